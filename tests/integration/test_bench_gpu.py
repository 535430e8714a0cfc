"""`python -m bench.gpu run --quick`: the GPU script and the benchmarks it drives, at toy sizes here.

The full run is for a GPU machine (docs/gpu.md); nothing in this suite may need one. ``--quick`` runs
the same parts, through the same command lines, on the CPU with the demo Stable Diffusion, so neither
``bench.gpu`` nor ``bench.diffusion`` nor ``bench.finetune`` can rot unseen (``bench.segmentation
--quick`` has its own test, ``test_bench_segmentation``, so this one leaves that part out). The
figures mean nothing at these sizes; what must hold at any size is asserted: every part ends well, the
job's image is the raw call's pixel for pixel (same seed, CPU), the concurrent round ran every job, and
a fine-tune killed after a checkpoint and resumed elsewhere ends with the uninterrupted run's weights.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.bench_runs import run_bench


def test_the_quick_run_drives_every_part_and_writes_the_summary(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # Segmentation's quick run has its own test (test_bench_segmentation): not twice in the suite.
    args = ["run", "--quick", "--only", "diffusion", "finetune", "--out", str(out), "--models", str(tmp_path)]
    done = run_bench("bench.gpu", *args, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["quick"] is True and summary["device"] == "cpu"
    parts = summary["parts"]
    assert set(parts) == {"diffusion", "finetune"}
    assert all(part["exit"] == 0 and "figures" in part for part in parts.values()), parts

    diffusion = parts["diffusion"]["figures"]
    assert diffusion["mode"] == "service" and diffusion["pixels_identical"] is True
    assert diffusion["job_median_s"] > 0 and diffusion["raw_median_s"] > 0
    assert diffusion["concurrency"]["jobs"] == 2 and diffusion["concurrency"]["at_once_s"] > 0
    assert diffusion["worker_device"]["type"] == "cpu", "the worker's heartbeat, as recorded (NVML on a GPU)"

    resume = parts["finetune"]["figures"]["resume"]
    assert resume["resumed_from"] >= 2 and resume["resumed_from"] < resume["steps"]
    assert resume["weights_equal"] is True and resume["max_abs_difference"] == 0
    assert resume["loss_curves_equal"] is True

    table = (out / "summary.md").read_text()
    assert "| text-to-image end to end / raw call, eager |" in table and "| finetune | 0 |" in table
    assert table in done.stdout
