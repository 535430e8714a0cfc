"""Stable Diffusion jobs (text_to_image, inpainting, style_transfer) with the tiny demo models.

Through the API and a real worker of this module's own (``sd_worker``), which loads the demo
catalog (``gpujobs models demo``: a tiny SD pipeline, a 9-channel inpainting UNet and an
IP-Adapter that the pipeline's catalog entry names). Their UNet, text encoder and adapter have
random weights, so what is checked is what does not depend on them: sizes, PNG parameters, seeds,
the pixels inpainting must keep, the colour statistics style transfer moves (the demo VAE
preserves colour), cancel, loading once, and precise 422s. A few tests use the pipeline family in
this process, where object identity, the step hook and the IP-Adapter swap can be seen directly.
"""

from __future__ import annotations

import io
import os
import secrets
import time
import zipfile
from typing import Any

import numpy as np
import pytest

from gpujobs.harness.processes import Stack
from tests.integration.client import assert_problem, auth, events, submit, wait_for
from tests.integration.generation import (
    JOB_TIMEOUT,
    download,
    fetch,
    mask_png,
    picture,
    pixels_of,
    run_job,
    uploaded,
    wait_models,
    worker_models,
)

SMALL = {"width": 64, "height": 64, "num_inference_steps": 3}


# --- fixtures and helpers -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd_worker(cluster, demo_catalog, tmp_path_factory) -> Any:
    """A gpu worker that knows the demo catalog, for this module only (the default one is stopped)."""
    from tests.integration.conftest import quiesce

    cluster.stop_gpu_worker()
    env = {
        **os.environ,
        "GPUJOBS_MODEL_CATALOG": str(demo_catalog),
        "GPUJOBS_HEARTBEAT_SECONDS": "0.3",
        # Idle OpenMP threads sleep instead of spinning: on a shared, busy CPU, spinning makes torch ~5× slower.
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    stack = Stack(env, tmp_path_factory.mktemp("sd-logs"), label="sd")
    worker = stack.start_worker("gpu", concurrency=2, name=f"sd-{secrets.token_hex(3)}")
    try:
        yield worker
    finally:
        quiesce()
        stack.stop_all()


@pytest.fixture(scope="module")
def users(services) -> Any:
    """Two users of tenants of this module's own: the session's shared tenants stay as other modules expect."""
    from tests.integration.conftest import make_key

    class Users:
        me = make_key("diffusion tests", "user")
        other = make_key("diffusion tests, other tenant", "user")

    return Users


def stored_artifacts(job_id: str, services: Any) -> tuple[list[str], list[str]]:
    from sqlalchemy import select

    from db.models import Artifact
    from db.session import session_scope

    with session_scope() as session:
        rows = session.scalars(select(Artifact.name).where(Artifact.job_id == job_id)).all()
    listing = services.s3.client().list_objects_v2(Bucket=services.env["GPUJOBS_S3_BUCKET"], Prefix=f"jobs/{job_id}/")
    return list(rows), [obj["Key"] for obj in listing.get("Contents", [])]


# --- the three job types --------------------------------------------------------------------------


def test_text_to_image_makes_pngs_of_the_requested_size_with_their_parameters(client, users, sd_worker):
    job = run_job(
        client,
        users.me.secret,
        "text_to_image",
        prompt="a lighthouse at dusk",
        negative_prompt="fog",
        width=64,
        height=48,
        num_inference_steps=3,
        seed=11,
        num_outputs=2,
    )
    output = job["output"]
    assert output["seed"] == 11 and output["seeds"] == [11, 12]
    assert [a["name"] for a in output["images"]] == ["image-0.png", "image-1.png"]
    for index, artifact in enumerate(output["images"]):
        assert artifact["content_type"] == "image/png"
        pixels, parameters = download(artifact)
        assert pixels.shape == (48, 64, 3)
        assert parameters["seed"] == 11 + index
        assert parameters["prompt"] == "a lighthouse at dusk" and parameters["negative_prompt"] == "fog"
        assert (parameters["width"], parameters["height"]) == (64, 48)
        assert parameters["type"] == "text_to_image" and parameters["model"] == "demo-sd"
        assert parameters["scheduler"] == "euler" and parameters["num_inference_steps"] == 3
    assert job["progress"]["step"] == job["progress"]["total"] == 3


def test_same_seed_gives_the_same_pixels_and_another_seed_other_pixels(client, users, sd_worker):
    key = users.me.secret
    params = {"prompt": "a red bicycle", **SMALL, "scheduler": "euler_a"}  # ancestral: noise at every step too
    first, again, other = (run_job(client, key, "text_to_image", seed=seed, **params) for seed in (5, 5, 6))
    assert np.array_equal(pixels_of(first)[0], pixels_of(again)[0])
    assert not np.array_equal(pixels_of(first)[0], pixels_of(other)[0])

    drawn = run_job(client, key, "text_to_image", **params)  # no seed: one is drawn and returned
    assert isinstance(drawn["output"]["seed"], int) and drawn["output"]["seeds"] == [drawn["output"]["seed"]]
    replay = run_job(client, key, "text_to_image", seed=drawn["output"]["seed"], **params)
    assert np.array_equal(pixels_of(drawn)[0], pixels_of(replay)[0])


@pytest.mark.parametrize("scheduler", ["heun", "lms", "ddim", "pndm", "dpmpp_2m", "dpmpp_2m_karras", "unipc"])
def test_every_scheduler_runs(client, users, sd_worker, scheduler):
    job = run_job(client, users.me.secret, "text_to_image", prompt="a cat", scheduler=scheduler, seed=1, **SMALL)
    pixels, parameters = download(job["output"]["images"][0])
    assert pixels.shape == (64, 64, 3) and parameters["scheduler"] == scheduler


def test_inpainting_repaints_the_mask_and_keeps_every_other_pixel(client, users, sd_worker):
    from PIL import Image

    key = users.me.secret
    width, height, box = 96, 72, (24, 16, 72, 48)
    image = picture(width, height, seed=1)
    job = run_job(
        client,
        key,
        "inpainting",
        image=uploaded(client, key, image),
        mask=uploaded(client, key, mask_png(width, height, box)),
        prompt="a window",
        num_inference_steps=3,
        seed=2,
        num_outputs=2,
    )
    original = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
    inside = np.zeros((height, width), bool)
    inside[box[1] : box[3], box[0] : box[2]] = True
    for artifact in job["output"]["images"]:
        pixels, parameters = download(artifact)
        assert pixels.shape == (height, width, 3)
        assert parameters["type"] == "inpainting" and (parameters["width"], parameters["height"]) == (width, height)
        difference = np.abs(pixels.astype(int) - original.astype(int))
        assert difference[~inside].max() <= 1, "pixels outside the mask changed"
        assert difference[inside].mean() > 10, "the masked area was not repainted"

    # The catalog names a dedicated 9-channel UNet for demo-sd: loaded (once) beside the family.
    models = wait_models(sd_worker.node, lambda m: "inpainting:demo-sd-inpainting" in m)
    assert models["inpainting:demo-sd-inpainting"]["loads"] == 1


def test_inpainting_sizes_round_to_8_and_a_smaller_mask_of_the_same_shape_is_resized(client, users, sd_worker):
    key = users.me.secret
    image = uploaded(client, key, picture(100, 60, seed=2))
    half_mask = uploaded(client, key, mask_png(50, 30, (10, 5, 30, 20)))
    job = run_job(client, key, "inpainting", image=image, mask=half_mask, num_inference_steps=2, seed=3)
    pixels, _ = download(job["output"]["images"][0])
    assert pixels.shape == (64, 104, 3)  # 100×60 → 104×64 (halves round up)

    explicit = run_job(
        client, key, "inpainting", image=image, mask=half_mask, width=48, height=32, num_inference_steps=2, seed=3
    )
    assert download(explicit["output"]["images"][0])[0].shape == (32, 48, 3)

    other_shape = uploaded(client, key, mask_png(60, 60, (10, 10, 30, 30)))
    failed = run_job(client, key, "inpainting", "failed", image=image, mask=other_shape, num_inference_steps=2)
    assert failed["error"]["code"] == "invalid_mask"
    assert "60×60" in failed["error"]["message"] and "100×60" in failed["error"]["message"]


def test_style_transfer_moves_colour_statistics_toward_the_style(client, users, sd_worker):
    key = users.me.secret
    content_colour, style_colour = np.array([200, 60, 40]), np.array([40, 80, 210])
    content = uploaded(client, key, picture(100, 60, base=tuple(content_colour), seed=4))
    style = uploaded(client, key, picture(80, 80, base=tuple(style_colour), seed=5))
    means = {}
    for style_strength in (0.0, 1.0):
        job = run_job(
            client,
            key,
            "style_transfer",
            content_image=content,
            style_image=style,
            style_strength=style_strength,
            strength=0.5,
            num_inference_steps=4,
            seed=7,
        )
        pixels, parameters = download(job["output"]["images"][0])
        assert pixels.shape == (64, 104, 3), "the content image's size, rounded to 8"
        assert parameters["type"] == "style_transfer" and parameters["style_strength"] == style_strength
        means[style_strength] = pixels.reshape(-1, 3).mean(axis=0)

    def distance(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.linalg.norm(a - b))

    assert distance(means[0.0], means[1.0]) > 40, means
    assert distance(means[1.0], style_colour) < distance(means[0.0], style_colour) - 40, means
    assert distance(means[0.0], content_colour) < distance(means[1.0], content_colour), means


def test_style_transfer_defaults_and_an_empty_prompt(client, users, sd_worker):
    key = users.me.secret
    content = uploaded(client, key, picture(64, 64, seed=6))
    style = uploaded(client, key, picture(64, 64, base=(30, 200, 30), seed=7))
    job = run_job(
        client,
        key,
        "style_transfer",
        content_image=content,
        style_image=style,
        prompt="",
        num_inference_steps=5,
        num_outputs=2,
    )
    assert len(job["output"]["images"]) == 2
    _, parameters = download(job["output"]["images"][1])
    assert parameters["strength"] == 0.6 and parameters["style_strength"] == 0.7
    assert parameters["seed"] == job["output"]["seed"] + 1
    assert job["progress"]["total"] == 3  # 5 steps × strength 0.6


# --- output formats -----------------------------------------------------------------------------------

# What a PNG's `parameters` chunk held before WebP and JPEG output existed: PNG jobs keep it as it was.
PNG_PARAMETERS = {
    "type", "prompt", "negative_prompt", "width", "height", "num_inference_steps", "guidance_scale", "scheduler",
    "seed", "num_outputs", "loras", "model",
}  # fmt: skip


def exif_parameters(image: Any) -> dict[str, Any]:
    """The generation parameters of a WebP or JPEG: JSON in the EXIF UserComment, after its ASCII code."""
    import json

    from PIL import ExifTags

    comment = image.getexif().get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment]
    assert comment[:8] == b"ASCII\0\0\0", comment[:8]
    return json.loads(comment[8:].decode("ascii"))


