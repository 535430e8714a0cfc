"""Load catalog models at worker start (``GPUJOBS_PRELOAD_MODELS``), so the first job is warm."""

from __future__ import annotations

import logging

from worker.jobs import model_kinds
from worker.models.cache import get_cache
from worker.models.catalog import load_catalog

log = logging.getLogger(__name__)


def preload(names: list[str]) -> None:
    cache = get_cache()
    kinds = model_kinds(cache.settings)
    for name in names:
        try:
            entry = load_catalog(cache.settings).get(name)
            cache.load(kinds[entry.kind], entry.name)
        except Exception as exc:  # a bad preload must not stop the worker: jobs report it precisely
            log.error("could not preload %s: %s", name, exc)
