"""Mask2Former instance segmentation: loading, dynamic batching, post-processing, outputs.

Every image is resized (by the model's image processor) to fit an N×N canvas and padded
to it, so a batch of different-sized images is exactly N single runs stacked: batched and
one-at-a-time results agree to float tolerance, and each result is cut back to its own size.
"""

from __future__ import annotations

import io
import logging
import math
import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps, UnidentifiedImageError
from pycocotools import mask as coco_mask

from worker.jobs.base import JobError
from worker.jobs.segmentation import Input, Instance, Output, RleMask
from worker.models.cache import ModelCache, get_cache
from worker.models.catalog import ModelEntry

if TYPE_CHECKING:
    from worker.context import JobContext

log = logging.getLogger(__name__)

STAGES = ("preprocess", "model", "postprocess", "upload")
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


def load_segmenter(entry: ModelEntry, folder: Path, device: str, dtype: torch.dtype) -> Segmenter:
    from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

    processor = AutoImageProcessor.from_pretrained(folder)
    model = Mask2FormerForUniversalSegmentation.from_pretrained(folder, use_safetensors=True, dtype=dtype)
    model = model.to(device).eval()
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    return Segmenter(key=f"segmentation:{entry.name}", model=model, processor=processor, id2label=id2label,
                     device=device, dtype=dtype)


# --- batching -----------------------------------------------------------------------


@dataclass
class _Request:
    pixel_values: torch.Tensor  # (3, N, N), normalized and padded
    future: Future[tuple[torch.Tensor, torch.Tensor]]


