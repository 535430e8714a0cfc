"""Load catalog models at worker start (``GPUJOBS_PRELOAD_MODELS``), so the first job is warm."""

from __future__ import annotations

import logging

from worker.models.cache import get_cache

log = logging.getLogger(__name__)

LOADERS = {
    "segmentation": ("worker.models.segmentation", "load_segmenter", "segmentation:{name}"),
    "diffusion": ("worker.models.diffusion", "load_family", "diffusion:{name}"),
    "inpainting": ("worker.models.diffusion", "load_inpainting_unet", "inpainting:{name}"),
}


def preload(names: list[str]) -> None:
    import importlib

    cache = get_cache()
    for name in names:
        try:
            entry = cache.entry(name, cache_kind(name))
            module, function, key = LOADERS[entry.kind]
            loader = getattr(importlib.import_module(module), function)
            cache.get(key.format(name=entry.name), entry, loader)
        except Exception as exc:  # a bad preload must not stop the worker: jobs report it precisely
            log.error("could not preload %s: %s", name, exc)


def cache_kind(name: str) -> str:
    from worker.models.catalog import load_catalog

    return load_catalog().get(name).kind
