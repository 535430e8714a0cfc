"""IP-Adapters for a pipeline family: loaded by diffusers' ``load_ip_adapter``, then kept off the UNet.

``load_ip_adapter`` changes the pipeline it is called on and that pipeline's UNet, which the
family's three pipelines share: the UNet's cross-attention processors become IP attention
processors, ``unet.encoder_hid_proj`` the image projection, ``unet.config.encoder_hid_dim_type``
``"ip_image_proj"``, and the pipeline gets an ``image_encoder`` and a ``feature_extractor``.
``load_ip_adapter`` here lets it do so once, keeps those pieces (an ``IPAdapter``) and puts the
family back as it was; ``swapped_in`` then puts them on for one style run and takes them off
again, whatever happens in the run. Swapping is setting attributes: no weights move or load.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from worker.models.cache import ModelUnavailable
from worker.models.catalog import ModelEntry

DEFAULT_IP_ADAPTER_WEIGHTS = "ip-adapter_sd15.safetensors"


@dataclass(eq=False)
class IPAdapter:
    """What ``load_ip_adapter`` put on a family's UNet and pipeline, kept off them between style runs."""

    name: str
    layers: tuple[str, ...]  # the cross-attention layers (``unet.attn_processors`` names) it conditions
    attention: torch.nn.ModuleList  # their IP attention processors, in the order of ``layers``
    image_projection: Any  # MultiIPAdapterImageProjection: the UNet's ``encoder_hid_proj`` while swapped in
    image_encoder: Any  # CLIPVisionModelWithProjection
    feature_extractor: Any  # CLIPImageProcessor, sized for the image encoder


@dataclass
class _Conditioning:
    """The UNet and pipeline state that IP-Adapter loading changes, captured or applied as a whole."""

    processors: dict[str, Any]
    encoder_hid_proj: Any
    encoder_hid_dim_type: str | None
    image_encoder: Any
    feature_extractor: Any

    @classmethod
    def of(cls, pipe: Any) -> _Conditioning:
        unet = pipe.unet
        return cls(
            unet.attn_processors,
            unet.encoder_hid_proj,
            unet.config.encoder_hid_dim_type,
            pipe.image_encoder,
            pipe.feature_extractor,
        )

    def apply(self, pipe: Any) -> None:
        unet = pipe.unet
        unet.set_attn_processor(dict(self.processors))  # a copy: set_attn_processor empties the dict it is given
        unet.encoder_hid_proj = self.encoder_hid_proj
        unet.config.encoder_hid_dim_type = self.encoder_hid_dim_type  # an attribute, as diffusers sets it
        pipe.register_modules(image_encoder=self.image_encoder, feature_extractor=self.feature_extractor)


@contextmanager
def swapped_in(pipe: Any, adapter: IPAdapter, scale: float) -> Iterator[None]:
    """``adapter`` on ``pipe`` and its UNet at ``scale`` for the block; exactly the state before it afterwards."""
    plain = _Conditioning.of(pipe)
    conditioned = _Conditioning(
        {**plain.processors, **dict(zip(adapter.layers, adapter.attention, strict=True))},
        adapter.image_projection,
        "ip_image_proj",
        adapter.image_encoder,
        adapter.feature_extractor,
    )
    try:
        conditioned.apply(pipe)
        pipe.set_ip_adapter_scale(scale)
        yield
    finally:
        plain.apply(pipe)


def load_ip_adapter(
    pipe: Any, base_model: str, entry: ModelEntry, folder: Path, device: str, dtype: torch.dtype
) -> IPAdapter:
    """``entry`` loaded by diffusers' ``load_ip_adapter`` on ``pipe`` (a family's image-to-image
    pipeline, of ``base_model``), then taken off it.

    Call under ``family.lock``: while it loads, the UNet is the adapter's. The folder is laid out as
    ``load_ip_adapter`` reads it: ``<subfolder>/<weight_name>`` (safetensors with ``image_proj.*``
    and ``ip_adapter.*`` tensors) and an image encoder folder (CLIPVisionModelWithProjection,
    safetensors), ``<subfolder>/image_encoder`` unless the catalog says otherwise. The adapter takes
    the device and dtype of the family's UNet (``device`` and ``dtype`` are the same).
    """
    from diffusers.models.attention_processor import (
        IPAdapterAttnProcessor,
        IPAdapterAttnProcessor2_0,
        IPAdapterXFormersAttnProcessor,
    )
    from safetensors import safe_open

    defaults = {"subfolder": "", "weight_name": DEFAULT_IP_ADAPTER_WEIGHTS, "image_encoder_folder": "image_encoder"}
    options = {option: entry.options.get(option, default) for option, default in defaults.items()}
    for option, value in options.items():
        if not isinstance(value, str):
            raise ModelUnavailable(f"model {entry.name!r}: the catalog's `{option}` option must be a string")
    subfolder, weight_name, encoder_folder = (options[option] for option in defaults)
    weights = folder / subfolder / weight_name
    # As diffusers resolves it: a bare name is a folder inside `subfolder`, a path is from the top.
    encoder = folder / encoder_folder if "/" in encoder_folder else folder / subfolder / encoder_folder
    if not weight_name.endswith(".safetensors"):
        raise ModelUnavailable(
            f"model {entry.name!r}: `weight_name` is {weight_name!r}; gpujobs loads safetensors only — "
            "name a .safetensors file (or convert the checkpoint)"
        )
    if not weights.is_file():
        raise ModelUnavailable(f"model {entry.name!r}: the IP-Adapter weights {weights} do not exist")
    if not any(encoder.glob("*.safetensors")):
        raise ModelUnavailable(f"model {entry.name!r}: no safetensors image encoder in {encoder}")
    with safe_open(weights, framework="pt") as tensors:
        if any("lora" in name for name in tensors.keys()):  # noqa: SIM118  (a safetensors handle, not a dict)
            # FaceID adapters bring LoRA layers that load_ip_adapter fuses into the UNet for good.
            raise ModelUnavailable(f"model {entry.name!r}: IP-Adapters with LoRA layers (FaceID) are not supported")

    plain = _Conditioning.of(pipe)
    try:
        pipe.load_ip_adapter(
            str(folder),
            subfolder=subfolder,
            weight_name=weight_name,
            image_encoder_folder=encoder_folder,
            local_files_only=True,
        )
        ip_classes = (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0, IPAdapterXFormersAttnProcessor)
        processors = {name: p for name, p in pipe.unet.attn_processors.items() if isinstance(p, ip_classes)}
        adapter = IPAdapter(
            name=entry.name,
            layers=tuple(processors),
            attention=torch.nn.ModuleList(processors.values()),
            image_projection=pipe.unet.encoder_hid_proj,
            image_encoder=pipe.image_encoder.eval(),
            feature_extractor=pipe.feature_extractor,
        )
    except RuntimeError as exc:  # tensors of the wrong shape: an adapter made for another base model
        reason = str(exc).strip().splitlines()[0]
        raise ModelUnavailable(f"the IP-Adapter {entry.name!r} does not fit {base_model!r}: {reason}") from exc
    finally:
        plain.apply(pipe)  # whatever happened, the family's UNet and pipeline are plain again
    return adapter