def test_png_stays_the_default_and_webp_and_jpeg_are_the_same_picture_with_exif_parameters(client, users, sd_worker):
    from PIL import Image

    key = users.me.secret
    params = {"prompt": "a windmill", "width": 64, "height": 48, "num_inference_steps": 3, "seed": 31}
    default = run_job(client, key, "text_to_image", **params)
    explicit = run_job(client, key, "text_to_image", output_format="png", **params)
    assert default["input"]["output_format"] == "png" and default["input"]["output_quality"] is None
    png, = default["output"]["images"]  # fmt: skip
    assert png["name"] == "image-0.png" and png["content_type"] == "image/png"
    assert explicit["output"]["images"][0]["sha256"] == png["sha256"], "`png` named or not: the same bytes"
    reference, parameters = download(png)
    assert set(parameters) == PNG_PARAMETERS, "a PNG's parameters chunk must stay as it was"

    webp = run_job(client, key, "text_to_image", output_format="webp", num_outputs=2, **params)
    jpeg = run_job(client, key, "text_to_image", output_format="jpeg", output_quality=75, **params)
    for job, extension, content_type, pil_format, quality in (
        (webp, "webp", "image/webp", "WEBP", 90),
        (jpeg, "jpg", "image/jpeg", "JPEG", 75),
    ):
        images = job["output"]["images"]
        assert [a["name"] for a in images] == [f"image-{i}.{extension}" for i in range(len(images))]
        for index, artifact in enumerate(images):
            assert artifact["content_type"] == content_type
            with Image.open(io.BytesIO(fetch(artifact))) as image:
                assert image.format == pil_format and image.size == (64, 48)
                pixels, found = np.asarray(image.convert("RGB")), exif_parameters(image)
            assert set(found) == PNG_PARAMETERS | {"output_format", "output_quality"}
            assert found["seed"] == 31 + index and found["output_quality"] == quality
            assert found["output_format"] == job["input"]["output_format"] and found["prompt"] == "a windmill"
            if index == 0:  # the same seed as the PNG: exactly the PNG's pixels, encoded at that quality
                encoded = io.BytesIO()
                Image.fromarray(reference).save(encoded, pil_format, quality=quality)
                assert np.array_equal(pixels, np.asarray(Image.open(encoded).convert("RGB")))
        assert len(images) == job["input"]["num_outputs"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"output_format": "gif"}, "'png', 'webp' or 'jpeg'"),
        ({"output_format": "JPEG"}, "'png', 'webp' or 'jpeg'"),
        ({"output_format": "webp", "output_quality": 0}, "greater than or equal to 1"),
        ({"output_format": "webp", "output_quality": 101}, "less than or equal to 100"),
        ({"output_format": "jpeg", "output_quality": "high"}, "valid integer"),
        ({"output_format": "jpeg", "output_quality": 80.0}, "valid integer"),
        ({"output_format": "jpeg", "output_quality": 80.5}, "valid integer"),
        ({"output_quality": 80}, "`png` is lossless"),
        ({"output_format": "png", "output_quality": 80}, "`png` is lossless"),
    ],
)
def test_a_bad_output_format_or_quality_is_a_422_naming_it_and_makes_no_job(client, users, files, extra, message):
    from sqlalchemy import func, select

    from db.models import Job
    from db.session import session_scope

    def jobs() -> int:
        with session_scope() as session:
            return session.scalar(select(func.count()).select_from(Job).where(Job.tenant_id == users.me.tenant))

    before = jobs()
    for job_type, needs in (
        ("text_to_image", TEXT),
        ("inpainting", {"image": files["image"], "mask": files["image"]}),
        ("style_transfer", {"content_image": files["image"], "style_image": files["image"]}),
    ):
        response = submit(client, users.me.secret, {"type": job_type, "input": {**needs, **extra}})
        field = "output_format" if "output_format" in extra and "output_quality" not in extra else "output_quality"
        body = assert_problem(response, 422, ["input", field])
        assert any(message in error["msg"] for error in body["errors"]), body["errors"]
    assert jobs() == before


