"""Process metrics without services: NVML present, absent and failing; stable worker labels; the API's
request hook labels URL rules, never raw paths; the gunicorn server's process_* over /proc."""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families


def _families(registry: Any) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}


class FakeNvml:
    """The handful of pynvml calls ``worker.nvml`` makes, answering for two devices."""

    def __init__(self, fail_init: bool = False, fail_read: bool = False) -> None:
        self.fail_init, self.fail_read = fail_init, fail_read

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if self.fail_read:
            raise RuntimeError("GPU is lost")
        return index

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return b"NVIDIA H200"

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        return SimpleNamespace(gpu=[37, 80][handle])

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        return SimpleNamespace(used=[2**30, 2**33][handle], total=141 * 2**30)


def test_without_the_nvml_package_no_gpu_family_is_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker import nvml

    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    registry = CollectorRegistry()
    assert nvml.load() is None and nvml.register(registry) is False
    assert not set(nvml.FAMILIES) & set(_families(registry))


def test_without_a_driver_no_gpu_family_is_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker import nvml

    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(fail_init=True))
    registry = CollectorRegistry()
    assert nvml.register(registry) is False and _families(registry) == {}


def test_gpu_gauges_follow_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker import nvml

    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    registry = CollectorRegistry()
    assert nvml.register(registry) is True
    found = _families(registry)
    assert set(found) == set(nvml.FAMILIES)
    [util] = found[nvml.UTILIZATION].samples
    assert util.labels == {"gpu": "1", "name": "NVIDIA H200"} and util.value == 0.8
    assert found[nvml.MEMORY_USED].samples[0].value == 2**33
    assert found[nvml.MEMORY_TOTAL].samples[0].value == 141 * 2**30
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert len(_families(registry)[nvml.UTILIZATION].samples) == 2


def test_a_failing_read_drops_the_gpu_families_from_that_scrape(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker import nvml

    registry = CollectorRegistry()
    registry.register(nvml.GpuCollector(FakeNvml(fail_read=True)))
    assert _families(registry) == {}


@pytest.mark.parametrize(
    ("row_id", "queues", "label"),
    [
        ("gpu-a@host1:4242:ab12cd", ["gpu"], "gpu-a"),
        ("gpujobs-4242@host1:4242:ab12cd", ["train", "gpu"], "gpu,train"),
        ("gpujobs-4242@host1:4242:ab12cd", [], "gpujobs-4242"),
        ("gpujobs-cpu@host1:1:x", ["webhooks"], "gpujobs-cpu"),
    ],
)
def test_worker_labels_carry_no_pid_or_random_suffix(row_id: str, queues: list[str], label: str) -> None:
    from api.metrics import worker_label

    assert worker_label(row_id, queues) == label


def test_the_request_hook_labels_url_rules_and_bounds_methods() -> None:
    from flask import Flask

    from api import instruments
    from worker import metrics

    app = Flask(__name__)
    instruments.register(app)

    @app.get("/v1/things/<thing_id>")
    def thing(thing_id: str) -> str:
        return thing_id

    def count(route: str, method: str, status: str) -> float:
        value = metrics.HTTP_REQUESTS.labels(route, method, status)._value.get()
        return float(value)

    client = app.test_client()
    before = count("/v1/things/<thing_id>", "GET", "200"), count("unmatched", "GET", "404")
    before_other = count("unmatched", "other", "404")
    for thing in ("thing_a", "thing_b"):
        assert client.get(f"/v1/things/{thing}").status_code == 200
    assert client.get("/nowhere/job_123456789").status_code == 404
    assert client.open("/nowhere", method="BREW").status_code == 404
    assert count("/v1/things/<thing_id>", "GET", "200") == before[0] + 2
    assert count("unmatched", "GET", "404") == before[1] + 1
    assert count("unmatched", "other", "404") == before_other + 1
    routes = {s.labels.get("route") for f in _families(REGISTRY).values() for s in f.samples}
    assert not any("thing_a" in str(r) or "job_1234" in str(r) for r in routes)


def test_server_processes_sum_the_parent_and_its_children() -> None:
    """Run as if this test process were a gunicorn worker: its parent is the 'arbiter'."""
    from api.instruments import ServerProcesses, children

    assert os.getpid() in children(os.getppid())
    registry = CollectorRegistry()
    registry.register(ServerProcesses())
    found = _families(registry)
    assert found["process_cpu_seconds"].samples[0].value > 0
    assert found["process_resident_memory_bytes"].samples[0].value > 0
    assert found["gpujobs_api_processes"].samples[0].value >= 1


@pytest.fixture
def heartbeat_nvml(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``worker.heartbeat`` with its NVML handle forgotten, so it loads whatever ``pynvml`` is now."""
    from worker import heartbeat

    monkeypatch.setattr(heartbeat, "_nvml", None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return heartbeat


def test_a_gpu_workers_heartbeat_reads_its_device_from_nvml(
    heartbeat_nvml: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml())
    assert heartbeat_nvml.device_info() == {
        "type": "cuda",
        "source": "nvml",
        "index": 0,
        "name": "NVIDIA H200",
        "memory_used_mb": 1024,
        "memory_total_mb": 141 * 1024,
        "utilization_percent": 37,
    }
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # the worker's GPU is the first one it may see
    device = heartbeat_nvml.device_info()
    assert (device["index"], device["memory_used_mb"], device["utilization_percent"]) == (1, 8192, 80)


def test_without_nvml_or_when_it_fails_the_heartbeat_falls_back_to_torch(
    heartbeat_nvml: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert heartbeat_nvml.device_info() == {"type": "cpu"}  # this host has no GPU
    monkeypatch.setattr(heartbeat_nvml, "_nvml", None)
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(fail_read=True))
    assert heartbeat_nvml.device_info() == {"type": "cpu"} and not torch.cuda.is_available()
