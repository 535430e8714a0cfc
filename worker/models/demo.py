"""Tiny random-weight models for every model job type, saved like real checkpoints.

``gpujobs models demo DIR`` (and ``gpujobs up --demo``) build them and write
``DIR/catalog.toml``; workers then load them through the same ``from_pretrained``
path as the real checkpoints. Their outputs are noise; their code path is real.
"""

from __future__ import annotations

import logging
from pathlib import Path

from worker.models.catalog import write_catalog
from worker.models.coco import COCO_LABELS
from worker.models.demo_diffusion import build_diffusion_models

log = logging.getLogger(__name__)

SEGMENTATION = "demo-mask2former"


def build_segmentation(folder: Path, seed: int = 0) -> None:
    """A small Swin + Mask2Former with the 80 COCO labels, and its image processor."""
    import torch
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig
    from transformers.models.mask2former import Mask2FormerImageProcessorPil

    backbone = SwinConfig(
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=7,
        image_size=224,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(
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
    torch.manual_seed(seed)
    model = Mask2FormerForUniversalSegmentation(config)
    model.save_pretrained(folder, safe_serialization=True)
    Mask2FormerImageProcessorPil(size={"shortest_edge": 384, "longest_edge": 384}).save_pretrained(folder)


def build_demo_models(directory: Path) -> Path:
    """Build every demo model under ``directory`` (skipping ones already built); returns the catalog path."""
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    entries = {}
    segmentation = directory / SEGMENTATION
    if not (segmentation / "model.safetensors").exists():
        log.info("building %s", segmentation)
        build_segmentation(segmentation)
    entries[SEGMENTATION] = {"kind": "segmentation", "source": str(segmentation), "default": True}
    entries.update(build_diffusion_models(directory))
    catalog = directory / "catalog.toml"
    write_catalog(catalog, entries)
    return catalog
