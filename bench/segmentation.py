"""Segmentation throughput and per-job overhead, against plain transformers, in one run.

    python -m bench.segmentation                 # CPU: full-size Swin-T Mask2Former, 384×384
    python -m bench.segmentation --device cuda   # GPU: 512×512, fp16

The model is the real checkpoint's architecture (``bench/model-configs``) with random
weights: the same shapes, so the same cost. Three measurements:

1. baseline — what a user writes with transformers, one image at a time:
   ``processor(images) → model(**inputs) → post_process_instance_segmentation``;
2. gpujobs' batcher at batch sizes 1, 2, 4, 8: B client threads each preprocess an
   image, submit it to the batcher and post-process their own result (images/s and
   per-image latency);
3. per-job overhead: whole ``segmentation`` jobs run by the real job runner (claim,
   S3 download, preprocess, forward, post-process, RLE, two PNGs, S3 upload, database)
   on SQLite + an embedded S3 server (``bench.deployment``), minus the forward pass of the same image.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.deployment import Deployment, run
from bench.lib.report import log, machine
from bench.lib.stats import median

CONFIG = Path(__file__).resolve().parent / "model-configs" / "mask2former-swin-tiny-coco-instance" / "config.json"
BASELINE = "baseline (transformers, 1 at a time)"


def build_full_size(folder: Path, canvas: int, config_path: Path = CONFIG) -> None:
    """The real checkpoint's architecture with random weights, saved like a checkpoint."""
    import torch
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation

    try:  # transformers ≥ 5.2 has a PIL backend; older ones only the one that needs torchvision
        from transformers.models.mask2former import Mask2FormerImageProcessorPil as Processor
    except ImportError:
        from transformers import Mask2FormerImageProcessor as Processor

    from worker.jobs.segmentation.coco import COCO_LABELS

    if (folder / "model.safetensors").exists():
        return
    raw = json.loads(config_path.read_text())
    raw.update(id2label=dict(enumerate(COCO_LABELS)), label2id={n: i for i, n in enumerate(COCO_LABELS)})
    config = Mask2FormerConfig.from_dict(raw)
    torch.manual_seed(0)
    model = Mask2FormerForUniversalSegmentation(config)
    log(f"built full-size Mask2Former: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")
    model.save_pretrained(folder)
    Processor(size={"shortest_edge": canvas, "longest_edge": canvas}).save_pretrained(folder)


def images(count: int, canvas: int) -> list:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (canvas, canvas, 3), dtype=np.uint8)) for _ in range(count)]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def baseline(folder: Path, pictures: list, device: str, dtype) -> dict:  # type: ignore[no-untyped-def]
    """Plain transformers, one image at a time."""
    import torch
    from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

    processor = AutoImageProcessor.from_pretrained(folder)
    model = Mask2FormerForUniversalSegmentation.from_pretrained(folder, dtype=dtype).to(device).eval()
    latencies = []
    for i, image in enumerate([pictures[0], *pictures]):  # the first is a warm-up
        started = time.perf_counter()
        inputs = processor(images=image, return_tensors="pt").to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        with torch.inference_mode():
            outputs = model(**inputs)
        processor.post_process_instance_segmentation(outputs, target_sizes=[(image.height, image.width)])
        sync(device)
        if i:
            latencies.append(time.perf_counter() - started)
    total = sum(latencies)
    return {"images_per_s": len(latencies) / total, "latency_ms": median(latencies) * 1000}


def batched(segmenter, cache, pictures: list, batch: int, canvas: int) -> dict:  # type: ignore[no-untyped-def]
    """B threads: preprocess → batcher → post-process, as concurrent jobs do in one worker."""
    from worker.jobs.segmentation import model as seg
    from worker.jobs.segmentation.run import encode_instances

    batcher = seg.Batcher(segmenter, cache, max_batch_size=batch, max_wait_ms=50)
    latencies: list[float] = []
    lock = threading.Lock()

    def one(image) -> None:  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        pixels, valid = seg.preprocess(segmenter, image, canvas)
        classes, masks = batcher.submit(pixels).result()
        found = seg.postprocess(classes, masks, valid, canvas, (image.height, image.width), 0.5, 0.5, 0.8)
        encode_instances(found, segmenter.id2label)
        with lock:
            latencies.append(time.perf_counter() - started)

    def run(group: list) -> None:
        threads = [threading.Thread(target=one, args=(image,)) for image in group]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    run(pictures[:batch])  # warm-up
    latencies.clear()
    started = time.perf_counter()
    for start in range(0, len(pictures), batch):
        run(pictures[start : start + batch])
    total = time.perf_counter() - started
    return {"images_per_s": len(pictures) / total, "latency_ms": median(latencies) * 1000}


