"""Our Mask2Former instance post-processing against transformers' ``post_process_instance_segmentation``.

Both are given THE SAME model outputs (``class_queries_logits``, ``masks_queries_logits``), built
so that several instances score above the threshold and overlap: hand-made queries (rectangles
with chosen class probabilities) and the outputs of a tiny random Mask2Former, standardized so
that its queries are confident. The level where both take the same inputs is a 384×384 canvas
with no padding, at 384×384 (transformers always upsamples the masks to 384×384 first).

There, transformers' instances are (query, label) pairs scored class probability × mean mask
probability, each with its full binary mask (``return_binary_maps``; its single-map output is
documented as wrong when instances overlap). Ours are the same instances with overlaps resolved:
each pixel goes to the highest-scoring instance that covers it, and an instance keeps what is
left of its mask if that is at least ``overlap_mask_area_threshold`` of it (and not nothing).
transformers 5 ignores ``mask_threshold`` and ``overlap_mask_area_threshold``; ours honours them.
Each difference is shown by a test of its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

CANVAS = 384
MASK = CANVAS // 4  # Mask2Former's masks are at 1/4 of its input
NUM_CLASSES = 5


@pytest.fixture(scope="module")
def m2f() -> SimpleNamespace:
    """torch, transformers and our post-processing, imported here only (torch is slow to import)."""
    import torch
    from transformers.models.mask2former import Mask2FormerImageProcessorPil
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerForUniversalSegmentationOutput

    # The module under test (it moves to worker/jobs/segmentation/model.py).
    from worker.jobs.segmentation import model as segmentation

    return SimpleNamespace(
        torch=torch,
        segmentation=segmentation,
        # The processor the demo model is saved with (the torchvision one has the same post-processing).
        processor=Mask2FormerImageProcessorPil(size={"shortest_edge": CANVAS, "longest_edge": CANVAS}),
        Output=Mask2FormerForUniversalSegmentationOutput,
    )


@dataclass
class Instance:
    label: int
    score: float
    mask: np.ndarray  # bool (H, W)


def theirs(
    m2f: SimpleNamespace, class_logits: Any, mask_logits: Any, threshold: float = 0.5, **kwargs: Any
) -> list[Instance]:
    """transformers' instances with their full masks, highest score first."""
    outputs = m2f.Output(class_queries_logits=class_logits[None], masks_queries_logits=mask_logits[None])
    result = m2f.processor.post_process_instance_segmentation(
        outputs, threshold=threshold, return_binary_maps=True, **kwargs
    )[0]
    if not result["segments_info"]:
        return []
    found = [
        Instance(info["label_id"], info["score"], mask.numpy().astype(bool))
        for info, mask in zip(result["segments_info"], result["segmentation"], strict=True)
    ]
    return sorted(found, key=lambda i: -i.score)


def ours(
    m2f: SimpleNamespace,
    class_logits: Any,
    mask_logits: Any,
    threshold: float = 0.5,
    mask_threshold: float = 0.5,
    overlap: float = 0.8,
    valid: tuple[int, int] = (CANVAS, CANVAS),
    original: tuple[int, int] = (CANVAS, CANVAS),
) -> list[Instance]:
    found = m2f.segmentation.postprocess(
        class_logits, mask_logits, valid, CANVAS, original, threshold, mask_threshold, overlap
    )
    return [Instance(f.label_id, f.score, f.mask) for f in found]


def resolve_overlaps(instances: list[Instance], overlap: float) -> list[Instance]:
    """The documented rule, applied to full masks: the highest score owns a pixel; an instance is kept
    with what it owns if that is at least ``overlap`` of its mask and not empty."""
    owner = np.full(instances[0].mask.shape, -1) if instances else None
    by_score = sorted(range(len(instances)), key=lambda i: instances[i].score)
    for index in by_score:
        owner[instances[index].mask] = index
    kept = []
    for index, instance in enumerate(instances):
        visible = owner == index
        if visible.any() and visible.sum() / instance.mask.sum() >= overlap:
            kept.append(Instance(instance.label, instance.score, visible))
    return sorted(kept, key=lambda i: -i.score)


def assert_same(ours_: list[Instance], expected: list[Instance], edge: int = 0, score_tolerance: float = 1e-6) -> None:
    """Same instances in the same order (labels, scores) and the same masks (up to ``edge`` pixels
    from any mask boundary, when the two were upsampled along different paths)."""
    assert [i.label for i in ours_] == [i.label for i in expected]
    for mine, reference in zip(ours_, expected, strict=True):
        assert mine.score == pytest.approx(reference.score, abs=score_tolerance)
    band = _boundary_band([i.mask for i in expected], edge) if edge else None
    for number, (mine, reference) in enumerate(zip(ours_, expected, strict=True)):
        differ = mine.mask != reference.mask
        if band is not None:
            differ &= ~band
        assert not differ.any(), f"instance {number} (label {mine.label}): {int(differ.sum())} pixels differ"


