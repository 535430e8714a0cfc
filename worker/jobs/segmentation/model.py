"""Mask2Former instance segmentation: loading, dynamic batching, pre- and post-processing.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from worker import metrics
from worker.jobs.segmentation.spec import SEGMENTATION
from worker.jobs.spec import JobError
from worker.models.cache import ModelCache
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


def load_segmenter(entry: ModelEntry, folder: Path, device: str, dtype: torch.dtype) -> Segmenter:
    from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

    processor = AutoImageProcessor.from_pretrained(folder)
    model = Mask2FormerForUniversalSegmentation.from_pretrained(folder, use_safetensors=True, dtype=dtype)
    model = model.to(device).eval()
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    return Segmenter(
        key=SEGMENTATION.cache_key(entry.name),
        model=model,
        processor=processor,
        id2label=id2label,
        device=device,
        dtype=dtype,
    )


def warm_segmenter(segmenter: Segmenter, sizes: list[str], settings: Any) -> list[str]:
    """One forward pass of a batch of 1 and of a full batch on the canvas (``segmentation_image_size``:
    every job's images are padded to it, so the operator's warm sizes change nothing here)."""
    canvas = settings.segmentation_image_size
    warmed = []
    for batch in sorted({1, max(1, settings.segmentation_max_batch_size)}):
        pixels = torch.zeros(batch, 3, canvas, canvas, device=segmenter.device, dtype=segmenter.dtype)
        with torch.inference_mode():
            segmenter.model(pixel_values=pixels)
        warmed.append(f"{canvas}x{canvas} batch {batch}")
    return warmed


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
        metrics.BATCH_SIZE.labels(metrics.model_name(seg.key)).observe(len(pixel_values))
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