def job_overhead(deployment: Deployment, folder: Path, pictures: list, canvas: int, device: str, jobs: int) -> dict:
    """Whole jobs through the real runner (database + S3), against the forward pass alone."""
    deployment.start_services(database_url=f"sqlite:///{deployment.tmp / 'bench.db'}")
    catalog = deployment.tmp / "catalog.toml"
    catalog.write_text(f'[models.bench]\nkind = "segmentation"\nsource = "{folder}"\ndefault = true\n')
    key = deployment.prepare(
        "gpujobs-bench-segmentation",
        {
            "GPUJOBS_MODEL_CATALOG": str(catalog),
            "GPUJOBS_SEGMENTATION_IMAGE_SIZE": str(canvas),
            "GPUJOBS_SEGMENTATION_MAX_WAIT_MS": "0",
            "GPUJOBS_DEVICE": device,
        },
        "segmentation benchmark",
    )

    from db import transitions
    from db.keys import find_active_key
    from db.models import File, Job
    from db.session import session_scope
    from db.storage import get_storage
    from worker import runner
    from worker.jobs.segmentation import model as seg
    from worker.jobs.segmentation.spec import SEGMENTATION
    from worker.models.cache import get_cache

    with session_scope() as session:
        tenant = find_active_key(session, key).tenant_id  # type: ignore[union-attr]
    buffer = io.BytesIO()
    pictures[0].save(buffer, "PNG")
    get_storage().put("inputs/file_bench", buffer.getvalue(), "image/png")
    with session_scope() as session:
        session.add(
            File(
                id="file_bench",
                tenant_id=tenant,
                purpose="input",
                filename="b.png",
                content_type="image/png",
                size=len(buffer.getvalue()),
                sha256="-",
                width=canvas,
                height=canvas,
                storage_key="inputs/file_bench",
            )
        )

    def submit() -> str:
        with session_scope() as session:
            job = transitions.create(
                session,
                Job(
                    tenant_id=tenant,
                    type="segmentation",
                    queue="gpu",
                    input={"image": "file_bench"},
                    meta={},
                    max_attempts=1,
                    deadline_seconds=600,
                ),
            )
            return job.id

    cache = get_cache()
    segmenter = cache.load(SEGMENTATION, None)
    pixels, _ = seg.preprocess(segmenter, pictures[0], canvas)
    batcher = seg.batcher_for(segmenter, cache)
    runner.execute(submit())  # warm-up: first job, first upload, first PNG
    forward, whole = [], []
    for _ in range(jobs):
        started = time.perf_counter()
        batcher.forward(pixels[None])
        sync(device)
        forward.append(time.perf_counter() - started)
        job_id = submit()
        started = time.perf_counter()
        outcome = runner.execute(job_id)
        whole.append(time.perf_counter() - started)
        assert outcome == "succeeded", outcome
    f, w = median(forward), median(whole)
    return {"forward_ms": f * 1000, "job_ms": w * 1000, "overhead_ms": (w - f) * 1000, "overhead_ratio": (w - f) / f}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--size", type=int, help="canvas (default 384 on CPU, 512 on CUDA)")
    parser.add_argument("--images", type=int, help="images per measurement (default 8 on CPU, 64 on CUDA)")
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--jobs", type=int, default=5, help="whole jobs for the overhead measurement (0: skip it)")
    parser.add_argument("--config", type=Path, default=CONFIG, help="the real checkpoint's config.json")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "gpujobs-bench-models")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp dir with the S3 server's log")
    args = parser.parse_args(argv)

    import torch

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available here", file=sys.stderr)
        return 2
    args.size = args.size or (512 if cuda else 384)
    args.images = args.images or (64 if cuda else 8)
    os.environ["GPUJOBS_DEVICE"] = args.device
    os.environ["GPUJOBS_DTYPE"] = "float16" if cuda else "float32"
    return run("segmentation", lambda deployment: measure(args, deployment), report, args.json, args.keep_logs)


def measure(args: argparse.Namespace, deployment: Deployment) -> dict[str, Any]:
    import torch

    canvas, dtype = args.size, torch.float16 if args.device.startswith("cuda") else torch.float32
    folder = args.cache / f"mask2former-full-{canvas}"
    build_full_size(folder, canvas, args.config)
    pictures = images(args.images, canvas)
    log(f"device: {machine(args.device)}; canvas {canvas}×{canvas}; {args.images} images per measurement")

    runs = {BASELINE: baseline(folder, pictures, args.device, dtype)}
    log(f"baseline: {runs[BASELINE]}")

    from worker.jobs.segmentation import model as seg
    from worker.jobs.segmentation.spec import SEGMENTATION
    from worker.models.cache import ModelCache
    from worker.models.catalog import ModelEntry

    cache = ModelCache()
    entry = ModelEntry(name="bench", kind=SEGMENTATION.name, source=str(folder))
    segmenter = cache.get(SEGMENTATION.cache_key(entry.name), entry, seg.load_segmenter)
    for batch in (int(b) for b in args.batches.split(",")):
        runs[f"gpujobs batch {batch}"] = batched(segmenter, cache, pictures, batch, canvas)
        log(f"batch {batch}: {runs[f'gpujobs batch {batch}']}")
    overhead = job_overhead(deployment, folder, pictures, canvas, args.device, args.jobs) if args.jobs else None
    return {
        "machine": machine(args.device),
        "canvas": canvas,
        "jobs": args.jobs,
        "runs": runs,
        "job_overhead": overhead,
    }


def report(r: dict[str, Any]) -> None:
    base = r["runs"][BASELINE]["images_per_s"]
    canvas = r["canvas"]
    print(f"\nSegmentation — {r['machine']}, full-size Swin-T Mask2Former (random weights), {canvas}×{canvas}")
    print(f"{'run':<40}{'images/s':>10}{'median latency':>16}{'vs baseline':>13}")
    for name, figures in r["runs"].items():
        print(
            f"{name:<40}{figures['images_per_s']:>10.2f}{figures['latency_ms']:>13.0f} ms{figures['images_per_s'] / base:>12.2f}×"
        )
    overhead = r["job_overhead"]
    if overhead is None:
        return
    print(
        f"\nWhole job (median of {r['jobs']}): {overhead['job_ms']:.0f} ms, "
        f"forward pass {overhead['forward_ms']:.0f} ms, "
        f"overhead {overhead['overhead_ms']:.0f} ms = {overhead['overhead_ratio'] * 100:.1f}% of the forward pass"
    )


if __name__ == "__main__":
    sys.exit(main())