@pytest.fixture
def claimed_job(users) -> Any:
    """``claim(input, lock)``: a ``text_to_image`` job of ``users.me`` claimed by this process, and a context for it
    whose ``progress`` and ``store`` note whether ``lock`` was free (the job is run here, not by a worker)."""
    import threading

    from db import transitions
    from db.models import Job
    from db.session import session_scope
    from db.settings import get_settings
    from worker.context import JobContext

    contexts = []

    class Watching(JobContext):
        lock: Any = None
        seen: list[tuple[str, bool, str]]

        def _note(self, what: str) -> None:
            free = self.lock.acquire(blocking=False)  # what the next job's turn would do
            if free:
                self.lock.release()
            self.seen.append((what, free, threading.current_thread().name))

        def progress(self, step: int, total: int | None = None, message: str | None = None, **extra: Any) -> None:
            if message in ("decoding", "storing"):
                self._note(message)
            super().progress(step, total, message, **extra)

        def store(self, name: str, data: bytes, content_type: str, key: str | None = None) -> Any:
            self._note(name)
            return super().store(name, data, content_type, key)

    def claim(params: dict[str, Any], lock: Any) -> Watching:
        with session_scope() as session:
            job = transitions.create(
                session,
                Job(tenant_id=users.me.tenant, type="text_to_image", queue="gpu", input=params, max_attempts=1,
                    deadline_seconds=120),
            )  # fmt: skip
            claimed = transitions.claim(session, job.id, "in-process@test", lease_seconds=get_settings().lease_seconds)
            assert claimed is not None
        ctx = Watching(
            job_id=job.id, attempt=claimed.attempt, tenant_id=users.me.tenant, worker_id="in-process@test",
            deadline_seconds=120, settings=get_settings(),
        )  # fmt: skip
        ctx.lock, ctx.seen = lock, []
        ctx.start()  # renews the lease, as a worker does
        contexts.append(ctx)
        return ctx

    yield claim
    for ctx in contexts:
        ctx.close()
        with session_scope() as session:  # ended like a job that failed, so no reconciler picks it up again
            transitions.fail(session, ctx.job_id, ctx.attempt, "test", "run in the test")


