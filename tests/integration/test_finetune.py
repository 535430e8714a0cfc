"""LoRA fine-tuning (``finetune``) with the tiny demo SD model, real workers and real S3.

A ``train`` worker of this module's own runs the fine-tunes (the kill test replaces it); a
``gpu`` worker runs the generation jobs that use the result. The demo UNet has random weights, so
what is checked is what does not depend on them: the job's life (checkpoints, resume after
SIGKILL, cancel), the model it registers, that diffusers loads the weights outside gpujobs, that
a LoRA changes the pixels at scale 1 and not at scale 0, and precise 422s.
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from gpujobs.harness.processes import Stack
from tests.integration.client import assert_problem, auth, events, submit, wait_for
from tests.integration.generation import download, picture, pixels_of, run_job, uploaded, worker_models

TRAIN_TIMEOUT = 180.0
SMALL = {"width": 64, "height": 64, "num_inference_steps": 3, "seed": 21}


class Workers:
    """This module's train worker (replaceable) and gpu worker, on one stack that knows the demo catalog."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.train = self.start_train()
        self.gpu = stack.start_worker("gpu", concurrency=2, name=f"ft-gpu-{secrets.token_hex(3)}")

    def start_train(self) -> Any:
        return self.stack.start_worker("train", concurrency=1, name=f"ft-train-{secrets.token_hex(3)}")


@pytest.fixture(scope="module")
def workers(cluster, services, tmp_path_factory) -> Any:
    from tests.integration.conftest import quiesce

    cluster.stop_gpu_worker()
    env = {**os.environ, "GPUJOBS_HEARTBEAT_SECONDS": "0.3", "OMP_WAIT_POLICY": "PASSIVE"}
    stack = Stack(env, tmp_path_factory.mktemp("finetune-logs"), label="ft")
    try:
        yield Workers(stack)
    finally:
        quiesce()
        stack.stop_all()


@pytest.fixture(scope="module")
def users(services) -> Any:
    from tests.integration.conftest import make_key

    class Users:
        me = make_key("finetune tests", "user")
        other = make_key("finetune tests, other tenant", "user")

    return Users


@pytest.fixture(scope="module")
def training_images(app, users) -> list[str]:
    client = app.test_client()
    colours = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]
    return [uploaded(client, users.me.secret, picture(72, 64, base=c, seed=i)) for i, c in enumerate(colours)]


def finetune(client: Any, key: str, **params: Any) -> dict[str, Any]:
    response = submit(client, key, {"type": "finetune", "input": params})
    assert response.status_code == 202, response.get_data(as_text=True)
    return response.get_json()


def timeline(job_id: str, kind: str) -> list[dict[str, Any]]:
    return [event for event in events(job_id) if event["kind"] == kind]


def weights_of(job: dict[str, Any]) -> bytes:
    artifact = job["output"]["weights"]
    response = requests.get(artifact["url"], timeout=10)
    assert response.status_code == 200
    assert hashlib.sha256(response.content).hexdigest() == artifact["sha256"]
    return response.content


def same_lora(a: bytes, b: bytes) -> bool:
    """The same tensors, bit for bit, and the same metadata (safetensors writes metadata keys in any order)."""
    import torch
    from safetensors.torch import load

    from worker.jobs.finetune.trainer import safetensors_metadata

    first, second = load(a), load(b)
    return (
        first.keys() == second.keys()
        and all(torch.equal(first[name], second[name]) for name in first)
        and safetensors_metadata(a) == safetensors_metadata(b)
    )


