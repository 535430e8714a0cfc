"""LoRA fine-tuning of a diffusion family's UNet: the loop, its checkpoints, and the model it makes.

The frozen parts come from the warm pipeline family in the model cache (VAE, text encoder,
tokenizer, scheduler config: shared with generation, never modified); the UNet is a fresh copy
loaded from the same folder, with LoRA layers (peft) on its attention projections ``to_q``,
``to_k``, ``to_v`` and ``to_out.0``. Images and captions are encoded once up front: each image's
latent distribution (mean, std) and each caption's text features; every step then samples
latents from the distribution, noise and timesteps, and takes the standard noise-prediction
(or v-prediction, as the scheduler config says) MSE loss. AdamW on the LoRA parameters only,
gradient clipping at 1.0, optional accumulation; on CUDA the frozen UNet is in the cache's dtype
with autocast (and a gradient scaler for float16) while the LoRA parameters stay float32.

Reproducible: all randomness comes from one CPU ``torch.Generator`` seeded with the job's seed
(the LoRA initialisation included), and the order of images is a permutation per epoch seeded by
the seed and the epoch. A checkpoint (one safetensors file: LoRA and optimizer tensors, the
generator's state, the step and the loss curve as metadata; no pickle) therefore lets a requeued
run continue exactly where the stored one was: on the same device and software its final weights
equal an uninterrupted run's.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from db import transitions
from db.models import Model, ModelKind, new_id
from db.session import session_scope
from db.storage import StorageError, get_storage
from db.wire import LORA_WEIGHTS_NAME, model_json
from worker.jobs.base import JobError
from worker.jobs.finetune import Input, LossPoint, Output
from worker.jobs.training_data import DatasetError, Sample, check_image, dataset_limits, read_dataset
from worker.models.cache import get_cache
from worker.models.diffusion import Family, dtype_kwargs, guard_out_of_memory, load_family, release_memory

if TYPE_CHECKING:
    from worker.context import JobContext

log = logging.getLogger(__name__)

TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
ADAPTER = "default"
ENCODE_BATCH = 8
MAX_LOSS_POINTS = 1000
CHECKPOINT_FORMAT = 1
WEIGHT_DECAY = 1e-2
MAX_GRAD_NORM = 1.0


# --- the training set ---------------------------------------------------------------------------


def load_samples(ctx: JobContext, params: Input) -> list[Sample]:
    limits = dataset_limits(ctx.settings)
    try:
        if params.dataset is not None:
            return read_dataset(ctx.input_file(params.dataset), limits)
        samples = []
        for index, file_id in enumerate(params.images or []):
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


@dataclass
class Encoded:
    """What the frozen parts make of the training set, once: latent distributions and text features."""

    latent_mean: torch.Tensor  # (n, 4, h, w), scaled like the UNet's latents
    latent_std: torch.Tensor
    text: torch.Tensor  # (captions, 77, d): each distinct caption once
    caption_index: torch.Tensor  # (n,): sample → its row of ``text``


def encode_samples(
    family: Family, samples: list[Sample], params: Input, device: str, latents: tuple[torch.Tensor, torch.Tensor] | None
) -> Encoded:
    """Latent distributions (unless ``latents`` brings them, from an earlier attempt) and caption features."""
    vae, text_encoder, tokenizer = family.vae, family.text_to_image.text_encoder, family.text_to_image.tokenizer
    with torch.inference_mode():
        if latents is None:
            means, stds = [], []
            for start in range(0, len(samples), ENCODE_BATCH):
                chunk = samples[start : start + ENCODE_BATCH]
                pixels = torch.from_numpy(np.stack([square_pixels(s.image, params.resolution) for s in chunk]))
                posterior = vae.encode(pixels.to(device, vae.dtype)).latent_dist
                means.append((posterior.mean * vae.config.scaling_factor).float().cpu())
                stds.append((posterior.std * vae.config.scaling_factor).float().cpu())
            # Contiguous, as latents read back from a checkpoint are: a channels-last layout here would pick
            # other conv kernels in the UNet, and a resumed run would drift from an uninterrupted one.
            latents = torch.cat(means).contiguous(), torch.cat(stds).contiguous()
        captions = [s.caption if s.caption is not None else params.instance_prompt for s in samples]
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


def latents_file(encoded: Encoded) -> bytes:
    from safetensors.torch import save

    return save({"mean": encoded.latent_mean.contiguous(), "std": encoded.latent_std.contiguous()})


def read_latents(data: bytes, count: int, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load

    tensors = load(data)
    mean, std = tensors["mean"].contiguous(), tensors["std"].contiguous()
    if mean.shape != std.shape or mean.shape[0] != count or mean.shape[-1] * 8 != resolution:
        raise ValueError(f"stored latents of shape {tuple(mean.shape)} do not fit {count} images at {resolution}²")
    return mean, std


# --- the trainer ------------------------------------------------------------------------------------


@dataclass
class LossCurve:
    """The loss averaged over intervals of ``every`` steps (at most about MAX_LOSS_POINTS points)."""

    every: int
    points: list[dict[str, float]] = field(default_factory=list)
    pending: list[float] = field(default_factory=list)

    @classmethod
    def for_steps(cls, steps: int) -> LossCurve:
        return cls(every=max(1, math.ceil(steps / MAX_LOSS_POINTS)))

    def add(self, step: int, loss: float, last: bool) -> None:
        self.pending.append(loss)
        if step % self.every == 0 or last:
            self.points.append({"step": step, "loss": sum(self.pending) / len(self.pending)})
            self.pending = []

    def state(self) -> dict[str, Any]:
        return {"every": self.every, "points": self.points, "pending": self.pending}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> LossCurve:
        return cls(every=int(state["every"]), points=list(state["points"]), pending=list(state["pending"]))


class Trainer:
    """One fine-tune's UNet with LoRA, optimizer and generator; ``step()`` runs one optimizer step."""

    def __init__(self, folder: Path, params: Input, seed: int, encoded: Encoded, family: Family) -> None:
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from peft import LoraConfig

        self.params, self.seed, self.encoded = params, seed, encoded
        self.device, self.dtype = family.device, family.dtype
        self.autocast = self.device.startswith("cuda") and self.dtype != torch.float32
        self.noise_scheduler = DDPMScheduler.from_config(family.scheduler_config)
        self.prediction_type = self.noise_scheduler.config.prediction_type

        unet = UNet2DConditionModel.from_pretrained(
            folder, subfolder="unet", use_safetensors=True, **dtype_kwargs(self.dtype if self.autocast else torch.float32)
        )
        unet.requires_grad_(False)
        unet.add_adapter(
            LoraConfig(
                r=params.rank,
                lora_alpha=params.alpha or params.rank,
                init_lora_weights="gaussian",
                target_modules=TARGET_MODULES,
            )
        )
        self.generator = torch.Generator("cpu").manual_seed(seed)
        self.names, self.lora = [], []
        for name, parameter in unet.named_parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()  # LoRA weights train in float32 whatever the UNet's dtype
                self.names.append(name)
                self.lora.append(parameter)
        with torch.no_grad():  # peft's gaussian init (A ~ N(0, 1/r), B = 0) from our generator, not torch's global one
            for name, parameter in zip(self.names, self.lora, strict=True):
                if ".lora_A." in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=self.generator) / params.rank)
                else:
                    parameter.zero_()
        self.unet = unet.to(self.device).train()
        self.optimizer = torch.optim.AdamW(self.lora, lr=params.learning_rate, weight_decay=WEIGHT_DECAY)
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast and self.dtype == torch.float16 else None
        self.samples_seen = 0  # micro-batch samples drawn so far: the position in the epoch order
        self.rate = 0.0  # steps per second of this attempt
        self.step_count = 0
        self.loss = LossCurve.for_steps(params.steps)
        self._orders: dict[int, torch.Tensor] = {}

    # --- one step ---------------------------------------------------------------------------------
    def _indices(self, count: int) -> torch.Tensor:
        """The next ``count`` samples of the epoch order (a permutation per epoch, seeded by seed and epoch)."""
        n = len(self.encoded.caption_index)
        picked = []
        for position in range(self.samples_seen, self.samples_seen + count):
            epoch = position // n
            if epoch not in self._orders:
                self._orders = {epoch: torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))}
            picked.append(self._orders[epoch][position % n])
        self.samples_seen += count
        return torch.stack(picked)

    def _micro_batch_loss(self) -> torch.Tensor:
        batch = self._indices(self.params.batch_size)
        g = self.generator
        mean, std = self.encoded.latent_mean[batch], self.encoded.latent_std[batch]
        latents = mean + std * torch.randn(mean.shape, generator=g)
        noise = torch.randn(latents.shape, generator=g)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(batch),), generator=g)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        text = self.encoded.text[self.encoded.caption_index[batch]]
        with torch.autocast(self.device.split(":")[0], dtype=self.dtype, enabled=self.autocast):
            prediction = self.unet(
                noisy.to(self.device, self.unet.dtype), timesteps.to(self.device), text.to(self.device, self.unet.dtype)
            ).sample
        return torch.nn.functional.mse_loss(prediction.float(), target.to(self.device).float())

    def step(self) -> float:
        accumulate = self.params.gradient_accumulation_steps
        total = 0.0
        for _ in range(accumulate):
            loss = self._micro_batch_loss() / accumulate
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.item()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.lora, MAX_GRAD_NORM)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        self.loss.add(self.step_count, total, last=self.step_count == self.params.steps)
        return total

    # --- checkpoints ------------------------------------------------------------------------------
    def checkpoint(self) -> bytes:
        from safetensors.torch import save

        tensors = {f"lora.{name}": p.detach().cpu().contiguous() for name, p in zip(self.names, self.lora, strict=True)}
        for index, state in self.optimizer.state_dict()["state"].items():
            for key, value in state.items():
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous().reshape(-1)
        tensors["generator"] = self.generator.get_state()
        meta = {
            "format": CHECKPOINT_FORMAT,
            "step": self.step_count,
            "seed": self.seed,
            "samples_seen": self.samples_seen,
            "loss": self.loss.state(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "shapes": {f"optimizer.{i}.{k}": list(v.shape) for i, s in self.optimizer.state_dict()["state"].items()
                       for k, v in s.items()},
        }  # fmt: skip
        return save(tensors, metadata={"gpujobs": json.dumps(meta)})

    def restore(self, data: bytes) -> None:
        from safetensors.torch import load

        tensors = load(data)
        meta = json.loads(safetensors_metadata(data)["gpujobs"])
        if meta.get("format") != CHECKPOINT_FORMAT or meta.get("seed") != self.seed:
            raise ValueError("the checkpoint was made by another format or seed")
        with torch.no_grad():
            for name, parameter in zip(self.names, self.lora, strict=True):
                parameter.copy_(tensors[f"lora.{name}"])
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, shape in meta["shapes"].items():
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = tensors[key].reshape(shape).to(self.device)
        for values in state.values():
            if "step" in values:
                values["step"] = values["step"].cpu()  # AdamW keeps its step count on the CPU
        self.optimizer.load_state_dict({"state": state, "param_groups": self.optimizer.state_dict()["param_groups"]})
        self.generator.set_state(tensors["generator"])
        if self.scaler and meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        self.step_count, self.samples_seen = int(meta["step"]), int(meta["samples_seen"])
        self.loss = LossCurve.from_state(meta["loss"])

    # --- the result -------------------------------------------------------------------------------
    def lora_weights(self) -> bytes:
        """The LoRA in diffusers' format (``load_lora_weights``), as the bytes of its safetensors file."""
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet, adapter_name=ADAPTER))
        layers = {name: tensor.detach().cpu().float().contiguous() for name, tensor in layers.items()}
        # Sets (target_modules) sorted: their order follows string hashing, which differs between processes.
        metadata = {
            key: sorted(value) if isinstance(value, set | frozenset) else value
            for key, value in self.unet.peft_config[ADAPTER].to_dict().items()
        }
        with tempfile.TemporaryDirectory() as folder:
            StableDiffusionPipeline.save_lora_weights(
                folder, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata, safe_serialization=True
            )
            return (Path(folder) / LORA_WEIGHTS_NAME).read_bytes()


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header (8 bytes of length, then JSON)."""
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length]).get("__metadata__") or {}


# --- the job ------------------------------------------------------------------------------------------


def finetune(ctx: JobContext, params: Input) -> Output:
    cache = get_cache()
    entry = cache.entry(params.base_model, "diffusion")
    ctx.progress(0, params.steps, "preparing")
    family = cache.get(f"diffusion:{entry.name}", entry, load_family)
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
    checkpoint = _latest_checkpoint(ctx)
    stored = _stored_latents(ctx, checkpoint, len(samples), params.resolution)
    ctx.progress(0, params.steps, "encoding the training set")
    encoded = guard_out_of_memory(
        family.device,
        "encoding the training set",
        functools.partial(encode_samples, family, samples, params, family.device, stored),
    )
    ctx.progress(0, params.steps, "loading the UNet")
    trainer = guard_out_of_memory(
        family.device, "preparing the UNet", functools.partial(Trainer, folder, params, params.seed, encoded, family)
    )
    resumed_from = _resume(ctx, trainer, checkpoint)
    latents_key = checkpoint.latents_key if checkpoint is not None and stored is not None else None
    _train(ctx, trainer, latents_key)
    return resumed_from, trainer.lora_weights(), trainer.loss.points, trainer.rate


def _train(ctx: JobContext, trainer: Trainer, latents_key: str | None) -> None:
    params = trainer.params
    previous_key = None
    started, first = time.monotonic(), trainer.step_count
    while trainer.step_count < params.steps:
        ctx.check()  # cancel, deadline, lost lease: stop before the next step (the last checkpoint stays)
        loss = guard_out_of_memory(trainer.device, "training", trainer.step)
        step = trainer.step_count
        trainer.rate = (step - first) / max(time.monotonic() - started, 1e-9)
        ctx.progress(step, params.steps, "training", loss=round(loss, 6), steps_per_second=round(trainer.rate, 4))
        if step % params.checkpoint_every == 0 and step < params.steps:
            if latents_key is None:  # once per job: a resumed attempt downloads them instead of encoding again
                latents_key = f"jobs/{ctx.job_id}/checkpoints/latents.safetensors"
                get_storage(ctx.settings).put(latents_key, latents_file(trainer.encoded), "application/octet-stream")
            previous_key = _store_checkpoint(ctx, trainer, previous_key, latents_key)


def _store_checkpoint(ctx: JobContext, trainer: Trainer, previous_key: str | None, latents_key: str) -> str:
    step = trainer.step_count
    key = f"jobs/{ctx.job_id}/checkpoints/step-{step:06d}.safetensors"
    data = trainer.checkpoint()
    stored = get_storage(ctx.settings).put(key, data, "application/octet-stream")
    with session_scope() as session:
        owned = transitions.checkpointed(
            session, ctx.job_id, ctx.attempt, ctx.settings.lease_seconds, step, key,
            {"size": stored.size, "sha256": stored.sha256, "loss": trainer.loss.points[-1:] or None,
             "latents_key": latents_key},
        )  # fmt: skip
    if not owned:
        ctx.check()  # the control thread will have seen the lost lease too
    if previous_key and previous_key != key:
        try:  # only the newest checkpoint is kept
            get_storage(ctx.settings).delete(previous_key)
        except StorageError as exc:
            log.warning("job %s: could not delete the old checkpoint %s: %s", ctx.job_id, previous_key, exc)
    return key


def _latest_checkpoint(ctx: JobContext) -> transitions.Checkpoint | None:
    if ctx.attempt == 1:
        return None
    with session_scope() as session:
        return transitions.latest_checkpoint(session, ctx.job_id)


def _stored_latents(
    ctx: JobContext, checkpoint: transitions.Checkpoint | None, count: int, resolution: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The training set's latents as an earlier attempt stored them, if it did (and they fit)."""
    if checkpoint is None or not checkpoint.latents_key:
        return None
    try:
        return read_latents(get_storage(ctx.settings).get(checkpoint.latents_key), count, resolution)
    except (StorageError, KeyError, ValueError, RuntimeError) as exc:
        log.warning("job %s: the stored latents cannot be used (%s); encoding again", ctx.job_id, exc)
        return None


