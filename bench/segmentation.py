"""Segmentation throughput and per-job overhead, against plain transformers, in one run.

    python bench/segmentation.py                 # CPU: full-size Swin-T Mask2Former, 384×384
    python bench/segmentation.py --device cuda   # GPU: 512×512, fp16

The model is the real checkpoint's architecture (``shared/model-configs``) with random
weights: the same shapes, so the same cost. Three measurements:

1. baseline — what a user writes with transformers, one image at a time:
   ``processor(images) → model(**inputs) → post_process_instance_segmentation``;
2. gpujobs' batcher at batch sizes 1, 2, 4, 8: B client threads each preprocess an
   image, submit it to the batcher and post-process their own result (images/s and
   per-image latency);
3. per-job overhead: whole ``segmentation`` jobs run by the real job runner (claim,
   S3 download, preprocess, forward, post-process, RLE, two PNGs, S3 upload, database)
   on SQLite + an embedded S3 server, minus the forward pass of the same image.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIG = ROOT.parent / "shared" / "model-configs" / "mask2former-swin-tiny-coco-instance" / "config.json"


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def build_full_size(folder: Path, canvas: int, config_path: Path = CONFIG) -> None:
    """The real checkpoint's architecture with random weights, saved like a checkpoint."""
    import torch
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation
    try:  # transformers ≥ 5.2 has a PIL backend; older ones only the one that needs torchvision
        from transformers.models.mask2former import Mask2FormerImageProcessorPil as Processor
    except ImportError:
        from transformers import Mask2FormerImageProcessor as Processor

    from worker.models.coco import COCO_LABELS

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
    return {"images_per_s": len(latencies) / total, "latency_ms": statistics.median(latencies) * 1000}


def batched(segmenter, cache, pictures: list, batch: int, canvas: int) -> dict:  # type: ignore[no-untyped-def]
    """B threads: preprocess → batcher → post-process, as concurrent jobs do in one worker."""
    from worker.models import segmentation as seg

    batcher = seg.Batcher(segmenter, cache, max_batch_size=batch, max_wait_ms=50)
    latencies: list[float] = []
    lock = threading.Lock()

    def one(image) -> None:  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        pixels, valid = seg.preprocess(segmenter, image, canvas)
        classes, masks = batcher.submit(pixels).result()
        found = seg.postprocess(classes, masks, valid, canvas, (image.height, image.width), 0.5, 0.5, 0.8)
        seg.encode_instances(found, segmenter.id2label)
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
    return {"images_per_s": len(pictures) / total, "latency_ms": statistics.median(latencies) * 1000}