def test_a_job_gives_the_model_back_before_it_encodes_and_uploads_and_leaves_no_thread(claimed_job):
    """In this process, on the real model cache, storage and database: while a job's images are encoded and
    uploaded, the family's lock is free for the next job's turn; a batch's encoder threads are gone at the end,
    and an image that cannot be encoded fails the job with ``encoding_failed``, storing nothing."""
    import threading

    from worker.jobs.diffusion import run
    from worker.jobs.diffusion.spec import DIFFUSION, TextToImageInput
    from worker.jobs.spec import JobError
    from worker.models.cache import get_cache

    family = get_cache().load(DIFFUSION, None)
    params = TextToImageInput(prompt="a kite", **SMALL, seed=3, num_outputs=2, output_format="webp")
    ctx = claimed_job(params.model_dump(mode="json"), family.lock)
    output = run.text_to_image(ctx, params)

    assert [a.name for a in output.images] == ["image-0.webp", "image-1.webp"]
    assert sorted(ctx.stored) == ["image-0.webp", "image-1.webp"]
    seen = {what: (free, thread) for what, free, thread in ctx.seen}
    assert seen["decoding"][0] is False, "decoding runs in the job's turn"
    assert seen["storing"][0] is True, "the lock must be given back before the images are encoded"
    for name in ("image-0.webp", "image-1.webp"):
        free, thread = seen[name]
        assert free, f"{name} was uploaded while the job still held the model's lock"
        assert thread.startswith(f"encode-{ctx.job_id}"), thread  # encoded and uploaded beside the other image
    assert not [t for t in threading.enumerate() if t.name.startswith(f"encode-{ctx.job_id}")], "encoder threads left"

    broken = claimed_job(params.model_dump(mode="json"), family.lock)
    noise = np.zeros((2, 16, 16, 5), np.float32)  # five channels: no image format takes that
    with pytest.raises(JobError) as failure:
        run._store(broken, "text_to_image", params, family, noise, [3, 4], 3)
    assert failure.value.code == "encoding_failed" and "as webp" in failure.value.message, failure.value.message
    assert broken.stored == {}
    assert not [t for t in threading.enumerate() if t.name.startswith(f"encode-{broken.job_id}")]