class Batcher:
    """Collects concurrent requests for one model and runs them as one forward pass."""

    def __init__(self, segmenter: Segmenter, cache: ModelCache, max_batch_size: int, max_wait_ms: float) -> None:
        self.segmenter = segmenter
        self.cache = cache
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self._queue: queue.Queue[_Request] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{segmenter.key}", daemon=True)
        self._thread.start()

    def submit(self, pixel_values: torch.Tensor) -> Future[tuple[torch.Tensor, torch.Tensor]]:
        request = _Request(pixel_values, Future())
        self._queue.put(request)
        return request.future

    def _loop(self) -> None:
        while True:
            batch = [self._queue.get()]
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch_size:
                remaining = deadline - time.monotonic()
                try:
                    batch.append(self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait())
                except queue.Empty:
                    break
            live = [r for r in batch if r.future.set_running_or_notify_cancel()]  # drop canceled jobs
            if live:
                self._run(live)

    def _run(self, batch: list[_Request]) -> None:
        try:
            results = self.forward(torch.stack([r.pixel_values for r in batch]))
        except Exception as exc:
            if len(batch) == 1:
                batch[0].future.set_exception(exc)
                return
            # Find the culprit: a failure must not take the batch's neighbours down with it.
            log.warning("batch of %d failed (%s); running its images one by one", len(batch), exc)
            for request in batch:
                try:
                    request.future.set_result(self.forward(request.pixel_values[None])[0])
                except Exception as single:
                    request.future.set_exception(single)
            return
        for request, result in zip(batch, results, strict=True):
            request.future.set_result(result)

    def forward(self, pixel_values: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        seg = self.segmenter
        with torch.inference_mode():
            outputs = seg.model(pixel_values=pixel_values.to(seg.device, seg.dtype))
        self.cache.count(seg.key, "forward_passes")
        self.cache.count(seg.key, "batched_images", len(pixel_values))
        classes = outputs.class_queries_logits.float()
        masks = outputs.masks_queries_logits.float()
        return [(classes[i], masks[i]) for i in range(len(pixel_values))]


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


def decode_image(data: bytes) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image = ImageOps.exif_transpose(image)
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise JobError(f"the input image could not be decoded: {exc}", "invalid_image") from None


def preprocess(segmenter: Segmenter, image: Image.Image, canvas: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Resize to fit ``canvas``×``canvas`` with the model's processor, then pad; returns the valid (h, w)."""
    size = {"shortest_edge": canvas, "longest_edge": canvas}
    inputs = segmenter.processor(images=[image], size=size, size_divisor=0, return_tensors="pt")
    pixels = inputs["pixel_values"][0]
    height, width = pixels.shape[-2:]
    padded = torch.zeros((3, canvas, canvas), dtype=pixels.dtype)
    padded[:, :height, :width] = pixels
    return padded, (int(height), int(width))


@dataclass
class Found:
    label_id: int
    score: float
    mask: np.ndarray  # bool (H, W)


def postprocess(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    valid: tuple[int, int],
    canvas: int,
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

    # Crop the padded canvas away (masks are at 1/4 of the canvas), then go to the original size.
    scale = mask_logits.shape[-1] / canvas
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
        for i in range(len(chunk)):
            score = float(top_scores[start + i] * mask_scores[i])
            if score >= threshold and bool(binary[i].any()):
                found.append(Found(int(labels[start + i]), score, binary[i].numpy()))

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


def encode_instances(found: list[Found], id2label: dict[int, str]) -> list[Instance]:
    instances = []
    for number, item in enumerate(found, start=1):
        rle = coco_mask.encode(np.asfortranarray(item.mask.astype(np.uint8)))
        x, y, w, h = (float(v) for v in coco_mask.toBbox(rle))
        instances.append(
            Instance(
                id=number,
                label=id2label.get(item.label_id, str(item.label_id)),
                label_id=item.label_id,
                score=round(item.score, 6),
                bbox=[x, y, w, h],
                area=int(coco_mask.area(rle)),
                mask=RleMask(size=[int(v) for v in rle["size"]], counts=rle["counts"].decode("ascii")),
            )
        )
    return instances


def instance_map_png(found: list[Found], size: tuple[int, int]) -> bytes:
    height, width = size
    dtype = np.uint8 if len(found) <= 255 else np.uint16
    pixels = np.zeros((height, width), dtype=dtype)
    for number, item in enumerate(found, start=1):
        pixels[item.mask] = number
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
]  # fmt: skip


def overlay_png(image: Image.Image, found: list[Found], instances: list[Instance]) -> bytes:
    """The input with each instance tinted, outlined and labelled: the picture a person checks first."""
    base = np.asarray(image, dtype=np.float32).copy()
    edges = []
    for number, item in enumerate(found, start=1):
        color = np.array(PALETTE[(number - 1) % len(PALETTE)], dtype=np.float32)
        base[item.mask] = base[item.mask] * 0.5 + color * 0.5
        mask_image = Image.fromarray(item.mask.astype(np.uint8) * 255)
        inner = np.asarray(mask_image.filter(_ERODE)) > 0
        edges.append((item.mask & ~inner, color))
    for edge, color in edges:
        base[edge] = color
    picture = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    font = _font(max(11, min(picture.size) // 40))
    for number, instance in enumerate(instances, start=1):
        x, y = instance.bbox[0], instance.bbox[1]
        text = f"{instance.label} {instance.score:.2f}"
        left, top, right, bottom = draw.textbbox((x, y), text, font=font)
        draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=PALETTE[(number - 1) % len(PALETTE)])
        draw.text((x, y), text, fill=(0, 0, 0), font=font)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


_ERODE = ImageFilter.MinFilter(3)


# --- the job ------------------------------------------------------------------------------


def segment(ctx: JobContext, params: Input) -> Output:
    cache = get_cache()
    entry = cache.entry(params.model, "segmentation")
    segmenter = cache.get(f"segmentation:{entry.name}", entry, load_segmenter)
    canvas = cache.settings.segmentation_image_size

    ctx.progress(0, len(STAGES), STAGES[0])
    image = decode_image(ctx.input_file(params.image))
    pixel_values, valid = preprocess(segmenter, image, canvas)

    ctx.check()
    ctx.progress(1, len(STAGES), STAGES[1])
    future = batcher_for(segmenter, cache).submit(pixel_values)
    while True:
        try:
            class_logits, mask_logits = future.result(timeout=0.05)
            break
        except FutureTimeout:
            try:
                ctx.check()
            except BaseException:
                future.cancel()
                raise

    ctx.progress(2, len(STAGES), STAGES[2])
    size = (image.height, image.width)
    found = postprocess(
        class_logits, mask_logits, valid, canvas, size,
        params.threshold, params.mask_threshold, params.overlap_mask_area_threshold,
    )  # fmt: skip
    if params.labels is not None:
        wanted = set(params.labels)
        found = [f for f in found if segmenter.id2label.get(f.label_id) in wanted]
    instances = encode_instances(found, segmenter.id2label)
    map_png = instance_map_png(found, size)
    overlay = overlay_png(image, found, instances)

    ctx.check()
    ctx.progress(3, len(STAGES), STAGES[3])
    return Output(
        width=image.width,
        height=image.height,
        instances=instances,
        instance_map=ctx.store("instance_map.png", map_png, "image/png"),
        overlay=ctx.store("overlay.png", overlay, "image/png"),
    )
