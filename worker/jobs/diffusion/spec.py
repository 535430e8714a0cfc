"""The Stable Diffusion family's specs: ``text_to_image``, ``inpainting`` and ``style_transfer`` (no torch).

The three types build their ``Input`` from the fields below, so a field means the same in every
type (as a keyword does in every diffusers pipeline). Bounds an operator configures (image size,
steps, prompt length; see ``db.settings``) are checked when the input is validated, so a request
over them is a 422 at submit, not a failed job. They share one model family per base model
(``pipeline.py``): the ``diffusion`` model kind, with an optional ``inpainting`` UNet and
``ip_adapter`` as parts of it.

**inpainting** repaints the white part of a mask.

Sizes: the output is the image's size rounded to a multiple of 8 (or ``width`` × ``height`` when
given); image and mask are resized together to it. A mask of another size than the image is
resized to the image when its aspect ratio is the same (within 1%), e.g. a half-resolution mask;
a mask of another shape fails the job with code ``invalid_mask`` (the API does not decode files at
submit, so this is found when the job runs). The mask is grey levels: ≥ 50% is repainted. After
decoding, pixels outside the mask are copied from the (resized) input, so they stay exact.

The catalog's dedicated inpainting UNet (9 channels) is used when the base model names one
(``inpainting = "<name>"``); otherwise the base pipeline inpaints by blending latents.

**style_transfer** renders a content image in the colours and texture statistics of a style image.

Both images are encoded with the VAE; the content latents' per-channel mean and standard
deviation move toward the style latents' by ``style_strength`` (latent AdaIN); image-to-image
then denoises from them at ``strength`` with the optional prompt (``strength`` 0: the AdaIN result
decoded as is). The output has the content image's size rounded to a multiple of 8; the style
image is resized to it.

When the catalog names an IP-Adapter for the base model (``ip_adapter = "<name>"`` on the
diffusion entry), the denoising is also conditioned on the style image through it, at the adapter
scale ``ip_adapter_scale × style_strength`` (``ip_adapter_scale`` from the catalog, default 1.0):
one knob moves both the latent statistics and the image prompt, and ``style_strength`` 0 is no
style at all. Without an adapter, ``style_strength`` moves the statistics only. See
``pipeline.py`` for how the adapter is kept off every other run of the family.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field, ValidationInfo, field_validator

from db.settings import get_settings
from worker.jobs.spec import (
    Artifact,
    DiffusionModel,
    ImageFile,
    JobInput,
    JobType,
    ModelId,
    ModelKind,
    Queue,
    TenantModelRef,
)

# The samplers a job may name (pipeline.py maps each to a diffusers scheduler).
SCHEDULERS = ("euler", "euler_a", "heun", "lms", "ddim", "pndm", "dpmpp_2m", "dpmpp_2m_karras", "unipc")
SchedulerName = Literal["euler", "euler_a", "heun", "lms", "ddim", "pndm", "dpmpp_2m", "dpmpp_2m_karras", "unipc"]
DEFAULT_SCHEDULER = "euler"
MAX_SEED = 2**32 - 1
MAX_OUTPUTS = 4
MAX_LORAS = 4
DEADLINE_SECONDS = 900
# The formats generated images may be stored in: name → (file extension, content type).
OUTPUT_FORMATS = {"png": ("png", "image/png"), "webp": ("webp", "image/webp"), "jpeg": ("jpg", "image/jpeg")}
OutputFormatName = Literal["png", "webp", "jpeg"]
DEFAULT_OUTPUT_FORMAT = "png"
DEFAULT_OUTPUT_QUALITY = 90


# The built-in catalog's public checkpoints (used when GPUJOBS_MODEL_CATALOG is unset), each pinned to a hub
# commit and fetching only the files its loader reads: Stable Diffusion 1.5 (the runwayml repo is gone; the
# stable-diffusion-v1-5 org keeps its files) with its inpainting UNet and the SD 1.5 IP-Adapter.
SD15, SD15_INPAINTING, SD15_IP_ADAPTER = "sd15", "sd15-inpainting", "sd15-ip-adapter"
DIFFUSION = ModelKind(
    name="diffusion",
    loader="worker.jobs.diffusion.pipeline:load_family",
    demo="worker.jobs.diffusion.demo:build",
    warm="worker.jobs.diffusion.pipeline:warm_family",
    builtin={
        SD15: {
            "kind": "diffusion",
            "source": "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "revision": "451f4fe16113bff5a5d2269ed5ad43b0592e9a14",
            "files": [
                "model_index.json",
                "scheduler/scheduler_config.json",
                "text_encoder/config.json",
                "text_encoder/model.safetensors",
                "tokenizer/*",
                "unet/config.json",
                "unet/diffusion_pytorch_model.safetensors",
                "vae/config.json",
                "vae/diffusion_pytorch_model.safetensors",
            ],
            "default": True,
            "inpainting": SD15_INPAINTING,
            "ip_adapter": SD15_IP_ADAPTER,
        },
    },
)
INPAINTING_UNET = ModelKind(  # a base model's dedicated inpainting UNet (`inpainting = "<name>"` on its entry)
    name="inpainting",
    loader="worker.jobs.diffusion.pipeline:load_inpainting_unet",
    listed=False,
    builtin={
        SD15_INPAINTING: {
            "kind": "inpainting",
            "source": "stable-diffusion-v1-5/stable-diffusion-inpainting",
            "revision": "8a4288a76071f7280aedbdb3253bdb9e9d5d84bb",  # its only commit: the UNet in fp16 only
            "files": ["unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors"],
            "variant": "fp16",
        },
    },
)
IP_ADAPTER = ModelKind(  # a base model's IP-Adapter for style transfer (`ip_adapter = "<name>"` on its entry)
    name="ip_adapter",
    loader=None,
    listed=False,  # loaded onto its family's pipeline (pipeline.py), never alone
    builtin={
        SD15_IP_ADAPTER: {
            "kind": "ip_adapter",
            "source": "h94/IP-Adapter",
            "revision": "018e402774aeeddd60609b4ecdb7e298259dc729",
            "files": [
                "models/ip-adapter_sd15.safetensors",
                "models/image_encoder/config.json",
                "models/image_encoder/model.safetensors",
            ],
            "subfolder": "models",
            "weight_name": "ip-adapter_sd15.safetensors",
        },
    },
)
KINDS = (DIFFUSION, INPAINTING_UNET, IP_ADAPTER)


def _prompt_length(value: str) -> str:
    limit = get_settings().generation_max_prompt_chars
    if len(value) > limit:
        raise ValueError(f"must be at most {limit} characters (it has {len(value)})")
    return value


def _steps_bound(value: int) -> int:
    limit = get_settings().generation_max_steps
    if value > limit:
        raise ValueError(f"must be at most {limit} on this service")
    return value


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be blank")
    return value


def _side(value: int | None, info: ValidationInfo) -> int | None:
    if value is None:
        return None
    settings = get_settings()
    limit = settings.generation_max_width if info.field_name == "width" else settings.generation_max_height
    if value > limit:
        raise ValueError(f"must be at most {limit} on this service")
    return value


Prompt = Annotated[
    str,
    Field(min_length=1, description="What to draw (CLIP reads the first 77 tokens)."),
    AfterValidator(_not_blank),
    AfterValidator(_prompt_length),
]
OptionalPrompt = Annotated[str, Field(description="Text guidance (may be empty)."), AfterValidator(_prompt_length)]
NegativePrompt = Annotated[
    str, Field(description="What to steer away from (may be empty)."), AfterValidator(_prompt_length)
]
Side = Annotated[
    int,
    Field(
        ge=8, multiple_of=8, description="Pixels, a multiple of 8, at most `GPUJOBS_GENERATION_MAX_WIDTH`/`_HEIGHT`."
    ),
    AfterValidator(_side),
]
Steps = Annotated[
    int,
    Field(ge=1, le=150, description="Denoising steps (image-to-image runs `strength` × this many)."),
    AfterValidator(_steps_bound),
]
GuidanceScale = Annotated[
    float, Field(ge=0, le=30, description="Classifier-free guidance: how strongly to follow the prompt (≤ 1: off).")
]
Scheduler = Annotated[SchedulerName, Field(description="The sampler.")]
Seed = Annotated[
    int | None,
    Field(ge=0, le=MAX_SEED, description="Image i uses seed + i; drawn at random when absent (and returned)."),
]
NumOutputs = Annotated[int, Field(ge=1, le=MAX_OUTPUTS, description="Images made in one batch.")]
OutputFormat = Annotated[
    OutputFormatName,
    Field(
        description="How the images are stored: `png` (lossless; the parameters in a `parameters` text chunk), "
        "`webp` or `jpeg` (lossy, at `output_quality`; the parameters as JSON in the EXIF UserComment)."
    ),
]
OutputQuality = Annotated[
    int | None,
    Field(
        ge=1,
        le=100,
        strict=True,  # an integer, not 90.0 nor "90"
        description=f"Quality of `webp` and `jpeg` images, 1–100 (default {DEFAULT_OUTPUT_QUALITY}); "
        "`png` is lossless and takes none.",
    ),
]
Strength = Annotated[float, Field(ge=0, le=1, description="How far to denoise from the input (1: all the way).")]


class LoraRef(JobInput):
    model: ModelId
    scale: float = Field(1.0, ge=-2, le=2, description="How strongly the LoRA applies (0: not at all, 1: as trained).")


def _distinct_models(value: list[LoraRef]) -> list[LoraRef]:
    ids = [ref.model for ref in value]
    if len(set(ids)) != len(ids):
        raise ValueError("names the same model twice; give each LoRA once, with its scale")
    return value


Loras = Annotated[
    list[LoraRef],
    Field(
        max_length=MAX_LORAS,
        description="Fine-tuned LoRA models of this tenant (`finetune` jobs) over the job's base model, "
        "each with its scale; applied for this job only.",
    ),
    AfterValidator(_distinct_models),
]


def check_pixels(width: int | None, height: int | None) -> None:
    """Raise (as a validation error of ``height``) when width × height is over the configured limit."""
    if width is None or height is None:
        return
    limit = get_settings().generation_max_pixels
    if width * height > limit:
        raise ValueError(f"{width}×{height} = {width * height} pixels is more than the limit of {limit} pixels")


class Output(BaseModel):
    images: list[Artifact] = Field(
        description="`image-<i>.png` (or `.webp`, `.jpg` as `output_format` asks); each carries its parameters: "
        "in a PNG text chunk, or in the EXIF UserComment."
    )
    seed: int = Field(description="The seed of the first image; image i used `seed + i`.")
    seeds: list[int] = Field(description="The seed of each image.")


# --- the three job types ------------------------------------------------------------------------


class GenerationInput(JobInput):
    """What the three generation inputs share beyond their fields: their LoRAs are the tenant's models."""

    if TYPE_CHECKING:  # declared by each input, in its own field order
        model: str | None
        loras: list[LoraRef]
        output_format: str
        output_quality: int | None

    def tenant_model_refs(self) -> list[TenantModelRef]:
        return [
            TenantModelRef(("loras", index, "model"), ref.model, self.model, DIFFUSION.name)
            for index, ref in enumerate(self.loras)
        ]

    @field_validator("output_quality", check_fields=False)  # the field is each input's own
    @classmethod
    def _quality_is_for_lossy_formats(cls, quality: int | None, info: ValidationInfo) -> int | None:
        if quality is not None and info.data.get("output_format") == "png":
            raise ValueError("applies to `webp` and `jpeg` output only: `png` is lossless")
        return quality

    @property
    def quality(self) -> int:
        """The quality ``webp`` and ``jpeg`` images are encoded at."""
        return DEFAULT_OUTPUT_QUALITY if self.output_quality is None else self.output_quality