# --- cancel -------------------------------------------------------------------------------------------


def test_cancel_stops_a_running_generation_at_its_next_step(client, users, sd_worker, services):
    key = users.me.secret
    response = submit(
        client,
        key,
        {
            "type": "text_to_image",
            "input": {
                "prompt": "a long one",
                "width": 256,
                "height": 256,
                "num_inference_steps": 50,
                "seed": 1,
            },
        },
    )
    job_id = response.get_json()["id"]
    running = wait_for(client, key, job_id, "running", timeout=JOB_TIMEOUT, until=lambda j: j["progress"]["step"] >= 3)
    seen_by_client = running["progress"]["step"]
    asked = time.monotonic()
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(key)).status_code == 202

    job = wait_for(client, key, job_id, ("canceled", "succeeded", "failed"), timeout=30)
    assert job["status"] == "canceled", job
    assert time.monotonic() - asked < 10
    assert job["output"] is None and job["error"] is None

    timeline = {event["message"]: event["data"]["step"] for event in events(job_id) if event["kind"] == "progress"}
    stopping, stopped = timeline["stopping"], timeline["stopped"]
    # The worker saw the cancel after step `stopping` and the pipeline ran no step after it.
    assert stopped - stopping <= 1, timeline
    # It stopped before its last step. How far past what the client saw depends on the step time (the
    # progress is saved, and the cancel flag read, every 0.2 s): on a loaded machine more steps fit in
    # that than on a quiet one, so no bound in steps here; the 10 s bound above holds the time.
    assert seen_by_client <= stopped < 50, timeline
    assert "decoding" not in timeline and "storing" not in timeline
    assert stored_artifacts(job_id, services) == ([], [])


# --- one copy of the model --------------------------------------------------------------------------


def test_a_mix_of_the_three_types_loads_the_model_once(client, users, sd_worker):
    key = users.me.secret
    image, style = uploaded(client, key, picture(64, 64, seed=8)), uploaded(client, key, picture(64, 64, seed=9))
    mask = uploaded(client, key, mask_png(64, 64, (0, 0, 32, 32)))
    bodies = [
        {"type": "text_to_image", "input": {"prompt": "a boat", **SMALL}},
        {"type": "inpainting", "input": {"image": image, "mask": mask, "num_inference_steps": 3}},
        {"type": "style_transfer", "input": {"content_image": image, "style_image": style, "num_inference_steps": 4}},
    ] * 2
    images_before = worker_models(sd_worker.node).get("diffusion:demo-sd", {}).get("images", 0)
    ids = [submit(client, key, body).get_json()["id"] for body in bodies]  # two run at once on the worker
    for job_id in ids:
        assert wait_for(client, key, job_id, timeout=JOB_TIMEOUT)["status"] == "succeeded"

    made = images_before + len(ids)
    models = wait_models(sd_worker.node, lambda m: m.get("diffusion:demo-sd", {}).get("images", 0) >= made)
    family = models["diffusion:demo-sd"]
    assert family["loads"] == 1 and family["loaded"] is True, family
    assert family["hits"] >= len(ids) - 1, family
    assert models["inpainting:demo-sd-inpainting"]["loads"] == 1, models


def test_the_family_shares_one_unet_vae_and_text_encoder(demo_catalog):
    """In this process: three pipelines over the same module objects, in the cache's dtype."""
    import torch

    from db.settings import Settings
    from worker.jobs.diffusion.pipeline import load_family
    from worker.models.cache import ModelCache

    cache = ModelCache(Settings(model_catalog=demo_catalog, device="cpu", dtype="bfloat16"))
    entry = cache.entry(None, "diffusion")
    family = cache.get("diffusion:demo-sd", entry, load_family)
    assert cache.get("diffusion:demo-sd", entry, load_family) is family
    base = family.text_to_image
    dedicated = family.inpaint_pipeline(cache)
    for pipe in (family.image_to_image, family.inpaint, dedicated):
        assert pipe.vae is base.vae and pipe.text_encoder is base.text_encoder and pipe.tokenizer is base.tokenizer
    assert family.image_to_image.unet is base.unet and family.inpaint.unet is base.unet
    assert dedicated.unet is not base.unet and dedicated.unet.config.in_channels == 9
    assert family.inpaint_pipeline(cache).unet is dedicated.unet  # put together per run, loaded once
    # from_pipe casts to float32 unless told otherwise: the shared modules must keep the cache's dtype.
    for module in (base.unet, base.vae, base.text_encoder, dedicated.unet):
        assert next(module.parameters()).dtype == torch.bfloat16
    stats = cache.loaded()
    assert stats["diffusion:demo-sd"]["loads"] == 1 and stats["inpainting:demo-sd-inpainting"]["loads"] == 1
    assert stats["diffusion:demo-sd"]["mb"] > 0