def zip_of(members: dict[str, bytes | str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


# --- a fine-tune and its model -------------------------------------------------------------------------


def test_a_finetune_makes_a_model_that_diffusers_and_generation_jobs_load(
    client, users, workers, training_images, services, tmp_path
):
    key = users.me.secret
    job = finetune(
        client,
        key,
        images=training_images,
        captions=["red", "green", "", "yellow"],
        instance_prompt="a block",
        steps=10,
        resolution=64,
        learning_rate=0.01,
        rank=4,
        alpha=8,
        seed=3,
        checkpoint_every=5,
        name="blocks",
    )
    assert job["input"]["seed"] == 3
    done = wait_for(client, key, job["id"], timeout=TRAIN_TIMEOUT)
    assert done["status"] == "succeeded", done
    output = done["output"]
    assert output["steps"] == 10 and output["images"] == 4 and output["resumed_from"] is None
    assert [point["step"] for point in output["loss"]] == list(range(1, 11))
    assert all(np.isfinite(point["loss"]) and point["loss"] > 0 for point in output["loss"])
    assert done["progress"]["step"] == 10 and np.isfinite(done["progress"]["loss"])
    assert [e["data"]["step"] for e in timeline(job["id"], "checkpoint")] == [5]
    left = services.s3.client().list_objects_v2(Bucket=services.env["GPUJOBS_S3_BUCKET"], Prefix=f"jobs/{job['id']}/")
    assert [obj["Key"] for obj in left.get("Contents", [])] == [], "checkpoints are deleted once the weights are stored"

    model = output["model"]
    assert model["kind"] == "lora" and model["base_model"] == "demo-sd" and model["name"] == "blocks"
    assert model["job_id"] == job["id"] and model["details"]["rank"] == 4 and model["details"]["alpha"] == 8
    listed = client.get("/v1/models", headers=auth(key)).get_json()["items"]
    assert [m["id"] for m in listed if m["kind"] == "base"] == ["demo-mask2former", "demo-sd"]
    mine = next(m for m in listed if m["id"] == model["id"])
    assert mine["weights"]["sha256"] == output["weights"]["sha256"]
    assert client.get(f"/v1/models/{model['id']}", headers=auth(key)).get_json()["name"] == "blocks"
    assert client.get("/v1/models/demo-sd", headers=auth(key)).get_json()["kind"] == "base"

    # The weights are an ordinary diffusers LoRA: load_lora_weights, outside gpujobs, changes the UNet.
    import torch
    from diffusers import StableDiffusionPipeline

    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(weights_of(done))
    pipe = StableDiffusionPipeline.from_pretrained(
        Path(services.env["GPUJOBS_MODEL_CATALOG"]).parent / "demo-sd",
        safety_checker=None,
        requires_safety_checker=False,
    )
    sample = (torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500]))
    text = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = pipe.unet(*sample, text).sample
        pipe.load_lora_weights(tmp_path, weight_name="pytorch_lora_weights.safetensors", adapter_name="blocks")
        after = pipe.unet(*sample, text).sample
    assert pipe.get_active_adapters() == ["blocks"]
    assert not torch.allclose(before, after)
    scaling = {m.scaling["blocks"] for m in pipe.unet.modules() if hasattr(m, "scaling") and "blocks" in m.scaling}
    assert scaling == {2.0}, "alpha 8 over rank 4 survives the file"

    # Generation with the LoRA: scale 1 changes the pixels, scale 0 gives the base model's exactly.
    base = pixels_of(run_job(client, key, "text_to_image", prompt="a block", **SMALL))[0]
    full = pixels_of(run_job(client, key, "text_to_image", prompt="a block", loras=[{"model": model["id"]}], **SMALL))
    zero = run_job(client, key, "text_to_image", prompt="a block", loras=[{"model": model["id"], "scale": 0}], **SMALL)
    again = pixels_of(run_job(client, key, "text_to_image", prompt="a block", **SMALL))[0]
    assert not np.array_equal(full[0], base)
    assert np.array_equal(pixels_of(zero)[0], base)
    assert np.array_equal(again, base), "a run after a LoRA run sees the base model"
    assert download(zero["output"]["images"][0])[1]["loras"] == [{"model": model["id"], "scale": 0.0}]
    stats = worker_models(workers.gpu.node)["diffusion:demo-sd"]
    assert stats.get("lora_loads") == 1, f"the adapter stays loaded between jobs: {stats}"

    # Inpainting (through the dedicated 9-channel UNet) and style transfer (with the IP-Adapter) take it too.
    image, mask = uploaded(client, key, picture(64, 64, seed=9)), uploaded(client, key, _mask(64, 64))
    for job_type, params in [
        ("inpainting", {"image": image, "mask": mask, "num_inference_steps": 2, "seed": 4}),
        ("style_transfer", {"content_image": image, "style_image": mask, "num_inference_steps": 4, "seed": 4}),
    ]:
        plain = pixels_of(run_job(client, key, job_type, **params))[0]
        tuned = pixels_of(run_job(client, key, job_type, loras=[{"model": model["id"]}], **params))[0]
        assert not np.array_equal(plain, tuned), job_type


