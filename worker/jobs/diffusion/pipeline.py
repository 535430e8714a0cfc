"""Stable Diffusion pipeline families: one per base model in the model cache, shared by three job types.

A family is the text-to-image pipeline, loaded once with ``from_pretrained``, and the
image-to-image and inpainting pipelines derived from it with ``from_pipe``: three pipelines, one
UNet, VAE and text encoder in memory. When the catalog names a dedicated inpainting checkpoint
for the base model (``inpainting = "<name>"``, a 9-channel UNet), only that UNet is loaded (its
own cache entry) and paired with the family's VAE, text encoder and tokenizer for each run.

The pipelines share state (``_interrupt``, guidance settings, the scheduler they were built
with), so the runs of one family take turns on its ``lock``, and each run gets a scheduler of its
own, made by name from the model's scheduler config. Progress and stopping go through
``callback_on_step_end`` and diffusers' ``interrupt``, not a forked pipeline; pipelines return
latents and the VAE decodes here, so a stopped run never pays for a decode.

When the catalog names an IP-Adapter for the base model (``ip_adapter = "<name>"``, optional
``ip_adapter_scale``), style-transfer runs are also conditioned on the style image through it.
``load_ip_adapter`` rewires the shared UNet (its cross-attention processors, ``encoder_hid_proj``,
``config.encoder_hid_dim_type``) and gives the pipeline an image encoder: the adapter is loaded
through it once, on the first style run that needs it (its own cache entry), its pieces are taken
back off at once, and each style run swaps them in for its pipeline call and out again after it,
under the family's lock. Every other run sees the plain UNet.
"""

from __future__ import annotations

import functools
import gc
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from db.settings import Settings, get_settings
from worker.jobs.diffusion.ip_adapter import IPAdapter, load_ip_adapter, swapped_in
from worker.jobs.diffusion.spec import DIFFUSION, INPAINTING_UNET, IP_ADAPTER
from worker.jobs.diffusion.spec import SCHEDULERS as SCHEDULER_NAMES
from worker.jobs.spec import JobError
from worker.models.cache import ModelUnavailable
from worker.models.catalog import ModelEntry

if TYPE_CHECKING:
    from worker.jobs.diffusion.lora import Lora
    from worker.models.cache import ModelCache

log = logging.getLogger(__name__)


class _NoEmptyFloat32Warning(logging.Filter):
    """diffusers warns of "modules that should be kept in float32: []" on every dtype cast, even with none."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


logging.getLogger("diffusers.models.modeling_utils").addFilter(_NoEmptyFloat32Warning())

# Job-facing sampler names → (diffusers scheduler class, options over the model's scheduler config).
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "unipc": ("UniPCMultistepScheduler", {}),
}
assert tuple(SCHEDULERS) == SCHEDULER_NAMES, "spec.py and this table must name the same samplers"

T = TypeVar("T")
StepHook = Callable[[int, int], bool]
"""Called after every denoising step with (steps run, total steps); returning True stops the run."""


def dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``from_pretrained``/``from_pipe``'s dtype argument (renamed from ``torch_dtype`` to ``dtype``)."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401  (present once `dtype` is the name)
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


@dataclass
class StylePipeline:
    """What a style run calls: the image-to-image pipeline, and the arguments that condition it on the style image."""

    pipe: Any  # StableDiffusionImg2ImgPipeline
    call: dict[str, Any]  # what conditions the call on the style image ({} without an adapter)


@dataclass(eq=False)
class Family:
    key: str
    model: str
    text_to_image: Any  # StableDiffusionPipeline
    image_to_image: Any  # StableDiffusionImg2ImgPipeline, same modules
    inpaint: Any  # StableDiffusionInpaintPipeline, same modules (the base UNet blends latents)
    scheduler_config: dict[str, Any]
    device: str
    dtype: torch.dtype
    inpainting_model: str | None = None
    ip_adapter_model: str | None = None
    ip_adapter_scale: float = 1.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def components(self) -> dict[str, Any]:
        """The loaded modules (what the cache measures)."""
        return self.text_to_image.components

    @property
    def vae(self) -> Any:
        return self.text_to_image.vae

    def inpaint_pipeline(self, cache: ModelCache) -> Any:
        """The dedicated inpainting pipeline when the catalog names one, else the base UNet's. Call under ``lock``.

        The dedicated one is put together per run (about a millisecond, no copies) so that it never
        keeps a UNet alive after the cache evicted it.
        """
        if not self.inpainting_model:
            return self.inpaint
        from diffusers import StableDiffusionInpaintPipeline

        unet = cache.load(INPAINTING_UNET, self.inpainting_model)
        encoder_width = self.text_to_image.text_encoder.config.hidden_size
        if unet.config.cross_attention_dim != encoder_width:
            raise ModelUnavailable(
                f"the inpainting model {self.inpainting_model!r} expects text features of width "
                f"{unet.config.cross_attention_dim}, but {self.model!r}'s text encoder makes {encoder_width}"
            )
        pipe = StableDiffusionInpaintPipeline(
            **{**self.text_to_image.components, "unet": unet}, requires_safety_checker=False
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @contextmanager
    def style_pipeline(self, cache: ModelCache, style_image: Any, style_strength: float) -> Iterator[StylePipeline]:
        """The image-to-image pipeline of a style run, with the IP-Adapter swapped in when there is one. Under ``lock``.

        The adapter's scale for the run is ``ip_adapter_scale × style_strength``: at 0 (or without an
        adapter in the catalog) the run is the plain pipeline's. The adapter is taken out again when
        the block ends, however it ends.
        """
        scale = self.ip_adapter_scale * style_strength
        if self.ip_adapter_model is None or scale == 0:
            yield StylePipeline(self.image_to_image, {})
            return
        key, adapter = self.ip_adapter(cache)
        with swapped_in(self.image_to_image, adapter, scale):
            cache.count(key, "runs")
            yield StylePipeline(self.image_to_image, {"ip_adapter_image": style_image})

    def ip_adapter(self, cache: ModelCache) -> tuple[str, IPAdapter]:
        """The family's IP-Adapter and its cache key, loaded on first use. Under ``lock``: loading rewires the UNet."""
        # One per family: loading rewires this family's UNet, and its processors' scale is set per run.
        key = IP_ADAPTER.cache_key(self.ip_adapter_model, variant=self.model)  # the catalog's name: the entry's
        return key, cache.load(
            IP_ADAPTER,
            self.ip_adapter_model,
            variant=self.model,
            loader=functools.partial(load_ip_adapter, self.image_to_image, self.model),
        )


