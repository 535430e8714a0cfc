"""Tiny random-weight models for every model kind, saved like real checkpoints.

``gpujobs models demo DIR`` (and ``gpujobs up --demo``) build them with each model kind's
``demo`` builder and write ``DIR/catalog.toml``; workers then load them through the same
``from_pretrained`` path as the real checkpoints. Their outputs are noise; their code path is real.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from db.settings import Settings
from worker.jobs import model_kinds
from worker.jobs.spec import resolve
from worker.models.catalog import write_catalog


def build_demo_models(directory: Path, settings: Settings | None = None) -> Path:
    """Build every demo model under ``directory`` (skipping ones already built); returns the catalog path."""
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    entries: dict[str, dict[str, Any]] = {}
    for kind in model_kinds(settings).values():
        if kind.demo is not None:
            entries.update(resolve(kind.demo)(directory))
    catalog = directory / "catalog.toml"
    write_catalog(catalog, entries)
    return catalog
