"""The per-process model cache: load once, keep warm, evict least recently used past a memory budget.

Loaders are given a local folder (catalog sources are resolved here: local folder,
Hugging Face snapshot or S3 prefix) and the device and dtype from settings.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from db import tracing
from db.settings import Settings, get_settings
from worker import metrics
from worker.jobs.spec import JobError, ModelKind, resolve
from worker.models.catalog import CatalogError, ModelEntry, load_catalog

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
CPU_DEFAULT_BUDGET_MB = 8192
# What a Hugging Face source fetches when its catalog entry names no `files`: configs, tokenizers, safetensors.
HF_DEFAULT_FILES = ("*.json", "*.safetensors", "*.txt", "*.model", "*.yaml")


class ModelUnavailable(JobError):
    code = "model_unavailable"


@dataclass
class ModelStats:
    loads: int = 0
    hits: int = 0
    load_seconds: float = 0.0
    bytes: int = 0
    counters: dict[str, int] = field(default_factory=dict)


@dataclass
class _Slot:
    value: Any
    bytes: int


def resolve_device(settings: Settings) -> tuple[str, Any]:
    import torch

    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype_name = settings.dtype
    if dtype_name == "auto":
        dtype_name = "float16" if device.startswith("cuda") else "float32"
    return device, getattr(torch, dtype_name)


def footprint(value: Any) -> int:
    """Bytes held by the torch modules inside ``value`` (shared tensors counted once)."""
    import torch

    seen: set[int] = set()
    total = 0
    modules = [
        v for v in (vars(value).values() if hasattr(value, "__dict__") else []) if isinstance(v, torch.nn.Module)
    ]
    if isinstance(value, torch.nn.Module):
        modules.append(value)
    if hasattr(value, "components"):  # a diffusers pipeline
        modules += [m for m in value.components.values() if isinstance(m, torch.nn.Module)]
    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                total += tensor.numel() * tensor.element_size()
    return total


def _holds(value: Any, module: Any) -> bool:
    """Whether ``module`` is ``value`` or one of its modules (a pipeline's components, a dataclass's fields)."""
    if value is module:
        return True
    parts = list(vars(value).values()) if hasattr(value, "__dict__") else []
    if hasattr(value, "components"):
        parts += list(value.components.values())
    return any(part is module for part in parts)


def check_safetensors(name: str, folder: Path) -> None:
    files = [p for p in folder.rglob("*") if p.is_file()]
    if any(p.suffix == ".safetensors" for p in files):
        return
    pickles = [p.name for p in files if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise ModelUnavailable(
            f"model {name!r} at {folder} has only pickle weights ({', '.join(sorted(pickles)[:3])}); "
            "gpujobs loads safetensors only — convert the checkpoint to .safetensors"
        )
    raise ModelUnavailable(f"model {name!r}: no .safetensors weights found in {folder}")


class ModelCache:
    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        self._slots: OrderedDict[str, _Slot] = OrderedDict()
        self._lock = threading.Lock()
        # One load at a time, whatever the model: the first use of transformers' and diffusers' lazily
        # imported classes is not thread-safe (two first loads of different kinds at once failed with
        # "cannot import name 'CLIPImageProcessor' from 'transformers'"), and loads share one memory budget.
        # A load is rare (the cache keeps what it loaded); a thread that waited finds its model loaded.
        self._load_lock = threading.Lock()
        self.stats: dict[str, ModelStats] = {}
        self._device: tuple[str, Any] | None = None

    @property
    def device(self) -> str:
        return self._resolved()[0]

    @property
    def dtype(self) -> Any:
        return self._resolved()[1]

    def _resolved(self) -> tuple[str, Any]:
        if self._device is None:
            self._device = resolve_device(self.settings)
        return self._device

    def budget_bytes(self) -> int:
        if self.settings.model_memory_mb:
            return self.settings.model_memory_mb * 2**20
        if self.device.startswith("cuda"):
            import torch

            return int(torch.cuda.get_device_properties(torch.device(self.device)).total_memory * 0.9)
        return CPU_DEFAULT_BUDGET_MB * 2**20

    def entry(self, name: str | None, kind: str) -> ModelEntry:
        try:
            catalog = load_catalog(self.settings)
            entry = catalog.get(name) if name else catalog.default_for(kind)
        except CatalogError as exc:
            raise ModelUnavailable(str(exc)) from None
        if entry.kind != kind:
            raise ModelUnavailable(f"model {entry.name!r} is a {entry.kind} model, not a {kind} model")
        return entry

    def load(
        self,
        kind: ModelKind,
        name: str | None,
        *,
        variant: str | None = None,
        loader: Callable[[ModelEntry, Path, str, Any], Any] | None = None,
        on_miss: Callable[[], None] | None = None,
    ) -> Any:
        """The catalog's model ``name`` (default: the kind's default) of ``kind``, loaded once and kept warm.

        ``variant`` keeps a separate copy per variant (an adapter loaded onto one family's UNet),
        ``loader`` replaces the kind's own (for a kind whose models load only onto another model), and
        ``on_miss`` is called when the model is not in memory, before it is loaded.
        """
        entry = self.entry(name, kind.name)
        if loader is None:
            if kind.loader is None:
                raise ModelUnavailable(f"model {entry.name!r}: {kind.name} models load only as part of another model")
            loader = resolve(kind.loader)
        return self.get(kind.cache_key(entry.name, variant), entry, loader, on_miss)

    def get(
        self,
        key: str,
        entry: ModelEntry,
        loader: Callable[[ModelEntry, Path, str, Any], Any],
        on_miss: Callable[[], None] | None = None,
    ) -> Any:
        """The loaded model for ``key``, loading it (once, even under concurrency) on a miss."""
        with self._lock:
            slot = self._slots.get(key)
            if slot is not None:
                self._slots.move_to_end(key)
                self.stats.setdefault(key, ModelStats()).hits += 1
                metrics.MODEL_CACHE_HITS.labels(metrics.model_name(key)).inc()
                return slot.value
        if on_miss is not None:
            on_miss()
        with self._load_lock:
            with self._lock:
                if key in self._slots:  # loaded by the thread we waited for
                    self._slots.move_to_end(key)
                    self.stats.setdefault(key, ModelStats()).hits += 1
                    metrics.MODEL_CACHE_HITS.labels(metrics.model_name(key)).inc()
                    return self._slots[key].value
            started = time.perf_counter()
            folder = self.local_folder(entry)
            device, dtype = self._resolved()
            try:
                with tracing.span("model.load", model=entry.name, device=device):
                    value = loader(entry, folder, device, dtype)
            except JobError:
                raise
            except (OSError, ValueError, KeyError) as exc:
                raise ModelUnavailable(f"model {entry.name!r} at {folder} could not be loaded: {exc}") from exc
            size = footprint(value)
            elapsed = time.perf_counter() - started
            with self._lock:
                self._evict_for(size)
                self._slots[key] = _Slot(value, size)
                stats = self.stats.setdefault(key, ModelStats())
                stats.loads += 1
                stats.load_seconds += elapsed
                stats.bytes = size
            metrics.MODEL_LOADS.labels(metrics.model_name(key)).inc()
            metrics.MODEL_LOAD_SECONDS.labels(metrics.model_name(key)).inc(elapsed)
            log.info("loaded model %s (%s) on %s in %.2f s, %.1f MB", key, entry.source, device, elapsed, size / 2**20)
            return value

    def remeasure(self, module: Any) -> None:
        """Measure again the loaded models that hold ``module`` (a UNet whose LoRA adapters changed); past the
        budget, others go, least recently used first. Call while nothing else changes ``module``."""
        with self._lock:
            holders = [key for key, slot in self._slots.items() if _holds(slot.value, module)]
            for key in holders:
                slot = self._slots[key]
                slot.bytes = self.stats[key].bytes = footprint(slot.value)
            self._evict_for(0, keep=holders)

    def _evict_for(self, incoming: int, keep: Collection[str] = ()) -> None:
        budget = self.budget_bytes()
        while sum(s.bytes for s in self._slots.values()) + incoming > budget:
            name = next((key for key in self._slots if key not in keep), None)
            if name is None:
                return
            slot = self._slots.pop(name)
            self.stats[name].bytes = 0
            metrics.MODEL_CACHE_EVICTIONS.labels(metrics.model_name(name)).inc()
            log.info("evicted model %s (%.1f MB) to stay within %.0f MB", name, slot.bytes / 2**20, budget / 2**20)
            del slot
            self._release_memory()

    def _release_memory(self) -> None:
        import gc

        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def count(self, key: str, counter: str, n: int = 1) -> None:
        with self._lock:
            counters = self.stats.setdefault(key, ModelStats()).counters
            counters[counter] = counters.get(counter, 0) + n

    def loaded(self) -> dict[str, dict[str, Any]]:
        """What the heartbeat reports."""
        with self._lock:
            return {
                name: {
                    "loaded": name in self._slots,
                    "loads": stats.loads,
                    "hits": stats.hits,
                    "mb": round(stats.bytes / 2**20, 1),
                    "load_seconds": round(stats.load_seconds, 2),
                    **stats.counters,
                }
                for name, stats in self.stats.items()
            }

    # --- sources ---------------------------------------------------------------------
    def local_folder(self, entry: ModelEntry) -> Path:
        if entry.scheme == "local":
            folder = Path(entry.source).expanduser()
            if not folder.is_dir():
                raise ModelUnavailable(f"model {entry.name!r}: the folder {folder} does not exist")
        elif entry.scheme == "s3":
            folder = self._download_s3(entry)
        else:
            folder = self._download_hf(entry)
        check_safetensors(entry.name, folder)
        return folder

    def _model_dir(self) -> Path:
        return self.settings.model_dir or (self.settings.var_dir / "models")

    def _download_s3(self, entry: ModelEntry) -> Path:
        from db.storage import get_storage

        bucket, _, prefix = entry.source.removeprefix("s3://").partition("/")
        folder = self._model_dir() / hashlib.sha256(entry.source.encode()).hexdigest()[:16]
        marker = folder / ".complete"
        if marker.exists():
            return folder
        client = get_storage(self.settings).client
        paginator = client.get_paginator("list_objects_v2")
        count = 0
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/"):
            for obj in page.get("Contents", []):
                relative = obj["Key"][len(prefix.rstrip("/")) + 1 :]
                if not relative or ".." in Path(relative).parts:
                    continue
                target = folder / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(bucket, obj["Key"], str(target))
                count += 1
        if count == 0:
            raise ModelUnavailable(f"model {entry.name!r}: nothing found under {entry.source}")
        marker.touch()
        return folder

    def _download_hf(self, entry: ModelEntry) -> Path:
        try:
            from huggingface_hub import snapshot_download

            path = snapshot_download(
                entry.source,
                revision=entry.revision,
                allow_patterns=list(entry.files or HF_DEFAULT_FILES),
            )
        except Exception as exc:
            raise ModelUnavailable(
                f"model {entry.name!r}: could not fetch {entry.source}@{entry.revision or 'main'} "
                f"from Hugging Face ({type(exc).__name__}); on an offline machine point the catalog at a local folder"
            ) from exc
        return Path(path)


_cache: ModelCache | None = None
_cache_lock = threading.Lock()


def get_cache() -> ModelCache:
    global _cache
    with _cache_lock:
        if _cache is None:
            _cache = ModelCache()
        return _cache
