"""Mask2Former instance segmentation: loading, dynamic batching, pre- and post-processing.

Every image is resized (by the model's image processor) to fit the N×N canvas, aspect kept, and
padded to the smallest bucket that holds it (``segmentation_buckets``: N×N, 4:3 and 16:9 shapes by
default), so a 4:3 or 16:9 image does not spend a quarter or more of its pixels on padding. An image
goes to the same bucket whether it runs alone or with others, and only images of one bucket are
stacked, so a batch is exactly its images' single runs stacked: batched and one-at-a-time results
agree to float tolerance, and each result is cut back to its own size.

The whole path stays in the model's dtype (fp16 on CUDA by default) on the model's device until the
logits, which are cast to fp32 there; post-processing runs on the logits' device (``postprocess``).

With ``torch_compile`` the forward pass is compiled with static shapes: one graph per (bucket, batch
size), batches padded to the next of a few sizes (``padded_batch_sizes``), every graph built by the
worker's warm-up (``warm_segmenter``) in the batcher's own thread, where jobs run them.
"""

from __future__ import annotations

import io
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from db.settings import Bucket, Settings, get_settings
from worker import metrics
from worker.jobs.segmentation.spec import SEGMENTATION
from worker.jobs.spec import JobError
from worker.models.cache import ModelCache, get_cache
from worker.models.catalog import ModelEntry

log = logging.getLogger(__name__)

UPSAMPLE_CHUNK = 16  # masks upsampled to full size at a time (bounds memory on large images)


@dataclass
class Segmenter:
    key: str
    model: Any
    processor: Any
    id2label: dict[int, str]
    device: str
    dtype: torch.dtype
    batcher: Batcher | None = field(default=None, repr=False)
    # The model's forward as called by the batcher: the model itself, or its torch.compile'd version.
    forward: Callable[..., Any] | None = field(default=None, repr=False)
    compiled: bool = False

    def __call__(self, pixel_values: torch.Tensor) -> Any:
        return (self.model if self.forward is None else self.forward)(pixel_values=pixel_values)


def load_segmenter(entry: ModelEntry, folder: Path, device: str, dtype: torch.dtype) -> Segmenter:
    from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

    processor = AutoImageProcessor.from_pretrained(folder)
    model = Mask2FormerForUniversalSegmentation.from_pretrained(folder, use_safetensors=True, dtype=dtype)
    model = model.to(device).eval()
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    segmenter = Segmenter(
        key=SEGMENTATION.cache_key(entry.name),
        model=model,
        processor=processor,
        id2label=id2label,
        device=device,
        dtype=dtype,
    )
    settings = get_settings()
    if settings.torch_compile:
        compile_forward(segmenter, settings)
    return segmenter


def padded_batch_sizes(max_batch_size: int) -> list[int]:
    """The batch sizes a compiled forward runs: powers of two below ``max_batch_size``, and it (1, 2, 4, 8 for
    8; 1, 2, 4, 6 for 6). A batch is padded up to the next, so there are log2(max) + 1 graphs per bucket, not max."""
    sizes = {max_batch_size}
    size = 1
    while size < max_batch_size:
        sizes.add(size)
        size *= 2
    return sorted(sizes)


def compile_forward(segmenter: Segmenter, settings: Settings) -> None:
    """``torch.compile`` the model's forward with static shapes: a graph per (bucket, padded batch size).

    With Inductor on CUDA the mode is ``reduce-overhead``: each graph is captured as a CUDA graph, so the
    hundreds of small kernel launches of Swin's windows and the decoder's layers are one replay (the
    shapes are fixed, which is what CUDA graphs need). Its outputs live in memory the next replay
    overwrites, so the batcher copies the logits out at once (``Batcher.forward``), and the graphs are
    recorded per thread, so the warm-up runs them in the batcher's thread (``warm_segmenter``). Another
    backend (``torch_compile_backend``: ``eager`` or ``aot_eager`` for tests on a CPU) gets no mode."""
    import torch._dynamo

    buckets = settings.segmentation_buckets_in_effect
    graphs = len(buckets) * len(padded_batch_sizes(settings.segmentation_max_batch_size))
    # Dynamo gives up compiling a function after recompile_limit shapes (8 by default) and runs it eagerly.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, graphs + 8)
    backend = settings.torch_compile_backend
    mode = "reduce-overhead" if backend == "inductor" and segmenter.device.startswith("cuda") else None
    segmenter.forward = torch.compile(segmenter.model, backend=backend, mode=mode, dynamic=False)
    segmenter.compiled = True
    log.info("%s: forward compiled (%s%s), %d graphs", segmenter.key, backend, f", {mode}" if mode else "", graphs)


