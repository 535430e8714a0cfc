"""The ``finetune`` job: its training set, the training run with checkpoints and resume, and its model.

The frozen parts come from the warm pipeline family in the model cache (VAE, text encoder,
tokenizer, scheduler config: shared with generation, never modified); ``trainer.py`` holds the
UNet being trained. The training set is read (and checked again), resized and
centre-cropped, and encoded once: image latents by the VAE, each distinct caption by the text
encoder. Every ``checkpoint_every`` steps the trainer's state goes to
``jobs/<id>/checkpoints/``, with the encoded latents once per job, so a requeued attempt resumes
without encoding the images again. When training ends the LoRA is stored as the tenant's model
and the checkpoints are deleted; a canceled or failed job keeps its newest checkpoint.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from db.models import Model, ModelOrigin, new_id
from db.storage import StorageError
from db.wire import LORA_WEIGHTS_NAME, model_json
from worker.context import Checkpoint, JobContext
from worker.jobs.diffusion.pipeline import Family, guard_out_of_memory, release_memory
from worker.jobs.diffusion.spec import DIFFUSION
from worker.jobs.finetune.spec import Input, LossPoint, Output
from worker.jobs.finetune.trainer import (
    TARGET_MODULES,
    Encoded,
    Trainer,
    TrainingConfig,
    latents_file,
    read_latents,
)
from worker.jobs.finetune.training_data import DatasetError, Sample, check_image, dataset_limits, read_dataset
from worker.jobs.spec import JobError
from worker.models.cache import get_cache

log = logging.getLogger(__name__)

ENCODE_BATCH = 8


# --- the training set ---------------------------------------------------------------------------


def load_samples(ctx: JobContext, params: Input) -> list[Sample]:
    limits = dataset_limits(ctx.settings)
    try:
        if params.dataset is not None:
            return read_dataset(ctx.input_file(params.dataset), limits)
        samples = []
        for index, file_id in enumerate(params.images or []):
            ctx.check()  # a long list of images: cancel and the deadline apply while they download
            data = ctx.input_file(file_id)
            width, height = check_image(file_id, data, limits)
            caption = params.captions[index] if params.captions else None
            samples.append(Sample(file_id, data, caption or None, width, height))
        return samples
    except DatasetError as exc:
        raise JobError(f"The training set cannot be used: {exc}", "invalid_dataset") from None


def square_pixels(data: bytes, resolution: int) -> np.ndarray:
    """An image resized so its short side is ``resolution``, centre-cropped square, in [-1, 1] (3, H, W)."""
    import io

    from PIL import ImageOps

    with Image.open(io.BytesIO(data)) as image:
        picture = ImageOps.exif_transpose(image).convert("RGB")
    scale = resolution / min(picture.size)
    size = (max(resolution, round(picture.width * scale)), max(resolution, round(picture.height * scale)))
    picture = picture.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    picture = picture.crop((left, top, left + resolution, top + resolution))
    return (np.asarray(picture, dtype=np.float32) / 127.5 - 1.0).transpose(2, 0, 1)


def encode_samples(
    family: Family,
    samples: list[Sample],
    resolution: int,
    instance_prompt: str,
    device: str,
    latents: tuple[torch.Tensor, torch.Tensor] | None,
    check: Callable[[], None] = lambda: None,
) -> Encoded:
    """Latent distributions (unless ``latents`` brings them, from an earlier attempt) and caption features;
    ``check()`` (cancel, deadline, lease) before each batch of images, so a large training set stops early."""
    vae, text_encoder, tokenizer = family.vae, family.text_to_image.text_encoder, family.text_to_image.tokenizer
    with torch.inference_mode():
        if latents is None:
            means, stds = [], []
            for start in range(0, len(samples), ENCODE_BATCH):
                check()
                chunk = samples[start : start + ENCODE_BATCH]
                pixels = torch.from_numpy(np.stack([square_pixels(s.image, resolution) for s in chunk]))
                posterior = vae.encode(pixels.to(device, vae.dtype)).latent_dist
                means.append((posterior.mean * vae.config.scaling_factor).float().cpu())
                stds.append((posterior.std * vae.config.scaling_factor).float().cpu())
            # Contiguous, as latents read back from a checkpoint are: a channels-last layout here would pick
            # other conv kernels in the UNet, and a resumed run would drift from an uninterrupted one.
            latents = torch.cat(means).contiguous(), torch.cat(stds).contiguous()
        captions = [s.caption if s.caption is not None else instance_prompt for s in samples]
        distinct = list(dict.fromkeys(captions))
        texts = []
        for start in range(0, len(distinct), ENCODE_BATCH):
            ids = tokenizer(
                distinct[start : start + ENCODE_BATCH],
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            texts.append(text_encoder(ids.to(device))[0].float().cpu())
    row = {caption: index for index, caption in enumerate(distinct)}
    return Encoded(*latents, torch.cat(texts), torch.tensor([row[c] for c in captions]))


# --- the job ------------------------------------------------------------------------------------------


def run(ctx: JobContext, params: Input) -> Output:
    cache = get_cache()
    entry = cache.entry(params.base_model, DIFFUSION.name)
    ctx.progress(0, params.steps, "preparing")
    family: Family = cache.load(DIFFUSION, entry.name)
    folder = cache.local_folder(entry)
    samples = load_samples(ctx, params)
    ctx.check()

    try:
        resumed_from, weights, curve, rate = _run_training(ctx, params, family, folder, samples)
    finally:
        release_memory(family.device)  # the run's UNet copy, optimizer and encodings are unreferenced by now
    return _result(ctx, params, entry.name, len(samples), resumed_from, weights, curve, rate)


def _run_training(
    ctx: JobContext, params: Input, family: Family, folder: Path, samples: list[Sample]
) -> tuple[int | None, bytes, list[dict[str, float]], float]:
    checkpoint = ctx.latest_checkpoint()
    stored = _stored_latents(ctx, checkpoint, len(samples), params.resolution)
    ctx.progress(0, params.steps, "encoding the training set")
    encode = functools.partial(
        encode_samples, family, samples, params.resolution, params.instance_prompt, family.device, stored, ctx.check
    )
    encoded = guard_out_of_memory(family.device, "encoding the training set", encode)
    ctx.progress(0, params.steps, "loading the UNet")
    trainer = guard_out_of_memory(
        family.device,
        "preparing the UNet",
        functools.partial(Trainer, folder, training_config(params), encoded, family),
    )
    resumed_from = _resume(ctx, trainer, checkpoint)
    latents_key = checkpoint.details.get("latents_key") if checkpoint is not None and stored is not None else None
    _train(ctx, trainer, params.checkpoint_every, latents_key)
    return resumed_from, trainer.lora_weights(), trainer.loss.points, trainer.rate


def training_config(params: Input) -> TrainingConfig:
    """What the trainer needs of the job's input."""
    return TrainingConfig(
        steps=params.steps,
        learning_rate=params.learning_rate,
        rank=params.rank,
        alpha=params.alpha,
        batch_size=params.batch_size,
        gradient_accumulation_steps=params.gradient_accumulation_steps,
        seed=params.seed,
    )