def test_the_step_hook_stops_the_pipeline_and_out_of_memory_is_a_job_error(demo_catalog):
    """``denoise`` on the real pipeline: a stop after step 3 of 20 runs exactly 3; a CUDA OOM fails the job."""
    import torch

    from db.settings import Settings
    from worker.jobs.diffusion.pipeline import denoise, load_family
    from worker.jobs.spec import JobError
    from worker.models.cache import ModelCache

    cache = ModelCache(Settings(model_catalog=demo_catalog, device="cpu", dtype="float32"))
    family = cache.get("diffusion:demo-sd", cache.entry(None, "diffusion"), load_family)
    call = {
        "prompt": "x",
        "width": 64,
        "height": 64,
        "num_inference_steps": 20,
        "generator": torch.Generator().manual_seed(0),
    }

    seen = []
    result = denoise(family, family.text_to_image, "euler", lambda step, total: seen.append(step) or step >= 3, **call)
    assert result.stopped and result.latents is None
    assert (result.steps_run, result.total) == (3, 20) and seen == [1, 2, 3]
    whole = denoise(family, family.text_to_image, "euler", lambda step, total: False, **call)
    assert not whole.stopped and whole.steps_run == 20 and whole.latents.shape == (1, 4, 8, 8)

    def exhausted(step: int, total: int) -> bool:  # the fault a CPU cannot produce, raised where CUDA would
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(JobError) as failure:
        denoise(family, family.text_to_image, "euler", exhausted, **call)
    assert failure.value.code == "out_of_memory" and "ran out of memory" in failure.value.message


# --- the IP-Adapter -----------------------------------------------------------------------------------

IP_ADAPTER_KEY = "ip_adapter:demo-sd-ip-adapter@demo-sd"


def test_the_ip_adapter_conditions_style_runs_and_no_other_run(demo_catalog):
    """In this process: the adapter changes a style run, is swapped out after it (a failed one too), loads once."""
    import torch
    from PIL import Image

    from db.settings import Settings
    from worker.jobs.diffusion.pipeline import denoise, load_family
    from worker.jobs.spec import JobError
    from worker.models.cache import ModelCache

    cache = ModelCache(Settings(model_catalog=demo_catalog, device="cpu", dtype="float32"))
    family = cache.get("diffusion:demo-sd", cache.entry(None, "diffusion"), load_family)
    assert (family.ip_adapter_model, family.ip_adapter_scale) == ("demo-sd-ip-adapter", 1.0)
    unet = family.text_to_image.unet
    content = Image.open(io.BytesIO(picture(64, 64, seed=10))).convert("RGB")
    style = Image.open(io.BytesIO(picture(64, 64, base=(30, 60, 200), seed=11))).convert("RGB")

    def plain_state() -> tuple[Any, ...]:
        """Everything load_ip_adapter changes, as every run but a style run must see it."""
        image_to_image = family.image_to_image
        return (
            {name: type(processor) for name, processor in unet.attn_processors.items()},
            unet.encoder_hid_proj,
            unet.config.encoder_hid_dim_type,
            sorted(unet.state_dict()),
            image_to_image.image_encoder,
            image_to_image.feature_extractor,
            image_to_image.config["image_encoder"],
            image_to_image.config["feature_extractor"],
        )

    def generator() -> torch.Generator:
        return torch.Generator().manual_seed(0)

    def text_to_image() -> torch.Tensor:
        with family.lock:
            return denoise(
                family,
                family.text_to_image,
                "euler",
                lambda step, total: False,
                prompt="a boat",
                width=64,
                height=64,
                num_inference_steps=3,
                generator=generator(),
            ).latents

    seen_during_the_run = []

    def watching(step: int, total: int) -> bool:
        kinds = {type(processor).__name__ for processor in unet.attn_processors.values()}
        seen_during_the_run.append(("IPAdapterAttnProcessor2_0" in kinds, unet.encoder_hid_proj is not None))
        return False

    def style_run(style_strength: float, on_step: Any = watching) -> torch.Tensor:
        with family.lock, family.style_pipeline(cache, style, style_strength) as styled:
            assert styled.pipe is family.image_to_image
            return denoise(
                family,
                styled.pipe,
                "euler",
                on_step,
                prompt="",
                image=content,
                strength=0.5,
                num_inference_steps=4,
                generator=generator(),
                **styled.call,
            ).latents

    plain = plain_state()
    assert plain[1] is None and plain[2] is None and plain[4] is None  # nothing of the adapter before its first run
    before = text_to_image()
    with family.lock:
        without = denoise(
            family,
            family.image_to_image,
            "euler",
            lambda step, total: False,
            prompt="",
            image=content,
            strength=0.5,
            num_inference_steps=4,
            generator=generator(),
        ).latents

    styled = style_run(1.0)
    assert seen_during_the_run and all(seen == (True, True) for seen in seen_during_the_run), seen_during_the_run
    assert not torch.equal(styled, without) and (styled - without).abs().mean() > 0.01
    assert plain_state() == plain, "the adapter stayed on the UNet or the pipeline after its run"
    assert torch.equal(text_to_image(), before), "a text-to-image run changed after a style run"

    seen_during_the_run.clear()
    assert torch.equal(style_run(0.0), without), "style_strength 0 must be the plain image-to-image run"
    assert seen_during_the_run == [(False, False)] * 2  # 4 steps × strength 0.5, without the adapter
    assert torch.equal(style_run(1.0), styled), "the same seed with the adapter must give the same latents"

    def exhausted(step: int, total: int) -> bool:  # a run that fails mid-way, with the adapter on
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(JobError):
        style_run(1.0, exhausted)
    assert plain_state() == plain, "a failed style run left the adapter on"
    assert torch.equal(text_to_image(), before)

    for pipe in (family.image_to_image, family.inpaint):
        assert pipe.unet is unet and pipe.vae is family.vae
    stats = cache.loaded()
    assert stats[IP_ADAPTER_KEY]["loads"] == 1 and stats[IP_ADAPTER_KEY]["runs"] == 3, stats
    assert stats[IP_ADAPTER_KEY]["hits"] == 2 and stats[IP_ADAPTER_KEY]["mb"] > 0, stats
    assert stats["diffusion:demo-sd"]["loads"] == 1
    key, adapter = family.ip_adapter(cache)
    assert key == IP_ADAPTER_KEY and len(adapter.layers) == 4  # the tiny UNet's four cross-attention layers
    assert all(name.endswith("attn2.processor") for name in adapter.layers)