class TextToImageInput(GenerationInput):
    prompt: Prompt
    negative_prompt: NegativePrompt = ""
    width: Side = Field(512, validate_default=True)
    height: Side = Field(512, validate_default=True)
    num_inference_steps: Steps = 25
    guidance_scale: GuidanceScale = 7.5
    scheduler: Scheduler = DEFAULT_SCHEDULER
    seed: Seed = None
    num_outputs: NumOutputs = 1
    loras: Loras = Field(default_factory=list)
    model: DiffusionModel = None
    output_format: OutputFormat = DEFAULT_OUTPUT_FORMAT
    output_quality: OutputQuality = None

    @field_validator("height")
    @classmethod
    def _pixels(cls, height: int, info: ValidationInfo) -> int:
        check_pixels(info.data.get("width"), height)
        return height


class InpaintingInput(GenerationInput):
    image: ImageFile
    mask: ImageFile
    prompt: OptionalPrompt = ""
    negative_prompt: NegativePrompt = ""
    width: Side | None = Field(None, description="Output width (default: the image's, rounded to 8).")
    height: Side | None = Field(
        None, validate_default=True, description="Output height (default: the image's, rounded to 8)."
    )
    strength: Strength = 1.0
    num_inference_steps: Steps = 25
    guidance_scale: GuidanceScale = 7.5
    scheduler: Scheduler = DEFAULT_SCHEDULER
    seed: Seed = None
    num_outputs: NumOutputs = 1
    loras: Loras = Field(default_factory=list)
    model: DiffusionModel = None
    output_format: OutputFormat = DEFAULT_OUTPUT_FORMAT
    output_quality: OutputQuality = None

    @field_validator("height")
    @classmethod
    def _pixels(cls, height: int | None, info: ValidationInfo) -> int | None:
        if "width" in info.data and (height is None) != (info.data["width"] is None):
            raise ValueError("give both width and height, or neither (then the image's size is used)")
        check_pixels(info.data.get("width"), height)
        return height


