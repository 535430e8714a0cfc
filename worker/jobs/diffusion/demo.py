"""Tiny Stable Diffusion checkpoints for offline runs, saved as ordinary diffusers folders.

``build_stable_diffusion`` writes a complete ``StableDiffusionPipeline`` folder (model_index.json,
unet/, vae/, text_encoder/, tokenizer/, scheduler/, safetensors weights) and
``build_inpainting_unet`` a dedicated 9-channel inpainting UNet (``unet/``), both loaded back by
the worker through ``from_pretrained`` like any real checkpoint, and ``build_ip_adapter`` an
IP-Adapter for the tiny UNet laid out like ``h94/IP-Adapter``'s ``models/`` folder (an
``image_encoder/`` and an ``ip-adapter_sd15.safetensors``), loaded by diffusers'
``load_ip_adapter``. Sized so that CPU tests take seconds: a 64×64 image is 8×8 latents (the VAE
downsamples by 8, like SD's).

The UNet, text encoder and IP-Adapter have random weights, so generated pictures are noise. The VAE's
weights are set by hand instead: it encodes each 8×8 block to its mean colour and decodes by
repeating it. Image-to-image results are then real pictures whose colours follow the latents,
which is what lets tests check style transfer and inpainting by their pixels.

The CLIP tokenizer is built offline from an in-code byte-level vocabulary (every byte, as a
word piece and as a word end, plus a few merges): real BPE, just a small vocabulary.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CROSS_ATTENTION_DIM = 32
IMAGE_ENCODER_SIZE = 32  # the IP-Adapter's CLIP image encoder sees 32×32 pictures (SD 1.5's sees 224×224)
IP_ADAPTER_WEIGHTS = "ip-adapter_sd15.safetensors"
IP_ADAPTER_TOKENS = 4  # image tokens per picture, as the original (non-Plus) IP-Adapter makes
SCHEDULER_CONFIG: dict[str, Any] = {  # what SD 1.5 ships (model-configs/sd15/scheduler)
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
}
MERGES = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("i", "n"), ("e", "r"), ("o", "n</w>"), ("a", "t</w>")]

# The hand-set VAE: pixel colour rides in channels 0-2, its negative in 3-5 and a constant carrier
# in 6-7, so the GroupNorm before each conv_out sees a fixed mean and variance (the signal cancels)
# and acts as a fixed affine map; SHIFT keeps the SiLU after it in its linear range.
VAE_CHANNELS = 8
CARRIER = 40.0
SHIFT = 12.0


def byte_alphabet() -> list[str]:
    """GPT-2/CLIP's printable stand-ins for the 256 byte values, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    codes = dict(zip(printable, printable, strict=True)) | {b: 256 + i for i, b in enumerate(extra)}
    return [chr(codes[b]) for b in range(256)]


def build_tokenizer(folder: Path) -> Any:
    """A CLIP BPE tokenizer with a small vocabulary, saved to ``folder`` (also as vocab.json + merges.txt)."""
    from transformers import CLIPTokenizer

    alphabet = byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=list(MERGES), model_max_length=77)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    # The files a slow (Python) CLIPTokenizer reads, for transformers releases that want them.
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
    return tokenizer


