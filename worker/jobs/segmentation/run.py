"""``segmentation``: one image padded to its bucket, through the shared batcher, then its instances, map and
overlay stored."""

from __future__ import annotations

import io
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from pycocotools import mask as coco_mask

from worker.context import JobContext
from worker.jobs.segmentation.model import Found, batcher_for, decode_image, instance_map_png, postprocess, preprocess
from worker.jobs.segmentation.spec import SEGMENTATION, Input, Instance, Output, RleMask
from worker.models.cache import get_cache

STAGES = ("preprocess", "model", "postprocess", "upload")


def run(ctx: JobContext, params: Input) -> Output:
    cache = get_cache()
    segmenter = cache.load(SEGMENTATION, params.model)
    settings = cache.settings

    ctx.progress(0, len(STAGES), STAGES[0])
    image = decode_image(ctx.input_file(params.image))
    buckets = settings.segmentation_buckets_in_effect
    pixel_values, valid = preprocess(segmenter, image, settings.segmentation_image_size, buckets)

    ctx.check()
    ctx.progress(1, len(STAGES), STAGES[1])
    future = batcher_for(segmenter, cache).submit(pixel_values, valid)
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
        class_logits,
        mask_logits,
        valid,
        pixel_values.shape[-1],
        size,
        params.threshold,
        params.mask_threshold,
        params.overlap_mask_area_threshold,
    )
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


PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
    (170, 110, 40),
    (255, 250, 200),
    (128, 0, 0),
    (170, 255, 195),
    (128, 128, 0),
    (255, 215, 180),
]


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