def _mask(width: int, height: int) -> bytes:
    from PIL import Image

    pixels = np.zeros((height, width), np.uint8)
    pixels[: height // 2] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def test_a_zip_dataset_with_captions_trains(client, users, workers):
    key = users.me.secret
    dataset = zip_of(
        {
            "set/": b"",
            "set/a.png": picture(64, 64, seed=1),
            "set/a.txt": "a red square",
            "set/b.jpg": _jpeg(picture(80, 64, seed=2)),
            "set/b.txt": "a blue one\n",
            "set/c.webp": _webp(picture(64, 96, seed=3)),
            "__MACOSX/set/._a.png": b"resource fork",
            ".DS_Store": b"junk",
        }
    )
    file_id = uploaded(client, key, dataset, filename="set.zip", purpose="dataset")
    job = finetune(
        client,
        key,
        dataset=file_id,
        instance_prompt="a shape",
        steps=3,
        resolution=64,
        checkpoint_every=2,
        batch_size=2,
        gradient_accumulation_steps=2,
    )
    done = wait_for(client, key, job["id"], timeout=TRAIN_TIMEOUT)
    assert done["status"] == "succeeded", done
    assert done["output"]["images"] == 3 and len(done["output"]["loss"]) == 3
    assert done["output"]["model"]["name"].startswith("demo-sd LoRA")


def _jpeg(png: bytes) -> bytes:
    return _convert(png, "JPEG")


def _webp(png: bytes) -> bytes:
    return _convert(png, "WEBP")


def _convert(png: bytes, fmt: str) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.open(io.BytesIO(png)).save(buffer, fmt)
    return buffer.getvalue()


# --- worker death, cancel -------------------------------------------------------------------------------


def _wait_checkpoint(job_id: str, timeout: float = TRAIN_TIMEOUT) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = timeline(job_id, "checkpoint")
        if found:
            return found[-1]["data"]["step"]
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} stored no checkpoint within {timeout:g}s")


# The kill lands as the first checkpoint (step 20) is stored, so the job must run well past it: 80 more
# steps are several seconds even on a fast CPU. Each run of it trains twice (resumed, then straight).
RESUME_STEPS = 100


def test_a_killed_training_worker_resumes_from_its_checkpoint_to_the_same_weights(
    client, users, workers, training_images
):
    key = users.me.secret
    params = {
        "images": training_images,
        "instance_prompt": "a block",
        "steps": RESUME_STEPS,
        "resolution": 64,
        "learning_rate": 0.005,
        "seed": 11,
        "checkpoint_every": 20,
        "batch_size": 2,
    }
    job = finetune(client, key, **params)
    _wait_checkpoint(job["id"])
    workers.train.kill()  # SIGKILL, mid-run: its lease expires and the reconciler requeues the job
    killed_at = time.monotonic()
    last = timeline(job["id"], "checkpoint")[-1]["data"]["step"]
    workers.train = workers.start_train()

    done = wait_for(client, key, job["id"], timeout=TRAIN_TIMEOUT)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2
    resumed = timeline(job["id"], "resumed")
    assert len(resumed) == 1 and resumed[0]["attempt"] == 2
    assert resumed[0]["data"]["step"] == done["output"]["resumed_from"] == last >= 20
    assert done["output"]["resumed_from"] < RESUME_STEPS
    curve = done["output"]["loss"]
    assert [p["step"] for p in curve] == list(range(1, RESUME_STEPS + 1)), "the loss curve runs on across the resume"
    print(f"resumed at step {resumed[0]['data']['step']}, {time.monotonic() - killed_at:.1f} s after the kill")

    # The same input, never interrupted, on the same kind of worker: the same weights, bit for bit.
    straight = wait_for(client, key, finetune(client, key, **params)["id"], timeout=TRAIN_TIMEOUT)
    assert straight["status"] == "succeeded" and straight["attempts"] == 1
    assert same_lora(weights_of(straight), weights_of(done))
    assert straight["output"]["loss"] == curve