def job_overhead(folder: Path, pictures: list, canvas: int, device: str, jobs: int) -> dict:
    """Whole jobs through the real runner (database + S3), against the forward pass alone."""
    from gpujobs.harness.servers import start_s3

    tmp = Path(tempfile.mkdtemp(prefix="gpujobs-bench-seg-"))
    s3 = start_s3(tmp / "s3")
    catalog = tmp / "catalog.toml"
    catalog.write_text(f'[models.bench]\nkind = "segmentation"\nsource = "{folder}"\ndefault = true\n')
    os.environ.update(
        GPUJOBS_DATABASE_URL=f"sqlite:///{tmp / 'bench.db'}",
        GPUJOBS_S3_ENDPOINT_URL=s3.endpoint_url,
        GPUJOBS_S3_ACCESS_KEY=s3.access_key,
        GPUJOBS_S3_SECRET_KEY=s3.secret_key,
        GPUJOBS_MODEL_CATALOG=str(catalog),
        GPUJOBS_SEGMENTATION_IMAGE_SIZE=str(canvas),
        GPUJOBS_SEGMENTATION_MAX_WAIT_MS="0",
        GPUJOBS_DEVICE=device,
        GPUJOBS_VAR_DIR=str(tmp / "var"),
    )
    from db.settings import reset_settings

    reset_settings()
    try:
        import migrations
        from db import transitions
        from db.keys import create_key
        from db.models import File, Job, Role
        from db.session import session_scope
        from db.storage import get_storage
        from worker import runner
        from worker.models import segmentation as seg
        from worker.models.cache import get_cache

        migrations.upgrade()
        storage = get_storage()
        storage.ensure_bucket()
        with session_scope() as session:
            key, _ = create_key(session, "bench", Role.ADMIN)
            tenant = key.tenant_id
        buffer = io.BytesIO()
        pictures[0].save(buffer, "PNG")
        storage.put("inputs/file_bench", buffer.getvalue(), "image/png")
        with session_scope() as session:
            session.add(File(id="file_bench", tenant_id=tenant, purpose="input", filename="b.png",
                             content_type="image/png", size=len(buffer.getvalue()), sha256="-",
                             width=canvas, height=canvas, storage_key="inputs/file_bench"))

        def submit() -> str:
            with session_scope() as session:
                job = transitions.create(session, Job(
                    tenant_id=tenant, type="segmentation", queue="gpu",
                    input={"image": "file_bench"}, meta={}, max_attempts=1, deadline_seconds=600,
                ))
                return job.id

        cache = get_cache()
        entry = cache.entry(None, "segmentation")
        segmenter = cache.get(f"segmentation:{entry.name}", entry, seg.load_segmenter)
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
        f, w = statistics.median(forward), statistics.median(whole)
        return {"forward_ms": f * 1000, "job_ms": w * 1000, "overhead_ms": (w - f) * 1000, "overhead_ratio": (w - f) / f}
    finally:
        s3.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--size", type=int, help="canvas (default 384 on CPU, 512 on CUDA)")
    parser.add_argument("--images", type=int, help="images per measurement (default 8 on CPU, 64 on CUDA)")
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--jobs", type=int, default=5, help="whole jobs for the overhead measurement (0: skip it)")
    parser.add_argument("--config", type=Path, default=CONFIG, help="the real checkpoint's config.json")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "gpujobs-bench-models")
    args = parser.parse_args()

    import torch

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available here")
    canvas = args.size or (512 if cuda else 384)
    count = args.images or (64 if cuda else 8)
    dtype = torch.float16 if cuda else torch.float32
    os.environ["GPUJOBS_DEVICE"] = args.device
    os.environ["GPUJOBS_DTYPE"] = "float16" if cuda else "float32"
    folder = args.cache / f"mask2former-full-{canvas}"
    build_full_size(folder, canvas, args.config)
    pictures = images(count, canvas)
    device_name = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    log(f"device: {device_name}; canvas {canvas}×{canvas}; {count} images per measurement")

    results = {"baseline (transformers, 1 at a time)": baseline(folder, pictures, args.device, dtype)}
    log(f"baseline: {results['baseline (transformers, 1 at a time)']}")

    from worker.models import segmentation as seg
    from worker.models.cache import ModelCache
    from worker.models.catalog import ModelEntry

    cache = ModelCache()
    entry = ModelEntry(name="bench", kind="segmentation", source=str(folder))
    segmenter = cache.get("segmentation:bench", entry, seg.load_segmenter)
    for batch in (int(b) for b in args.batches.split(",")):
        results[f"gpujobs batch {batch}"] = batched(segmenter, cache, pictures, batch, canvas)
        log(f"batch {batch}: {results[f'gpujobs batch {batch}']}")

    overhead = job_overhead(folder, pictures, canvas, args.device, args.jobs) if args.jobs else None

    base = results["baseline (transformers, 1 at a time)"]["images_per_s"]
    print(f"\nSegmentation — {device_name}, full-size Swin-T Mask2Former (random weights), {canvas}×{canvas}")
    print(f"{'run':<40}{'images/s':>10}{'median latency':>16}{'vs baseline':>13}")
    for name, figures in results.items():
        print(f"{name:<40}{figures['images_per_s']:>10.2f}{figures['latency_ms']:>13.0f} ms{figures['images_per_s'] / base:>12.2f}×")
    if overhead is None:
        return
    print(
        f"\nWhole job (median of {args.jobs}): {overhead['job_ms']:.0f} ms, forward pass {overhead['forward_ms']:.0f} ms, "
        f"overhead {overhead['overhead_ms']:.0f} ms = {overhead['overhead_ratio'] * 100:.1f}% of the forward pass"
    )


if __name__ == "__main__":
    main()
