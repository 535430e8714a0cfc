"""LoRA fine-tuning through gpujobs against a plain peft training loop, and resume after a worker's death.

Run from the repository root::

    . .venv/bin/activate && python -m bench.finetune                  # CPU: 256×256, a few steps, fp32
    . .venv/bin/activate && python -m bench.finetune --device cuda    # GPU: 512×512, fp16 (or --dtype bfloat16)

The model is SD 1.5 (UNet, VAE, CLIP text encoder) built from ``bench/model-configs/sd15``
with random weights by ``bench.diffusion`` (same shapes, same cost as the real weights), and the
training set is ``--images`` generated pictures uploaded as files.

Started here (by ``bench.deployment``): an embedded Redis and S3 server, a fresh PostgreSQL database
when one answers on 127.0.0.1:5432 (else SQLite, or ``--database-url``), ``gpujobs api``, two
``gpujobs worker --queues train --concurrency 1`` (both warmed up with a one-step fine-tune, so both
hold the model), and ``gpujobs beat`` with a ``maintenance`` worker for the reconciler.

Measured:

- **steps/s, plain loop**: in this process, the loop a user writes by hand with diffusers + peft
  (the same LoRA config, AdamW, clipping, batch, precomputed latents and text features, and
  mixed precision in a half dtype), ``--steps`` steps timed after one warm-up step, freed before a job runs.
- ``--rounds`` rounds (default 3) of one plain loop and one job, alternating which goes first (this
  machine drifts); the medians are compared.
- **steps/s, gpujobs**: a ``finetune`` job of ``--steps`` + 1 steps with the same data and
  settings, timed by its own timeline in the database: from its ``training`` milestone (written
  when step 1 is done) to its ``training done`` milestone (as the last step ends; before the LoRA
  file is made), so ``--steps`` steps with everything gpujobs does per step (progress, cancel and
  deadline checks, the lease thread) and any checkpoint it stores. The job's own steps/s (its
  progress, which counts step 1 too) is shown beside it.
- **resume**: a second fine-tune of ``--resume-steps`` steps checkpoints every
  ``--resume-checkpoint-every`` steps; after its first checkpoint the worker running it is SIGKILLed,
  and the other, warm worker takes it over once its lease (``--lease`` s) expires and the reconciler
  (beat's default period, plus the follow-up it schedules for a lease about to expire) requeues it.
  From the job's events: kill → lease expiry (the job's ``lease_expires_at``) → requeued → claimed →
  resumed (checkpoint restored) → its next step done, with the parts in between. Then the same input
  runs uninterrupted, and the two LoRA files are compared tensor by tensor (bit-exact, or the largest
  difference).
- **LoRA switching**: on the full UNet in this process, loading + unloading the job's LoRA (what a
  generation worker would pay per job without an adapter cache) against switching a loaded one on
  and off, and UNet forward passes with no adapter, a loaded one switched off, and on.

Every process it starts is stopped at the end (and on Ctrl-C); a database it created is dropped.
"""

from __future__ import annotations

import argparse
import gc
import io
import signal
import sys
import time
from pathlib import Path
from typing import Any

import requests

from bench.deployment import REPO, Deployment, run
from bench.diffusion import DEFAULT_CONFIGS, MODEL_NAME, build_model, write_catalog
from bench.lib.client import JobsClient
from bench.lib.report import log, machine
from bench.lib.stats import median
from gpujobs.harness.processes import ManagedProcess, signal_group

PROFILES = {"cpu": (256, 4), "cuda": (512, 100)}  # device → (resolution, measured steps)
RANK = 4
LEARNING_RATE = 1e-4
PROMPT = "a photo of a lighthouse"
POLL_SECONDS = 0.2
JOB_TIMEOUT = 3600.0


# --- the training set -------------------------------------------------------------------------------


