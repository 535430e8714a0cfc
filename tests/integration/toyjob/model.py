"""The inverter: one 1×1 convolution, loaded from safetensors like any checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from worker.models.catalog import ModelEntry


def load_inverter(entry: ModelEntry, folder: Path, device: str, dtype: torch.dtype) -> torch.nn.Conv2d:
    conv = torch.nn.Conv2d(3, 3, kernel_size=1)
    conv.load_state_dict(load_file(folder / "model.safetensors"))
    return conv.to(device, dtype).eval()


def invert(conv: torch.nn.Conv2d, pixels: np.ndarray, strength: float) -> Any:
    """``pixels``: uint8 (H, W, 3); returns uint8 (H, W, 3), blended toward the inverse by ``strength``."""
    weight = next(conv.parameters())
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].to(weight.device, weight.dtype) / 255
    with torch.inference_mode():
        y = conv(x) * strength + x * (1 - strength)
    return (y[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
