"""Segmentation padding buckets (issue 18 item 4): the setting, the choice of bucket, batching per bucket,
batch padding and the compiled forward, on the tiny demo Mask2Former in this process.

An image is resized to fit the N×N canvas and padded to the smallest bucket that holds it, always the
same one, and only images of one bucket are stacked: so a batch is its images' single runs stacked, and
each image's logits are the ones it gets alone (to float tolerance). The model runs at a 128×128 canvas
here (buckets 128x128, 128x96, 96x128 by default), which keeps each forward pass to milliseconds.
"""

from __future__ import annotations

import json
import threading
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from db.settings import Bucket, Settings, default_segmentation_buckets

CANVAS = 128


# --- the setting --------------------------------------------------------------------------------------------


def sizes(buckets: list[Bucket]) -> list[str]:
    return [str(b) for b in buckets]


def test_the_default_buckets_are_the_square_4_3_and_16_9_and_their_transposes() -> None:
    assert sizes(Settings().segmentation_buckets_in_effect) == ["384x224", "224x384", "384x288", "288x384", "384x384"]
    assert sizes(default_segmentation_buckets(512)) == ["512x512", "512x384", "384x512", "512x288", "288x512"]
    # Rounded up to 32; shapes that coincide are listed once (128: 3/4 and 9/16 both give 96).
    assert sizes(Settings(segmentation_image_size=128).segmentation_buckets_in_effect) == [
        "128x96",
        "96x128",
        "128x128",
    ]
    assert sizes(Settings(segmentation_image_size=64).segmentation_buckets_in_effect) == ["64x64"]


def test_listed_buckets_replace_the_default_and_the_canvas_is_always_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUJOBS_SEGMENTATION_BUCKETS", json.dumps(["384x192", "384x192", "192x384"]))
    settings = Settings()
    assert settings.segmentation_buckets == ["384x192", "384x192", "192x384"]
    assert sizes(settings.segmentation_buckets_in_effect) == ["384x192", "192x384", "384x384"]
    monkeypatch.setenv("GPUJOBS_SEGMENTATION_BUCKETS", '["384x384"]')
    assert sizes(Settings().segmentation_buckets_in_effect) == ["384x384"], "the square canvas only"