def test_cancel_stops_training_at_the_next_step_and_keeps_the_last_checkpoint(client, users, workers, services):
    key = users.me.secret
    job = finetune(
        client, key, images=[uploaded(client, key, picture(64, 64))], steps=20000, resolution=64, checkpoint_every=10
    )
    running = wait_for(
        client, key, job["id"], "running", timeout=TRAIN_TIMEOUT, until=lambda j: j["progress"]["step"] >= 25
    )
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(key)).status_code == 202
    asked = time.monotonic()
    done = wait_for(client, key, job["id"], ("canceled", "failed", "succeeded"), timeout=30)
    assert done["status"] == "canceled" and time.monotonic() - asked < 10
    assert done["output"] is None
    stopped = next(e for e in timeline(job["id"], "progress") if e["message"] == "stopped")["data"]["step"]
    # The client saw step `running` a moment before it asked; progress is saved and the cancel flag read every
    # 0.2 s, a step takes tens of ms here: the loop stops within those few steps, at the step boundary it saw it.
    assert running["progress"]["step"] <= stopped <= running["progress"]["step"] + 40 < 20000
    assert done["progress"]["step"] == stopped

    checkpoints = timeline(job["id"], "checkpoint")
    assert checkpoints and checkpoints[-1]["data"]["step"] >= 20
    kept = services.s3.client().list_objects_v2(
        Bucket=services.env["GPUJOBS_S3_BUCKET"], Prefix=f"jobs/{job['id']}/checkpoints/"
    )
    latents = checkpoints[-1]["data"]["latents_key"]  # the encoded training set, stored once with the first checkpoint
    assert {c["data"]["latents_key"] for c in checkpoints} == {latents}
    assert sorted(obj["Key"] for obj in kept.get("Contents", [])) == sorted([latents, checkpoints[-1]["data"]["key"]])
    names = [m["name"] for m in client.get("/v1/models?kind=lora", headers=auth(key)).get_json()["items"]]
    assert f"demo-sd LoRA ({job['id']})" not in names


# --- models: tenants and deletion ----------------------------------------------------------------------


def test_a_model_is_its_tenants_alone_and_deleting_it_removes_the_weights(
    client, users, workers, training_images, api_catalog, demo_catalog
):
    me, other = users.me.secret, users.other.secret
    job = finetune(client, me, images=training_images[:1], steps=2, resolution=64, checkpoint_every=100)
    done = wait_for(client, me, job["id"], timeout=TRAIN_TIMEOUT)
    model_id = done["output"]["model"]["id"]

    assert_problem(client.get(f"/v1/models/{model_id}", headers=auth(other)), 404)
    assert_problem(client.delete(f"/v1/models/{model_id}", headers=auth(other)), 404)
    assert model_id not in [m["id"] for m in client.get("/v1/models", headers=auth(other)).get_json()["items"]]
    body = {"type": "text_to_image", "input": {"prompt": "x", "loras": [{"model": model_id}], **SMALL}}
    assert_problem(submit(client, other, body), 422, ["input", "loras", 0, "model"])
    unknown = {**body, "input": {**body["input"], "model": "some-other-model"}}
    assert "some-other-model" in assert_problem(submit(client, me, unknown), 422, ["input", "model"])["detail"]
    api_catalog(f'[models.other-sd]\nkind = "diffusion"\nsource = "{demo_catalog.parent / "demo-sd"}"\n')
    mismatched = {**body, "input": {**body["input"], "model": "other-sd"}}
    problem = assert_problem(submit(client, me, mismatched), 422, ["input", "loras", 0, "model"])
    assert "a LoRA of 'demo-sd'" in problem["detail"] and "other-sd" in problem["detail"]
    assert_problem(client.delete("/v1/models/demo-sd", headers=auth(me)), 409)

    url = done["output"]["weights"]["url"]
    assert client.delete(f"/v1/models/{model_id}", headers=auth(me)).status_code == 204
    assert_problem(client.get(f"/v1/models/{model_id}", headers=auth(me)), 404)
    assert requests.get(url, timeout=10).status_code == 404, "the weights are gone from storage"
    assert_problem(submit(client, me, body), 422, ["input", "loras", 0, "model"])


