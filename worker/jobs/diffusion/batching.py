"""Cross-request batching of text-to-image runs: jobs that can share one pipeline call share it.

Two ``text_to_image`` jobs share a call when they run on the same model with the same LoRAs (and
scales), size, steps, sampler and guidance; their prompts, negative prompts, seeds and image counts
may differ. A worker runs several jobs at once (its concurrency), and a model runs one call at a time
(``Family.lock``), so jobs that arrive while a call runs wait for the model anyway: whoever takes the
lock next (the *leader*) takes every waiting request that matches its own, up to
``generation_max_batch_images`` images, and runs them as one call. ``generation_batch_wait_ms`` makes a
leader wait that long for more before it starts (0, the default: only those already waiting).

What each job keeps:

- **its seeds**: one ``torch.Generator`` per image, as alone, so the starting noise (and an ancestral
  sampler's per-step noise) of each image is its own;
- **its prompts**: each request's prompt is encoded on its own (a batch of one, as alone) and the
  embeddings are stacked, so the text encoder's numbers do not depend on the neighbours;
- **its progress and its cancel**: the call's step callback reports each step to every job in it and
  asks each whether it must stop; a job that must (canceled, past its deadline, lease lost) leaves at
  that step: its waiting thread is released at once and the job ends, while its rows keep being
  computed with the others' (removing them would need every sampler's history sliced) and are
  dropped at the end. When every job of a call has left, the call stops;
- **its decode**: each job decodes its own latents (a batch of its own images, as alone), under the
  model's lock, in its own thread.

On the CPU a job's image in a batch is the same, pixel for pixel, as alone
(``tests/integration/test_batching.py``); on a GPU, batched kernels may round differently
(``python -m bench.gpu`` measures the difference). Inpainting and style transfer are not batched:
their calls carry per-job images (and an IP-Adapter's state) that the pipelines take per call.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from db.settings import get_settings
from worker.jobs.diffusion.lora import Lora, applied
from worker.jobs.diffusion.pipeline import (
    Denoised,
    Family,
    StepHook,
    guard_out_of_memory,
    make_scheduler,
    release_memory,
)
from worker.models.cache import get_cache


@dataclass(eq=False)
class Request:
    """One job's part of a call: what must match (``key``), what is its own, and how it ends."""

    key: tuple[Any, ...]
    prompt: str
    negative_prompt: str
    generators: list[torch.Generator]
    on_step: StepHook
    done: threading.Event = field(default_factory=threading.Event)
    result: Denoised | None = None
    error: BaseException | None = None
    taken: bool = False  # in a call (or run): no longer withdrawable
    shared_with: int = 0  # the other jobs in its call

    @property
    def images(self) -> int:
        return len(self.generators)

    def finish(self, result: Denoised | None = None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()

    @property
    def stopped(self) -> bool:
        return self.done.is_set() and (self.error is not None or (self.result is not None and self.result.stopped))


@dataclass(eq=False)
class Gatherer:
    """A family's waiting requests (one per loaded family: ``gatherer_of``)."""

    _mutex: threading.Lock = field(default_factory=threading.Lock)
    _waiting: list[Request] = field(default_factory=list)

    def add(self, request: Request) -> None:
        with self._mutex:
            self._waiting.append(request)

    def withdraw(self, request: Request) -> bool:
        """Take a request back that no call has taken (its job stopped while waiting); whether it was."""
        with self._mutex:
            if request.taken:
                return False
            self._waiting.remove(request)
            return True

    def take(self, leader: Request, max_images: int) -> list[Request]:
        """The leader and the waiting requests that match it, oldest first, within ``max_images``."""
        with self._mutex:
            batch, images = [leader], leader.images
            for request in list(self._waiting):
                if request is leader:
                    continue
                if request.key == leader.key and images + request.images <= max_images:
                    batch.append(request)
                    images += request.images
            for request in batch:
                request.taken = True
                self._waiting.remove(request)
            return batch


_gatherers: weakref.WeakKeyDictionary[Family, Gatherer] = weakref.WeakKeyDictionary()
_gatherers_lock = threading.Lock()


def gatherer_of(family: Family) -> Gatherer:
    with _gatherers_lock:
        found = _gatherers.get(family)
        if found is None:
            found = _gatherers[family] = Gatherer()
        return found


def key_of(scheduler: str, loras: Sequence[Lora], **shared: Any) -> tuple[Any, ...]:
    """What two requests must have in common to share a call (the family is the gatherer's)."""
    return (scheduler, tuple((lora.sha256, lora.scale) for lora in loras), tuple(sorted(shared.items())))


def run_batch(family: Family, scheduler: str, loras: Sequence[Lora], batch: list[Request], **shared: Any) -> None:
    """One pipeline call for ``batch`` (under ``family.lock``); every request ends with its latents, a stop
    or the call's error."""
    pipe = family.text_to_image
    live = list(batch)
    for request in batch:
        request.shared_with = len(batch) - 1
    get_cache().count(family.key, "shared_calls" if len(batch) > 1 else "alone_calls")
    steps = {"run": 0, "total": 0}

    def on_step_end(pipeline: Any, step_index: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        steps["run"] += 1
        steps["total"] = pipeline.num_timesteps
        for request in list(live):
            try:
                stop = request.on_step(steps["run"], steps["total"])
            except BaseException as exc:  # the job's own check failed (its database, its lease): it leaves
                live.remove(request)
                request.finish(error=exc)
                continue
            if stop:  # it leaves now; its rows run on with the others' and are dropped at the end
                live.remove(request)
                request.finish(Denoised(None, steps["run"], steps["total"]))
        if not live:
            pipeline._interrupt = True
        return callback_kwargs

    def run() -> torch.Tensor:
        with applied(pipe.unet, loras, get_settings().lora_cache_size, family.key), torch.inference_mode():
            positive, negative = [], []
            for request in batch:  # each prompt alone, as a job alone encodes it
                embeds, negative_embeds = pipe.encode_prompt(
                    request.prompt,
                    family.device,
                    request.images,
                    True,  # classifier-free guidance: the jobs' guidance_scale is above 1 (checked at submit)
                    request.negative_prompt or None,
                )
                positive.append(embeds)
                negative.append(negative_embeds)
            return pipe(
                prompt_embeds=torch.cat(positive),
                negative_prompt_embeds=torch.cat(negative),
                generator=[generator for request in batch for generator in request.generators],
                output_type="latent",
                return_dict=False,
                callback_on_step_end=on_step_end,
                **shared,
            )[0]

    pipe.scheduler = make_scheduler(family, scheduler)
    try:
        latents = guard_out_of_memory(family.device, "denoising", run)
    except BaseException as exc:
        for request in live:
            request.finish(error=exc)
        raise
    offset = 0
    for request in batch:
        rows = slice(offset, offset + request.images)
        offset += request.images
        if request in live:
            request.finish(Denoised(latents[rows], steps["run"], steps["total"]))
    if len(live) < len(batch):
        release_memory(family.device)


def denoise_shared(
    family: Family,
    scheduler: str,
    on_step: StepHook,
    loras: Sequence[Lora],
    should_stop: Callable[[], bool],
    waiting: Callable[[], None],
    *,
    prompt: str,
    negative_prompt: str | None,
    generators: list[torch.Generator],
    **shared: Any,
) -> tuple[Denoised, int, bool]:
    """This job's text-to-image denoising, in a call it leads or one another job leads.

    Returns its result, the number of other jobs in its call, and whether it holds ``family.lock`` (its
    caller decodes under it and releases it; a job that stopped returns without it). ``should_stop()`` is
    asked while the job waits its turn; ``waiting()`` is called once if it has to wait."""
    settings = get_settings()
    request = Request(key_of(scheduler, loras, **shared), prompt, negative_prompt or "", generators, on_step)
    gatherer = gatherer_of(family)
    gatherer.add(request)
    said_waiting = False
    while True:
        if request.stopped:  # it left a call that runs on: no need for the lock
            return _outcome(request), request.shared_with, False
        if family.lock.acquire(timeout=0.05):
            try:
                if not request.taken:  # this job leads the next call
                    if settings.generation_batch_wait_ms > 0:
                        time.sleep(settings.generation_batch_wait_ms / 1000)
                    batch = gatherer.take(request, settings.generation_max_batch_images)
                    try:
                        run_batch(family, scheduler, loras, batch, **shared)
                    except BaseException:
                        if not request.done.is_set():
                            raise
                result = _outcome(request)
            except BaseException:
                family.lock.release()
                raise
            if result.stopped:
                family.lock.release()
                return result, request.shared_with, False
            return result, request.shared_with, True
        if not request.taken and should_stop() and gatherer.withdraw(request):
            return Denoised(None, 0, 0), 0, False
        if not said_waiting and not request.taken:
            waiting()
            said_waiting = True


def _outcome(request: Request) -> Denoised:
    if request.error is not None:
        raise request.error
    assert request.result is not None, "a request in a finished call has its result"
    return request.result
