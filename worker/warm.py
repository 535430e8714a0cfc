"""A worker warm before its first job: models preloaded, run at the operator's sizes, compiled graphs cached.

``GPUJOBS_PRELOAD_MODELS`` names the catalog models a worker loads at start; with ``GPUJOBS_WARM_SIZES``
each of them is also run once per size by its kind's ``warm`` hook (a diffusion model: a short
text-to-image run per size; a segmentation model: each of its padding buckets, whatever the sizes, at a
batch of 1 and a full batch, and compiled at each padded batch size). With
``GPUJOBS_TORCH_COMPILE`` that is when the compiled graphs are built, so the first job of a size does
not pay for them. The compile caches (Inductor's kernels and FX graphs) live on the model-cache volume
(``compile_cache_dir``), so a restarted worker reads them back rather than compiling again.

Meanwhile the worker's heartbeat says ``warming`` and the scheduler sends it nothing: its slots count
once it is warm (``worker.dispatcher``). A model that fails to load or warm is logged and skipped: the
jobs that need it report it precisely.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from db.settings import Settings
from worker.jobs.spec import resolve
from worker.models.preload import preload

log = logging.getLogger(__name__)

CACHE_VARIABLES = {"TORCHINDUCTOR_FX_GRAPH_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}


def configure_compile_cache(settings: Settings) -> Path:
    """Point torch.compile's on-disk caches at the model-cache volume, before torch reads its settings.

    ``compile_cache_dir`` when set; else ``TORCHINDUCTOR_CACHE_DIR`` when the operator set it; else
    ``<model_dir>/torch-compile``."""
    if settings.compile_cache_dir is not None:
        folder = settings.compile_cache_dir
    elif os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        folder = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    else:
        folder = (settings.model_dir or settings.var_dir / "models") / "torch-compile"
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    for name, value in CACHE_VARIABLES.items():
        os.environ.setdefault(name, value)
    return folder


def preload_and_warm(settings: Settings) -> dict[str, list[str]]:
    """Load each of ``preload_models`` and run it at ``warm_sizes``; what was warmed, by model name."""
    names = settings.preload_models
    if not names:
        if settings.warm_sizes:
            log.warning("GPUJOBS_WARM_SIZES is set but GPUJOBS_PRELOAD_MODELS names no model: nothing to warm")
        return {}
    warmed: dict[str, list[str]] = {}
    for name in names:
        started = time.monotonic()
        try:
            kind, model = preload(name, settings)
            log.info("preloaded %s in %.1f s", name, time.monotonic() - started)
            if not settings.warm_sizes or kind.warm is None:
                continue
            started = time.monotonic()
            warmed[name] = resolve(kind.warm)(model, settings.warm_sizes, settings)
            log.info("warmed %s (%s) in %.1f s", name, ", ".join(warmed[name]), time.monotonic() - started)
        except Exception as exc:  # a bad preload must not stop the worker: jobs report it precisely
            log.error("could not preload or warm %s: %s", name, exc)
    return warmed