def test_a_job_whose_lora_was_deleted_after_submit_fails_clearly(client, users, workers, training_images):
    me = users.me.secret
    done = wait_for(
        client,
        me,
        finetune(client, me, images=training_images[:1], steps=1, resolution=64)["id"],
        timeout=TRAIN_TIMEOUT,
    )
    model_id = done["output"]["model"]["id"]
    workers.gpu.kill()  # so the job waits in the queue while its model goes
    response = submit(
        client, me, {"type": "text_to_image", "input": {"prompt": "x", "loras": [{"model": model_id}], **SMALL}}
    )
    assert response.status_code == 202
    assert client.delete(f"/v1/models/{model_id}", headers=auth(me)).status_code == 204
    workers.gpu = workers.stack.start_worker("gpu", concurrency=2, name=f"ft-gpu-{secrets.token_hex(3)}")
    failed = wait_for(client, me, response.get_json()["id"], timeout=TRAIN_TIMEOUT)
    assert failed["status"] == "failed" and failed["error"]["code"] == "lora_missing", failed
    assert model_id in failed["error"]["message"]


# --- bad input ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(app, users, training_images) -> dict[str, str]:
    client = app.test_client()
    return {
        "image": training_images[0],
        "dataset": uploaded(
            client, users.me.secret, zip_of({"a.png": picture(16, 16)}), filename="d.zip", purpose="dataset"
        ),
        "other": uploaded(client, users.other.secret, picture(16, 16)),
    }


@pytest.mark.parametrize(
    ("params", "loc"),
    [
        ({}, ["input"]),
        ({"images": ["@image"], "dataset": "@dataset"}, ["input"]),
        ({"images": []}, ["input", "images"]),
        ({"images": ["@image"] * 21}, ["input", "images"]),
        ({"images": ["@image"], "captions": ["a", "b"]}, ["input"]),
        ({"dataset": "@dataset", "captions": ["a"]}, ["input"]),
        ({"images": ["@image"], "captions": ["x" * 2001]}, ["input", "captions", 0]),
        ({"images": ["@dataset"]}, ["input", "images"]),
        ({"dataset": "@image"}, ["input", "dataset"]),
        ({"images": ["@other"]}, ["input", "images"]),
        ({"images": ["file_gone"]}, ["input", "images"]),
        ({"images": ["@image"], "steps": 0}, ["input", "steps"]),
        ({"images": ["@image"], "steps": 20001}, ["input", "steps"]),
        ({"images": ["@image"], "rank": 0}, ["input", "rank"]),
        ({"images": ["@image"], "rank": 129}, ["input", "rank"]),
        ({"images": ["@image"], "resolution": 100}, ["input", "resolution"]),
        ({"images": ["@image"], "resolution": 2048}, ["input", "resolution"]),
        ({"images": ["@image"], "learning_rate": 0}, ["input", "learning_rate"]),
        ({"images": ["@image"], "learning_rate": "fast"}, ["input", "learning_rate"]),
        ({"images": ["@image"], "batch_size": 0}, ["input", "batch_size"]),
        ({"images": ["@image"], "checkpoint_every": 0}, ["input", "checkpoint_every"]),
        ({"images": ["@image"], "seed": -1}, ["input", "seed"]),
        ({"images": ["@image"], "name": ""}, ["input", "name"]),
        ({"images": ["@image"], "epochs": 3}, ["input", "epochs"]),
        ({"images": ["@image"], "base_model": "no-such-model"}, ["input", "base_model"]),
        ({"images": ["@image"], "base_model": "demo-mask2former"}, ["input", "base_model"]),
    ],
)
def test_bad_finetune_input_is_a_precise_422(client, users, inputs, params, loc):
    def resolve(value: Any) -> Any:
        if isinstance(value, list):
            return [resolve(v) for v in value]
        return inputs[value[1:]] if isinstance(value, str) and value.startswith("@") else value

    response = submit(
        client, users.me.secret, {"type": "finetune", "input": {k: resolve(v) for k, v in params.items()}}
    )
    assert_problem(response, 422, loc)