def pictures(count: int, size: int) -> list[bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        base = rng.integers(0, 255, 3)
        pixels = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


# --- the baseline: a plain diffusers + peft loop ---------------------------------------------------------


def plain_loop(folder: Path, images: list[bytes], args: argparse.Namespace) -> dict[str, Any]:
    """The training loop of diffusers' LoRA example, on precomputed latents: steps/s over ``args.steps`` steps."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    device, dtype = args.device, getattr(torch, args.dtype)
    mixed = dtype != torch.float32  # as the service trains: a half dtype means autocast, on any device
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype).to(device)
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=dtype).to(device)
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    with torch.no_grad():
        pixels = torch.stack(
            [
                torch.from_numpy(
                    np.asarray(
                        Image.open(io.BytesIO(data)).convert("RGB").resize((args.resolution,) * 2), dtype=np.float32
                    )
                    / 127.5
                    - 1
                ).permute(2, 0, 1)
                for data in images
            ]
        )
        posterior = vae.encode(pixels.to(device, dtype)).latent_dist
        mean, std = (
            (posterior.mean * vae.config.scaling_factor).float(),
            (posterior.std * vae.config.scaling_factor).float(),
        )
        ids = tokenizer(
            [PROMPT] * len(images), padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        )
        text = text_encoder(ids.input_ids.to(device))[0]
    del vae, text_encoder

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype if mixed else torch.float32)
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]
        )
    )
    lora = [p for p in unet.parameters() if p.requires_grad]
    for p in lora:
        p.data = p.data.float()
    unet.to(device).train()
    optimizer = torch.optim.AdamW(lora, lr=LEARNING_RATE, weight_decay=1e-2)
    scaler = torch.amp.GradScaler(torch.device(device).type) if mixed and dtype == torch.float16 else None
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    generator = torch.Generator("cpu").manual_seed(0)

    def step() -> float:
        index = torch.randint(0, len(images), (args.batch_size,), generator=generator)
        latents = mean[index] + std[index] * torch.randn(mean[index].shape, generator=generator).to(device)
        noise = torch.randn(latents.shape, generator=generator).to(device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch_size,), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps.to(device))
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=mixed):
            prediction = unet(noisy.to(unet.dtype), timesteps.to(device), text[index].to(unet.dtype)).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(lora, 1.0)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()  # a sync, as gpujobs has (it reports the loss)

    step()  # warm-up
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"steps": args.steps, "seconds": round(seconds, 3), "steps_per_second": round(args.steps / seconds, 4)}


def free_memory(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# --- gpujobs -----------------------------------------------------------------------------------------


def finetune(params: dict[str, Any]) -> dict[str, Any]:
    return {"type": "finetune", "input": params}


def job_rate(timeline: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    """Steps/s from the job's own timeline: its ``training`` milestone (recorded when step 1 is done) to its
    ``training done`` milestone (as the last step ends), so ``steps`` steps, the warm-up step excluded; no polling."""
    at = {e["message"]: e["at"] for e in timeline if e["kind"] == "progress"}
    seconds = (at["training done"] - at["training"]).total_seconds()
    return {"steps": steps, "seconds": round(seconds, 3), "steps_per_second": round(steps / seconds, 4)}


def events(database_url: str, job_id: str) -> list[dict[str, Any]]:
    from sqlalchemy import select

    from db.models import JobEvent
    from db.session import session_scope

    with session_scope(database_url) as session:
        rows = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)).all()
        return [{"kind": r.kind, "at": r.at, "message": r.message, "data": r.data, "attempt": r.attempt} for r in rows]


def wait_event(database_url: str, job_id: str, kind: str, attempt: int | None = None) -> dict[str, Any]:
    deadline = time.monotonic() + JOB_TIMEOUT
    while time.monotonic() < deadline:
        for event in events(database_url, job_id):
            if event["kind"] == kind and (attempt is None or event["attempt"] == attempt):
                return event
        time.sleep(POLL_SECONDS)
    raise RuntimeError(f"job {job_id} never had a {kind} event")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--dtype", help="float32 (CPU default), float16 (CUDA default) or bfloat16")
    parser.add_argument("--resolution", type=int, help="training size (default: 256 on CPU, 512 on CUDA)")
    parser.add_argument("--steps", type=int, help="measured steps (default: 4 on CPU, 100 on CUDA)")
    parser.add_argument("--images", type=int, default=4, help="training images (default 4)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of plain loop + job (default 3)")
    parser.add_argument(
        "--checkpoint-every", type=int, default=100, help="the measured job's checkpoints (default 100)"
    )
    parser.add_argument("--resume-checkpoint-every", type=int, default=2, help="the resume job's checkpoints")
    parser.add_argument(
        "--resume-steps", type=int, default=100, help="the resume job's steps, long enough to be killed mid-run"
    )
    parser.add_argument("--lease", type=float, default=10.0, help="GPUJOBS_LEASE_SECONDS (default 10)")
    parser.add_argument(
        "--control-poll",
        type=float,
        default=0.5,
        help="GPUJOBS_CONTROL_POLL_SECONDS: lease renewal and progress saves (default 0.5, the service's)",
    )
    parser.add_argument("--no-resume", action="store_true", help="skip the worker-death part")
    parser.add_argument(
        "--configs", type=Path, default=DEFAULT_CONFIGS, help=f"SD 1.5 configs (default {DEFAULT_CONFIGS})"
    )
    parser.add_argument("--model-dir", type=Path, default=REPO / "var" / "bench" / MODEL_NAME)
    parser.add_argument("--database-url", help="default: a fresh PostgreSQL database on 127.0.0.1:5432, else SQLite")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args(argv)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "--device cuda: torch sees no CUDA device; run on a GPU machine with a CUDA build of torch.",
            file=sys.stderr,
        )
        return 2
    resolution, steps = PROFILES[args.device]
    args.resolution, args.steps = args.resolution or resolution, args.steps or steps
    args.dtype = args.dtype or ("float16" if args.device == "cuda" else "float32")

    args.model_dir = args.model_dir.resolve()

    def build_and_measure(deployment: Deployment) -> dict[str, Any]:
        build_model(args.configs, args.model_dir)
        return measure(args, deployment)

    return run("finetune", build_and_measure, report, args.json, args.keep_logs)


def measure(args: argparse.Namespace, deployment: Deployment) -> dict[str, Any]:
    settings = {
        "GPUJOBS_MODEL_CATALOG": str(write_catalog(deployment.tmp, args.model_dir)),
        "GPUJOBS_DEVICE": args.device,
        "GPUJOBS_DTYPE": args.dtype,
        "GPUJOBS_LEASE_SECONDS": str(args.lease),
        "GPUJOBS_CONTROL_POLL_SECONDS": str(args.control_poll),
        "GPUJOBS_MAX_BODY_BYTES": str(256 * 2**20),
    }
    deployment.start_services(database_url=args.database_url)
    key = deployment.prepare("gpujobs-bench-finetune", settings, "finetune benchmark")
    stack = deployment.stack
    assert stack is not None
    workers = {
        name: stack.start_worker("train", concurrency=1, name=name, wait=False)
        for name in ("bench-train-a", "bench-train-b")
    }
    _, base = deployment.start_api()
    for worker in workers.values():
        stack.wait_worker_ready(worker)
    stack.start_beat()
    stack.start_worker("maintenance", name="bench-m")

    client = JobsClient(base, key)
    images = pictures(args.images, args.resolution)
    files = [client.upload(data, f"{i}.png") for i, data in enumerate(images)]
    common = {
        "images": files,
        "instance_prompt": PROMPT,
        "resolution": args.resolution,
        "rank": RANK,
        "learning_rate": LEARNING_RATE,
        "batch_size": args.batch_size,
        "seed": 0,
    }

    log("warming up both workers (a one-step fine-tune each, at once)")
    started = time.monotonic()
    warm = [client.submit(finetune({**common, "steps": 1})) for _ in workers]
    for job in warm:
        done = client.finish(job, JOB_TIMEOUT)
        if done["status"] != "succeeded":
            raise RuntimeError(f"warm-up job ended {done['status']}: {done.get('error')}")
    cold_seconds = time.monotonic() - started

    def plain_run(which: str) -> dict[str, Any]:
        log(
            f"plain diffusers + peft loop in this process ({which}): {args.steps} steps at {args.resolution}², {args.dtype}"
        )
        figures = plain_loop(args.model_dir, images, args)
        free_memory(args.device)
        log(f"plain loop: {figures['steps_per_second']:.4f} steps/s")
        return figures

    def job_run() -> dict[str, Any]:
        log(f"gpujobs finetune job: {args.steps} + 1 steps")
        job = client.submit(finetune({**common, "steps": args.steps + 1, "checkpoint_every": args.checkpoint_every}))
        done = client.finish(job, JOB_TIMEOUT)
        if done["status"] != "succeeded":
            raise RuntimeError(f"the measured job ended {done['status']}: {done.get('error')}")
        figures = job_rate(events(deployment.database_url, job["id"]), args.steps) | {
            "reported_steps_per_second": done["progress"].get("steps_per_second"),
            "run_seconds": done["metrics"]["run_seconds"],
        }
        log(f"gpujobs job: {figures['steps_per_second']:.4f} steps/s")
        return figures | {"weights_url": done["output"]["weights"]["url"]}

    plain, service = [], []
    for round_ in range(args.rounds):  # interleaved, alternating which goes first: the machine drifts
        job_first = round_ % 2 == 1
        if job_first:
            service.append(job_run())
        plain.append(plain_run(f"round {round_ + 1}"))
        if not job_first:
            service.append(job_run())
    plain_rate = median([p["steps_per_second"] for p in plain])
    job_rate_ = median([j["steps_per_second"] for j in service])
    weights_url = service[-1].pop("weights_url")
    for figures in service:
        figures.pop("weights_url", None)

    results = {
        "device": args.device,
        "machine": machine(args.device),
        "dtype": args.dtype,
        "resolution": args.resolution,
        "batch_size": args.batch_size,
        "images": args.images,
        "plain": plain,
        "plain_steps_per_second": round(plain_rate, 4),
        "gpujobs": service,
        "gpujobs_steps_per_second": round(job_rate_, 4),
        "ratio": round(job_rate_ / plain_rate, 4),
        "cold_two_jobs_s": round(cold_seconds, 2),
    }
    if not args.no_resume:
        results["resume"] = measure_resume(args, deployment, client, common, workers)
    weights = requests.get(weights_url, timeout=60).content
    results["lora_switching"] = lora_switching(args, deployment.tmp, weights)
    free_memory(args.device)
    return results


def lora_switching(args: argparse.Namespace, tmp: Path, weights: bytes) -> dict[str, Any]:
    """What a generation worker pays per job to load and unload a LoRA, against switching a loaded one on and off."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    log("LoRA switching: load/unload against set_adapters/disable_lora on the full UNet, and forward passes")
    (tmp / "lora").mkdir(exist_ok=True)
    (tmp / "lora" / "pytorch_lora_weights.safetensors").write_bytes(weights)
    dtype = getattr(torch, args.dtype)
    unet = (
        UNet2DConditionModel.from_pretrained(args.model_dir, subfolder="unet", torch_dtype=dtype).to(args.device).eval()
    )
    side = args.resolution // 8
    sample = torch.randn(2, 4, side, side, device=args.device, dtype=dtype)  # a CFG batch
    text = torch.randn(2, 77, unet.config.cross_attention_dim, device=args.device, dtype=dtype)

    def timed(run: Any, repeat: int = 3) -> float:
        seconds = []
        for _ in range(repeat):
            started = time.perf_counter()
            run()
            if args.device == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - started)
        return median(seconds)

    def forward() -> None:
        with torch.inference_mode():
            unet(sample, 500, text)

    def load() -> None:
        state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(
            str(tmp / "lora"), weight_name="pytorch_lora_weights.safetensors", return_lora_metadata=True
        )
        StableDiffusionPipeline.load_lora_into_unet(
            state, network_alphas=alphas, unet=unet, adapter_name="bench", metadata=metadata
        )

    forward()
    plain = timed(forward)
    load_s = timed(lambda: (load(), unet.delete_adapters(["bench"])), repeat=3)
    load()
    switch_s = timed(lambda: (unet.enable_lora(), unet.set_adapters(["bench"], [1.0]), unet.disable_lora()), repeat=5)
    disabled = timed(forward)
    unet.enable_lora()
    unet.set_adapters(["bench"], [1.0])
    enabled = timed(forward)
    return {
        "forward_no_adapter_s": round(plain, 4),
        "forward_adapter_off_s": round(disabled, 4),
        "forward_adapter_on_s": round(enabled, 4),
        "load_and_unload_s": round(load_s, 4),
        "switch_on_and_off_s": round(switch_s, 5),
    }


