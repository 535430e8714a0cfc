"""Segmentation throughput and per-job overhead, against plain transformers, in one run.

    python -m bench.segmentation                 # CPU: full-size Swin-T Mask2Former, 384×384
    python -m bench.segmentation --device cuda   # GPU: 512×512, fp16
    python -m bench.segmentation --quick         # the tiny demo configuration, 2 images, 2 jobs: seconds

The model is the real checkpoint's architecture (``bench/model-configs``) with random
weights: the same shapes, so the same cost. Random weights alone find no instance (no query
scores above the threshold), which would leave the post-processing nothing to do; so the
builder changes them, as ``make_confident`` documents, until up to ``TARGET_INSTANCES``
queries find an instance each on the benchmark's images (synthetic scenes: shapes on a
gradient, with noise). The forward pass costs the same: only values change, no shape.
Three measurements:

1. baseline — what a user writes with transformers, one image at a time:
   ``processor(images) → model(**inputs) → post_process_instance_segmentation``;
2. gpujobs' batcher at batch sizes 1, 2, 4, 8: B client threads each preprocess an
   image, submit it to the batcher and post-process their own result (images/s and
   per-image latency);
3. per-job overhead: whole ``segmentation`` jobs run by the real job runner (claim,
   S3 download, preprocess, forward, post-process, RLE, two PNGs, S3 upload, database)
   on SQLite + an embedded S3 server (``bench.deployment``), minus the forward pass of the same image;
4. an aspect-ratio mix (``MIX``: 4:3, 16:9, square, 3:4, 3:2, 9:16 crops of the scenes, at least two of
   each): the batcher at the largest batch size, ``--mix-in-flight`` requests at a time (a loaded worker:
   4 batches' worth by default), with the default padding buckets against the square canvas only
   (buckets ``NxN``), side by side: images/s, the share of input pixels that is padding, and the ratio.

Every image's instances, from gpujobs' batcher at every batch size and from the whole job, are
checked against transformers' (``agreement``; on a canvas other than 384×384, in a pass of its own at
384×384, where both paths upsample alike): the run fails (exit 1) when they differ. The aspect-ratio mix is
not: transformers stretches every mask to 384×384 before its target size, so on non-square images the two
paths upsample differently whatever the padding (and a bucket's padding is not the canvas's, so its logits
differ from the square run's by design; tests/unit/test_segmentation_buckets.py holds each image's to its
single run's).
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

# The job's defaults (worker/jobs/segmentation/spec.py), used by both sides.
THRESHOLD, MASK_THRESHOLD, OVERLAP = 0.5, 0.5, 0.8

# The random weights' changes (make_confident). At most TARGET_INSTANCES queries are made confident; where
# their masks overlap, gpujobs keeps fewer (OVERLAP): about 7 per image on the benchmark's images on the
# full-size model (COCO averages 7.3 instances per image).
TARGET_INSTANCES = 15
DAMPING = 0.05  # the decoder layers' residual updates are scaled by this: each query keeps its own identity
CONFIDENT_LOGIT = 12.0  # a chosen query's logit for its label …
NO_OBJECT_BIAS = 7.0  # … against "no object"'s: class probability ≈ 0.99; every other query's < 0.01
MASK_SPREAD = 12.0  # the chosen masks' logits are scaled to about this spread: mask probabilities near 1
MASK_AREA = (0.003, 0.03)  # each query's mask (logit > 0) covers a share of the calibration image in this range …
MASK_SHARED = 0.1  # … and a chosen one at most this share of it covered by the masks chosen before it

# Agreement with transformers, image by image: the same instances (paired by label and mask), scores
# within SCORE_TOLERANCE, and masks the same except within BOUNDARY_BAND pixels of transformers' mask
# boundaries. On a 384×384 canvas both upsample the same 96×96 masks bilinearly to 384×384 and agree to
# float precision but for pixels whose logit rounds to a probability of exactly 0.5 (IoU ≥ 0.999 seen).
SCORE_TOLERANCE = 0.01
BOUNDARY_BAND = 1
# So the check runs on this canvas: a run on another (the GPU's 512×512) adds a pass at 384×384 for it.
# There transformers' path differs (masks downsampled to 384×384, then nearest-neighbour): on the tiny model
# at 512×512, scores differed by up to 0.016, small masks' IoU fell to 0.5 and instances near the overlap
# threshold were kept by one side only.
AGREEMENT_CANVAS = 384

# The aspect-ratio mix (width:height), cycled over the scenes: landscape photos and video frames first, as
# they come; 3:2 fits no default bucket exactly (it pads to 4:3's).
MIX = ((4, 3), (16, 9), (1, 1), (3, 4), (3, 2), (9, 16))
SQUARE_ONLY = "square canvas only"


def build_full_size(
    folder: Path, canvas: int, config_path: Path | None = CONFIG, instances: int = TARGET_INSTANCES, seed: int = 0
) -> None:
    """The real checkpoint's architecture (``config_path``; None: the tiny demo configuration) with random
    weights, up to ``instances`` queries made to find an instance (``make_confident``), saved like a checkpoint."""
    import torch
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation

    try:  # transformers ≥ 5.2 has a PIL backend; older ones only the one that needs torchvision
        from transformers.models.mask2former import Mask2FormerImageProcessorPil as Processor
    except ImportError:
        from transformers import Mask2FormerImageProcessor as Processor

    from worker.jobs.segmentation.coco import COCO_LABELS
    from worker.jobs.segmentation.demo import tiny_config

    if (folder / "model.safetensors").exists():
        return
    raw = json.loads(config_path.read_text()) if config_path else tiny_config().to_dict()
    raw.update(id2label=dict(enumerate(COCO_LABELS)), label2id={n: i for i, n in enumerate(COCO_LABELS)})
    config = Mask2FormerConfig.from_dict(raw)
    torch.manual_seed(seed)
    model = Mask2FormerForUniversalSegmentation(config).eval()
    processor = Processor(size={"shortest_edge": canvas, "longest_edge": canvas})
    size = "full-size" if config_path else "tiny"
    log(f"built {size} Mask2Former: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")
    chosen, found = make_confident(model, processor, images(1, canvas)[0], instances, seed)
    log(f"random weights changed: {chosen} queries chosen, {found} instances on the calibration image")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def changes(instances: int) -> str:
    """A tag of make_confident's settings, for the cached model's folder: changed settings, another model."""
    import hashlib

    settings = (instances, DAMPING, CONFIDENT_LOGIT, NO_OBJECT_BIAS, MASK_SPREAD, MASK_AREA, MASK_SHARED)
    return f"instances{instances}-{hashlib.sha256(repr(settings).encode()).hexdigest()[:8]}"


def make_confident(model: Any, processor: Any, image: Any, instances: int, seed: int) -> tuple[int, int]:
    """Change a random Mask2Former's weights so that up to ``instances`` queries find an instance.

    Random weights find none: every query's class probabilities are spread over the 81 classes
    (none near the 0.5 threshold), every query's hidden state, so its mask, is nearly the same, and
    a mask covers half the image or more. Deterministically from ``seed`` and ``image`` (the first
    benchmark image):

    1. the decoder layers' residual updates (cross-attention, self-attention and feed-forward output
       projections) are scaled by ``DAMPING``, so each query's final hidden state stays close to its own
       query embedding (every mask the same otherwise);
    2. the last channel of the pixel embeddings is made 1 everywhere (its mask-projection row: weight 0,
       bias 1), and that channel of the mask embedder's output is set, by least squares on ``image``, to
       each query's own offset: its mask (logit > 0) covers a seeded share of ``image`` in ``MASK_AREA``,
       and still follows the image's features;
    3. queries are taken in a seeded order when their mask overlaps the ones taken before little
       (``MASK_SHARED``), until ``instances`` are taken; each gets a seeded COCO label;
    4. the class head gets, added to its random weights, the least-squares solution that gives each
       chosen query ``CONFIDENT_LOGIT`` for its label and every other (query, label) 0 on ``image``,
       and "no object" ``NO_OBJECT_BIAS`` more bias: chosen queries score ≈ 0.99, the others < 0.01;
    5. the mask embedder's last layer is scaled so that the chosen masks' logits spread ≈ ``MASK_SPREAD``:
       mask probabilities near 1, so an instance's score is about its class probability.

    No shape changes, so the forward pass costs the same. Returns (queries chosen, instances found on
    ``image`` by the worker's post-processing once changed)."""
    import numpy as np
    import torch

    from worker.jobs.segmentation.model import postprocess

    decoder = model.model.transformer_module.decoder
    mask_mlp = decoder.mask_predictor.mask_embedder
    mask_head = mask_mlp.layers[-1].layers[0]
    projection = model.model.pixel_level_module.decoder.mask_projection
    rng = np.random.default_rng(seed)
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        for layer in decoder.layers:
            for linear in (layer.cross_attn.out_proj, layer.self_attn.out_proj, layer.fc2):
                linear.weight.mul_(DAMPING)
                linear.bias.mul_(DAMPING)
        projection.weight[-1] = 0
        projection.bias[-1] = 1

        outputs = model(pixel_values=pixel_values)
        hidden = decoder.layernorm(outputs.transformer_decoder_last_hidden_state[0])  # what the heads read
        classes, masks = outputs.class_queries_logits[0], outputs.masks_queries_logits[0]
        assert torch.allclose(model.class_predictor(hidden), classes, atol=1e-4), "not the class head's input"
        before_head = mask_mlp.layers[1](mask_mlp.layers[0](hidden))
        embeddings = mask_head(before_head)
        pixels = outputs.pixel_decoder_last_hidden_state[0]
        assert torch.allclose(torch.einsum("qc,chw->qhw", embeddings, pixels), masks, atol=1e-3), "not the masks"

        # Without what every query's embedding shares (one mask for all), and each query's offset: its
        # mask covers its share of the image.
        mask_head.bias -= embeddings.mean(0)
        embeddings -= embeddings.mean(0)
        unshifted = torch.einsum("qc,chw->qhw", embeddings[:, :-1], pixels[:-1])
        shares = torch.from_numpy(rng.uniform(*MASK_AREA, len(masks))).float()
        offsets = torch.quantile(unshifted.flatten(1), 1 - shares, dim=1).diagonal()
        mask_head.weight[-1] = -(torch.linalg.pinv(before_head) @ offsets)
        mask_head.bias[-1] = 0
        masks = unshifted - offsets[:, None, None]

        taken = torch.zeros(masks.shape[1:], dtype=torch.bool)
        chosen: list[int] = []
        for query in rng.permutation(len(masks)).tolist():
            mask = masks[query] > 0
            if not mask.any() or int((mask & taken).sum()) > MASK_SHARED * int(mask.sum()):
                continue
            chosen.append(query)
            taken |= mask
            if len(chosen) == instances:
                break
        labels = rng.integers(0, classes.shape[1] - 1, len(chosen)).tolist()

        target = torch.zeros_like(classes)
        target[chosen, labels] = CONFIDENT_LOGIT
        model.class_predictor.weight += (torch.linalg.pinv(hidden) @ target).T
        model.class_predictor.bias[-1] += NO_OBJECT_BIAS
        spread = float(masks[chosen].flatten(1).std(1).median()) if chosen else 1.0
        mask_head.weight.mul_(MASK_SPREAD / spread)
        mask_head.bias.mul_(MASK_SPREAD / spread)

        outputs = model(pixel_values=pixel_values)
    canvas = pixel_values.shape[-1]
    found = postprocess(
        outputs.class_queries_logits[0],
        outputs.masks_queries_logits[0],
        (canvas, canvas),
        canvas,
        (image.height, image.width),
        THRESHOLD,
        MASK_THRESHOLD,
        OVERLAP,
    )
    return len(chosen), len(found)


def images(count: int, canvas: int) -> list:
    """Synthetic scenes, the same for a seed: 6-14 filled ellipses and rectangles on a colour gradient, with
    noise (masks follow regions, as in a photo; uniform noise would make speckle of every mask)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    rows = np.linspace(0, 1, canvas)[:, None, None]
    pictures = []
    for _ in range(count):
        top, bottom = rng.integers(0, 256, (2, 3))
        gradient = np.broadcast_to(top * (1 - rows) + bottom * rows, (canvas, canvas, 3))
        picture = Image.fromarray(gradient.astype(np.uint8))
        draw = ImageDraw.Draw(picture)
        for _ in range(int(rng.integers(6, 15))):
            x, y = rng.integers(0, canvas, 2).tolist()
            w, h = rng.integers(canvas // 12, canvas // 3, 2).tolist()
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape((x, y, x + w, y + h), fill=tuple(rng.integers(0, 256, 3).tolist()))
        noisy = np.asarray(picture, dtype=np.float32) + rng.normal(0, 8, (canvas, canvas, 3))
        pictures.append(Image.fromarray(noisy.clip(0, 255).astype(np.uint8)))
    return pictures


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def baseline(folder: Path, pictures: list, device: str, dtype) -> dict:  # type: ignore[no-untyped-def]
    """Plain transformers, one image at a time, with binary maps (as its documentation asks where instances
    can overlap); each image's instances are kept for the agreement check (after the timing)."""
    import torch
    from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

    processor = AutoImageProcessor.from_pretrained(folder)
    model = Mask2FormerForUniversalSegmentation.from_pretrained(folder, dtype=dtype).to(device).eval()
    latencies, references = [], []
    for i, image in enumerate([pictures[0], *pictures]):  # the first is a warm-up
        started = time.perf_counter()
        inputs = processor(images=image, return_tensors="pt").to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        with torch.inference_mode():
            outputs = model(**inputs)
        result = processor.post_process_instance_segmentation(
            outputs, threshold=THRESHOLD, target_sizes=[(image.height, image.width)], return_binary_maps=True
        )[0]
        sync(device)
        if i:
            latencies.append(time.perf_counter() - started)
            references.append(reference_instances(result))
    total = sum(latencies)
    return {
        "images_per_s": len(latencies) / total,
        "latency_ms": median(latencies) * 1000,
        "instances_per_image": sum(len(r["instances"]) for r in references) / len(references),
        "listed_per_image": sum(r["listed"] for r in references) / len(references),
        "references": references,
    }


def reference_instances(result: dict) -> dict:
    """transformers' instances of one image with overlaps resolved by gpujobs' documented rule (transformers 5
    ignores ``overlap_mask_area_threshold``; tests/unit/test_segmentation_postprocess.py): each pixel goes to
    the highest score covering it, and an instance keeps what is left if that is ≥ OVERLAP of its mask."""
    import numpy as np
    from pycocotools import mask as coco_mask

    infos = result["segments_info"]
    found = [
        (info["label_id"], info["score"], mask.cpu().numpy().astype(bool))
        for info, mask in zip(infos, result["segmentation"] if infos else [], strict=True)
    ]
    kept = []
    if found:
        owner = np.full(found[0][2].shape, -1)
        for index in sorted(range(len(found)), key=lambda i: found[i][1]):
            owner[found[index][2]] = index
        for index, (label, score, mask) in enumerate(found):
            visible = owner == index
            if visible.any() and visible.sum() / mask.sum() >= OVERLAP:
                kept.append((label, score, coco_mask.encode(np.asfortranarray(visible.astype(np.uint8)))))
    kept.sort(key=lambda k: -k[1])
    return {"listed": len(found), "instances": kept}


def batched(segmenter, cache, pictures: list, batch: int, canvas: int) -> dict:  # type: ignore[no-untyped-def]
    """B threads: preprocess → batcher → post-process, as concurrent jobs do in one worker."""
    from worker.jobs.segmentation import model as seg
    from worker.jobs.segmentation.run import encode_instances

    batcher = seg.Batcher(segmenter, cache, max_batch_size=batch, max_wait_ms=50)
    latencies: list[float] = []
    found: dict[int, list] = {}
    lock = threading.Lock()

    def one(index: int, image) -> None:  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        pixels, valid = seg.preprocess(segmenter, image, canvas)
        classes, masks = batcher.submit(pixels).result()
        size = (image.height, image.width)
        instances = encode_instances(
            seg.postprocess(classes, masks, valid, canvas, size, THRESHOLD, MASK_THRESHOLD, OVERLAP), segmenter.id2label
        )
        with lock:
            latencies.append(time.perf_counter() - started)
            found[index] = instances

    def run(start: int, group: list) -> None:
        threads = [threading.Thread(target=one, args=(start + n, image)) for n, image in enumerate(group)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    run(0, pictures[:batch])  # warm-up
    latencies.clear()
    started = time.perf_counter()
    for start in range(0, len(pictures), batch):
        run(start, pictures[start : start + batch])
    total = time.perf_counter() - started
    instances = [found[index] for index in range(len(pictures))]
    return {
        "images_per_s": len(pictures) / total,
        "latency_ms": median(latencies) * 1000,
        "instances_per_image": sum(map(len, instances)) / len(instances),
        "instances": instances,
    }


def mixed_pictures(pictures: list) -> list:
    """The scenes cropped (centred) to the aspect ratios of ``MIX``, in turn: the largest crop of each."""
    cropped = []
    for index, picture in enumerate(pictures):
        across, down = MIX[index % len(MIX)]
        width, height = picture.size
        if width * down > height * across:
            width = height * across // down
        else:
            height = width * down // across
        left, top = (picture.width - width) // 2, (picture.height - height) // 2
        cropped.append(picture.crop((left, top, left + width, top + height)))
    return cropped


def aspect_mix(segmenter, cache, pictures: list, batch: int, canvas: int, in_flight: int) -> dict:  # type: ignore[no-untyped-def]
    """The mix of aspect ratios through the batcher, batches of up to ``batch``, ``in_flight`` requests at a
    time (a worker with that many job threads): with the default buckets, then with the square canvas only. Each run warms its buckets
    first (an untimed pass over the images), then times a pass; the padding share is the batcher's own
    count (``input_pixels``, ``padding_pixels``) over the timed pass."""
    from concurrent.futures import ThreadPoolExecutor

    from db.settings import Bucket, default_segmentation_buckets
    from worker.jobs.segmentation import model as seg

    configurations = {
        "buckets " + ", ".join(map(str, default_segmentation_buckets(canvas))): default_segmentation_buckets(canvas),
        SQUARE_ONLY: [Bucket(canvas, canvas)],
    }
    mix = mixed_pictures(pictures)
    runs: dict[str, Any] = {}
    for name, buckets in configurations.items():
        batcher = seg.Batcher(segmenter, cache, max_batch_size=batch, max_wait_ms=50)
        latencies: list[float] = []
        found: list[int] = [0] * len(mix)

        def one(
            index: int,
            buckets: list = buckets,
            batcher: Any = batcher,
            latencies: list = latencies,
            found: list = found,
        ) -> None:
            image = mix[index]
            started = time.perf_counter()
            pixels, valid = seg.preprocess(segmenter, image, canvas, buckets)
            classes, masks = batcher.submit(pixels, valid).result()
            kept = seg.postprocess(
                classes, masks, valid, pixels.shape[-1], (image.height, image.width), THRESHOLD, MASK_THRESHOLD, OVERLAP
            )
            latencies.append(time.perf_counter() - started)
            found[index] = len(kept)

        with ThreadPoolExecutor(in_flight) as pool:
            list(pool.map(one, range(len(mix))))  # warm-up: every bucket's first pass
            latencies.clear()
            before = dict(cache.stats[segmenter.key].counters)
            started = time.perf_counter()
            list(pool.map(one, range(len(mix))))
            total = time.perf_counter() - started
        after = cache.stats[segmenter.key].counters
        delta = {key: after.get(key, 0) - before.get(key, 0) for key in after}
        runs[name] = {
            "images_per_s": len(mix) / total,
            "latency_ms": median(latencies) * 1000,
            "padding": delta["padding_pixels"] / delta["input_pixels"],
            "forward_passes": delta["forward_passes"],
            "images_per_pass": delta["batched_images"] / delta["forward_passes"],
            "instances_per_image": sum(found) / len(found),
        }
    bucketed, square = (runs[name] for name in configurations)
    return {
        "mix": [f"{across}:{down}" for across, down in MIX],
        "images": len(mix),
        "batch": batch,
        "in_flight": in_flight,
        "runs": runs,
        "buckets_over_square": bucketed["images_per_s"] / square["images_per_s"],
        "padding": {"buckets": bucketed["padding"], "square": square["padding"]},
    }


def compare(ours: list, reference: dict) -> tuple[list[str], float, float]:
    """gpujobs' instances of one image (``Instance``s) against transformers' (``reference_instances``):
    the differences found (none: they agree), the lowest mask IoU and the largest score difference.

    Each of ours (highest score first) is paired with the transformers instance of the same label whose
    mask overlaps it most; both must pair off exactly, each pair's scores be within SCORE_TOLERANCE, and
    each pair's masks be the same but within BOUNDARY_BAND pixels of the transformers mask's boundary."""
    import numpy as np
    from pycocotools import mask as coco_mask
    from scipy import ndimage

    square = np.ones((3, 3), dtype=bool)
    theirs = list(reference["instances"])
    problems, lowest, largest = [], 1.0, 0.0
    for number, mine in enumerate(ours, start=1):
        mine_rle = {"size": mine.mask.size, "counts": mine.mask.counts.encode("ascii")}
        same_label = [t for t in theirs if t[0] == mine.label_id]
        if not same_label:
            problems.append(f"instance {number} ({mine.label_id}, score {mine.score:.4f}): none of transformers'")
            lowest, largest = 0.0, 1.0
            continue
        ious = coco_mask.iou([mine_rle], [t[2] for t in same_label], [0] * len(same_label))[0]
        best = int(np.argmax(ious))
        label, score, rle = same_label[best]
        theirs.remove(same_label[best])
        lowest, largest = min(lowest, float(ious[best])), max(largest, abs(mine.score - score))
        if abs(mine.score - score) > SCORE_TOLERANCE:
            problems.append(f"instance {number} ({label}): score {mine.score:.4f}, transformers {score:.4f}")
        mask, expected = coco_mask.decode(mine_rle).astype(bool), coco_mask.decode(rle).astype(bool)
        band = ndimage.binary_dilation(expected, square, BOUNDARY_BAND) & ~ndimage.binary_erosion(
            expected, square, BOUNDARY_BAND
        )
        off = int(((mask != expected) & ~band).sum())
        if off:
            problems.append(f"instance {number} ({label}): {off} pixels differ off the boundary (IoU {ious[best]:.4f})")
    if theirs:
        problems += [f"transformers' instance ({label}, score {score:.4f}): none of ours" for label, score, _ in theirs]
        lowest, largest = 0.0, 1.0
    return problems, lowest, largest


def agreement(references: list[dict], checked: dict[str, list[list]]) -> dict[str, Any]:
    """Every image's instances of every gpujobs run (``checked``: run → per image) against transformers'."""
    problems, lowest, largest, images_checked = [], 1.0, 0.0, 0
    for name, per_image in checked.items():
        for index, ours in enumerate(per_image):
            found, iou, score = compare(ours, references[index])
            problems += [f"{name}, image {index}: {p}" for p in found]
            lowest, largest, images_checked = min(lowest, iou), max(largest, score), images_checked + 1
    return {
        "agree": not problems,
        "runs": list(checked),
        "images_checked": images_checked,
        "score_tolerance": SCORE_TOLERANCE,
        "boundary_band_px": BOUNDARY_BAND,
        "min_iou": lowest,
        "max_score_difference": largest,
        "problems": problems,
    }


def job_overhead(deployment: Deployment, folder: Path, pictures: list, canvas: int, device: str, jobs: int) -> dict:
    """Whole jobs through the real runner (database + S3), against the forward pass alone; the jobs'
    instances (from their stored output) are counted, and the last job's kept for the agreement check."""
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
    from worker.jobs.segmentation.spec import SEGMENTATION, Instance
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
    forward, whole, found = [], [], []
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
        with session_scope() as session:
            output = session.get(Job, job_id).output  # type: ignore[union-attr]
        found.append([Instance.model_validate(i) for i in output["instances"]])
    f, w = median(forward), median(whole)
    return {
        "forward_ms": f * 1000,
        "job_ms": w * 1000,
        "overhead_ms": (w - f) * 1000,
        "overhead_ratio": (w - f) / f,
        "instances_per_job": sum(map(len, found)) / len(found),
        "instances": found[-1],  # the job's image is the first: checked against transformers'
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--size", type=int, help="canvas (default 384 on CPU, 512 on CUDA)")
    parser.add_argument("--images", type=int, help="images per measurement (default 8 on CPU, 64 on CUDA, 2 quick)")
    parser.add_argument("--batches", help="batch sizes (default 1,2,4,8; 1,2 with --quick)")
    parser.add_argument(
        "--jobs", type=int, help="whole jobs for the overhead measurement (default 5, 2 quick; 0: skip)"
    )
    parser.add_argument(
        "--mix-in-flight", type=int, help="requests at a time in the aspect-ratio mix (default 4 × the largest batch)"
    )
    parser.add_argument("--config", type=Path, default=CONFIG, help="the real checkpoint's config.json")
    parser.add_argument("--quick", action="store_true", help="the tiny demo configuration and few images: seconds")
    parser.add_argument(
        "--instances", type=int, default=TARGET_INSTANCES, help="queries the model is made confident in"
    )
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
    args.images = args.images or (2 if args.quick else 64 if cuda else 8)
    args.batches = args.batches or ("1,2" if args.quick else "1,2,4,8")
    args.jobs = (2 if args.quick else 5) if args.jobs is None else args.jobs
    os.environ["GPUJOBS_DEVICE"] = args.device
    os.environ["GPUJOBS_DTYPE"] = "float16" if cuda else "float32"
    results: dict[str, Any] = {}

    def measured(deployment: Deployment) -> dict[str, Any]:
        results.update(measure(args, deployment))
        return results

    status = run("segmentation", measured, report, args.json, args.keep_logs)
    if status == 0 and not results["agreement"]["agree"]:
        print("\nFAILED: gpujobs' instances differ from transformers':", file=sys.stderr)
        for problem in results["agreement"]["problems"][:20]:
            print(f"  {problem}", file=sys.stderr)
        return 1
    return status


def measure(args: argparse.Namespace, deployment: Deployment) -> dict[str, Any]:
    import torch

    canvas, dtype = args.size, torch.float16 if args.device.startswith("cuda") else torch.float32
    load = [os.getloadavg()]
    folder = built(args, canvas)
    pictures = images(args.images, canvas)
    log(f"device: {machine(args.device)}; canvas {canvas}×{canvas}; {args.images} images per measurement")

    runs = {BASELINE: baseline(folder, pictures, args.device, dtype)}
    references = runs[BASELINE].pop("references")
    log(f"baseline: {runs[BASELINE]}")

    cache, segmenter = loaded(folder)
    checked: dict[str, list[list]] = {}
    for batch in (int(b) for b in args.batches.split(",")):
        name = f"gpujobs batch {batch}"
        runs[name] = batched(segmenter, cache, pictures, batch, canvas)
        checked[name] = runs[name].pop("instances")
        log(f"batch {batch}: {runs[name]}")
    largest = max(int(b) for b in args.batches.split(","))
    mixed = pictures if len(pictures) >= 2 * len(MIX) else images(2 * len(MIX), canvas)
    mix = aspect_mix(segmenter, cache, mixed, largest, canvas, args.mix_in_flight or 4 * largest)
    log(f"aspect-ratio mix: {mix}")
    overhead = job_overhead(deployment, folder, pictures, canvas, args.device, args.jobs) if args.jobs else None
    if overhead is not None:
        checked["whole job"] = [overhead.pop("instances")]
    if canvas == AGREEMENT_CANVAS:
        agreed = agreement(references, checked)
    else:  # transformers' masks go through 384×384 whatever the canvas: check where both paths are the same
        agreed = agreement_pass(args, dtype, max(int(b) for b in args.batches.split(",")))
    agreed["canvas"] = AGREEMENT_CANVAS
    load.append(os.getloadavg())
    return {
        "machine": machine(args.device),
        "canvas": canvas,
        "model": "tiny demo configuration" if args.quick else "full-size Swin-T Mask2Former",
        "images": args.images,
        "jobs": args.jobs,
        "target_instances": args.instances,
        "runs": runs,
        "job_overhead": overhead,
        "aspect_mix": mix,
        "agreement": agreed,
        "load_average": {"start": load[0], "end": load[1]},
    }


def built(args: argparse.Namespace, canvas: int) -> Path:
    """The benchmark's model for this canvas, built once into ``--cache``."""
    folder = args.cache / f"mask2former-{'tiny' if args.quick else 'full'}-{canvas}-{changes(args.instances)}"
    build_full_size(folder, canvas, None if args.quick else args.config, args.instances)
    return folder


def loaded(folder: Path) -> tuple[Any, Any]:
    """A model cache and the worker's segmenter from ``folder``, as a worker loads it."""
    from worker.jobs.segmentation import model as seg
    from worker.jobs.segmentation.spec import SEGMENTATION
    from worker.models.cache import ModelCache
    from worker.models.catalog import ModelEntry

    cache = ModelCache()
    entry = ModelEntry(name="bench", kind=SEGMENTATION.name, source=str(folder))
    return cache, cache.get(SEGMENTATION.cache_key(entry.name), entry, seg.load_segmenter)


def agreement_pass(args: argparse.Namespace, dtype: Any, batch: int) -> dict[str, Any]:
    """The agreement check for a run on another canvas than 384×384: the same device and dtype, the model
    built for 384×384, up to 8 images, transformers against the batcher at ``batch`` (not timed)."""
    folder = built(args, AGREEMENT_CANVAS)
    pictures = images(min(args.images, 8), AGREEMENT_CANVAS)
    references = baseline(folder, pictures, args.device, dtype)["references"]
    cache, segmenter = loaded(folder)
    ours = batched(segmenter, cache, pictures, batch, AGREEMENT_CANVAS)["instances"]
    log(f"agreement pass at {AGREEMENT_CANVAS}×{AGREEMENT_CANVAS}: {len(pictures)} images")
    return agreement(references, {f"gpujobs batch {batch}": ours})


def report(r: dict[str, Any]) -> None:
    base = r["runs"][BASELINE]["images_per_s"]
    canvas = r["canvas"]
    print(f"\nSegmentation — {r['machine']}, {r['model']} (random weights made to find instances), {canvas}×{canvas}")
    print(f"{'run':<40}{'images/s':>10}{'median latency':>16}{'vs baseline':>13}{'instances/image':>17}")
    for name, figures in r["runs"].items():
        print(
            f"{name:<40}{figures['images_per_s']:>10.2f}{figures['latency_ms']:>13.0f} ms"
            f"{figures['images_per_s'] / base:>12.2f}×{figures['instances_per_image']:>17.1f}"
        )
    print(
        f"(transformers listed {r['runs'][BASELINE]['listed_per_image']:.1f} instances per image before overlaps "
        f"were resolved by the rule gpujobs applies, overlap_mask_area_threshold {OVERLAP})"
    )
    mix = r["aspect_mix"]
    print(
        f"\nAspect-ratio mix ({', '.join(mix['mix'])}; {mix['images']} images, {mix['in_flight']} in flight, "
        f"batches of up to {mix['batch']})"
    )
    print(f"{'run':<58}{'images/s':>10}{'median latency':>16}{'padding':>9}{'images/pass':>13}")
    for name, figures in mix["runs"].items():
        print(
            f"{name:<58}{figures['images_per_s']:>10.2f}{figures['latency_ms']:>13.0f} ms"
            f"{figures['padding'] * 100:>8.1f}%{figures['images_per_pass']:>13.2f}"
        )
    print(f"buckets / square canvas only: {mix['buckets_over_square']:.2f}× images/s")
    overhead = r["job_overhead"]
    if overhead is not None:
        print(
            f"\nWhole job (median of {r['jobs']}): {overhead['job_ms']:.0f} ms, "
            f"forward pass {overhead['forward_ms']:.0f} ms, "
            f"overhead {overhead['overhead_ms']:.0f} ms = {overhead['overhead_ratio'] * 100:.1f}% of the forward pass, "
            f"{overhead['instances_per_job']:.1f} instances per job"
        )
    a = r["agreement"]
    verdict = "agree" if a["agree"] else f"DIFFER ({len(a['problems'])} differences)"
    print(
        f"\nAgreement with transformers at {a['canvas']}×{a['canvas']}: {verdict} on {a['images_checked']} images "
        f"({', '.join(a['runs'])}): "
        f"the same instances and labels, scores within {a['score_tolerance']} (largest difference "
        f"{a['max_score_difference']:.2g}), masks the same but within {a['boundary_band_px']} pixel of "
        f"transformers' boundaries (lowest IoU {a['min_iou']:.4f})"
    )
    start, end = r["load_average"]["start"], r["load_average"]["end"]
    print(
        f"load average: {start[0]:.2f} {start[1]:.2f} {start[2]:.2f} at the start, {end[0]:.2f} {end[1]:.2f} {end[2]:.2f} at the end"
    )


if __name__ == "__main__":
    sys.exit(main())
