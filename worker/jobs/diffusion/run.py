"""The generation job types on a pipeline family: input files → one pipeline call → image artifacts.

Each job resolves its family through the model cache, prepares its images outside the family's
lock, takes its turn (waiting cancellably), runs one batch of ``num_outputs`` with a
``torch.Generator`` per output seeded ``seed + i``, reports every step, stops at the next step on
cancel or deadline, and decodes. Then it gives the lock back, and only then encodes and uploads
its images (``_store``, each image in a thread of its own: the encoders let go of the GIL), so the
next job of the worker (``worker_concurrency`` ≥ 2) denoises while this one's images are encoded
and uploaded; the job ends once they are stored.

Images are PNG (``output_format``, default), WebP or JPEG (at ``output_quality``). Each carries the
parameters that made it as JSON: in a ``parameters`` tEXt chunk (PNG) or in the EXIF UserComment
(WebP, JPEG; character code ``ASCII``, the JSON being ASCII).
"""

from __future__ import annotations

import contextvars
import io
import json
import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from db.settings import get_settings
from worker import metrics
from worker.context import JobContext
from worker.jobs.diffusion import lora
from worker.jobs.diffusion.batching import denoise_shared
from worker.jobs.diffusion.pipeline import Denoised, Family, StepHook, adain, decode, denoise, encode
from worker.jobs.diffusion.spec import (
    DEFAULT_OUTPUT_QUALITY,
    DIFFUSION,
    MAX_SEED,
    OUTPUT_FORMATS,
    GenerationInput,
    InpaintingInput,
    LoraRef,
    Output,
    StyleTransferInput,
    TextToImageInput,
)
from worker.jobs.spec import Artifact, JobError
from worker.models.cache import get_cache

PARAMETERS_KEY = "parameters"
PNG_COMPRESS_LEVEL = 1  # 512² photo-like: 26 ms and +17% bytes vs 123 ms at level 6, Pillow's default
EXIF_ASCII = b"ASCII\0\0\0"  # a UserComment starts with its character code, 8 bytes
JPEG_MAX_EXIF = 65_533  # one APP1 segment: the length field (2 bytes) counts itself
MASK_ASPECT_TOLERANCE = 0.01


def text_to_image(ctx: JobContext, params: TextToImageInput) -> Output:
    family = _family(ctx, params.model)
    loras = _loras(ctx, params.loras, family.model)
    seeds = _seeds(params.seed, params.num_outputs)
    ctx.check()
    # Shared with the other text-to-image jobs waiting for this model that can share a call (batching.py).
    result, shared_with, holding = denoise_shared(
        family,
        params.scheduler,
        _on_step(ctx),
        loras,
        ctx.should_stop,
        lambda: ctx.progress(0, None, "waiting for the model"),
        prompt=params.prompt,
        negative_prompt=params.negative_prompt,
        generators=_generators(seeds),
        width=params.width,
        height=params.height,
        num_inference_steps=params.num_inference_steps,
        guidance_scale=params.guidance_scale,
    )
    try:
        pixels = _decoded(ctx, family, result, shared_with=shared_with)
    finally:
        if holding:
            family.lock.release()
    return _store(ctx, "text_to_image", params, family, pixels, seeds, result.total)


def inpaint(ctx: JobContext, params: InpaintingInput) -> Output:
    family = _family(ctx, params.model)
    loras = _loras(ctx, params.loras, family.model)
    image = decode_image(ctx.input_file(params.image), "image")
    mask = fit_mask(decode_image(ctx.input_file(params.mask), "mask").convert("L"), image.size)
    size = (params.width, params.height) if params.width and params.height else output_size(image.size, "image")
    image = image.resize(size, Image.Resampling.LANCZOS) if image.size != size else image
    repaint = np.asarray(mask.resize(size, Image.Resampling.BILINEAR) if mask.size != size else mask) >= 128
    seeds = _seeds(params.seed, params.num_outputs)
    kept = np.asarray(image, dtype=np.float32) / 255
    with _turn(ctx, family):
        steps = int(params.num_inference_steps * params.strength)
        if steps == 0:  # nothing to denoise: the input as is
            pixels = np.repeat(kept[None], params.num_outputs, axis=0)
        else:
            result = denoise(
                family,
                family.inpaint_pipeline(get_cache()),
                params.scheduler,
                _on_step(ctx),
                loras,
                prompt=params.prompt,
                negative_prompt=params.negative_prompt or None,
                image=image,
                mask_image=Image.fromarray(repaint.astype(np.uint8) * 255),
                width=size[0],
                height=size[1],
                strength=params.strength,
                num_inference_steps=params.num_inference_steps,
                guidance_scale=params.guidance_scale,
                num_images_per_prompt=params.num_outputs,
                generator=_generators(seeds),
            )
            pixels, steps = _decoded(ctx, family, result), result.total
    pixels = np.where(repaint[None, :, :, None], pixels, kept[None])  # outside the mask: the input, exactly
    return _store(ctx, "inpainting", params, family, pixels, seeds, steps)