@pytest.mark.parametrize(
    ("canvas", "bucket"),
    [
        (384, "384x200"),  # not a multiple of 32
        (384, "416x384"),  # wider than the canvas
        (256, "256x288"),  # taller than this canvas
        (384, "0x384"),
        (384, "384"),
        (384, "384X288"),
        (384, "384x288x3"),
        (384, " 384x288"),
    ],
)
def test_a_bad_bucket_is_a_settings_error_that_says_what_is_allowed(
    canvas: int, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPUJOBS_SEGMENTATION_IMAGE_SIZE", str(canvas))
    monkeypatch.setenv("GPUJOBS_SEGMENTATION_BUCKETS", json.dumps(["384x288" if canvas == 384 else "256x192", bucket]))
    with pytest.raises(ValidationError) as caught:
        Settings()
    message = str(caught.value)
    assert "segmentation_buckets" in message
    assert f"{bucket!r} is not WIDTHxHEIGHT with sides multiples of 32, from 32 to the canvas" in message
    assert f"GPUJOBS_SEGMENTATION_IMAGE_SIZE={canvas}" in message


def test_an_image_goes_to_the_smallest_bucket_that_holds_it() -> None:
    from worker.jobs.segmentation.model import choose_bucket

    buckets = Settings().segmentation_buckets_in_effect
    # (height, width) after the resize to fit 384×384: the long side is 384.
    cases = {
        (384, 384): "384x384",
        (288, 384): "384x288",  # 4:3
        (384, 288): "288x384",  # 3:4
        (216, 384): "384x224",  # 16:9
        (256, 384): "384x288",  # 3:2: the next squarer bucket
        (192, 384): "384x224",  # 2:1
        (384, 100): "224x384",
        (289, 384): "384x384",  # a pixel too tall for 4:3
    }
    assert {hw: str(choose_bucket(*hw, buckets)) for hw in cases} == cases
    with pytest.raises(ValueError, match="no bucket of 384x224 holds a 384x288 image"):
        choose_bucket(288, 384, [Bucket(384, 224)])


def test_a_compiled_forward_pads_batches_to_a_few_sizes() -> None:
    from worker.jobs.segmentation.model import padded_batch_sizes

    assert padded_batch_sizes(8) == [1, 2, 4, 8]
    assert padded_batch_sizes(6) == [1, 2, 4, 6]
    assert padded_batch_sizes(1) == [1]
    assert padded_batch_sizes(64) == [1, 2, 4, 8, 16, 32, 64]


# --- the tiny model -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny() -> SimpleNamespace:
    """The demo configuration with random weights, and the processor the demo model is saved with."""
    import torch
    from transformers import Mask2FormerForUniversalSegmentation
    from transformers.models.mask2former import Mask2FormerImageProcessorPil

    from worker.jobs.segmentation import model as seg
    from worker.jobs.segmentation.demo import tiny_config

    torch.manual_seed(0)
    return SimpleNamespace(
        torch=torch,
        seg=seg,
        model=Mask2FormerForUniversalSegmentation(tiny_config()).eval(),
        processor=Mask2FormerImageProcessorPil(size={"shortest_edge": 384, "longest_edge": 384}),
    )


def segmenter(tiny: SimpleNamespace) -> Any:
    return tiny.seg.Segmenter(
        key="segmentation:unit",
        model=tiny.model,
        processor=tiny.processor,
        id2label={},
        device="cpu",
        dtype=tiny.torch.float32,
    )


def picture(width: int, height: int, seed: int) -> Any:
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


class Shapes:
    """The input shapes the model's forward sees (a forward pre-hook on the real model), in order."""

    def __init__(self, model: Any) -> None:
        self.seen: list[tuple[int, ...]] = []
        self._lock = threading.Lock()
        self._handle = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: Any, args: Any, kwargs: Any) -> None:
        with self._lock:
            self.seen.append(tuple(kwargs["pixel_values"].shape))

    def close(self) -> None:
        self._handle.remove()


def alone(tiny: SimpleNamespace, pixels: Any) -> tuple[Any, Any]:
    with tiny.torch.inference_mode():
        out = tiny.model(pixel_values=pixels[None])
    return out.class_queries_logits[0], out.masks_queries_logits[0]


def assert_same_logits(ours: tuple[Any, Any], expected: tuple[Any, Any]) -> None:
    import torch

    assert ours[0].shape == expected[0].shape and ours[1].shape == expected[1].shape
    assert torch.allclose(ours[0], expected[0], atol=1e-4) and torch.allclose(ours[1], expected[1], atol=1e-4)


def test_a_non_square_image_is_padded_to_its_bucket_and_cropped_back(tiny: SimpleNamespace) -> None:
    from worker.jobs.segmentation.model import postprocess, preprocess

    buckets = Settings(segmentation_image_size=CANVAS).segmentation_buckets_in_effect
    seg = segmenter(tiny)
    pixels, valid = preprocess(seg, picture(160, 90, seed=1), CANVAS, buckets)  # 16:9 → 128×72 → 128x96
    assert valid == (72, 128) and tuple(pixels.shape) == (3, 96, 128)
    assert pixels[:, 72:].abs().sum() == 0, "zero padding below the image"
    square, _ = preprocess(seg, picture(160, 90, seed=1), CANVAS)  # no buckets: the canvas, as before
    assert tuple(square.shape) == (3, 128, 128) and tiny.torch.equal(square[:, :96], pixels)
    portrait, valid = preprocess(seg, picture(60, 80, seed=2), CANVAS, buckets)
    assert valid == (128, 96) and tuple(portrait.shape) == (3, 128, 96)

    classes, masks = alone(tiny, pixels)
    assert tuple(masks.shape) == (20, 24, 32), "masks at 1/4 of the bucket"
    found = postprocess(classes, masks, valid, pixels.shape[-1], (90, 160), 0.0, 0.5, 0.0)
    assert found and all(f.mask.shape == (90, 160) for f in found)


