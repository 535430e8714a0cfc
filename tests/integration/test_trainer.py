"""The fine-tune's parts in this process, with the tiny demo SD model: no worker, no queue.

The trainer in float16 and bfloat16 (the mixed-precision path a CUDA worker takes, run on the CPU),
loss scaling, the encoding of the training set and its cancel checks, and what a loaded LoRA costs
the model cache. ``test_finetune`` runs whole fine-tunes through the API and real workers.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.integration.generation import picture

# --- mixed precision ---------------------------------------------------------------------------------
# A CUDA worker trains in its half dtype: the frozen UNet in float16 or bfloat16 under autocast, the LoRA
# parameters in float32, and (float16 only) a gradient scaler. The trainer takes that path whenever the
# worker's dtype is a half one, on any device; here it runs on the CPU, the same code but for the device.


def _training_set(catalog: Path, dtype: str, images: int = 3, **params: Any) -> tuple[Any, ...]:
    """The demo family in ``dtype`` (its cache of its own), its folder, an ``Input`` and ``images`` samples."""
    from db.settings import Settings
    from worker.jobs.diffusion.spec import DIFFUSION
    from worker.jobs.finetune.spec import Input
    from worker.jobs.finetune.training_data import Sample
    from worker.models.cache import ModelCache

    cache = ModelCache(Settings(model_catalog=catalog, device="cpu", dtype=dtype))
    entry = cache.entry(None, DIFFUSION.name)
    family = cache.load(DIFFUSION, None)
    ids = [f"file_{i}" for i in range(images)]
    inputs = Input(images=ids, resolution=64, seed=5, learning_rate=1e-2, **params)
    samples = [Sample(name, picture(64, 64, seed=i), None, 64, 64) for i, name in enumerate(ids)]
    return family, cache.local_folder(entry), inputs, samples


def _trainer(catalog: Path, dtype: str, **params: Any) -> Any:
    import functools

    from worker.jobs.finetune.run import encode_samples, training_config
    from worker.jobs.finetune.trainer import Trainer

    family, folder, inputs, samples = _training_set(catalog, dtype, **params)
    encoded = encode_samples(family, samples, inputs.resolution, inputs.instance_prompt, "cpu", None)
    return functools.partial(Trainer, folder, training_config(inputs), encoded, family)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_training_keeps_float32_lora_weights_and_resumes_exactly(demo_catalog, dtype):
    import torch
    from safetensors.torch import load

    half = getattr(torch, dtype)
    make = _trainer(demo_catalog, dtype, steps=6)
    trainer = make()
    assert trainer.autocast and trainer.unet.dtype == half
    assert {parameter.dtype for parameter in trainer.lora} == {torch.float32}
    assert (trainer.scaler is not None) == (dtype == "float16")

    initial = [parameter.detach().clone() for parameter in trainer.lora]
    losses = [trainer.step() for _ in range(3)]
    checkpoint = trainer.checkpoint()
    losses += [trainer.step() for _ in range(3)]
    assert all(np.isfinite(loss) and loss > 0 for loss in losses), losses
    full = _trainer(demo_catalog, "float32", steps=6)()  # the same run in float32, without autocast
    assert not full.autocast and full.scaler is None
    assert np.allclose([full.step() for _ in range(3)], losses[:3], rtol=2e-2), "the half-precision loss is off"
    assert not all(torch.equal(a, b) for a, b in zip(initial, trainer.lora, strict=True)), "no weight moved"

    resumed = make()
    resumed.restore(checkpoint)
    assert resumed.step_count == 3
    assert [resumed.step() for _ in range(3)] == losses[3:]
    assert all(torch.equal(a, b) for a, b in zip(trainer.lora, resumed.lora, strict=True))
    if trainer.scaler is not None:
        assert resumed.scaler.state_dict() == trainer.scaler.state_dict()

    layers = load(trainer.lora_weights())
    assert layers and {tensor.dtype for tensor in layers.values()} == {torch.float32}


def test_an_overflowing_float16_step_is_skipped_and_its_loss_scale_kept_in_the_checkpoint(demo_catalog):
    """Loss scaling is wired in: gradients that overflow float16 skip the update and halve the scale."""
    import torch

    make = _trainer(demo_catalog, "float16", steps=4)
    trainer = make()
    trainer.step()
    trainer.scaler.update(new_scale=2.0**100)  # far past float16's range: every gradient becomes inf
    before = [parameter.detach().clone() for parameter in trainer.lora]
    optimizer_step = [state["step"].item() for state in trainer.optimizer.state.values()]
    trainer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.lora, strict=True)), "an inf update was applied"
    assert [state["step"].item() for state in trainer.optimizer.state.values()] == optimizer_step
    assert trainer.scaler.get_scale() == 2.0**99

    resumed = make()
    resumed.restore(trainer.checkpoint())
    assert resumed.scaler.get_scale() == 2.0**99
    assert resumed.step_count == 2


# --- a LoRA in the model cache, and encoding the training set ----------------------------------------


def test_a_loaded_lora_counts_in_the_model_cache_budget_and_makes_room(demo_catalog, tmp_path, monkeypatch):
    """In this process: a LoRA loaded into the warm UNet grows its model's measured size; past the budget the
    least recently used other model goes; dropping the adapter gives the size back."""
    import math

    from db.settings import Settings
    from worker.jobs.diffusion.lora import Lora, applied
    from worker.jobs.diffusion.pipeline import load_family
    from worker.jobs.segmentation.model import load_segmenter
    from worker.models import cache as cache_module
    from worker.models.cache import ModelCache

    trainer = _trainer(demo_catalog, "float32", steps=1, rank=128)()  # over 1 MB, the budget's granularity
    trainer.step()
    path = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    path.parent.mkdir()
    path.write_bytes(trainer.lora_weights())
    lora = Lora("mdl_budget", 1.0, path, hashlib.sha256(path.read_bytes()).hexdigest())

    cache = ModelCache(Settings(model_catalog=demo_catalog, device="cpu", dtype="float32"))
    monkeypatch.setattr(cache_module, "_cache", cache)
    segmenter = cache.get("segmentation:demo-mask2former", cache.entry(None, "segmentation"), load_segmenter)
    family = cache.get("diffusion:demo-sd", cache.entry(None, "diffusion"), load_family)
    assert segmenter is not None
    plain = cache.stats["diffusion:demo-sd"].bytes
    both = plain + cache.stats["segmentation:demo-mask2former"].bytes
    budget_mb = math.ceil(both / 2**20)
    cache.settings = cache.settings.model_copy(update={"model_memory_mb": budget_mb})

    unet = family.text_to_image.unet
    with applied(unet, [lora], capacity=8, cache_key=family.key):
        adapter = sum(p.numel() * p.element_size() for n, p in unet.named_parameters() if "mdl_budget" in n)
    assert both + adapter > budget_mb * 2**20, "the budget must not hold both models and the adapter"
    assert cache.stats["diffusion:demo-sd"].bytes == plain + adapter
    held = cache.loaded()
    assert held["diffusion:demo-sd"]["loaded"] and not held["segmentation:demo-mask2former"]["loaded"], held

    with applied(unet, [lora], capacity=0, cache_key=family.key):  # capacity 0: no adapter stays after a run
        pass
    assert cache.stats["diffusion:demo-sd"].bytes == plain
    assert not any("mdl_budget" in name for name, _ in unet.named_parameters())


def test_encoding_the_training_set_checks_for_cancel_before_each_batch(demo_catalog):
    """A large training set is encoded in batches; a cancel (or the deadline) stops it at the next batch."""
    from worker.context import Canceled
    from worker.jobs.finetune.run import ENCODE_BATCH, encode_samples

    family, _, _, samples = _training_set(demo_catalog, "float32", images=ENCODE_BATCH * 2 + 1)
    checks = []

    def cancel_on_the_second() -> None:
        checks.append(len(checks))
        if len(checks) == 2:
            raise Canceled()

    with pytest.raises(Canceled):
        encode_samples(family, samples, 64, "", "cpu", None, cancel_on_the_second)
    assert len(checks) == 2, "stopped at the second of three batches"
    encoded = encode_samples(family, samples, 64, "", "cpu", None, lambda: checks.append(0))
    assert len(checks) == 2 + 3 and encoded.latent_mean.shape[0] == len(samples)