def warm_segmenter(segmenter: Segmenter, sizes: list[str], settings: Any) -> list[str]:
    """Every bucket (``segmentation_buckets``) at batch 1 and the full batch (and, compiled, at each padded
    batch size), through the model's batcher (``warm_batcher``). Every job's images are padded to a bucket,
    so the operator's warm sizes change nothing here."""
    return warm_batcher(batcher_for(segmenter, get_cache()), settings)


def warm_batcher(batcher: Batcher, settings: Settings) -> list[str]:
    """A forward pass of zeros per (bucket, batch size) a job can run: batch 1 and ``batcher.max_batch_size``,
    or with a compiled forward each of its padded batch sizes, so that no job pays for building a graph. They
    run in the batcher's thread, where jobs run, as CUDA graphs are recorded per thread; not counted as jobs'."""
    seg = batcher.segmenter
    sizes = batcher.batch_sizes or sorted({1, batcher.max_batch_size})
    warmed = []
    for bucket in settings.segmentation_buckets_in_effect:
        for size in sizes:
            pixels = torch.zeros(size, 3, bucket.height, bucket.width, device=seg.device, dtype=seg.dtype)
            batcher.run_batch(pixels).result()
            warmed.append(f"{bucket} batch {size}")
    return warmed


# --- batching -----------------------------------------------------------------------

Result = tuple[torch.Tensor, torch.Tensor]  # one image's class logits (Q, C+1) and mask logits (Q, H/4, W/4)


@dataclass
class _Request:
    pixel_values: torch.Tensor  # (3, H, W) normalized and padded to its bucket; (B, 3, H, W) for a whole batch
    future: Future[Any]
    valid: tuple[int, int] | None = None  # the image's (h, w) within its bucket, for the padding figures
    arrived: float = field(default_factory=time.monotonic)
    whole: bool = False  # a batch of its own (the warm-up's), never stacked with others

    @property
    def bucket(self) -> tuple[int, int]:
        return (int(self.pixel_values.shape[-2]), int(self.pixel_values.shape[-1]))


