"""A tiny random-weight Mask2Former with the 80 COCO labels, saved like the real checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from worker.jobs.segmentation.coco import COCO_LABELS

log = logging.getLogger(__name__)

NAME = "demo-mask2former"


def tiny_config() -> Any:
    """A small Swin + Mask2Former configuration with the 80 COCO labels (seconds on a CPU)."""
    from transformers import Mask2FormerConfig, SwinConfig

    backbone = SwinConfig(
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=7,
        image_size=224,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    return Mask2FormerConfig(
        backbone_config=backbone,
        num_queries=20,
        hidden_dim=32,
        mask_feature_size=32,
        feature_size=32,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        dim_feedforward=64,
        encoder_feedforward_dim=64,
        num_labels=len(COCO_LABELS),
        id2label=dict(enumerate(COCO_LABELS)),
        label2id={name: i for i, name in enumerate(COCO_LABELS)},
    )


def build_segmentation(folder: Path, seed: int = 0) -> None:
    """The tiny model with random weights, and its image processor, saved like the real checkpoint."""
    import torch
    from transformers import Mask2FormerForUniversalSegmentation
    from transformers.models.mask2former import Mask2FormerImageProcessorPil

    torch.manual_seed(seed)
    model = Mask2FormerForUniversalSegmentation(tiny_config())
    model.save_pretrained(folder, safe_serialization=True)
    Mask2FormerImageProcessorPil(size={"shortest_edge": 384, "longest_edge": 384}).save_pretrained(folder)


def build(directory: Path) -> dict[str, dict[str, Any]]:
    """Build the demo segmentation model under ``directory`` (once); its catalog entry."""
    folder = directory / NAME
    if not (folder / "model.safetensors").exists():
        log.info("building %s", folder)
        build_segmentation(folder)
    return {NAME: {"kind": "segmentation", "source": str(folder), "default": True}}
