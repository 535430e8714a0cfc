"""`python -m bench.encode` runs small (docs/benchmarks.md quotes its full run), so the script cannot rot:
every picture × format row is timed, and each format's bytes are what that format's decoder reads back."""

from __future__ import annotations

import json
from pathlib import Path

from tests.bench_runs import run_bench


def test_bench_encode_times_every_format_of_both_pictures(tmp_path: Path) -> None:
    out = tmp_path / "encode.json"
    done = run_bench("bench.encode", "--size", "64", "--samples", "2", "--json", str(out), timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["size"] == 64 and figures["quality"] == 90
    rows = {(row["picture"], row["format"]): row for row in figures["rows"]}
    assert set(rows) == {(p, f) for p in ("noise-like", "photo-like") for f in ("png", "webp", "jpeg")}, set(rows)
    assert all(row["encode_ms"] > 0 and row["batch_of_4_ms"] > 0 and row["bytes"] > 0 for row in rows.values())
    assert "| photo-like | webp |" in done.stdout