def test_an_ip_adapter_with_pickle_weights_is_refused_and_the_family_stays_plain(demo_catalog, tmp_path):
    from db.settings import Settings
    from worker.jobs.diffusion.pipeline import load_family
    from worker.models.cache import ModelCache, ModelUnavailable
    from worker.models.catalog import load_catalog, write_catalog

    entries = {
        name: {"kind": entry.kind, "source": entry.source, "default": entry.default, **entry.options}
        for name, entry in load_catalog(Settings(model_catalog=demo_catalog)).entries.items()
    }
    entries["demo-sd-ip-adapter"]["weight_name"] = "ip-adapter_sd15.bin"
    write_catalog(tmp_path / "catalog.toml", entries)
    cache = ModelCache(Settings(model_catalog=tmp_path / "catalog.toml", device="cpu", dtype="float32"))
    family = cache.get("diffusion:demo-sd", cache.entry(None, "diffusion"), load_family)
    unet = family.text_to_image.unet
    processors = {name: type(processor) for name, processor in unet.attn_processors.items()}

    with pytest.raises(ModelUnavailable) as refused, family.lock, family.style_pipeline(cache, None, 0.5):
        pass
    assert "safetensors only" in refused.value.message and "ip-adapter_sd15.bin" in refused.value.message
    assert {name: type(processor) for name, processor in unet.attn_processors.items()} == processors
    assert unet.encoder_hid_proj is None and family.image_to_image.image_encoder is None
    with family.lock, family.style_pipeline(cache, None, 0.0) as styled:  # no style: the adapter is not needed
        assert styled.call == {}
    assert IP_ADAPTER_KEY not in cache.loaded()


def test_style_transfer_jobs_use_the_ip_adapter_loaded_once_and_text_to_image_does_not(client, users, sd_worker):
    key = users.me.secret
    content = uploaded(client, key, picture(64, 64, base=(180, 90, 60), seed=12))
    style = uploaded(client, key, picture(64, 64, base=(40, 90, 200), seed=13))
    text = {"prompt": "a harbour", **SMALL, "seed": 21}
    styled = {"content_image": content, "style_image": style, "strength": 0.5, "num_inference_steps": 4, "seed": 22}
    runs_before = worker_models(sd_worker.node).get(IP_ADAPTER_KEY, {}).get("runs", 0)

    first_text = run_job(client, key, "text_to_image", **text)
    first_style = run_job(client, key, "style_transfer", style_strength=0.8, **styled)
    run_job(client, key, "style_transfer", style_strength=0.0, **styled)  # adapter scale 0: run without it
    again_text = run_job(client, key, "text_to_image", **text)
    again_style = run_job(client, key, "style_transfer", style_strength=0.8, **styled)

    assert np.array_equal(pixels_of(first_text)[0], pixels_of(again_text)[0]), "a style run changed text_to_image"
    assert np.array_equal(pixels_of(first_style)[0], pixels_of(again_style)[0])
    models = wait_models(sd_worker.node, lambda m: m.get(IP_ADAPTER_KEY, {}).get("runs", 0) >= runs_before + 2)
    adapter = models[IP_ADAPTER_KEY]
    assert adapter["loads"] == 1 and adapter["loaded"] is True and adapter["mb"] > 0, adapter
    assert adapter["runs"] == runs_before + 2, adapter  # the style_strength 0 job ran without it
    assert models["diffusion:demo-sd"]["loads"] == 1, models