class StyleTransferInput(GenerationInput):
    content_image: ImageFile
    style_image: ImageFile
    prompt: OptionalPrompt = ""
    negative_prompt: NegativePrompt = ""
    style_strength: float = Field(
        0.7,
        ge=0,
        le=1,
        description=(
            "How far the content's latent statistics move toward the style's (0: not at all); with an IP-Adapter "
            "configured for the model, also the adapter's scale (times the catalog's `ip_adapter_scale`)."
        ),
    )
    strength: Strength = 0.6
    num_inference_steps: Steps = 25
    guidance_scale: GuidanceScale = 7.5
    scheduler: Scheduler = DEFAULT_SCHEDULER
    seed: Seed = None
    num_outputs: NumOutputs = 1
    loras: Loras = Field(default_factory=list)
    model: DiffusionModel = None
    output_format: OutputFormat = DEFAULT_OUTPUT_FORMAT
    output_quality: OutputQuality = None


TEXT_TO_IMAGE = JobType(
    name="text_to_image",
    summary="Stable Diffusion text-to-image: 1–4 images (PNG, WebP or JPEG) from a prompt, reproducible by seed.",
    Input=TextToImageInput,
    Output=Output,
    queue=Queue.GPU,
    run="worker.jobs.diffusion.run:text_to_image",
    deadline_seconds=DEADLINE_SECONDS,
    model_kinds=KINDS,
)
INPAINTING = JobType(
    name="inpainting",
    summary="Stable Diffusion inpainting: repaint the white part of a mask; the rest of the image is kept.",
    Input=InpaintingInput,
    Output=Output,
    queue=Queue.GPU,
    run="worker.jobs.diffusion.run:inpaint",
    deadline_seconds=DEADLINE_SECONDS,
    model_kinds=KINDS,
)
STYLE_TRANSFER = JobType(
    name="style_transfer",
    summary="Style transfer with Stable Diffusion: latent statistics of the style image, then image-to-image.",
    Input=StyleTransferInput,
    Output=Output,
    queue=Queue.GPU,
    run="worker.jobs.diffusion.run:style_transfer",
    deadline_seconds=DEADLINE_SECONDS,
    model_kinds=KINDS,
)
