"""Segmentation jobs with the tiny demo Mask2Former, through the API and real workers.

The demo model has random weights, so tests use ``threshold: 0`` to get instances;
what they check is the plumbing: COCO RLE masks, boxes, areas, the instance map,
the overlay, batching and loading — all of which are independent of the weights.
"""

from __future__ import annotations

import io
import os
import time
from typing import Any

import numpy as np
import pytest
import requests

from gpujobs.harness.processes import Stack
from tests.integration.client import assert_problem, auth, submit, upload, wait_for


def picture(width: int, height: int, seed: int = 0) -> bytes:
    """A PNG with a few coloured shapes (something a segmenter could find)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, width - 4)), int(rng.integers(0, height - 4))
        x1, y1 = int(rng.integers(x0 + 2, width)), int(rng.integers(y0 + 2, height))
        draw.ellipse((x0, y0, x1, y1), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def uploaded(client: Any, key: str, data: bytes) -> str:
    response = upload(client, key, data)
    assert response.status_code == 201, response.get_data(as_text=True)
    return response.get_json()["id"]


def segment(client: Any, key: str, file_id: str, **params: Any) -> dict[str, Any]:
    response = submit(client, key, {"type": "segmentation", "input": {"image": file_id, "threshold": 0, **params}})
    assert response.status_code == 202, response.get_data(as_text=True)
    return response.get_json()


def download_png(url: str) -> np.ndarray:
    from PIL import Image

    response = requests.get(url, timeout=10)
    assert response.status_code == 200
    with Image.open(io.BytesIO(response.content)) as image:
        assert image.format == "PNG"
        return np.asarray(image)


def worker_models(node: str) -> dict[str, Any]:
    """The model counters a worker's heartbeat reports (loads, hits, forward passes…)."""
    from sqlalchemy import select

    from db.models import WorkerProcess
    from db.session import session_scope

    with session_scope() as session:
        rows = session.scalars(select(WorkerProcess).where(WorkerProcess.id.like(f"%{node}%"))).all()
        assert rows, f"no heartbeat from {node}"
        return rows[-1].models