def test_batches_stack_only_one_bucket_and_match_single_runs(tiny: SimpleNamespace) -> None:
    """Five images of three buckets submitted at once, a sixth canceled: the oldest request's bucket runs
    first with the others of its bucket, then the next oldest's; each image's logits are its own run's."""
    from worker.jobs.segmentation.model import Batcher, preprocess
    from worker.models.cache import ModelCache

    buckets = Settings(segmentation_image_size=CANVAS).segmentation_buckets_in_effect
    seg = segmenter(tiny)
    cache = ModelCache(Settings())
    shapes = Shapes(tiny.model)
    try:
        batcher = Batcher(seg, cache, max_batch_size=4, max_wait_ms=200)
        images = [(160, 120), (100, 100), (200, 150), (90, 120), (64, 64), (128, 96)]  # L, S, L, P, S, L
        inputs = [preprocess(seg, picture(w, h, seed=i), CANVAS, buckets) for i, (w, h) in enumerate(images)]
        with batcher._ready:  # all queued before the batcher looks: the order is the arrival order
            futures = [batcher.submit(pixels, valid) for pixels, valid in inputs]
        assert futures[5].cancel(), "canceled while waiting: it drops out"
        results = [future.result(timeout=60) for future in futures[:5]]
        assert shapes.seen == [(2, 3, 96, 128), (2, 3, 128, 128), (1, 3, 128, 96)]
        for (pixels, _), result in zip(inputs, results, strict=False):
            assert_same_logits(result, alone(tiny, pixels))
        shapes.seen.clear()
        counters = cache.stats[seg.key].counters
        assert counters["forward_passes"] == 3 and counters["batched_images"] == 5
        padded = 2 * 96 * 128 + 2 * 128 * 128 + 128 * 96
        assert counters["input_pixels"] == padded
        # 160×120 and 200×150 fill their 128x96 bucket; 100×100 and 64×64 the canvas; 90×120 is 96×128.
        assert counters["padding_pixels"] == 0

        # A compiled forward's batch padding: 3 images run as a batch of 4, the padded row dropped.
        padding = Batcher(seg, cache, max_batch_size=4, max_wait_ms=200, pad_batches=True)
        squares = [preprocess(seg, picture(w, 100, seed=w), CANVAS, buckets) for w in (100, 110, 120)]
        with padding._ready:
            futures = [padding.submit(pixels, valid) for pixels, valid in squares]
        results = [future.result(timeout=60) for future in futures]
        assert shapes.seen == [(4, 3, 128, 128)]
        for (pixels, _), result in zip(squares, results, strict=True):
            assert_same_logits(result, alone(tiny, pixels))
        assert cache.stats[seg.key].counters["batched_images"] == 8, "padded rows are not images"
    finally:
        shapes.close()


def test_the_oldest_request_never_waits_behind_later_buckets(tiny: SimpleNamespace) -> None:
    """A stream of one bucket does not starve a request of another: batches start from the oldest request."""
    from worker.jobs.segmentation.model import Batcher, preprocess
    from worker.models.cache import ModelCache

    buckets = Settings(segmentation_image_size=CANVAS).segmentation_buckets_in_effect
    seg = segmenter(tiny)
    shapes = Shapes(tiny.model)
    try:
        batcher = Batcher(seg, ModelCache(Settings()), max_batch_size=2, max_wait_ms=50)
        square = preprocess(seg, picture(100, 100, seed=0), CANVAS, buckets)
        wide = preprocess(seg, picture(160, 120, seed=1), CANVAS, buckets)
        with batcher._ready:
            futures = [batcher.submit(*square), batcher.submit(*wide)] + [batcher.submit(*square) for _ in range(5)]
        for future in futures:
            future.result(timeout=60)
        # S S | W | S S | S S: the wide one runs second, not after every square one.
        assert shapes.seen == [(2, 3, 128, 128), (1, 3, 96, 128), (2, 3, 128, 128), (2, 3, 128, 128)]
    finally:
        shapes.close()


