"""`python -m bench.segmentation --quick` runs, so the script cannot rot, and it measures real work.

Its figures are for docs/benchmarks.md; here only what it must get right is asserted: the random-weight
model finds instances (random weights alone find none, which left the post-processing nothing to do), both
transformers and gpujobs find them on every image, the agreement check between the two ran on every
image of every run (the batcher at each batch size and a whole job) and passed, and the aspect-ratio mix
ran with padding buckets and with the square canvas only, the buckets padding far less. A second test shows the
check catching differences (a label, a score, a mask) on real encoded masks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench import segmentation
from tests.bench_runs import run_bench
from worker.jobs.segmentation.model import Found
from worker.jobs.segmentation.run import encode_instances


def test_quick_run_finds_instances_and_agrees_with_transformers(tmp_path: Path) -> None:
    out = tmp_path / "segmentation.json"
    args = ["--quick", "--cache", str(tmp_path / "models"), "--json", str(out)]
    done = run_bench("bench.segmentation", *args, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["model"] == "tiny demo configuration" and figures["canvas"] == 384
    runs = figures["runs"]
    assert list(runs) == [segmentation.BASELINE, "gpujobs batch 1", "gpujobs batch 2"]
    for name, run in runs.items():
        assert run["images_per_s"] > 0 and run["latency_ms"] > 0, name
        assert run["instances_per_image"] > 0, f"{name}: no instance, no post-processing measured"
    baseline = runs[segmentation.BASELINE]
    assert baseline["listed_per_image"] >= baseline["instances_per_image"]
    overhead = figures["job_overhead"]
    assert overhead["instances_per_job"] > 0
    assert {"forward_ms", "job_ms", "overhead_ms", "overhead_ratio"} <= set(overhead)

    # The aspect-ratio mix: the default buckets against the square canvas, on the same images.
    mix = figures["aspect_mix"]
    assert mix["mix"] == ["4:3", "16:9", "1:1", "3:4", "3:2", "9:16"] and mix["images"] == 12
    bucketed, square = mix["runs"].values()
    assert list(mix["runs"]) == ["buckets 384x384, 384x288, 288x384, 384x224, 224x384", segmentation.SQUARE_ONLY]
    # 4:3 and 16:9 fill their buckets (16:9's 216 rows pad to 224); 3:2 pads to 4:3's; the square pads nothing.
    assert 0.02 < bucketed["padding"] < 0.04 and 0.25 < square["padding"] < 0.32
    assert all(run["images_per_s"] > 0 and run["instances_per_image"] > 0 for run in (bucketed, square))
    assert square["images_per_pass"] == 2 and 1 <= bucketed["images_per_pass"] <= 2
    assert mix["buckets_over_square"] == bucketed["images_per_s"] / square["images_per_s"]
    assert "buckets / square canvas only:" in done.stdout

    agreement = figures["agreement"]
    assert agreement["agree"] and agreement["problems"] == []
    assert agreement["canvas"] == 384, "where transformers and gpujobs upsample the same way"
    assert agreement["runs"] == ["gpujobs batch 1", "gpujobs batch 2", "whole job"]
    assert agreement["images_checked"] == 2 * figures["images"] + 1
    assert agreement["boundary_band_px"] == 1
    assert agreement["min_iou"] >= 0.99
    assert agreement["max_score_difference"] <= agreement["score_tolerance"]
    assert len(figures["load_average"]["start"]) == 3

    assert "instances/image" in done.stdout
    assert "Agreement with transformers at 384×384: agree" in done.stdout and "load average" in done.stdout


def test_the_agreement_check_catches_a_label_a_score_and_a_mask() -> None:
    """``compare`` on real COCO RLE masks (the worker's encoder, pycocotools' IoU)."""
    from pycocotools import mask as coco_mask

    mask = np.zeros((64, 64), dtype=bool)
    mask[10:40, 10:40] = True
    other = np.zeros((64, 64), dtype=bool)
    other[45:60, 5:25] = True
    ours = encode_instances([Found(3, 0.9, mask), Found(7, 0.8, other)], {3: "car", 7: "train"})

    def reference(*instances: tuple[int, float, np.ndarray]) -> dict:
        encoded = [
            (label, score, coco_mask.encode(np.asfortranarray(m.astype(np.uint8)))) for label, score, m in instances
        ]
        return {"listed": len(instances), "instances": encoded}

    same = reference((7, 0.8, other), (3, 0.9, mask))  # paired by label and mask, not by position
    assert segmentation.compare(ours, same) == ([], 1.0, 0.0)

    problems, _, _ = segmentation.compare(ours, reference((3, 0.9, mask), (6, 0.8, other)))
    assert problems == [
        "instance 2 (7, score 0.8000): none of transformers'",
        "transformers' instance (6, score 0.8000): none of ours",
    ]
    problems, lowest, _ = segmentation.compare(ours, reference((3, 0.9, mask)))
    assert problems == ["instance 2 (7, score 0.8000): none of transformers'"] and lowest == 0.0

    problems, _, largest = segmentation.compare(ours, reference((3, 0.9, mask), (7, 0.75, other)))
    assert problems == ["instance 2 (7): score 0.8000, transformers 0.7500"] and largest == pytest.approx(0.05)

    edge = np.roll(mask, 1, axis=1)  # one column off: on the boundary band, allowed
    problems, lowest, _ = segmentation.compare(ours, reference((3, 0.9, edge), (7, 0.8, other)))
    assert problems == [] and lowest == pytest.approx(29 / 31)
    # Three columns off: of the 3 columns each side that differ, 2 are off the band (30 rows on the left,
    # where they are outside the mask, 28 on the right, inside it but for the band's top and bottom rows).
    shifted = np.roll(mask, 3, axis=1)
    problems, lowest, _ = segmentation.compare(ours, reference((3, 0.9, shifted), (7, 0.8, other)))
    assert lowest == pytest.approx(27 / 33)
    assert problems == [f"instance 1 (3): {2 * 30 + 2 * 28} pixels differ off the boundary (IoU {27 / 33:.4f})"]

    verdict = segmentation.agreement([same, reference((3, 0.9, shifted), (7, 0.8, other))], {"b": [ours, ours]})
    assert not verdict["agree"] and verdict["images_checked"] == 2
    assert verdict["problems"] == [f"b, image 1: {problems[0]}"]