def _train(ctx: JobContext, trainer: Trainer, checkpoint_every: int, latents_key: str | None) -> None:
    steps = trainer.config.steps
    started, first = time.monotonic(), trainer.step_count
    saved = first  # the step of the newest checkpoint (a resumed run starts at one)

    def save(step: int) -> None:
        nonlocal latents_key, saved
        if latents_key is None:  # once per job: a resumed attempt downloads them instead of encoding again
            latents_key = ctx.save_scratch("latents.safetensors", latents_file(trainer.encoded))
        ctx.checkpoint(step, trainer.checkpoint(), loss=trainer.loss.points[-1:] or None, latents_key=latents_key)
        saved = step

    while trainer.step_count < steps:
        if ctx.should_stop():
            if ctx.handing_back and trainer.step_count > saved:
                save(trainer.step_count)  # a draining worker: the next attempt resumes from here, nothing lost
            ctx.progress(trainer.step_count, steps, "stopped")  # a timeline milestone: where it stopped
            ctx.check()  # cancel, deadline, lost lease, hand-back: no further step (the last checkpoint stays)
        loss = guard_out_of_memory(trainer.device, "training", trainer.step)
        step = trainer.step_count
        trainer.rate = (step - first) / max(time.monotonic() - started, 1e-9)
        ctx.progress(step, steps, "training", loss=round(loss, 6), steps_per_second=round(trainer.rate, 4))
        if step % checkpoint_every == 0 and step < steps:
            save(step)
    # A milestone as the last step ends: the timeline separates training from making the weights file.
    ctx.progress(trainer.step_count, steps, "training done", steps_per_second=round(trainer.rate, 4))