def style_transfer(ctx: JobContext, params: StyleTransferInput) -> Output:
    family = _family(ctx, params.model)
    loras = _loras(ctx, params.loras, family.model)
    content = decode_image(ctx.input_file(params.content_image), "content_image")
    style = decode_image(ctx.input_file(params.style_image), "style_image")
    width, height = output_size(content.size, "content image")
    pictures = family.image_to_image.image_processor.preprocess([content, style], height=height, width=width)
    seeds = _seeds(params.seed, params.num_outputs)
    with _turn(ctx, family):
        ctx.progress(0, None, "encoding")
        latents = encode(family, pictures)
        mixed = adain(latents[:1], latents[1:], params.style_strength).repeat(params.num_outputs, 1, 1, 1)
        steps = int(params.num_inference_steps * params.strength)
        if steps == 0:  # nothing to denoise: the AdaIN result
            ctx.progress(0, 0, "decoding")
            pixels = decode(family, mixed)
        else:
            # With an IP-Adapter in the catalog, the style image also conditions every step through it.
            with family.style_pipeline(get_cache(), style, params.style_strength) as styled:
                result = denoise(
                    family,
                    styled.pipe,
                    params.scheduler,
                    _on_step(ctx),
                    loras,
                    prompt=params.prompt,
                    negative_prompt=params.negative_prompt or None,
                    image=mixed,  # 4 channels: taken as latents, not encoded again
                    strength=params.strength,
                    num_inference_steps=params.num_inference_steps,
                    guidance_scale=params.guidance_scale,
                    num_images_per_prompt=params.num_outputs,
                    generator=_generators(seeds),
                    **styled.call,
                )
            pixels, steps = _decoded(ctx, family, result), result.total
    return _store(ctx, "style_transfer", params, family, pixels, seeds, steps)


# --- the steps every job shares ---------------------------------------------------------------------


def _family(ctx: JobContext, model: str | None) -> Family:
    family: Family = get_cache().load(DIFFUSION, model, on_miss=lambda: ctx.progress(0, None, "loading model"))
    return family


def _loras(ctx: JobContext, refs: list[LoraRef], base_model: str) -> list[lora.Lora]:
    """The job's LoRAs (looked up again: one may have been deleted since submit), on local disk."""
    if not refs:
        return []
    found = ctx.tenant_models([ref.model for ref in refs])
    return lora.resolve([(ref.model, ref.scale) for ref in refs], found, base_model, ctx.settings)


@contextmanager
def _turn(ctx: JobContext, family: Family) -> Iterator[None]:
    """Hold the family's lock; while another run has it, keep honouring cancel and the deadline."""
    if not family.lock.acquire(blocking=False):
        ctx.progress(0, None, "waiting for the model")
        while not family.lock.acquire(timeout=0.1):
            ctx.check()
    try:
        ctx.check()
        yield
    finally:
        family.lock.release()


def _on_step(ctx: JobContext) -> StepHook:
    def on_step(steps_run: int, total: int) -> bool:
        ctx.progress(steps_run, total, "denoising")
        if ctx.should_stop():
            ctx.progress(steps_run, total, "stopping")  # a timeline milestone: the step at which the stop was seen
            return True
        return False

    return on_step


def _decoded(ctx: JobContext, family: Family, result: Denoised, **details: Any) -> Any:
    if result.stopped:
        ctx.progress(result.steps_run, result.total, "stopped", steps_run=result.steps_run)
        ctx.check()  # raises Canceled, DeadlineExceeded or LeaseLost: the reasons a run is stopped
        raise JobError("the run stopped before its last step", "interrupted")
    ctx.progress(result.steps_run, result.total, "decoding", steps_run=result.steps_run, **details)
    get_cache().count(family.key, "batches")
    get_cache().count(family.key, "steps", result.steps_run)
    return decode(family, result.latents)


def _seeds(seed: int | None, count: int) -> list[int]:
    first = seed if seed is not None else secrets.randbelow(MAX_SEED + 1)
    return [first + i for i in range(count)]


def _generators(seeds: list[int]) -> list[torch.Generator]:
    # On the CPU whatever the device: the starting noise of a seed is then the same everywhere.
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


