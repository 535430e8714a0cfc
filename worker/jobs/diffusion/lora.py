"""A generation job's LoRAs on a warm UNet: fetched once, kept loaded (LRU), switched on per run.

A job names its LoRAs by model id (checked at submit to be its tenant's and made for the job's
base model). Here each is looked up again (it may have been deleted since), its weights fetched
from storage once per worker into ``<model_dir>/loras/<sha256>.safetensors`` (checked against
the recorded sha256), and loaded into the UNet as a peft adapter named by the model id.

Adapters stay in the UNet after the run, up to ``lora_cache_size`` per UNet (least recently used
dropped first): loading one costs a file read and a few hundred module swaps, switching costs almost
nothing. Their weights count in the model cache's memory budget (the UNet's model is measured again
when its adapters change, and other models make room). Every run sets the adapters it wants before
it starts, under the family's lock: the job's LoRAs at their scales, or all adapters off, so a run
without LoRAs computes exactly what the base model computes (peft then calls the original layers
only).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from db.settings import Settings
from db.storage import StorageError, get_storage
from worker.jobs.spec import JobError
from worker.models.cache import get_cache

if TYPE_CHECKING:
    from worker.context import TenantModel

log = logging.getLogger(__name__)

_adapters: weakref.WeakKeyDictionary[Any, OrderedDict[str, str]] = weakref.WeakKeyDictionary()
_fetch_lock = threading.Lock()


@dataclass(frozen=True)
class Lora:
    model_id: str
    scale: float
    path: Path
    sha256: str


def resolve(
    wanted: Sequence[tuple[str, float]], found: Mapping[str, TenantModel], base_model: str, settings: Settings
) -> list[Lora]:
    """The LoRAs ``wanted`` (model id, scale) with their weights on local disk.

    A deleted or mismatched one fails the job."""
    loras = []
    for model_id, scale in wanted:
        row = found.get(model_id)
        if row is None:
            raise JobError(f"The LoRA model {model_id!r} no longer exists (it was deleted).", "lora_missing")
        if row.base_model != base_model:
            raise JobError(
                f"The LoRA model {model_id!r} was trained on {row.base_model!r}; this job runs {base_model!r}.",
                "lora_mismatch",
            )
        loras.append(Lora(row.id, scale, _fetch(settings, row), row.sha256))
    return loras


def _fetch(settings: Settings, row: TenantModel) -> Path:
    folder = (settings.model_dir or settings.var_dir / "models") / "loras"
    path = folder / f"{row.sha256}.safetensors"
    with _fetch_lock:
        if path.is_file():
            return path
        try:
            data = get_storage(settings).get(row.storage_key)
        except StorageError as exc:
            raise JobError(
                f"The weights of the LoRA model {row.id!r} could not be read: {exc}", "lora_missing"
            ) from None
        if hashlib.sha256(data).hexdigest() != row.sha256:
            raise JobError(
                f"The stored weights of the LoRA model {row.id!r} do not match their checksum.", "invalid_lora"
            )
        folder.mkdir(parents=True, exist_ok=True)
        scratch = path.with_suffix(f".{os.getpid()}.partial")
        scratch.write_bytes(data)
        scratch.replace(path)
        return path


@contextmanager
def applied(unet: Any, loras: Sequence[Lora], capacity: int, cache_key: str) -> Iterator[None]:
    """Run with exactly ``loras`` active on ``unet`` (call under the family's lock)."""
    loaded = _adapters.setdefault(unet, OrderedDict())
    if not loras:
        if loaded:
            unet.disable_lora()
        yield
        return
    cache = get_cache()
    count = len(loaded)
    try:
        for lora in loras:
            if loaded.get(lora.model_id) == lora.sha256:
                loaded.move_to_end(lora.model_id)
                continue
            _load(unet, lora)
            loaded[lora.model_id] = lora.sha256
            cache.count(cache_key, "lora_loads")
    finally:
        if len(loaded) != count:  # the adapters' weights count in the model cache's memory budget
            cache.remeasure(unet)
    unet.enable_lora()
    unet.set_adapters([lora.model_id for lora in loras], [lora.scale for lora in loras])
    try:
        yield
    finally:
        wanted = {lora.model_id for lora in loras}
        spare = [name for name in loaded if name not in wanted]
        count = len(loaded)
        while len(loaded) > max(capacity, len(wanted)) and spare:  # drop the least recently used
            name = spare.pop(0)
            unet.delete_adapters([name])
            del loaded[name]
        if capacity == 0:
            unet.delete_adapters(list(loaded))
            loaded.clear()
        if len(loaded) != count:
            cache.remeasure(unet)


def _load(unet: Any, lora: Lora) -> None:
    """diffusers' own LoRA loading (``lora_state_dict`` + ``load_lora_into_unet``), aimed at this UNet."""
    from diffusers import StableDiffusionPipeline
    from safetensors import SafetensorError

    try:
        state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(
            str(lora.path.parent), weight_name=lora.path.name, return_lora_metadata=True
        )
        if lora.model_id in (getattr(unet, "peft_config", None) or {}):  # the same id with other weights
            unet.delete_adapters([lora.model_id])
        StableDiffusionPipeline.load_lora_into_unet(
            state, network_alphas=alphas, unet=unet, adapter_name=lora.model_id, metadata=metadata
        )
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError) as exc:
        raise JobError(
            f"The LoRA model {lora.model_id!r} could not be applied to this model: {exc}", "invalid_lora"
        ) from None
    log.info("loaded LoRA %s into %s", lora.model_id, type(unet).__name__)