def _stored_latents(
    ctx: JobContext, checkpoint: Checkpoint | None, count: int, resolution: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The training set's latents as an earlier attempt stored them, if it did (and they fit)."""
    latents_key = checkpoint.details.get("latents_key") if checkpoint is not None else None
    if not latents_key:
        return None
    try:
        return read_latents(ctx.load_scratch(latents_key), count, resolution)
    except (StorageError, KeyError, ValueError, RuntimeError) as exc:
        log.warning("job %s: the stored latents cannot be used (%s); encoding again", ctx.job_id, exc)
        return None


def _resume(ctx: JobContext, trainer: Trainer, checkpoint: Checkpoint | None) -> int | None:
    """Continue from the job's newest checkpoint, if an earlier attempt stored one; the step resumed from."""
    if checkpoint is None:
        return None
    started = time.monotonic()
    try:
        trainer.restore(ctx.load_scratch(checkpoint.key))
    except (StorageError, KeyError, ValueError, RuntimeError) as exc:
        log.warning(
            "job %s: the checkpoint at step %d cannot be used (%s); starting over", ctx.job_id, checkpoint.step, exc
        )
        ctx.progress(0, trainer.config.steps, "checkpoint unusable, starting over")
        return None
    seconds = time.monotonic() - started
    ctx.resumed(checkpoint, load_seconds=round(seconds, 3))
    log.info(
        "job %s attempt %d resumed from step %d (checkpoint loaded in %.2f s)",
        ctx.job_id,
        ctx.attempt,
        checkpoint.step,
        seconds,
    )
    return checkpoint.step


def _result(
    ctx: JobContext,
    params: Input,
    base: str,
    images: int,
    resumed_from: int | None,
    weights: bytes,
    curve: list[dict[str, float]],
    rate: float,
) -> Output:
    ctx.check()
    ctx.progress(
        params.steps,
        params.steps,
        "storing",
        loss=round(curve[-1]["loss"], 6) if curve else None,
        steps_per_second=round(rate, 4),
    )
    model_id = new_id("mdl")
    key = f"models/{model_id}/{LORA_WEIGHTS_NAME}"
    artifact = ctx.store(LORA_WEIGHTS_NAME, weights, "application/octet-stream", key=key)
    ctx.drop_scratch()  # the weights are the result now: the checkpoints (and stored latents) of every attempt can go
    row = {
        "id": model_id,
        "tenant_id": ctx.tenant_id,
        "name": params.name or f"{base} LoRA ({ctx.job_id})",
        "kind": ModelOrigin.LORA.value,
        "base_model": base,
        "storage_key": key,
        "size": artifact.size,
        "sha256": artifact.sha256,
        "details": {
            "rank": params.rank,
            "alpha": params.alpha or params.rank,
            "steps": params.steps,
            "resolution": params.resolution,
            "learning_rate": params.learning_rate,
            "batch_size": params.batch_size,
            "gradient_accumulation_steps": params.gradient_accumulation_steps,
            "images": images,
            "seed": params.seed,
            "target_modules": TARGET_MODULES,
        },
    }
    ctx.add_model(row)
    return Output(
        model=model_json(Model(**row, job_id=ctx.job_id), urls=False),
        weights=artifact,
        loss=[LossPoint(**point) for point in curve],
        steps=params.steps,
        seed=params.seed,
        images=images,
        resumed_from=resumed_from,
    )