@pytest.mark.parametrize(
    ("loras", "loc"),
    [
        ([{"model": "mdl_nothere"}], ["input", "loras", 0, "model"]),
        ([{"model": "not-an-id"}], ["input", "loras", 0, "model"]),
        ([{"model": "mdl_a", "scale": 3}], ["input", "loras", 0, "scale"]),
        ([{"model": "mdl_a", "weight": 1}], ["input", "loras", 0, "weight"]),
        ([{"model": "mdl_a"}, {"model": "mdl_a"}], ["input", "loras"]),
        ([{"model": f"mdl_{i}"} for i in range(5)], ["input", "loras"]),
        ({"model": "mdl_a"}, ["input", "loras"]),
    ],
)
def test_bad_loras_are_a_precise_422(client, users, loras, loc):
    body = {"type": "text_to_image", "input": {"prompt": "x", "loras": loras}}
    assert_problem(submit(client, users.me.secret, body), 422, loc)


def _symlink_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("a.png", picture(16, 16))
        link = zipfile.ZipInfo("b.png")
        link.external_attr = (0o120777 << 16) | 0x20
        archive.writestr(link, "/etc/passwd")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("members", "why"),
    [
        ({"a.png": b"", "../../escape.png": b"x"}, "unsafe path"),
        ({"/abs.png": b"x"}, "unsafe path"),
        ({"a.png": picture(16, 16), "run.sh": "#!/bin/sh"}, "neither an image"),
        ({"a.png": picture(16, 16), "b.txt": "no image for me"}, "no image"),
        ({"a.png": b"not a png at all"}, "not an image"),
        ({"a.png": picture(16, 16), "a.txt": b"\xff\xfe\x00bad"}, "not UTF-8"),
        ({f"{i}.png": picture(8, 8, seed=i) for i in range(21)}, "more than 20 images"),
        ({"a.png": picture(16, 16), "big.png": b"\x00" * 10_000_000}, "zip bomb"),
        ({"a.txt": "only a caption"}, "no image"),
        ({}, "no images"),
    ],
    ids=[
        "dotdot",
        "absolute",
        "script",
        "orphan-caption",
        "bad-image",
        "bad-caption",
        "too-many",
        "bomb",
        "caption-only",
        "empty",
    ],
)
def test_a_bad_dataset_zip_is_a_422_naming_the_problem(client, users, members, why):
    response = client.post(
        "/v1/files",
        data={"file": (io.BytesIO(zip_of(members)), "set.zip"), "purpose": "dataset"},
        headers=auth(users.me.secret),
        content_type="multipart/form-data",
    )
    problem = assert_problem(response, 422, ["file"])
    assert why in problem["detail"], problem


def test_a_dataset_zip_with_a_link_is_a_422(client, users):
    response = client.post(
        "/v1/files",
        data={"file": (io.BytesIO(_symlink_zip()), "set.zip"), "purpose": "dataset"},
        headers=auth(users.me.secret),
        content_type="multipart/form-data",
    )
    assert "is a link" in assert_problem(response, 422, ["file"])["detail"]