def wait_heartbeat(node: str, until: Any, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        models = worker_models(node) if _has_heartbeat(node) else {}
        if until(models):
            return models
        if time.monotonic() > deadline:
            raise AssertionError(f"heartbeat of {node} never showed what was expected: {models}")
        time.sleep(0.2)


def _has_heartbeat(node: str) -> bool:
    from sqlalchemy import func, select

    from db.models import WorkerProcess
    from db.session import session_scope

    with session_scope() as session:
        return bool(session.scalar(select(func.count()).where(WorkerProcess.id.like(f"%{node}%"))))


@pytest.fixture
def seg_stack(services, tmp_path):
    """A stack whose workers get extra settings (heartbeats every 0.2 s); stopped at the end."""
    stacks: list[Stack] = []

    def make(**settings: str) -> Stack:
        env = {**os.environ, "GPUJOBS_HEARTBEAT_SECONDS": "0.2", **settings}
        stack = Stack(env, tmp_path / f"logs-{len(stacks)}", label=f"seg{len(stacks)}")
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.stop_all()


def test_segmentation_outputs_are_consistent_coco(client, keys, gpu_worker):
    from pycocotools import mask as coco_mask

    from worker.jobs.segmentation.coco import COCO_LABELS

    width, height = 96, 72
    file_id = uploaded(client, keys.user_a.secret, picture(width, height))
    job = segment(client, keys.user_a.secret, file_id)
    job = wait_for(client, keys.user_a.secret, job["id"], timeout=90)
    assert job["status"] == "succeeded", job
    output = job["output"]
    assert (output["width"], output["height"]) == (width, height)
    instances = output["instances"]
    assert instances, "threshold 0 keeps at least one instance"
    assert [i["id"] for i in instances] == list(range(1, len(instances) + 1))
    assert [i["score"] for i in instances] == sorted((i["score"] for i in instances), reverse=True)

    instance_map = download_png(output["instance_map"]["url"])
    assert instance_map.shape == (height, width)
    assert set(np.unique(instance_map)) <= {0, *(i["id"] for i in instances)}
    for instance in instances:
        assert instance["label"] in COCO_LABELS and COCO_LABELS[instance["label_id"]] == instance["label"]
        mask = coco_mask.decode({"size": instance["mask"]["size"], "counts": instance["mask"]["counts"].encode()})
        assert mask.shape == (height, width)
        assert np.array_equal(mask.astype(bool), instance_map == instance["id"])
        assert instance["area"] == int(mask.sum()) > 0
        x, y, w, h = instance["bbox"]
        rows, cols = np.nonzero(mask)
        assert x <= cols.min() and cols.max() < x + w and y <= rows.min() and rows.max() < y + h
        assert (x, y, w, h) == (cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1)

    overlay = download_png(output["overlay"]["url"])
    assert overlay.shape == (height, width, 3)
    for artifact in (output["instance_map"], output["overlay"]):
        assert artifact["content_type"] == "image/png" and len(artifact["sha256"]) == 64


def test_label_filter_keeps_only_the_named_categories(client, keys, gpu_worker):
    file_id = uploaded(client, keys.user_a.secret, picture(64, 64, seed=3))
    everything = wait_for(client, keys.user_a.secret, segment(client, keys.user_a.secret, file_id)["id"], timeout=60)
    labels = {i["label"] for i in everything["output"]["instances"]}
    keep = sorted(labels)[:1]
    filtered = segment(client, keys.user_a.secret, file_id, labels=keep)
    filtered = wait_for(client, keys.user_a.secret, filtered["id"], timeout=60)
    assert filtered["status"] == "succeeded"
    assert {i["label"] for i in filtered["output"]["instances"]} == set(keep)
    absent = next(label for label in ("toothbrush", "hair drier", "zebra") if label not in labels)
    none = wait_for(client, keys.user_a.secret, segment(client, keys.user_a.secret, file_id, labels=[absent])["id"])
    assert none["status"] == "succeeded" and none["output"]["instances"] == []
    assert download_png(none["output"]["instance_map"]["url"]).max() == 0


def test_concurrent_jobs_batch_and_match_sequential_runs(client, keys, no_gpu_worker, seg_stack):
    """N jobs of different sizes in one process: each image padded to its bucket (the default ones: 384x288
    for the 3:2 image, 288x384 for the two portrait ones, the 384x384 canvas for the square one), one batch
    per bucket, and the same instances as one at a time."""
    sizes = [(96, 64), (50, 80), (120, 120), (33, 47)]
    buckets = [(384, 288), (288, 384), (384, 384), (288, 384)]  # (width, height) after the resize to fit 384
    key = keys.user_a.secret
    files = [uploaded(client, key, picture(w, h, seed=i)) for i, (w, h) in enumerate(sizes)]
    stack = seg_stack(GPUJOBS_SEGMENTATION_MAX_WAIT_MS="1500", GPUJOBS_SEGMENTATION_MAX_BATCH_SIZE="8")

    # Sequential: one job at a time, each its own forward pass.
    worker = stack.start_worker("gpu", concurrency=len(sizes), name="seg-batch")
    sequential = []
    for file_id in files:
        job = wait_for(client, key, segment(client, key, file_id)["id"], timeout=90)
        assert job["status"] == "succeeded", job
        sequential.append(job)
    before = wait_heartbeat(
        worker.node, lambda m: m.get("segmentation:demo-mask2former", {}).get("batched_images") == len(sizes)
    )
    passes_before = before["segmentation:demo-mask2former"]["forward_passes"]
    assert passes_before == len(sizes)
    # The smaller buckets, not the canvas, for the non-square images (the square canvas: 4 × 384 × 384).
    assert before["segmentation:demo-mask2former"]["input_pixels"] == sum(w * h for w, h in buckets)

    # Concurrent: all jobs at once; the worker's threads hand them to one batcher.
    concurrent = [segment(client, key, file_id)["id"] for file_id in files]
    concurrent = [wait_for(client, key, job_id, timeout=90) for job_id in concurrent]
    after = wait_heartbeat(
        worker.node,
        lambda m: m["segmentation:demo-mask2former"].get("batched_images", 0) >= 2 * len(sizes),
    )["segmentation:demo-mask2former"]
    batched_passes = after["forward_passes"] - passes_before
    # Three buckets: never fewer passes (a batch stacks one bucket), and the two portrait images in one.
    assert batched_passes == 3, f"{len(sizes)} concurrent jobs of 3 buckets took {batched_passes} forward passes"
    assert after["loads"] == 1, after

    for one, many in zip(sequential, concurrent, strict=True):
        assert many["status"] == "succeeded", many
        a, b = one["output"]["instances"], many["output"]["instances"]
        assert [(i["label"], i["bbox"], i["area"], i["mask"]["counts"]) for i in a] == [
            (i["label"], i["bbox"], i["area"], i["mask"]["counts"]) for i in b
        ]
        assert np.allclose([i["score"] for i in a], [i["score"] for i in b], atol=1e-4)


def test_model_is_loaded_once_for_many_jobs(client, keys, no_gpu_worker, seg_stack):
    stack = seg_stack()
    worker = stack.start_worker("gpu", concurrency=2, name="seg-loads")
    file_id = uploaded(client, keys.user_a.secret, picture(40, 30))
    jobs = [segment(client, keys.user_a.secret, file_id)["id"] for _ in range(5)]
    for job_id in jobs:
        assert wait_for(client, keys.user_a.secret, job_id, timeout=90)["status"] == "succeeded"
    models = wait_heartbeat(
        worker.node, lambda m: m.get("segmentation:demo-mask2former", {}).get("batched_images") == 5
    )
    stats = models["segmentation:demo-mask2former"]
    assert stats["loads"] == 1 and stats["loaded"] is True
    assert stats["hits"] == 4


def test_a_missing_or_pickle_only_model_fails_the_job_clearly(
    client, keys, no_gpu_worker, seg_stack, api_catalog, tmp_path
):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded: pickle checkpoints are refused before any read")
    catalog = api_catalog(
        '[models.gone]\nkind = "segmentation"\nsource = "/nonexistent/m2f"\n'
        f'\n[models.pickled]\nkind = "segmentation"\nsource = "{pickled}"\n'
    )
    stack = seg_stack(GPUJOBS_MODEL_CATALOG=str(catalog))
    stack.start_worker("gpu", concurrency=1, name="seg-missing")
    file_id = uploaded(client, keys.user_a.secret, picture(32, 32))
    job = wait_for(
        client, keys.user_a.secret, segment(client, keys.user_a.secret, file_id, model="gone")["id"], timeout=60
    )
    assert job["status"] == "failed"
    assert job["error"]["code"] == "model_unavailable"
    assert "gone" in job["error"]["message"] and "/nonexistent/m2f" in job["error"]["message"]
    refused = segment(client, keys.user_a.secret, file_id, model="pickled")
    refused = wait_for(client, keys.user_a.secret, refused["id"], timeout=60)
    assert refused["status"] == "failed" and refused["error"]["code"] == "model_unavailable"
    assert "pickle" in refused["error"]["message"] and "safetensors" in refused["error"]["message"]
    # Not in the catalog at all: refused at submit, naming the models there are.
    unknown = {"type": "segmentation", "input": {"image": file_id, "model": "no-such-model"}}
    problem = assert_problem(submit(client, keys.user_a.secret, unknown), 422, ["input", "model"])
    assert "no model 'no-such-model'" in problem["detail"] and "demo-mask2former, gone, pickled" in problem["detail"]
    other_kind = {"type": "segmentation", "input": {"image": file_id, "model": "demo-sd"}}
    problem = assert_problem(submit(client, keys.user_a.secret, other_kind), 422, ["input", "model"])
    assert "'demo-sd' is a diffusion model, not a segmentation model" in problem["detail"]


@pytest.mark.parametrize(
    ("change", "loc"),
    [
        ({"image": None}, ["input", "image"]),
        ({"threshold": 1.5}, ["input", "threshold"]),
        ({"mask_threshold": -0.1}, ["input", "mask_threshold"]),
        ({"overlap_mask_area_threshold": "high"}, ["input", "overlap_mask_area_threshold"]),
        ({"labels": ["person", "unicorn"]}, ["input", "labels"]),
        ({"labels": []}, ["input", "labels"]),
        ({"image": "not-a-file-id"}, ["input", "image"]),
        ({"image": "file_doesnotexist"}, ["input", "image"]),
        ({"model": "no-such-model"}, ["input", "model"]),
        ({"model": "demo-sd"}, ["input", "model"]),  # a diffusion model
        ({"model": ""}, ["input", "model"]),
        ({"model": "x" * 201}, ["input", "model"]),
    ],
)
def test_bad_segmentation_input_is_a_precise_422(client, keys, change, loc):
    file_id = uploaded(client, keys.user_a.secret, picture(16, 16))
    body = {"image": file_id, **change}
    body = {k: v for k, v in body.items() if v is not None}
    response = submit(client, keys.user_a.secret, {"type": "segmentation", "input": body})
    assert_problem(response, 422, loc)


def test_another_tenants_image_or_a_dataset_is_refused(client, keys):
    import zipfile

    theirs = uploaded(client, keys.user_b.secret, picture(16, 16))
    response = submit(client, keys.user_a.secret, {"type": "segmentation", "input": {"image": theirs}})
    body = assert_problem(response, 422, ["input", "image"])
    assert theirs in body["detail"]

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("a.png", picture(16, 16))
        archive.writestr("a.txt", "caption")
    dataset = upload(client, keys.user_a.secret, buffer.getvalue(), filename="d.zip", purpose="dataset")
    assert dataset.status_code == 201, dataset.get_data(as_text=True)
    response = submit(
        client, keys.user_a.secret, {"type": "segmentation", "input": {"image": dataset.get_json()["id"]}}
    )
    assert_problem(response, 422, ["input", "image"])


def test_unknown_job_for_images_never_reaches_a_worker(client, keys):
    response = client.post("/v1/jobs", json={"type": "segmentation"}, headers=auth(keys.user_a.secret))
    assert_problem(response, 422, ["input", "image"])