def _store(
    ctx: JobContext,
    job_type: str,
    params: GenerationInput,
    family: Family,
    pixels: Any,
    seeds: list[int],
    steps: int,
) -> Output:
    """Encode and upload the images: called after the family's lock is given back (the next job's turn)."""
    ctx.check()
    get_cache().count(family.key, "images", len(seeds))
    metrics.BATCH_SIZE.labels(metrics.model_name(family.key)).observe(len(seeds))
    ctx.progress(steps, steps, "storing")
    height, width = pixels.shape[1:3]
    output_format = params.output_format
    extension, content_type = OUTPUT_FORMATS[output_format]
    # PNG's record is what it was before WebP and JPEG existed (same bytes for the same job); a lossy image's
    # also says how it was encoded.
    encoding = {} if output_format == "png" else {"output_format": output_format, "output_quality": params.quality}
    record = {
        "type": job_type,
        **params.model_dump(mode="json", exclude={"output_format", "output_quality"}),
        **encoding,
        "model": family.model,
        "width": width,
        "height": height,
    }

    def encode_and_store(index: int) -> Artifact:
        ctx.check()  # a cancel (or a lost lease) seen while the batch's other images were stored: no more uploads
        try:
            data = encode_image(pixels[index], {**record, "seed": seeds[index]}, output_format, params.quality)
        except (OSError, ValueError, TypeError) as exc:
            raise JobError(f"image {index} could not be encoded as {output_format}: {exc}", "encoding_failed") from exc
        return ctx.store(f"image-{index}.{extension}", data, content_type)

    if len(seeds) == 1:
        images = [encode_and_store(0)]
    else:  # zlib, libwebp and libjpeg let go of the GIL: a batch's images encode (and upload) side by side
        with ThreadPoolExecutor(max_workers=len(seeds), thread_name_prefix=f"encode-{ctx.job_id}") as pool:
            # Each in a copy of this thread's context: log lines and trace spans stay the job's.
            futures = [
                pool.submit(contextvars.copy_context().run, encode_and_store, index) for index in range(len(seeds))
            ]
            images = [future.result() for future in futures]  # the first failure, in image order
    return Output(images=images, seed=seeds[0], seeds=seeds)


# --- images -----------------------------------------------------------------------------------------


def decode_image(data: bytes, field: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return ImageOps.exif_transpose(image).convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise JobError(f"`{field}` could not be decoded as an image: {exc}", "invalid_image") from None


def output_size(size: tuple[int, int], what: str) -> tuple[int, int]:
    """An input image's size rounded to multiples of 8, within the configured generation limits."""
    width, height = (max(8, int(side / 8 + 0.5) * 8) for side in size)  # halves round up
    settings = get_settings()
    if (
        width > settings.generation_max_width
        or height > settings.generation_max_height
        or width * height > settings.generation_max_pixels
    ):
        raise JobError(
            f"The {what} is {size[0]}×{size[1]} pixels; this service generates at most "
            f"{settings.generation_max_width}×{settings.generation_max_height} and "
            f"{settings.generation_max_pixels} pixels. Send a smaller image.",
            "image_too_large",
        )
    return width, height


def fit_mask(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The mask at the image's size: resized when only its resolution differs, refused when its shape does."""
    if mask.size == size:
        return mask
    if abs(mask.width / mask.height - size[0] / size[1]) > MASK_ASPECT_TOLERANCE * size[0] / size[1]:
        raise JobError(
            f"The mask is {mask.width}×{mask.height} pixels but the image is {size[0]}×{size[1]}: "
            "the mask must have the image's size, or at least its aspect ratio.",
            "invalid_mask",
        )
    return mask.resize(size, Image.Resampling.BILINEAR)


def encode_image(
    pixels: Any, parameters: dict[str, Any], output_format: str = "png", quality: int = DEFAULT_OUTPUT_QUALITY
) -> bytes:
    """Float pixels in [0, 1] (H, W, 3) → image bytes with ``parameters`` as JSON: a ``parameters`` tEXt chunk
    in a PNG, the EXIF UserComment in a WebP or JPEG (a JPEG whose parameters do not fit in its one EXIF segment,
    64 KB, only with prompts far over the default limit, is stored without them)."""
    array = (np.clip(pixels, 0, 1) * 255).round().astype(np.uint8)
    text = json.dumps(parameters, ensure_ascii=True, separators=(",", ":"))
    image = Image.fromarray(array)
    buffer = io.BytesIO()
    if output_format == "png":
        info = PngImagePlugin.PngInfo()
        info.add_text(PARAMETERS_KEY, text)
        image.save(buffer, format="PNG", pnginfo=info, compress_level=PNG_COMPRESS_LEVEL)
        return buffer.getvalue()
    exif = Image.Exif()
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment] = EXIF_ASCII + text.encode("ascii")
    metadata = exif.tobytes()
    if output_format == "jpeg":
        image.save(buffer, format="JPEG", quality=quality, exif=metadata if len(metadata) <= JPEG_MAX_EXIF else b"")
    elif output_format == "webp":
        image.save(buffer, format="WEBP", quality=quality, exif=metadata)
    else:
        raise ValueError(f"unknown output format {output_format!r}")
    return buffer.getvalue()