def test_a_failing_batch_falls_back_to_one_by_one(tiny: SimpleNamespace) -> None:
    """A request whose pixels the model cannot take (2 channels) fails alone; its neighbours succeed."""
    from worker.jobs.segmentation.model import Batcher, preprocess
    from worker.models.cache import ModelCache

    buckets = Settings(segmentation_image_size=CANVAS).segmentation_buckets_in_effect
    seg = segmenter(tiny)
    batcher = Batcher(seg, ModelCache(Settings()), max_batch_size=4, max_wait_ms=100)
    good = preprocess(seg, picture(100, 100, seed=0), CANVAS, buckets)
    with batcher._ready:
        first = batcher.submit(*good)
        bad = batcher.submit(tiny.torch.zeros(2, 128, 128))  # its bucket's shape, but 2 channels
        last = batcher.submit(*good)
    assert_same_logits(first.result(timeout=60), alone(tiny, good[0]))
    assert_same_logits(last.result(timeout=60), alone(tiny, good[0]))
    with pytest.raises(RuntimeError):
        bad.result(timeout=60)


def test_the_compiled_forward_matches_eager_and_the_warm_up_builds_every_graph(
    tiny: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``GPUJOBS_TORCH_COMPILE`` with the cheap ``eager`` backend (Inductor takes minutes on 2 cores): one
    graph per bucket and batch size, all built by the warm-up; jobs' images then compile nothing, and get
    the instances the eager model finds. Two buckets, batches of one: two graphs (about 5 s each here)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from worker.jobs.segmentation.model import (
        Batcher,
        compile_forward,
        postprocess,
        preprocess,
        warm_batcher,
    )
    from worker.models.cache import ModelCache

    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", torch._dynamo.config.recompile_limit)
    settings = Settings(
        torch_compile=True,
        torch_compile_backend="eager",
        segmentation_image_size=CANVAS,
        segmentation_buckets=["128x96"],
        segmentation_max_batch_size=1,
    )
    seg = segmenter(tiny)
    torch._dynamo.reset()
    try:
        compile_forward(seg, settings)
        assert seg.compiled and seg.forward is not tiny.model
        assert torch._dynamo.config.recompile_limit >= 2 + 8
        batcher = Batcher(seg, ModelCache(settings), max_batch_size=1, max_wait_ms=0)
        assert batcher.batch_sizes == [1]
        before = counters["stats"]["unique_graphs"]
        assert warm_batcher(batcher, settings) == ["128x96 batch 1", "128x128 batch 1"]
        assert counters["stats"]["unique_graphs"] - before == 2, "a graph per bucket, built at warm-up"

        buckets = settings.segmentation_buckets_in_effect
        for width, height in [(160, 120), (100, 100), (120, 160)]:
            image = picture(width, height, seed=width)
            pixels, valid = preprocess(seg, image, CANVAS, buckets)
            classes, masks = batcher.submit(pixels, valid).result(timeout=120)
            eager = alone(tiny, pixels)
            assert_same_logits((classes, masks), eager)
            ours = postprocess(classes, masks, valid, pixels.shape[-1], (height, width), 0.0, 0.5, 0.0)
            expected = postprocess(*eager, valid, pixels.shape[-1], (height, width), 0.0, 0.5, 0.0)
            assert ours and [(f.label_id, round(f.score, 5)) for f in ours] == [
                (f.label_id, round(f.score, 5)) for f in expected
            ]
            assert all(np.array_equal(a.mask, b.mask) for a, b in zip(ours, expected, strict=True))
        assert counters["stats"]["unique_graphs"] - before == 2, "no job compiled anything"
    finally:
        torch._dynamo.reset()