# --- bad input --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(client_module, users) -> dict[str, str]:
    """An image and a dataset zip of user a, and an image of user b."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("a.png", picture(16, 16))
        archive.writestr("a.txt", "a caption")
    return {
        "image": uploaded(client_module, users.me.secret, picture(16, 16)),
        "zip": uploaded(client_module, users.me.secret, buffer.getvalue(), filename="set.zip", purpose="dataset"),
        "other_tenant": uploaded(client_module, users.other.secret, picture(16, 16)),
    }


@pytest.fixture(scope="module")
def client_module(app) -> Any:
    return app.test_client()


TEXT = {"prompt": "a bridge"}


@pytest.mark.parametrize(
    ("job_type", "params", "loc"),
    [
        ("text_to_image", {}, ["input", "prompt"]),
        ("text_to_image", {"prompt": ""}, ["input", "prompt"]),
        ("text_to_image", {"prompt": "   "}, ["input", "prompt"]),
        ("text_to_image", {"prompt": "x" * 2001}, ["input", "prompt"]),
        ("text_to_image", {**TEXT, "negative_prompt": "x" * 2001}, ["input", "negative_prompt"]),
        ("text_to_image", {**TEXT, "width": 100}, ["input", "width"]),
        ("text_to_image", {**TEXT, "height": 0}, ["input", "height"]),
        ("text_to_image", {**TEXT, "width": 4096}, ["input", "width"]),
        ("text_to_image", {**TEXT, "width": 2048, "height": 2048}, ["input", "height"]),
        ("text_to_image", {**TEXT, "num_inference_steps": 0}, ["input", "num_inference_steps"]),
        ("text_to_image", {**TEXT, "num_inference_steps": 151}, ["input", "num_inference_steps"]),
        ("text_to_image", {**TEXT, "guidance_scale": 31}, ["input", "guidance_scale"]),
        ("text_to_image", {**TEXT, "scheduler": "karras_magic"}, ["input", "scheduler"]),
        ("text_to_image", {**TEXT, "seed": -1}, ["input", "seed"]),
        ("text_to_image", {**TEXT, "num_outputs": 5}, ["input", "num_outputs"]),
        ("text_to_image", {**TEXT, "loras": [{"model": "mdl_x", "scale": 1}]}, ["input", "loras", 0, "model"]),
        ("text_to_image", {**TEXT, "model": "no-such-model"}, ["input", "model"]),
        ("text_to_image", {**TEXT, "model": "demo-mask2former"}, ["input", "model"]),
        ("text_to_image", {**TEXT, "model": "demo-sd-inpainting"}, ["input", "model"]),
        ("text_to_image", {**TEXT, "model": 7}, ["input", "model"]),
        ("inpainting", {"image": "@image", "mask": "@image", "model": "nope"}, ["input", "model"]),
        (
            "style_transfer",
            {"content_image": "@image", "style_image": "@image", "model": "demo-sd-ip-adapter"},
            ["input", "model"],
        ),
        ("inpainting", {"image": "@image", "mask": "@zip"}, ["input", "mask"]),
        ("inpainting", {"image": "@other_tenant", "mask": "@image"}, ["input", "image"]),
        ("inpainting", {"image": "@image"}, ["input", "mask"]),
        ("inpainting", {"image": "@image", "mask": "@image", "strength": 1.5}, ["input", "strength"]),
        ("inpainting", {"image": "@image", "mask": "@image", "width": 64}, ["input", "height"]),
        ("style_transfer", {"content_image": "@image", "style_image": "@zip"}, ["input", "style_image"]),
        ("style_transfer", {"content_image": "file_nothere", "style_image": "@image"}, ["input", "content_image"]),
        (
            "style_transfer",
            {"content_image": "@image", "style_image": "@image", "style_strength": -0.1},
            ["input", "style_strength"],
        ),
        (
            "style_transfer",
            {"content_image": "@image", "style_image": "@image", "scheduler": "nope"},
            ["input", "scheduler"],
        ),
    ],
)
def test_bad_generation_input_is_a_precise_422(client, users, files, job_type, params, loc):
    params = {
        name: files[value[1:]] if isinstance(value, str) and value.startswith("@") else value
        for name, value in params.items()
    }
    response = submit(client, users.me.secret, {"type": job_type, "input": params})
    assert_problem(response, 422, loc)
