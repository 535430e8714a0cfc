"""One LoRA fine-tune's training state on a UNet: the step, its checkpoints, and the LoRA file it makes.

The UNet is a fresh copy loaded from the base model's folder, with LoRA layers (peft) on its
attention projections ``to_q``, ``to_k``, ``to_v`` and ``to_out.0``; the training set arrives
encoded (``Encoded``: each image's latent distribution, each distinct caption's text features).
Every step samples latents from the distribution, noise and timesteps, and takes the standard
noise-prediction (or v-prediction, as the scheduler config says) MSE loss. AdamW on the LoRA
parameters only, gradient clipping at 1.0, optional accumulation. When the worker's dtype is a
half one (float16 by default on CUDA; float16 or bfloat16 on the CPU when configured) the frozen
UNet is in that dtype under autocast, with a gradient scaler for float16, while the LoRA
parameters stay float32: the same code on every device.

Reproducible: all randomness comes from one CPU ``torch.Generator`` seeded with the job's seed
(the LoRA initialisation included), and the order of images is a permutation per epoch seeded by
the seed and the epoch. A checkpoint (one safetensors file: LoRA and optimizer tensors, the
generator's state, the step and the loss curve as metadata; no pickle) therefore lets a requeued
run continue exactly where the stored one was: on the CPU its final weights equal an uninterrupted
run's bit for bit (tested); on CUDA, cuDNN's non-deterministic kernels (not switched off here: that
setting is process-wide and would slow generation too) can make two runs differ in the last bits.
``run.py`` runs it as a job.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from db.wire import LORA_WEIGHTS_NAME
from worker.jobs.diffusion.pipeline import dtype_kwargs

if TYPE_CHECKING:
    from worker.jobs.diffusion.pipeline import Family

TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
ADAPTER = "default"
MAX_LOSS_POINTS = 1000
CHECKPOINT_FORMAT = 1
WEIGHT_DECAY = 1e-2
MAX_GRAD_NORM = 1.0


@dataclass
class Encoded:
    """What the frozen parts make of the training set, once: latent distributions and text features."""

    latent_mean: torch.Tensor  # (n, 4, h, w), scaled like the UNet's latents
    latent_std: torch.Tensor
    text: torch.Tensor  # (captions, 77, d): each distinct caption once
    caption_index: torch.Tensor  # (n,): sample → its row of ``text``


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


@dataclass(frozen=True)
class TrainingConfig:
    """What shapes a training run (the job's input, less where the images come from)."""

    steps: int
    learning_rate: float
    rank: int
    alpha: float | None
    batch_size: int
    gradient_accumulation_steps: int
    seed: int


class Trainer:
    """One fine-tune's UNet with LoRA, optimizer and generator; ``step()`` runs one optimizer step."""

    def __init__(self, folder: Path, config: TrainingConfig, encoded: Encoded, family: Family) -> None:
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from peft import LoraConfig

        self.config, self.seed, self.encoded = config, config.seed, encoded
        self.device, self.dtype = family.device, family.dtype
        self.device_type = torch.device(self.device).type
        self.autocast = self.dtype != torch.float32
        self.noise_scheduler = DDPMScheduler.from_config(family.scheduler_config)
        self.prediction_type = self.noise_scheduler.config.prediction_type

        unet = UNet2DConditionModel.from_pretrained(
            folder,
            subfolder="unet",
            use_safetensors=True,
            **dtype_kwargs(self.dtype if self.autocast else torch.float32),
        )
        unet.requires_grad_(False)
        unet.add_adapter(
            LoraConfig(
                r=config.rank,
                lora_alpha=config.alpha or config.rank,
                init_lora_weights="gaussian",
                target_modules=TARGET_MODULES,
            )
        )
        self.generator = torch.Generator("cpu").manual_seed(self.seed)
        self.names, self.lora = [], []
        for name, parameter in unet.named_parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()  # LoRA weights train in float32 whatever the UNet's dtype
                self.names.append(name)
                self.lora.append(parameter)
        with torch.no_grad():  # peft's gaussian init (A ~ N(0, 1/r), B = 0) from our generator, not torch's global one
            for name, parameter in zip(self.names, self.lora, strict=True):
                if ".lora_A." in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=self.generator) / config.rank)
                else:
                    parameter.zero_()
        self.unet = unet.to(self.device).train()
        self.optimizer = torch.optim.AdamW(self.lora, lr=config.learning_rate, weight_decay=WEIGHT_DECAY)
        # float16 gradients underflow without loss scaling; bfloat16 has float32's range and needs none.
        self.scaler = torch.amp.GradScaler(self.device_type) if self.dtype == torch.float16 else None
        self.samples_seen = 0  # micro-batch samples drawn so far: the position in the epoch order
        self.rate = 0.0  # steps per second of this attempt
        self.step_count = 0
        self.loss = LossCurve.for_steps(config.steps)
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
        batch = self._indices(self.config.batch_size)
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
        with torch.autocast(self.device_type, dtype=self.dtype, enabled=self.autocast):
            prediction = self.unet(
                noisy.to(self.device, self.unet.dtype), timesteps.to(self.device), text.to(self.device, self.unet.dtype)
            ).sample
        return torch.nn.functional.mse_loss(prediction.float(), target.to(self.device).float())

    def step(self) -> float:
        accumulate = self.config.gradient_accumulation_steps
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
        self.loss.add(self.step_count, total, last=self.step_count == self.config.steps)
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
            "shapes": {
                f"optimizer.{i}.{k}": list(v.shape)
                for i, s in self.optimizer.state_dict()["state"].items()
                for k, v in s.items()
            },
        }
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