def load_family(entry: ModelEntry, folder: Path, device: str, dtype: torch.dtype) -> Family:
    from diffusers import (
        StableDiffusionImg2ImgPipeline,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
    )
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()  # loading bars are noise in a worker's log
    transformers_logging.disable_progress_bar()
    settings = get_settings()
    base = StableDiffusionPipeline.from_pretrained(
        folder,
        use_safetensors=True,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        **dtype_kwargs(dtype),
    )
    base.to(device)
    if settings.channels_last:
        base.unet.to(memory_format=torch.channels_last)
        base.vae.to(memory_format=torch.channels_last)
    if settings.torch_compile:
        # In place: the module keeps its type, so from_pipe shares it as is.
        base.unet.compile(backend=settings.torch_compile_backend)
    # from_pipe casts the shared modules to its dtype argument (float32 by default): pass ours.
    image_to_image = StableDiffusionImg2ImgPipeline.from_pipe(base, **dtype_kwargs(dtype))
    inpaint = StableDiffusionInpaintPipeline.from_pipe(base, **dtype_kwargs(dtype))
    for pipe in (base, image_to_image, inpaint):
        pipe.set_progress_bar_config(disable=True)

    inpainting_model = entry.options.get("inpainting")
    if inpainting_model is not None and not isinstance(inpainting_model, str):
        raise ModelUnavailable(f"model {entry.name!r}: the catalog's `inpainting` option must be a model name")
    ip_adapter_model = entry.options.get("ip_adapter")
    if ip_adapter_model is not None and not isinstance(ip_adapter_model, str):
        raise ModelUnavailable(f"model {entry.name!r}: the catalog's `ip_adapter` option must be a model name")
    ip_adapter_scale = entry.options.get("ip_adapter_scale", 1.0)
    if isinstance(ip_adapter_scale, bool) or not isinstance(ip_adapter_scale, int | float) or ip_adapter_scale < 0:
        raise ModelUnavailable(f"model {entry.name!r}: the catalog's `ip_adapter_scale` must be a number ≥ 0")
    return Family(
        key=DIFFUSION.cache_key(entry.name),
        model=entry.name,
        text_to_image=base,
        image_to_image=image_to_image,
        inpaint=inpaint,
        scheduler_config=dict(base.scheduler.config),
        device=device,
        dtype=dtype,
        inpainting_model=inpainting_model,
        ip_adapter_model=ip_adapter_model,
        ip_adapter_scale=float(ip_adapter_scale),
    )


def warm_family(family: Family, sizes: list[str], settings: Settings) -> list[str]:
    """One text-to-image run per warm size (``warm_steps`` steps, guidance on, one image, decoded): the
    shapes a job of that size runs, so with ``torch_compile`` the UNet's graph for it is built (or read
    from the compile cache) here, before the worker takes jobs."""
    warmed = []
    for size in sizes:
        width, height = (int(side) for side in size.split("x"))
        with family.lock:
            family.text_to_image(
                "warm-up",
                width=width,
                height=height,
                num_inference_steps=settings.warm_steps,
                guidance_scale=7.5,
                generator=torch.Generator("cpu").manual_seed(0),
                output_type="np",
            )
        warmed.append(size)
    return warmed