def tiny_unet(in_channels: int = 4, seed: int = 0) -> Any:
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=CROSS_ATTENTION_DIM,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def tiny_text_encoder(tokenizer: Any, seed: int = 0) -> Any:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=CROSS_ATTENTION_DIM,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=CROSS_ATTENTION_DIM,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def tiny_image_encoder(seed: int = 0) -> Any:
    """A CLIPVisionModelWithProjection whose image embeddings have the UNet's cross-attention width."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_ENCODER_SIZE,
        patch_size=8,
        projection_dim=CROSS_ATTENTION_DIM,
    )
    return CLIPVisionModelWithProjection(config)


def ip_adapter_weights(unet: Any, image_embed_dim: int, seed: int = 0) -> dict[str, Any]:
    """Random IP-Adapter weights for ``unet`` in the original checkpoints' format (what diffusers converts).

    ``image_proj.*``: a linear map of the image embedding to ``IP_ADAPTER_TOKENS`` tokens and their
    LayerNorm. ``ip_adapter.<n>.to_k_ip/to_v_ip``: the extra key and value projections of each
    cross-attention layer, numbered 1, 3, 5, … in the order of ``unet.attn_processors``.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    width = unet.config.cross_attention_dim

    def normal(rows: int, columns: int) -> torch.Tensor:
        return torch.randn(rows, columns, generator=generator) / math.sqrt(columns)

    weights = {
        "image_proj.proj.weight": normal(width * IP_ADAPTER_TOKENS, image_embed_dim),
        "image_proj.proj.bias": torch.zeros(width * IP_ADAPTER_TOKENS),
        "image_proj.norm.weight": torch.ones(width),
        "image_proj.norm.bias": torch.zeros(width),
    }
    cross_attention = [name for name in unet.attn_processors if not name.endswith("attn1.processor")]
    for index, name in enumerate(cross_attention):
        hidden = unet.get_submodule(name.removesuffix(".processor")).to_k.out_features
        weights[f"ip_adapter.{2 * index + 1}.to_k_ip.weight"] = normal(hidden, width)
        weights[f"ip_adapter.{2 * index + 1}.to_v_ip.weight"] = normal(hidden, width)
    return weights


def block_colour_vae() -> Any:
    """An AutoencoderKL (4 levels: ÷8) that encodes 8×8 blocks to their colour and decodes them back."""
    import torch
    from diffusers import AutoencoderKL
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(VAE_CHANNELS,) * 4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=1,
        sample_size=64,
        scaling_factor=1.0,  # latents already span about [-1, 1], like scaled SD latents
    )
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, ResnetBlock2D):  # residual branch off: the block is the identity
                module.conv2.weight.zero_()
                module.conv2.bias.zero_()
            elif isinstance(module, Attention):
                module.to_out[0].weight.zero_()
                module.to_out[0].bias.zero_()
        for block in vae.encoder.down_blocks:
            for down in block.downsamplers or []:  # stride-2 conv on a (0,1,0,1)-padded input: mean of 2×2
                _set_conv(down.conv, {c: c for c in range(VAE_CHANNELS)}, taps=[(0, 0), (0, 1), (1, 0), (1, 1)])
        for block in vae.decoder.up_blocks:
            for up in block.upsamplers or []:  # nearest ×2, then the identity
                _set_conv(up.conv, {c: c for c in range(VAE_CHANNELS)})
        signal = {0: 0, 1: 1, 2: 2}
        _set_carrier_conv(vae.encoder.conv_in, signal)
        _set_carrier_conv(vae.decoder.conv_in, signal)
        for norm in (vae.encoder.conv_norm_out, vae.decoder.conv_norm_out):
            std = math.sqrt(CARRIER**2 * 2 / VAE_CHANNELS - (CARRIER * 2 / VAE_CHANNELS) ** 2)
            norm.weight.fill_(std)
            norm.bias.fill_(CARRIER * 2 / VAE_CHANNELS + SHIFT)
        # Encoder out: latent means 0-2 = colour, 3 = grey; log-variances so low that sampling is exact.
        _set_conv(vae.encoder.conv_out, {0: 0, 1: 1, 2: 2}, bias=-SHIFT)
        vae.encoder.conv_out.weight[3, 0:3, 1, 1] = 1 / 3
        vae.encoder.conv_out.bias[3] = -SHIFT
        vae.encoder.conv_out.bias[4:] = -20.0
        _set_conv(vae.decoder.conv_out, {0: 0, 1: 1, 2: 2}, bias=-SHIFT)
        _set_conv(vae.quant_conv, {c: c for c in range(8)})
        _set_conv(vae.post_quant_conv, {c: c for c in range(4)})
    return vae