def measure_resume(
    args: argparse.Namespace,
    deployment: Deployment,
    client: JobsClient,
    common: dict[str, Any],
    workers: dict[str, ManagedProcess],
) -> dict[str, Any]:
    every = args.resume_checkpoint_every
    log(f"resume: a fine-tune checkpointing every {every} steps; its worker is killed after the first checkpoint")
    params = {**common, "steps": args.resume_steps, "checkpoint_every": every}
    job = client.submit(finetune(params))
    checkpoint = wait_event(deployment.database_url, job["id"], "checkpoint")
    claimed = wait_event(deployment.database_url, job["id"], "claimed", attempt=1)
    victim = next(name for name in workers if f"claimed by {name}@" in claimed["message"])
    signal_group(workers[victim].proc, signal.SIGKILL)
    killed_at = _utcnow()
    expires_at = _lease_expiry(deployment.database_url, job["id"])  # its last renewal + the lease
    workers[victim].proc.wait(30)
    log(f"killed {victim} after the checkpoint at step {checkpoint['data']['step']}")

    step = checkpoint["data"]["step"]
    resumed = wait_event(deployment.database_url, job["id"], "resumed")
    deadline = time.monotonic() + JOB_TIMEOUT
    while time.monotonic() < deadline and not _milestone(deployment.database_url, job["id"], 2, "training"):
        time.sleep(0.5)
    done = client.finish(client.get(job["id"]), JOB_TIMEOUT)
    if done["status"] != "succeeded":
        raise RuntimeError(f"the resumed fine-tune ended {done['status']}: {done.get('error')}")
    log("resume: the same input, never interrupted, for the weights")
    straight = client.finish(client.submit(finetune(params)), JOB_TIMEOUT)
    if straight["status"] != "succeeded":
        raise RuntimeError(f"the uninterrupted fine-tune ended {straight['status']}: {straight.get('error')}")
    equal, difference = compare_lora(download(straight["output"]["weights"]), download(done["output"]["weights"]))
    log(f"resume: weights {'equal bit for bit' if equal else f'differ by up to {difference:g}'}")
    second = [e for e in events(deployment.database_url, job["id"]) if e["attempt"] == 2]
    at = {e["kind"]: e["at"] for e in second if e["kind"] != "progress"}
    at |= {e["message"]: e["at"] for e in second if e["kind"] == "progress"}
    requeued = next(e["at"] for e in events(deployment.database_url, job["id"]) if e["kind"] == "requeued")

    def since(start: Any, end: Any) -> float:
        return round((end - start).total_seconds(), 3)

    return {
        "lease_seconds": args.lease,
        "checkpoint_step": step,
        "checkpoint_bytes": checkpoint["data"].get("size"),
        "kill_to_lease_expiry_s": since(killed_at, expires_at),
        "lease_expiry_to_requeued_s": since(expires_at, requeued),
        "kill_to_requeued_s": since(killed_at, requeued),
        "kill_to_claimed_s": since(killed_at, at["claimed"]),
        "kill_to_resumed_s": since(killed_at, at["resumed"]),
        "kill_to_next_step_s": since(killed_at, at["training"]),
        "claimed_to_encoding_s": since(at["claimed"], at["encoding the training set"]),
        "encoding_s": since(at["encoding the training set"], at["loading the UNet"]),
        "unet_and_checkpoint_s": since(at["loading the UNet"], at["resumed"]),
        "checkpoint_load_s": resumed["data"]["load_seconds"],
        "resumed_to_next_step_s": since(at["resumed"], at["training"]),
        "steps": params["steps"],
        "resumed_from": done["output"]["resumed_from"],
        "weights_equal": equal,
        "max_abs_difference": difference,
        "loss_curves_equal": straight["output"]["loss"] == done["output"]["loss"],
    }