def load_inpainting_unet(entry: ModelEntry, folder: Path, device: str, dtype: torch.dtype) -> Any:
    """Only the UNet of an inpainting checkpoint (a full pipeline folder's ``unet/``, or a UNet folder); the
    catalog's ``variant`` option picks a weights variant (``fp16``: ``diffusion_pytorch_model.fp16.safetensors``,
    what the public SD 1.5 inpainting repo has), cast to the worker's dtype."""
    from diffusers import UNet2DConditionModel

    variant = entry.options.get("variant")
    if variant is not None and not isinstance(variant, str):
        raise ModelUnavailable(f"model {entry.name!r}: the catalog's `variant` option must be a string")
    subfolder = "unet" if (folder / "unet" / "config.json").is_file() else None
    unet = UNet2DConditionModel.from_pretrained(
        folder, subfolder=subfolder, use_safetensors=True, variant=variant, **dtype_kwargs(dtype)
    )
    if unet.config.in_channels != 9:
        raise ModelUnavailable(
            f"model {entry.name!r} is not an inpainting UNet: it takes {unet.config.in_channels} input channels, not 9"
        )
    if get_settings().channels_last:
        unet.to(memory_format=torch.channels_last)
    return unet.to(device).eval()


# --- one run ------------------------------------------------------------------------------------


@dataclass
class Denoised:
    latents: torch.Tensor | None  # None when the run was stopped
    steps_run: int
    total: int

    @property
    def stopped(self) -> bool:
        return self.latents is None


class _StepCounter:
    """``callback_on_step_end``: counts steps, reports them, and sets diffusers' interrupt when told to stop."""

    def __init__(self, on_step: StepHook) -> None:
        self.on_step = on_step
        self.steps_run = 0
        self.total = 0
        self.stopped = False

    def __call__(self, pipe: Any, step_index: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        self.steps_run += 1
        self.total = pipe.num_timesteps
        if self.on_step(self.steps_run, self.total):
            self.stopped = True
            pipe._interrupt = True  # the pipeline skips every remaining step
        return callback_kwargs


def make_scheduler(family: Family, name: str) -> Any:
    import diffusers

    class_name, options = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(family.scheduler_config, **options)


def denoise(
    family: Family, pipe: Any, scheduler: str, on_step: StepHook, loras: Sequence[Lora] = (), **call: Any
) -> Denoised:
    """One pipeline call (under ``family.lock``) with a fresh scheduler and exactly ``loras`` active;
    latents out, or None if stopped."""
    from worker.jobs.diffusion.lora import applied

    counter = _StepCounter(on_step)
    pipe.scheduler = make_scheduler(family, scheduler)

    def run() -> torch.Tensor:
        with applied(pipe.unet, loras, get_settings().lora_cache_size, family.key), torch.inference_mode():
            return pipe(**call, output_type="latent", return_dict=False, callback_on_step_end=counter)[0]

    latents = guard_out_of_memory(family.device, "denoising", run)
    if counter.stopped:
        del latents
        release_memory(family.device)
        return Denoised(None, counter.steps_run, counter.total)
    return Denoised(latents, counter.steps_run, counter.total)


def encode(family: Family, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1], (n, 3, H, W) → scaled latents (the distribution's mean: deterministic)."""
    vae = family.vae

    def run() -> torch.Tensor:
        with torch.inference_mode():
            posterior = vae.encode(images.to(family.device, vae.dtype)).latent_dist
            return posterior.mean * vae.config.scaling_factor

    return guard_out_of_memory(family.device, "encoding the images", run)


def decode(family: Family, latents: torch.Tensor) -> Any:
    """Scaled latents → float pixels in [0, 1], a numpy array (n, H, W, 3)."""
    vae = family.vae

    def run() -> Any:
        with torch.inference_mode():
            images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
            return family.text_to_image.image_processor.postprocess(images, output_type="np")

    return guard_out_of_memory(family.device, "decoding the images", run)


def adain(content: torch.Tensor, style: torch.Tensor, strength: float, eps: float = 1e-5) -> torch.Tensor:
    """Move each latent channel's mean and standard deviation from the content's toward the style's."""
    c, s = content.float(), style.float()
    c_mean, c_std = c.mean((2, 3), keepdim=True), c.std((2, 3), keepdim=True, correction=0) + eps
    s_mean, s_std = s.mean((2, 3), keepdim=True), s.std((2, 3), keepdim=True, correction=0) + eps
    mean, std = torch.lerp(c_mean, s_mean, strength), torch.lerp(c_std, s_std, strength)
    return ((c - c_mean) / c_std * std + mean).to(content.dtype)


# --- memory ---------------------------------------------------------------------------------------


def release_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def guard_out_of_memory(device: str, doing: str, run: Callable[[], T]) -> T:
    """``run()``; a CUDA out-of-memory error fails the job (with the memory given back), not the worker."""
    try:
        return run()
    except torch.cuda.OutOfMemoryError:
        pass  # leave the handler first: the error's traceback holds the run's tensors until then
    release_memory(device)
    raise JobError(
        f"The GPU ran out of memory while {doing}. Ask for fewer outputs or a smaller image, "
        "or try again when the worker is less busy.",
        "out_of_memory",
    )