def _boundary_band(masks: list[np.ndarray], width: int) -> np.ndarray:
    from scipy import ndimage

    band = np.zeros(masks[0].shape, dtype=bool)
    for mask in masks:
        band |= ndimage.binary_dilation(mask, iterations=width) & ~ndimage.binary_erosion(mask, iterations=width)
    return band


# --- hand-made outputs -------------------------------------------------------------------------------------


def rect(
    m2f: SimpleNamespace, rows: tuple[int, int], cols: tuple[int, int], inside: float = 6.0, size: int = MASK
) -> Any:
    logits = m2f.torch.full((size, size), -6.0)
    logits[rows[0] : rows[1], cols[0] : cols[1]] = inside
    return logits


def class_logits(m2f: SimpleNamespace, probabilities: dict[int, float]) -> Any:
    """Logits whose softmax gives these class probabilities; the rest goes to "no object" (the last class)."""
    p = m2f.torch.full((NUM_CLASSES + 1,), 1e-4)
    for label, value in probabilities.items():
        p[label] = value
    p[NUM_CLASSES] = max(1e-4, 1 - sum(probabilities.values()))
    return m2f.torch.log(p / p.sum())


def outputs(m2f: SimpleNamespace, queries: list[tuple[dict[int, float], Any]]) -> tuple[Any, Any]:
    return (
        m2f.torch.stack([class_logits(m2f, probabilities) for probabilities, _ in queries]),
        m2f.torch.stack([mask for _, mask in queries]),
    )


def overlapping_queries(m2f: SimpleNamespace) -> list[tuple[dict[int, float], Any]]:
    return [
        ({1: 0.95}, rect(m2f, (10, 50), (10, 50))),  # A
        ({2: 0.99}, rect(m2f, (30, 70), (30, 70))),  # B: over a quarter of A
        ({3: 0.90}, rect(m2f, (60, 90), (5, 25))),  # alone
        ({0: 0.80}, rect(m2f, (5, 20), (60, 90))),  # alone
        ({2: 0.85}, rect(m2f, (40, 60), (40, 80))),  # over A and B; its right end shows
        ({4: 0.90}, rect(m2f, (70, 90), (70, 90), inside=0.1)),  # a weak mask: mean probability 0.52, score < 0.5
        ({4: 0.95}, rect(m2f, (0, 0), (0, 0))),  # no mask at all
        ({}, rect(m2f, (0, MASK), (0, MASK))),  # "no object"
    ]


def test_the_same_instances_as_transformers_with_overlaps_given_to_the_higher_score(m2f: SimpleNamespace) -> None:
    classes, masks = outputs(m2f, overlapping_queries(m2f))
    reference = theirs(m2f, classes, masks)
    assert [i.label for i in reference] == [2, 1, 3, 2, 0], "five instances pass the threshold"
    assert reference[0].mask[160, 160] and reference[1].mask[160, 160], "and some of them overlap"

    mine = ours(m2f, classes, masks, overlap=0.0)
    # Every instance keeps some pixels: the same instances, scores and (overlaps aside) masks.
    assert_same(mine, resolve_overlaps(reference, overlap=0.0))
    assert np.array_equal(np.any([i.mask for i in mine], axis=0), np.any([i.mask for i in reference], axis=0))
    for mine_i, reference_i in zip(mine, reference, strict=True):
        assert not (mine_i.mask & ~reference_i.mask).any(), "an instance only ever loses pixels to overlaps"
    owners = np.sum([i.mask for i in mine], axis=0)
    assert owners.max() == 1, "our masks do not overlap"


def test_an_instance_mostly_hidden_is_dropped_where_transformers_keeps_it(m2f: SimpleNamespace) -> None:
    """``overlap_mask_area_threshold``: transformers 5 ignores it; ours drops an instance when less
    than that share of its mask is left after higher-scoring instances took theirs."""
    classes, masks = outputs(m2f, overlapping_queries(m2f))
    reference = theirs(m2f, classes, masks)
    for overlap in (0.8, 0.5, 0.3):
        mine = ours(m2f, classes, masks, overlap=overlap)
        assert_same(mine, resolve_overlaps(reference, overlap))
    # A keeps 3/4 of its mask (B took a quarter); the second label-2 instance keeps 1/4 of its own.
    assert [i.label for i in ours(m2f, classes, masks, overlap=0.8)] == [2, 3, 0]
    assert [i.label for i in ours(m2f, classes, masks, overlap=0.5)] == [2, 1, 3, 0]
    assert [i.label for i in ours(m2f, classes, masks, overlap=0.2)] == [2, 1, 3, 2, 0]
    assert len(theirs(m2f, classes, masks, overlap_mask_area_threshold=0.8)) == 5, "transformers keeps all five"