def _set_conv(conv: Any, mapping: dict[int, int], taps: list[tuple[int, int]] | None = None, bias: float = 0.0) -> None:
    """Output channel ``o`` = mean of input channel ``mapping[o]`` over ``taps`` (default: the centre)."""
    kernel_h, kernel_w = conv.weight.shape[2:]
    taps = taps or [(kernel_h // 2, kernel_w // 2)]
    conv.weight.zero_()
    conv.bias.zero_()
    for out_channel, in_channel in mapping.items():
        for row, col in taps:
            conv.weight[out_channel, in_channel, row, col] = 1 / len(taps)
        conv.bias[out_channel] = bias


def _set_carrier_conv(conv: Any, signal: dict[int, int]) -> None:
    """Channels 0-2: the signal; 3-5: its negative; 6-7: the constant carrier."""
    _set_conv(conv, signal)
    for out_channel, in_channel in signal.items():
        conv.weight[out_channel + 3, in_channel, 1, 1] = -1.0
    conv.bias[6:] = CARRIER


def build_stable_diffusion(folder: Path, seed: int = 0) -> None:
    """A tiny StableDiffusionPipeline saved as a diffusers folder with safetensors weights."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    tokenizer = build_tokenizer(folder / "tokenizer")
    pipeline = StableDiffusionPipeline(
        vae=block_colour_vae(),
        text_encoder=tiny_text_encoder(tokenizer, seed),
        tokenizer=tokenizer,
        unet=tiny_unet(4, seed),
        scheduler=PNDMScheduler.from_config(SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder, safe_serialization=True)


def build_inpainting_unet(folder: Path, seed: int = 1) -> None:
    """A tiny 9-channel (latents + mask + masked-image latents) UNet in ``folder/unet``, like SD-inpainting's."""
    tiny_unet(9, seed).save_pretrained(folder / "unet", safe_serialization=True)


def build_ip_adapter(folder: Path, seed: int = 2) -> None:
    """A tiny IP-Adapter for the demo UNet: ``image_encoder/`` (with its image processor) and the weights file."""
    from safetensors.torch import save_file
    from transformers.models.clip import CLIPImageProcessorPil

    encoder = tiny_image_encoder(seed)
    encoder.save_pretrained(folder / "image_encoder", safe_serialization=True)
    side = IMAGE_ENCODER_SIZE
    CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(
        folder / "image_encoder"
    )
    layout = tiny_unet()  # the demo UNet's attention layers and widths (its weights play no part)
    weights = ip_adapter_weights(layout, encoder.config.projection_dim, seed)
    save_file({name: tensor.contiguous() for name, tensor in weights.items()}, folder / IP_ADAPTER_WEIGHTS)


STABLE_DIFFUSION = "demo-sd"
INPAINTING = "demo-sd-inpainting"
IP_ADAPTER = "demo-sd-ip-adapter"
# The default, written out. The random adapter moves the latents visibly, yet style transfer still
# follows the style image's colours (AdaIN sets them), which is what the tests check.
IP_ADAPTER_SCALE = 1.0


def build(directory: Path) -> dict[str, dict[str, Any]]:
    """Build the demo pipeline, inpainting UNet and IP-Adapter under ``directory`` (unless built).

    Returns their catalog entries.
    """
    base, inpainting, ip_adapter = directory / STABLE_DIFFUSION, directory / INPAINTING, directory / IP_ADAPTER
    _build_once(base, build_stable_diffusion)
    _build_once(inpainting, build_inpainting_unet)
    _build_once(ip_adapter, build_ip_adapter)
    return {
        STABLE_DIFFUSION: {
            "kind": "diffusion",
            "source": str(base),
            "default": True,
            "inpainting": INPAINTING,
            "ip_adapter": IP_ADAPTER,
            "ip_adapter_scale": IP_ADAPTER_SCALE,
        },
        INPAINTING: {"kind": "inpainting", "source": str(inpainting)},
        IP_ADAPTER: {"kind": "ip_adapter", "source": str(ip_adapter), "weight_name": IP_ADAPTER_WEIGHTS},
    }


def _build_once(folder: Path, build: Any) -> None:
    """Build into a scratch folder and rename it: an interrupted build never looks finished."""
    import shutil

    if folder.is_dir():
        return
    log.info("building %s", folder)
    scratch = folder.with_name(folder.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    build(scratch)
    scratch.rename(folder)
