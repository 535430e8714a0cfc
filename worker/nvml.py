"""GPU utilisation and memory from NVML (``nvidia-ml-py``) on a worker's own ``/metrics``.

Why NVML and not torch: it sees the whole device (other processes' memory too, utilisation over the
last sample period) and costs no CUDA context. Optional: without the package, the driver or a GPU
``register`` adds nothing and the families are absent (not zero), as Prometheus expects of a
worker that has no GPU. The devices are those ``CUDA_VISIBLE_DEVICES`` names when it names them by
index, else all the driver sees.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger(__name__)

_registered: set[int] = set()
UTILIZATION, MEMORY_USED, MEMORY_TOTAL = (
    "gpujobs_gpu_utilization_ratio",
    "gpujobs_gpu_memory_used_bytes",
    "gpujobs_gpu_memory_total_bytes",
)
FAMILIES = (UTILIZATION, MEMORY_USED, MEMORY_TOTAL)


def load() -> Any | None:
    """The initialised ``pynvml`` module, or None when there is no package, driver or device."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        if pynvml.nvmlDeviceGetCount() < 1:
            return None
    except Exception as exc:  # NVMLError: no driver (a CPU host) or a driver/library mismatch
        log.debug("no NVML: %s", exc)
        return None
    return pynvml


def visible_indices(count: int) -> list[int]:
    named = os.environ.get("CUDA_VISIBLE_DEVICES")
    if named is None:
        return list(range(count))
    indices = [int(part) for part in named.split(",") if part.strip().isdigit()]
    return [i for i in indices if i < count] if indices or not named.strip() else list(range(count))


class GpuCollector:
    """Reads NVML at each scrape (a few microseconds per device)."""

    def __init__(self, nvml: Any) -> None:
        self.nvml = nvml

    def collect(self) -> Iterator[GaugeMetricFamily]:
        nvml = self.nvml
        util = GaugeMetricFamily(UTILIZATION, "GPU busy fraction (NVML).", labels=["gpu", "name"])
        used = GaugeMetricFamily(MEMORY_USED, "GPU memory in use (NVML).", labels=["gpu", "name"])
        total = GaugeMetricFamily(MEMORY_TOTAL, "GPU memory (NVML).", labels=["gpu", "name"])
        try:
            for index in visible_indices(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                name = nvml.nvmlDeviceGetName(handle)
                name = name.decode() if isinstance(name, bytes) else str(name)
                labels = [str(index), name]
                util.add_metric(labels, nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                used.add_metric(labels, float(memory.used))
                total.add_metric(labels, float(memory.total))
        except Exception as exc:  # a device that fell off the bus: this scrape has no GPU numbers
            log.warning("NVML read failed: %s", exc)
            return
        yield from (util, used, total)


def device_summary(nvml: Any) -> dict[str, Any] | None:
    """The worker's GPU as its heartbeat records it: the first visible device, as NVML sees it.

    None when NVML cannot read it (the heartbeat then falls back to torch)."""
    try:
        indices = visible_indices(nvml.nvmlDeviceGetCount())
        if not indices:
            return None
        handle = nvml.nvmlDeviceGetHandleByIndex(indices[0])
        name = nvml.nvmlDeviceGetName(handle)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        utilization = nvml.nvmlDeviceGetUtilizationRates(handle).gpu
    except Exception as exc:  # a device that fell off the bus
        log.warning("NVML read failed: %s", exc)
        return None
    return {
        "type": "cuda",
        "source": "nvml",
        "index": indices[0],
        "name": name.decode() if isinstance(name, bytes) else str(name),
        "memory_used_mb": round(memory.used / 2**20),
        "memory_total_mb": round(memory.total / 2**20),
        "utilization_percent": int(utilization),
    }


def register(registry: Any) -> bool:
    """Add the GPU gauges to ``registry`` when NVML answers; whether it did."""
    if id(registry) in _registered:
        return True
    nvml = load()
    if nvml is None:
        return False
    registry.register(GpuCollector(nvml))
    _registered.add(id(registry))
    return True