def test_an_instance_entirely_hidden_is_dropped_where_transformers_keeps_it(m2f: SimpleNamespace) -> None:
    """One query, two labels over the threshold (0.3): two instances with the same mask. transformers
    lists both; ours gives the pixels to the higher score and drops the other, even at overlap 0."""
    classes, masks = outputs(
        m2f,
        [
            ({1: 0.55, 3: 0.40}, rect(m2f, (10, 60), (10, 60))),
            ({0: 0.90}, rect(m2f, (20, 40), (20, 40))),  # inside the first, above it
            ({2: 0.80}, rect(m2f, (70, 90), (70, 90))),
            # "No object" queries: both take the best (query, label) pairs, as many as there are queries.
            ({}, rect(m2f, (0, MASK), (0, MASK))),
            ({}, rect(m2f, (0, MASK), (0, MASK))),
        ],
    )
    reference = theirs(m2f, classes, masks, threshold=0.3)
    assert [i.label for i in reference] == [0, 2, 1, 3]
    assert np.array_equal(reference[2].mask, reference[3].mask)
    mine = ours(m2f, classes, masks, threshold=0.3, overlap=0.0)
    assert_same(mine, resolve_overlaps(reference, overlap=0.0))
    assert [i.label for i in mine] == [0, 2, 1], "label 3 has no pixel left"


def test_mask_threshold_is_the_probability_above_which_a_pixel_is_in(m2f: SimpleNamespace) -> None:
    """transformers 5 always cuts at probability 0.5 (logit 0); at ``mask_threshold`` t ours equals
    transformers' masks for logits shifted by logit(t) (bilinear upsampling commutes with the shift)."""
    queries = [
        ({1: 0.97}, rect(m2f, (10, 40), (10, 40), inside=1.0)),  # probability 0.73 inside
        ({2: 0.98}, rect(m2f, (50, 90), (50, 90), inside=3.0)),  # 0.95 inside
    ]
    classes, masks = outputs(m2f, queries)
    at_half = theirs(m2f, classes, masks)
    assert theirs(m2f, classes, masks, mask_threshold=0.9)[0].mask.sum() == at_half[0].mask.sum(), "ignored"
    for t in (0.3, 0.6, 0.9):
        shifted = theirs(m2f, classes, masks - math.log(t / (1 - t)), threshold=0.0)
        mine = ours(m2f, classes, masks, threshold=0.0, mask_threshold=t, overlap=0.0)
        assert [i.label for i in mine] == [i.label for i in sorted(shifted, key=lambda i: -i.score)]
        for mine_i, reference_i in zip(mine, sorted(shifted, key=lambda i: -i.score), strict=True):
            assert np.array_equal(mine_i.mask, reference_i.mask), f"mask_threshold {t}, label {mine_i.label}"
    assert [i.label for i in ours(m2f, classes, masks, threshold=0.0, mask_threshold=0.9, overlap=0.0)] == [2]


def test_padding_is_cropped_and_masks_are_made_at_the_original_size(m2f: SimpleNamespace) -> None:
    """A 300×200 image fills 384×256 of the canvas; the mask rows past 64 (of 96) are padding, where
    a query sees only garbage. Ours crops it and upsamples to 200×300 directly; transformers, given
    the same cropped masks, upsamples to 384×384 and then (nearest) to 200×300: the same instances,
    scores within 0.01, masks equal but along edges."""
    queries = [
        ({1: 0.95}, rect(m2f, (5, 40), (10, 50))),
        ({2: 0.99}, rect(m2f, (20, 60), (30, 90))),
        ({3: 0.90}, rect(m2f, (64, 96), (0, 96))),  # in the padding only
        ({0: 0.80}, rect(m2f, (45, 64), (0, 20))),
    ]
    classes, masks = outputs(m2f, queries)
    valid, original = (256, 384), (200, 300)
    rows = math.ceil(valid[0] * MASK / CANVAS)
    assert rows == 64
    reference = theirs(m2f, classes, masks[:, :rows, :], target_sizes=[original])
    assert [i.label for i in reference] == [2, 1, 0]
    mine = ours(m2f, classes, masks, overlap=0.0, valid=valid, original=original)
    assert all(i.mask.shape == original for i in mine)
    assert_same(mine, resolve_overlaps(reference, overlap=0.0), edge=2, score_tolerance=0.01)


