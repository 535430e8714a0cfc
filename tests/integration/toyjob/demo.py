"""A demo inverter (weights −1, bias 1: exact), saved as ``model.safetensors``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

NAME = "demo-inverter"


def build(directory: Path) -> dict[str, dict[str, Any]]:
    import torch
    from safetensors.torch import save_file

    folder = directory / NAME
    folder.mkdir(parents=True, exist_ok=True)
    weight = -torch.eye(3).reshape(3, 3, 1, 1)
    save_file({"weight": weight.contiguous(), "bias": torch.ones(3)}, folder / "model.safetensors")
    return {NAME: {"kind": "inverter", "source": str(folder), "default": True}}
