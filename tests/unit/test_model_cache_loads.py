"""The model cache loads one model at a time, and each model once, however many threads ask."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path
from typing import Any

from db.settings import Settings
from worker.models.cache import ModelCache
from worker.models.catalog import ModelEntry


def _entry(tmp_path: Path, name: str) -> ModelEntry:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\0" * 16)
    return ModelEntry(name=name, kind="segmentation", source=str(folder))


def test_loads_of_different_models_never_overlap_and_each_model_loads_once(tmp_path: Path) -> None:
    cache = ModelCache(Settings(device="cpu", dtype="float32", var_dir=tmp_path / "var"))
    intervals: list[tuple[str, float, float]] = []

    def loader(entry: ModelEntry, folder: Path, device: str, dtype: Any) -> bytes:
        started = time.monotonic()
        time.sleep(0.15)
        intervals.append((entry.name, started, time.monotonic()))
        return b"weights of " + entry.name.encode()

    entries = [_entry(tmp_path, name) for name in ("a", "b", "c")]
    results: list[bytes] = []
    threads = [
        threading.Thread(target=lambda e=entry: results.append(cache.get(f"kind:{e.name}", e, loader)))
        for entry in entries * 3  # three threads per model
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)

    assert sorted(results) == sorted([b"weights of a", b"weights of b", b"weights of c"] * 3)
    assert sorted(name for name, _, _ in intervals) == ["a", "b", "c"]  # each loaded once
    ordered = sorted(intervals, key=lambda interval: interval[1])
    for (_, _, first_end), (_, second_start, _) in itertools.pairwise(ordered):
        assert second_start >= first_end, f"two loads overlapped: {ordered}"
    assert {key: stats.loads for key, stats in cache.stats.items()} == {"kind:a": 1, "kind:b": 1, "kind:c": 1}