@pytest.mark.parametrize(
    ("bucket", "valid", "original"),
    [
        ((224, 384), (216, 384), (180, 320)),  # 16:9 in the 384x224 bucket: mask rows past 54 (of 56) are padding
        ((384, 288), (384, 256), (300, 200)),  # 2:3 in the 288x384 bucket: mask columns past 64 (of 72)
    ],
)
def test_a_non_square_bucket_is_cropped_and_masks_are_made_at_the_original_size(
    m2f: SimpleNamespace, bucket: tuple[int, int], valid: tuple[int, int], original: tuple[int, int]
) -> None:
    """An image padded to a bucket smaller than the canvas (``segmentation_buckets``): its masks are at 1/4
    of the bucket, ``padded_width`` is the bucket's, and what lies past the image is cropped away. The same
    instances as transformers given the cropped masks (which it stretches to 384×384, then to the original
    size), scores within 0.01, masks equal but along edges; a query only in the padding is not one."""
    torch = m2f.torch
    rows, cols = bucket[0] // 4, bucket[1] // 4
    keep_rows, keep_cols = math.ceil(valid[0] / 4), math.ceil(valid[1] / 4)
    assert (keep_rows, keep_cols) != (rows, cols), "some padding to crop"

    def box(top: int, bottom: int, left: int, right: int) -> Any:
        logits = torch.full((rows, cols), -6.0)
        logits[top:bottom, left:right] = 6.0
        return logits

    padding = box(keep_rows, rows, 0, cols) if keep_rows < rows else box(0, rows, keep_cols, cols)
    queries = [
        ({1: 0.95}, box(2, keep_rows // 2, 3, keep_cols // 2)),
        ({2: 0.99}, box(keep_rows // 3, keep_rows - 2, keep_cols // 3, keep_cols - 1)),
        ({3: 0.90}, padding),  # in the padding only
        ({}, box(0, rows, 0, cols)),
    ]
    classes, masks = outputs(m2f, queries)
    reference = theirs(m2f, classes, masks[:, :keep_rows, :keep_cols], target_sizes=[original])
    assert [i.label for i in reference] == [2, 1]
    found = m2f.segmentation.postprocess(classes, masks, valid, bucket[1], original, 0.5, 0.5, 0.0)
    mine = [Instance(f.label_id, f.score, f.mask) for f in found]
    assert all(i.mask.shape == original for i in mine)
    assert_same(mine, resolve_overlaps(reference, overlap=0.0), edge=2, score_tolerance=0.01)


# --- the outputs of a real (tiny, random) Mask2Former -------------------------------------------------------


@pytest.fixture(scope="module")
def random_model_outputs(m2f: SimpleNamespace) -> tuple[Any, Any]:
    """A tiny random Mask2Former (the demo model's shape) run on a 384×384 image through our own
    preprocessing, its logits standardized and scaled: random weights alone give no instance."""
    from PIL import Image
    from transformers import Mask2FormerForUniversalSegmentation

    from worker.jobs.segmentation.demo import tiny_config

    torch = m2f.torch
    torch.manual_seed(0)
    model = Mask2FormerForUniversalSegmentation(tiny_config()).eval()
    segmenter = m2f.segmentation.Segmenter(
        key="segmentation:unit", model=model, processor=m2f.processor, id2label={}, device="cpu", dtype=torch.float32
    )
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (CANVAS, CANVAS, 3), dtype=np.uint8))
    pixels, valid = m2f.segmentation.preprocess(segmenter, image, CANVAS)
    assert valid == (CANVAS, CANVAS)
    with torch.inference_mode():
        out = model(pixel_values=pixels[None])
    classes, masks = out.class_queries_logits[0].float(), out.masks_queries_logits[0].float()
    assert classes.shape == (20, 81) and masks.shape == (20, MASK, MASK)
    assert ours(m2f, classes, masks, overlap=0.0) == [] and theirs(m2f, classes, masks) == []
    classes = (classes - classes.mean()) / classes.std() * 6
    masks = (masks - masks.mean()) / masks.std() * 4
    return classes, masks


def test_a_random_mask2formers_outputs_give_the_same_instances(m2f: SimpleNamespace, random_model_outputs) -> None:
    classes, masks = random_model_outputs
    reference = theirs(m2f, classes, masks)
    assert len(reference) >= 8
    overlapping = sum(bool((a.mask & b.mask).any()) for n, a in enumerate(reference) for b in reference[n + 1 :])
    assert overlapping >= 10, "the comparison must involve overlapping instances"
    for overlap in (0.0, 0.5, 0.8):
        mine = ours(m2f, classes, masks, overlap=overlap)
        expected = resolve_overlaps(reference, overlap)
        assert expected, f"overlap {overlap}: nothing left to compare"
        assert_same(mine, expected)
    # Instances transformers lists that ours leaves out: hidden (almost) entirely by higher-scoring ones.
    assert len(ours(m2f, classes, masks, overlap=0.8)) < len(reference)