class Batcher:
    """Collects concurrent requests for one model and runs those of one bucket as one forward pass.

    One thread per model. Each batch starts from the oldest waiting request: it takes the requests of
    that request's bucket (padded shape) that arrive within ``max_wait_ms`` of it, up to ``max_batch_size``,
    in arrival order; requests of other buckets stay queued, in order, for the next batches. The oldest
    request is always the next batch's, so none starves. Canceled requests drop out. When the forward is
    compiled, a batch is padded up to the next of ``padded_batch_sizes`` (zeros) and the padded rows
    dropped, so each bucket has a few graphs, not one per batch size."""

    def __init__(
        self,
        segmenter: Segmenter,
        cache: ModelCache,
        max_batch_size: int,
        max_wait_ms: float,
        pad_batches: bool | None = None,
    ) -> None:
        self.segmenter = segmenter
        self.cache = cache
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        pad = segmenter.compiled if pad_batches is None else pad_batches
        self.batch_sizes = padded_batch_sizes(max_batch_size) if pad else None
        self._pending: deque[_Request] = deque()
        self._ready = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{segmenter.key}", daemon=True)
        self._thread.start()

    def submit(self, pixel_values: torch.Tensor, valid: tuple[int, int] | None = None) -> Future[Result]:
        """One image, ``(3, H, W)`` padded to its bucket (``preprocess``); ``valid``: its (h, w) within it."""
        return self._put(_Request(pixel_values, Future(), valid))

    def run_batch(self, pixel_values: torch.Tensor) -> Future[list[Result]]:
        """A whole batch ``(B, 3, H, W)``, run as it is in the batcher's thread, with no other request
        (the warm-up: the graphs a compiled forward records there are the ones jobs replay)."""
        return self._put(_Request(pixel_values, Future(), whole=True))

    def _put(self, request: _Request) -> Future[Any]:
        with self._ready:
            self._pending.append(request)
            self._ready.notify()
        return request.future

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            live = [r for r in batch if r.future.set_running_or_notify_cancel()]  # drop canceled jobs
            if live:
                self._run(live)

    def _next_batch(self) -> list[_Request]:
        with self._ready:
            while True:
                self._pending = deque(r for r in self._pending if not r.future.cancelled())
                if not self._pending:
                    self._ready.wait()
                    continue
                head = self._pending[0]
                if head.whole:
                    return [self._pending.popleft()]
                same = [r for r in self._pending if not r.whole and r.bucket == head.bucket]
                remaining = head.arrived + self.max_wait - time.monotonic()
                if len(same) >= self.max_batch_size or remaining <= 0:
                    batch = same[: self.max_batch_size]
                    taken = {id(r) for r in batch}
                    self._pending = deque(r for r in self._pending if id(r) not in taken)
                    return batch
                self._ready.wait(remaining)

    def _run(self, batch: list[_Request]) -> None:
        if batch[0].whole:
            try:
                batch[0].future.set_result(self.forward(batch[0].pixel_values, record=False))
            except Exception as exc:
                batch[0].future.set_exception(exc)
            return
        try:
            results = self.forward(torch.stack([r.pixel_values for r in batch]), [r.valid for r in batch])
        except Exception as exc:
            if len(batch) == 1:
                batch[0].future.set_exception(exc)
                return
            # Find the culprit: a failure must not take the batch's neighbours down with it.
            log.warning("batch of %d failed (%s); running its images one by one", len(batch), exc)
            for request in batch:
                try:
                    request.future.set_result(self.forward(request.pixel_values[None], [request.valid])[0])
                except Exception as single:
                    request.future.set_exception(single)
            return
        for request, result in zip(batch, results, strict=True):
            request.future.set_result(result)

    def padded_size(self, count: int) -> int:
        """The batch size ``count`` images run at: the next of ``batch_sizes`` when padding, else ``count``."""
        if self.batch_sizes is None:
            return count
        return next((size for size in self.batch_sizes if size >= count), count)

    def forward(
        self, pixel_values: torch.Tensor, valid: Sequence[tuple[int, int] | None] | None = None, record: bool = True
    ) -> list[Result]:
        """One forward pass of a batch of one bucket; each image's logits, fp32, on the model's device.
        ``valid``: each image's (h, w) in the bucket, for the padding figures; ``record``: count the pass
        (the cache's counters, the metrics), which the warm-up does not."""
        seg = self.segmenter
        count = len(pixel_values)
        pixels = pixel_values.to(seg.device, seg.dtype)
        rows = self.padded_size(count)
        if rows > count:
            pixels = torch.cat([pixels, pixels.new_zeros((rows - count, *pixels.shape[1:]))])
        with torch.inference_mode():
            if seg.compiled and seg.device.startswith("cuda"):
                torch.compiler.cudagraph_mark_step_begin()  # a new replay: the last one's outputs are ours now
            outputs = seg(pixels)
            # A copy in any case (``.float()`` would return fp32 logits themselves): a CUDA graph's outputs
            # are overwritten by its next replay, and these go to other threads.
            classes = outputs.class_queries_logits[:count].to(torch.float32, copy=True)
            masks = outputs.masks_queries_logits[:count].to(torch.float32, copy=True)
        if record:
            self._record(count, pixels.shape[-2:], valid)
        return [(classes[i], masks[i]) for i in range(count)]

    def _record(self, count: int, shape: Any, valid: Sequence[tuple[int, int] | None] | None) -> None:
        seg = self.segmenter
        self.cache.count(seg.key, "forward_passes")
        self.cache.count(seg.key, "batched_images", count)
        model = metrics.model_name(seg.key)
        metrics.BATCH_SIZE.labels(model).observe(count)
        height, width = (int(side) for side in shape)
        known = [v for v in valid or [] if v is not None]
        if known:  # the share of the images' input pixels that is padding (rows padding the batch aside)
            padded = len(known) * height * width
            padding = padded - sum(h * w for h, w in known)
            self.cache.count(seg.key, "input_pixels", padded)
            self.cache.count(seg.key, "padding_pixels", padding)
            metrics.SEGMENTATION_PADDING.labels(model, f"{width}x{height}").observe(padding / padded)


_batchers_lock = threading.Lock()


def batcher_for(segmenter: Segmenter, cache: ModelCache) -> Batcher:
    with _batchers_lock:
        if segmenter.batcher is None:
            settings = cache.settings
            segmenter.batcher = Batcher(
                segmenter, cache, settings.segmentation_max_batch_size, settings.segmentation_max_wait_ms
            )
        return segmenter.batcher


# --- the stages ------------------------------------------------------------------------


def choose_bucket(height: int, width: int, buckets: Sequence[Bucket]) -> Bucket:
    """The smallest-area bucket that holds an ``height``×``width`` image (``buckets`` in any order; with the
    canvas among them, as ``Settings.segmentation_buckets_in_effect`` lists it, one holds every image)."""
    for bucket in sorted(buckets, key=lambda b: (b.area, b.height, b.width)):
        if bucket.height >= height and bucket.width >= width:
            return bucket
    raise ValueError(f"no bucket of {', '.join(map(str, buckets))} holds a {width}x{height} image")


