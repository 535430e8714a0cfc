"""Text-to-image through gpujobs against the raw diffusers call, on the full-size SD 1.5 architecture.

Run from the repository root::

    . .venv/bin/activate && python -m bench.diffusion                  # CPU: 256×256, 4 steps, fp32
    . .venv/bin/activate && python -m bench.diffusion --device cuda    # GPU: 512×512, 25 steps, fp16

The model is SD 1.5's UNet, VAE and CLIP text encoder built from ``bench/model-configs/sd15``
(or ``--configs``) with random weights and an offline tokenizer, saved once with ``save_pretrained``
(safetensors) into ``--model-dir`` and reused: same shapes, so the same cost as the real weights.

Started here (by ``bench.deployment``): an embedded Redis and S3 server (``gpujobs.harness``), a fresh
PostgreSQL database when one answers on 127.0.0.1:5432 (else SQLite, or ``--database-url``), then ``gpujobs api`` and ``gpujobs worker
--queues gpu --concurrency 1`` with a catalog naming the model (not preloaded).

Measured, one client, the same prompt, size, steps, guidance, sampler (``euler``) and seed for both:

- **cold**: the first job (the worker loads the model): submit → succeeded.
- **warm, interleaved** ``--samples`` rounds (alternating which goes first) of: the raw call in this process
  (``pipe(...)`` → PIL images, the model loaded here once and warmed up) and a job through the API
  (``POST /v1/jobs`` with ``Prefer: wait``, then ``GET`` until succeeded): submit → succeeded,
  which includes the queue, progress, PNG encoding and the upload to S3. The job's own
  ``run_seconds`` (claim → success, from the API) are shown beside it.
- the pixels of the job's PNG against the raw call's image for the same seed (expected identical).

``--concurrency N`` (service mode) adds: N jobs one after another, then N submitted at once (the worker
runs with N slots), images/s of each and their ratio: what concurrent clients get from one GPU.

``--in-process`` leaves the service out: the worker's own ``text_to_image`` (model cache, per-run
scheduler, step callback, decode, PNG encoding) runs in this process with an in-memory context,
on the same loaded modules as the raw call, to tell the job code's cost from the queue's.
``--torch-compile`` / ``--channels-last`` turn the worker settings on and do the same to the raw
pipeline.

Every process it starts is stopped at the end (and on Ctrl-C); a database it created is dropped.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import requests

from bench.deployment import REPO, Deployment, run
from bench.lib.client import JobsClient
from bench.lib.report import log, machine
from bench.lib.stats import median

DEFAULT_CONFIGS = Path(__file__).resolve().parent / "model-configs" / "sd15"
MODEL_NAME = "sd15-random"
PROMPT = "a lighthouse on a cliff at dusk, oil painting"
NEGATIVE = "blurry"
GUIDANCE = 7.5
SCHEDULER = "euler"
PROFILES = {  # device → (size, steps)
    "cpu": (256, 4),
    "cuda": (512, 25),
}
JOB_TIMEOUT = 1800.0


# --- the model ------------------------------------------------------------------------------------


def build_model(configs: Path, folder: Path) -> None:
    """SD 1.5's architecture with random weights, saved like a real checkpoint (once)."""
    if (folder / "model_index.json").is_file():
        log(f"model: reusing {folder}")
        return
    import torch
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from worker.jobs.diffusion.demo import build_tokenizer

    log(f"model: building SD 1.5 with random weights from {configs} into {folder} (once; ~4.3 GB)")
    started = time.monotonic()
    scratch = folder.with_name(folder.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    torch.manual_seed(0)

    def config(part: str) -> dict[str, Any]:
        return json.loads(
            (configs / part / ("scheduler_config.json" if part == "scheduler" else "config.json")).read_text()
        )

    def model_config(part: str) -> dict[str, Any]:
        return {k: v for k, v in config(part).items() if not k.startswith("_")}

    text_config = {k: v for k, v in config("text_encoder").items() if k not in ("architectures", "model_type")}
    pipeline = StableDiffusionPipeline(
        vae=AutoencoderKL.from_config(model_config("vae")),
        text_encoder=CLIPTextModel(CLIPTextConfig(**text_config)),
        tokenizer=build_tokenizer(scratch / "tokenizer"),
        unet=UNet2DConditionModel.from_config(model_config("unet")),
        scheduler=PNDMScheduler.from_config(config("scheduler")),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(scratch, safe_serialization=True)
    scratch.rename(folder)
    log(f"model: built in {time.monotonic() - started:.0f} s")


def write_catalog(folder: Path, model_dir: Path) -> Path:
    """A model catalog naming the built model (``GPUJOBS_MODEL_CATALOG``), written into ``folder``."""
    catalog = folder / "catalog.toml"
    catalog.write_text(f'[models.{MODEL_NAME}]\nkind = "diffusion"\nsource = "{model_dir}"\ndefault = true\n')
    return catalog


def load_raw_pipeline(folder: Path, device: str, torch_compile: bool = False, channels_last: bool = False) -> Any:
    """The baseline: the pipeline a user would load by hand, with the sampler the jobs use."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from worker.jobs.diffusion.pipeline import dtype_kwargs

    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(
        folder, use_safetensors=True, safety_checker=None, requires_safety_checker=False, **dtype_kwargs(dtype)
    ).to(device)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if torch_compile:
        pipe.unet.compile()
    return pipe


def raw_call(pipe: Any, size: int, steps: int, seed: int) -> tuple[float, Any]:
    import torch

    started = time.perf_counter()
    image = pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        width=size,
        height=size,
        num_inference_steps=steps,
        guidance_scale=GUIDANCE,
        generator=[torch.Generator("cpu").manual_seed(seed)],
    ).images[0]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started, image


# --- jobs -----------------------------------------------------------------------------------------


def run_job(client: JobsClient, size: int, steps: int, seed: int) -> tuple[float, dict[str, Any]]:
    """Submit → succeeded, seconds (client side), and the finished job."""
    body = {
        "type": "text_to_image",
        "input": {
            "prompt": PROMPT,
            "negative_prompt": NEGATIVE,
            "width": size,
            "height": size,
            "num_inference_steps": steps,
            "guidance_scale": GUIDANCE,
            "scheduler": SCHEDULER,
            "seed": seed,
        },
    }
    started = time.perf_counter()
    job = client.finish(client.submit(body, wait=60), JOB_TIMEOUT)
    elapsed = time.perf_counter() - started
    if job["status"] != "succeeded":
        raise RuntimeError(f"job {job['id']} ended {job['status']}: {job.get('error')}")
    return elapsed, job


def job_pixels(job: dict[str, Any]) -> Any:
    import numpy as np
    from PIL import Image

    data = requests.get(job["output"]["images"][0]["url"], timeout=60).content
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


# --- the run --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--samples", type=int, help="warm rounds (raw call + job each; default: 5 on CPU, 20 on CUDA)")
    parser.add_argument("--size", type=int, help="image side (default: 256 on CPU, 512 on CUDA)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: 4 on CPU, 25 on CUDA)")
    parser.add_argument(
        "--concurrency", type=int, default=0, help="also time N jobs one at a time against N at once (service mode)"
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="no API, queue or S3: the worker's text_to_image code in this process, on the raw call's modules",
    )
    parser.add_argument(
        "--torch-compile", action="store_true", help="GPUJOBS_TORCH_COMPILE for the job, and compile the raw UNet"
    )
    parser.add_argument(
        "--channels-last", action="store_true", help="GPUJOBS_CHANNELS_LAST for the job, and the raw UNet/VAE"
    )
    parser.add_argument(
        "--configs", type=Path, default=DEFAULT_CONFIGS, help=f"SD 1.5 configs (default {DEFAULT_CONFIGS})"
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=REPO / "var" / "bench" / MODEL_NAME,
        help="where the random-weight model is built once and reused (default var/bench/sd15-random)",
    )
    parser.add_argument("--database-url", help="default: a fresh PostgreSQL database on 127.0.0.1:5432, else SQLite")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp dir with the API's and worker's logs")
    args = parser.parse_args(argv)

    import torch  # fail fast, before building or starting anything

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False); "
            f"this torch is {torch.__version__}. Run on a GPU machine with a CUDA build of torch.",
            file=sys.stderr,
        )
        return 2
    size, steps = PROFILES[args.device]
    args.size, args.steps = args.size or size, args.steps or steps
    args.samples = args.samples or (20 if args.device == "cuda" else 5)
    if args.size % 8:
        parser.error("--size must be a multiple of 8")

    args.model_dir = args.model_dir.resolve()

    def measure(deployment: Deployment) -> dict[str, Any]:
        build_model(args.configs, args.model_dir)
        settings = {
            "GPUJOBS_MODEL_CATALOG": str(write_catalog(deployment.tmp, args.model_dir)),
            "GPUJOBS_DEVICE": args.device,
        }
        if args.torch_compile:
            settings["GPUJOBS_TORCH_COMPILE"] = "true"
        if args.channels_last:
            settings["GPUJOBS_CHANNELS_LAST"] = "true"
        return (measure_in_process if args.in_process else measure_service)(args, deployment, settings)

    return run("diffusion", measure, report, args.json, args.keep_logs)


def measure_service(args: argparse.Namespace, deployment: Deployment, settings: dict[str, str]) -> dict[str, Any]:
    """Jobs through ``gpujobs api`` and ``gpujobs worker`` against the raw call in this process."""
    deployment.start_services(database_url=args.database_url)
    key = deployment.prepare("gpujobs-bench-diffusion", settings, "diffusion benchmark")
    assert deployment.stack is not None
    slots = max(1, args.concurrency)
    worker = deployment.stack.start_worker("gpu", concurrency=slots, name="bench-diffusion", wait=False)
    _, base = deployment.start_api()
    deployment.stack.wait_worker_ready(worker)
    client = JobsClient(base, key)
    log(
        f"API and worker up; {args.device}: {args.size}×{args.size}, {args.steps} steps, guidance {GUIDANCE}, {SCHEDULER}"
    )

    cold_seconds, cold_job = run_job(client, args.size, args.steps, seed=1)
    log(f"cold job: {cold_seconds:.2f} s (includes loading the model in the worker)")

    log("loading the raw pipeline in this process")
    pipe = load_raw_pipeline(args.model_dir, args.device, args.torch_compile, args.channels_last)

    def job(seed: int) -> tuple[float, Any, float | None, float | None]:
        seconds, finished = run_job(client, args.size, args.steps, seed)
        return seconds, job_pixels(finished), finished["metrics"]["run_seconds"], finished["metrics"]["queue_seconds"]

    return {
        "mode": "service",
        **rounds(args, pipe, job),
        "cold_job_s": round(cold_seconds, 3),
        "cold_run_s": cold_job["metrics"]["run_seconds"],
        "concurrency": concurrent(client, args) if args.concurrency > 1 else None,
        "worker_device": heartbeat_device(deployment.database_url, "bench-diffusion"),
    }


def heartbeat_device(database_url: str, name: str) -> dict[str, Any] | None:
    """The device the worker's heartbeat recorded (from NVML on a GPU worker: ``source`` says so)."""
    from sqlalchemy import select

    from db.models import WorkerProcess
    from db.session import session_scope

    with session_scope(database_url) as session:
        row = session.scalars(select(WorkerProcess).where(WorkerProcess.id.like(f"{name}@%"))).first()
        return dict(row.device) if row is not None else None


def concurrent(client: JobsClient, args: argparse.Namespace) -> dict[str, Any]:
    """``--concurrency`` jobs one after another, then the same number submitted at once."""
    from concurrent.futures import ThreadPoolExecutor

    count = args.concurrency
    seeds = [3000 + i for i in range(count)]

    def one(seed: int) -> float:
        return run_job(client, args.size, args.steps, seed)[0]

    started = time.perf_counter()
    for seed in seeds:
        one(seed)
    alone = time.perf_counter() - started
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=count) as pool:
        latencies = list(pool.map(one, seeds))
    together = time.perf_counter() - started
    log(f"{count} jobs one at a time: {alone:.2f} s; at once: {together:.2f} s")
    return {
        "jobs": count,
        "one_at_a_time_s": round(alone, 3),
        "at_once_s": round(together, 3),
        "images_per_s_one_at_a_time": round(count / alone, 4),
        "images_per_s_at_once": round(count / together, 4),
        "at_once_over_one_at_a_time": round(alone / together, 4),
        "at_once_latency_median_s": round(median(latencies), 3),
    }


class MemoryContext:
    """What a job sees of the worker (``worker.context.JobContext``), kept in memory: no database, no S3."""

    def __init__(self) -> None:
        self.deadline = time.monotonic() + JOB_TIMEOUT
        self.stored: dict[str, bytes] = {}

    def should_stop(self) -> bool:
        return time.monotonic() > self.deadline

    def progress(self, step: int, total: int | None = None, message: str | None = None, **extra: Any) -> None:
        pass

    def check(self) -> None:
        pass

    def store(self, name: str, data: bytes, content_type: str) -> Any:
        from worker.jobs.spec import Artifact

        self.stored[name] = data
        return Artifact(name=name, content_type=content_type, size=len(data), sha256="")


def measure_in_process(args: argparse.Namespace, deployment: Deployment, settings: dict[str, str]) -> dict[str, Any]:
    """The worker's ``text_to_image`` in this process against ``pipe(...)`` on the same loaded modules."""
    import numpy as np
    from PIL import Image

    os.environ.update(settings)
    from db.settings import reset_settings
    from worker.jobs.diffusion.pipeline import make_scheduler
    from worker.jobs.diffusion.run import text_to_image
    from worker.jobs.diffusion.spec import DIFFUSION
    from worker.jobs.diffusion.spec import TextToImageInput as Input
    from worker.models.cache import get_cache

    reset_settings()
    params = {
        "prompt": PROMPT,
        "negative_prompt": NEGATIVE,
        "width": args.size,
        "height": args.size,
        "num_inference_steps": args.steps,
        "guidance_scale": GUIDANCE,
        "scheduler": SCHEDULER,
    }
    started = time.perf_counter()
    text_to_image(MemoryContext(), Input(**params, seed=1))
    cold_seconds = time.perf_counter() - started
    log(f"cold job path: {cold_seconds:.2f} s (includes loading the model)")
    cache = get_cache()
    family = cache.load(DIFFUSION, MODEL_NAME)
    pipe = family.text_to_image
    pipe.scheduler = make_scheduler(family, SCHEDULER)  # the raw side keeps this one; each job makes its own

    def job(seed: int) -> tuple[float, Any, float | None, float | None]:
        ctx = MemoryContext()
        started = time.perf_counter()
        text_to_image(ctx, Input(**params, seed=seed))
        seconds = time.perf_counter() - started
        pipe.scheduler = make_scheduler(family, SCHEDULER)
        with Image.open(io.BytesIO(ctx.stored["image-0.png"])) as image:
            return seconds, np.asarray(image.convert("RGB")), None, None

    return {"mode": "in-process", **rounds(args, pipe, job), "cold_job_s": round(cold_seconds, 3), "cold_run_s": None}


def rounds(args: argparse.Namespace, pipe: Any, job: Any) -> dict[str, Any]:
    """Warm-up, then ``--samples`` rounds of the raw call and a job, alternating which goes first."""
    import numpy as np

    raw_call(pipe, args.size, args.steps, seed=0)  # warm-up (allocator, kernels, compilation)
    job(0)
    load_before = os.getloadavg()[0]
    raw, jobs, run_seconds, queue_seconds = [], [], [], []
    max_difference = 0
    for index in range(args.samples):
        seed = 1000 + index
        if index % 2:  # neither side always runs right after the other
            job_seconds, job_image, run, queued = job(seed)
            raw_seconds, raw_image = raw_call(pipe, args.size, args.steps, seed)
        else:
            raw_seconds, raw_image = raw_call(pipe, args.size, args.steps, seed)
            job_seconds, job_image, run, queued = job(seed)
        raw.append(raw_seconds)
        jobs.append(job_seconds)
        if run is not None:
            run_seconds.append(run)
            queue_seconds.append(queued)
        difference = int(np.abs(job_image.astype(int) - np.asarray(raw_image).astype(int)).max())
        max_difference = max(max_difference, difference)
        log(
            f"round {index + 1}/{args.samples}: raw {raw_seconds:.3f} s, job {job_seconds:.3f} s"
            + (f" (run {run:.3f} s)" if run is not None else "")
            + f", max pixel difference {difference}"
        )
    return {
        "device": args.device,
        "machine": machine(args.device),
        "size": args.size,
        "steps": args.steps,
        "samples": args.samples,
        "torch_compile": args.torch_compile,
        "channels_last": args.channels_last,
        "raw_median_s": round(median(raw), 4),
        "job_median_s": round(median(jobs), 4),
        "job_run_median_s": round(median(run_seconds), 4) if run_seconds else None,
        "job_queue_median_s": round(median(queue_seconds), 4) if queue_seconds else None,
        "overhead_median_s": round(median([j - r for j, r in zip(jobs, raw, strict=True)]), 4),
        "job_over_raw": round(median(jobs) / median(raw), 4),
        "pixels_identical": max_difference == 0,
        "max_pixel_difference": max_difference,
        "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "raw_s": [round(v, 4) for v in raw],
        "job_s": [round(v, 4) for v in jobs],
    }


def report(r: dict[str, Any]) -> None:
    overhead_pct = (r["job_over_raw"] - 1) * 100
    settings = ", ".join(name for name in ("torch_compile", "channels_last") if r[name]) or "eager"
    job_label = "job submit → succeeded, warm" if r["mode"] == "service" else "job path in process, warm"
    print(
        f"\nText-to-image, SD 1.5 architecture (random weights), {r['size']}×{r['size']}, {r['steps']} steps, "
        f"guidance {GUIDANCE}, {SCHEDULER}, 1 image, {settings}; {r['device']}: {r['machine']}"
    )
    print(f"{'':36}{'median':>10}")
    print(f"{'raw pipe(...) call, warm':36}{r['raw_median_s']:>9.3f}s")
    print(f"{job_label:36}{r['job_median_s']:>9.3f}s   ({r['job_over_raw']:.3f}× raw, {overhead_pct:+.1f}%)")
    if r["job_run_median_s"] is not None:
        print(
            f"{'  of which the worker ran it':36}{r['job_run_median_s']:>9.3f}s   (queue {r['job_queue_median_s']:.3f} s)"
        )
    print(f"{'job minus raw, paired by round':36}{r['overhead_median_s']:>9.3f}s")
    cold_over_warm = r["cold_job_s"] / r["job_median_s"]
    print(f"{'cold job (first, loads the model)':36}{r['cold_job_s']:>9.3f}s   ({cold_over_warm:.2f}× warm)")
    if r.get("concurrency"):
        c = r["concurrency"]
        print(
            f"{c['jobs']} jobs at once: {c['images_per_s_at_once']:.3f} images/s against "
            f"{c['images_per_s_one_at_a_time']:.3f} one at a time ({c['at_once_over_one_at_a_time']:.2f}×)"
        )
    same = "identical" if r["pixels_identical"] else f"differ by up to {r['max_pixel_difference']}/255"
    print(f"job PNG vs raw image, same seed: {same}; {r['samples']} rounds")
    before, after = r["load_average_1m"]
    print(
        f"machine load (1-min average) before / after the rounds: {before:.2f} / {after:.2f}"
        + (
            "  ← busy: other processes shared the CPU, figures are noisy"
            if max(before, after) > (os.cpu_count() or 1) + 1
            else ""
        )
    )


if __name__ == "__main__":
    sys.exit(main())
