"""Load a catalog model at worker start (``GPUJOBS_PRELOAD_MODELS``); ``worker.warm`` then runs it."""

from __future__ import annotations

from typing import Any

from db.settings import Settings
from worker.jobs import model_kinds
from worker.jobs.spec import ModelKind
from worker.models.cache import get_cache
from worker.models.catalog import load_catalog


def preload(name: str, settings: Settings) -> tuple[ModelKind, Any]:
    """The catalog's model ``name``, loaded into this process's cache, with its kind."""
    entry = load_catalog(settings).get(name)
    kind = model_kinds(settings)[entry.kind]
    return kind, get_cache().load(kind, entry.name)