def download(artifact: dict[str, Any]) -> bytes:
    response = requests.get(artifact["url"], timeout=60)
    response.raise_for_status()
    return response.content


def compare_lora(a: bytes, b: bytes) -> tuple[bool, float]:
    """Whether two LoRA files hold the same tensors bit for bit, and the largest difference between them."""
    import torch
    from safetensors.torch import load

    first, second = load(a), load(b)
    if first.keys() != second.keys():
        return False, float("inf")
    difference = max(((first[k].float() - second[k].float()).abs().max().item() for k in first), default=0.0)
    return all(torch.equal(first[k], second[k]) for k in first), difference


def _milestone(database_url: str, job_id: str, attempt: int, message: str) -> bool:
    return any(e["attempt"] == attempt and e["message"] == message for e in events(database_url, job_id))


def _lease_expiry(database_url: str, job_id: str) -> Any:
    from db.models import Job
    from db.session import session_scope

    with session_scope(database_url) as session:
        return session.get(Job, job_id).lease_expires_at


def _utcnow() -> Any:
    from db.models import utcnow

    return utcnow()


def report(r: dict[str, Any]) -> None:
    print()
    print(
        f"LoRA fine-tuning on {r['device']} ({r['machine']}), {r['resolution']}², batch {r['batch_size']}, "
        f"{r['images']} images, rank {RANK}, {r['dtype']}"
    )
    plain = ", ".join(f"{p['steps_per_second']:.4f}" for p in r["plain"])
    jobs = ", ".join(f"{j['steps_per_second']:.4f}" for j in r["gpujobs"])
    reported = ", ".join(str(j["reported_steps_per_second"]) for j in r["gpujobs"])
    print(
        f"  plain diffusers + peft loop : {r['plain_steps_per_second']:.4f} steps/s median ({plain}; "
        f"{r['plain'][0]['steps']} steps each)"
    )
    print(
        f"  gpujobs finetune job        : {r['gpujobs_steps_per_second']:.4f} steps/s median ({jobs}; by the "
        f"job's timeline; the jobs report {reported})"
    )
    print(f"  ratio gpujobs / plain       : {r['ratio']:.3f}  (aim ≥ 0.95)")
    print(f"  two cold one-step jobs      : {r['cold_two_jobs_s']:.1f} s (both workers load the model)")
    if "resume" in r:
        s = r["resume"]
        print(
            f"  resume after SIGKILL (lease {s['lease_seconds']:g} s, checkpoint at step {s['checkpoint_step']}, "
            f"{s['checkpoint_bytes']} bytes):"
        )
        print(
            f"    kill → lease expired {s['kill_to_lease_expiry_s']:.2f} s (requeued "
            f"{s['lease_expiry_to_requeued_s']:.2f} s after that)"
        )
        print(
            f"    kill → requeued {s['kill_to_requeued_s']:.2f} s → claimed {s['kill_to_claimed_s']:.2f} s "
            f"→ resumed {s['kill_to_resumed_s']:.2f} s → next step done {s['kill_to_next_step_s']:.2f} s"
        )
        print(
            f"    after the claim: {s['claimed_to_encoding_s']:.2f} s to start, encoding the captions (latents "
            f"downloaded) {s['encoding_s']:.2f} s, UNet copy + checkpoint {s['unet_and_checkpoint_s']:.2f} s "
            f"(checkpoint fetched and restored in {s['checkpoint_load_s']:.2f} s), one step "
            f"{s['resumed_to_next_step_s']:.2f} s"
        )
        same = "equal bit for bit" if s["weights_equal"] else f"differ by up to {s['max_abs_difference']:g}"
        print(
            f"    resumed at step {s['resumed_from']} of {s['steps']}: its weights and an uninterrupted run's are "
            f"{same}; loss curves {'equal' if s['loss_curves_equal'] else 'differ'}"
        )
        budget = s["lease_seconds"] + s["checkpoint_load_s"]
        print(f"    aim: resumed within lease + checkpoint load = {budget:.2f} s → {s['kill_to_resumed_s']:.2f} s")
    if "lora_switching" in r:
        w = r["lora_switching"]
        print(
            f"  a generation worker's LoRA (rank {RANK}) on the full UNet: load + unload {w['load_and_unload_s']:.3f} s; "
            f"switch on + off {w['switch_on_and_off_s'] * 1000:.1f} ms"
        )
        print(
            f"    UNet forward (CFG batch 2): no adapter {w['forward_no_adapter_s']:.3f} s, adapter loaded but off "
            f"{w['forward_adapter_off_s']:.3f} s, on {w['forward_adapter_on_s']:.3f} s"
        )


if __name__ == "__main__":
    sys.exit(main())