def _resume(ctx: JobContext, trainer: Trainer, checkpoint: transitions.Checkpoint | None) -> int | None:
    """Continue from the job's newest checkpoint, if an earlier attempt stored one; the step resumed from."""
    if checkpoint is None:
        return None
    started = time.monotonic()
    try:
        trainer.restore(get_storage(ctx.settings).get(checkpoint.key))
    except (StorageError, KeyError, ValueError, RuntimeError) as exc:
        log.warning(
            "job %s: the checkpoint at step %d cannot be used (%s); starting over", ctx.job_id, checkpoint.step, exc
        )
        ctx.progress(0, trainer.params.steps, "checkpoint unusable, starting over")
        return None
    seconds = time.monotonic() - started
    with session_scope() as session:
        transitions.resumed(session, ctx.job_id, ctx.attempt, checkpoint, load_seconds=round(seconds, 3))
    log.info("job %s attempt %d resumed from step %d (checkpoint loaded in %.2f s)", ctx.job_id, ctx.attempt,
             checkpoint.step, seconds)  # fmt: skip
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
    ctx.progress(params.steps, params.steps, "storing", loss=round(curve[-1]["loss"], 6) if curve else None,
                 steps_per_second=round(rate, 4))  # fmt: skip
    model_id = new_id("mdl")
    key = f"models/{model_id}/{LORA_WEIGHTS_NAME}"
    artifact = ctx.store(LORA_WEIGHTS_NAME, weights, "application/octet-stream", key=key)
    row = {
        "id": model_id,
        "tenant_id": ctx.tenant_id,
        "name": params.name or f"{base} LoRA ({ctx.job_id})",
        "kind": ModelKind.LORA.value,
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