def decode_image(data: bytes) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image = ImageOps.exif_transpose(image)
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise JobError(f"the input image could not be decoded: {exc}", "invalid_image") from None


def preprocess(
    segmenter: Segmenter, image: Image.Image, canvas: int, buckets: Sequence[Bucket] | None = None
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Resize to fit ``canvas``×``canvas`` (aspect kept) with the model's processor, then pad to the smallest
    of ``buckets`` that holds it (None: the canvas itself); returns the padded pixels and the valid (h, w)."""
    size = {"shortest_edge": canvas, "longest_edge": canvas}
    inputs = segmenter.processor(images=[image], size=size, size_divisor=0, return_tensors="pt")
    pixels = inputs["pixel_values"][0]
    height, width = (int(side) for side in pixels.shape[-2:])
    bucket = choose_bucket(height, width, buckets or [Bucket(canvas, canvas)])
    padded = torch.zeros((3, bucket.height, bucket.width), dtype=pixels.dtype)
    padded[:, :height, :width] = pixels
    return padded, (height, width)


@dataclass
class Found:
    label_id: int
    score: float
    mask: np.ndarray  # bool (H, W)


def postprocess(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    valid: tuple[int, int],
    padded_width: int,
    original: tuple[int, int],
    threshold: float,
    mask_threshold: float,
    overlap_mask_area_threshold: float,
) -> list[Found]:
    """Mask2Former's instance post-processing at the original size.

    The same algorithm as transformers' ``post_process_instance_segmentation`` (softmax
    class scores, top-k (query, class) pairs, score = class score × mean mask probability,
    later/higher instances painted over earlier ones), except that it honours
    ``mask_threshold`` and ``overlap_mask_area_threshold`` (transformers 5 ignores both),
    crops the padding away first, and upsamples only the masks that can pass ``threshold``.
    ``valid`` is the image's (h, w) within the padded input, ``padded_width`` that input's width (its
    bucket's, or the canvas's): the masks are at ``mask_logits.shape[-1] / padded_width`` of it.
    """
    num_queries, num_classes = class_logits.shape[0], class_logits.shape[1] - 1
    scores = class_logits.softmax(-1)[:, :-1]
    top_scores, top_index = scores.flatten().topk(num_queries, sorted=False)
    labels = top_index % num_classes
    queries = torch.div(top_index, num_classes, rounding_mode="floor")
    keep = top_scores >= threshold  # the final score is at most the class score
    if not keep.any():
        return []
    top_scores, labels, queries = top_scores[keep], labels[keep], queries[keep]

    # Crop the padding away (masks are at 1/4 of the padded input), then go to the original size.
    scale = mask_logits.shape[-1] / padded_width
    rows, cols = math.ceil(valid[0] * scale), math.ceil(valid[1] * scale)
    cropped = mask_logits[queries, :rows, :cols]
    height, width = original
    found: list[Found] = []
    for start in range(0, len(queries), UPSAMPLE_CHUNK):
        chunk = torch.nn.functional.interpolate(
            cropped[start : start + UPSAMPLE_CHUNK, None], size=(height, width), mode="bilinear", align_corners=False
        )[:, 0].sigmoid()
        binary = chunk > mask_threshold
        mask_scores = (chunk * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
        # Upsampling, thresholds and scores stay where the logits are (the GPU on a GPU worker); only the
        # chunk's boolean masks and scores come to the host, once.
        chunk_scores = (top_scores[start : start + len(chunk)] * mask_scores).tolist()
        masks = binary.cpu().numpy()
        for i, score in enumerate(chunk_scores):
            if score >= threshold and masks[i].any():
                found.append(Found(int(labels[start + i]), score, masks[i]))

    # Paint lowest score first so the most confident instance wins each pixel.
    found.sort(key=lambda f: f.score)
    owner = np.full((height, width), -1, dtype=np.int32)
    for index, instance in enumerate(found):
        owner[instance.mask] = index
    kept = []
    for index, instance in enumerate(found):
        visible = owner == index
        original_area = int(instance.mask.sum())
        if visible.sum() / original_area >= overlap_mask_area_threshold and visible.any():
            kept.append(Found(instance.label_id, instance.score, visible))
    kept.sort(key=lambda f: -f.score)
    return kept


def instance_map_png(found: list[Found], size: tuple[int, int]) -> bytes:
    height, width = size
    dtype = np.uint8 if len(found) <= 255 else np.uint16
    pixels = np.zeros((height, width), dtype=dtype)
    for number, item in enumerate(found, start=1):
        pixels[item.mask] = number
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()
