"""Closed-loop load: client threads that each run an operation back to back, timed one by one.

An operation takes its thread's state (a session, a client) and returns whether it succeeded and
any extra figures of its own (seconds, counts). Systems compared in one run take turns, in rounds or
sample by sample, so that a change in the machine's load hits them all alike.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.lib.cpu import CpuMeter
from bench.lib.report import log
from bench.lib.stats import mean, median, percentile

# An operation: (per-thread state) -> (ok, extra figures); timed by the caller.
Op = Callable[[Any], tuple[bool, dict[str, float]]]
# (label, operation, how a client thread makes its state)
System = tuple[str, Op, Callable[[], Any]]
# (phase, label) -> a context in which that phase of that system runs (a profiler's recording)
Recorder = Callable[[str, str], contextlib.AbstractContextManager[Any]]

STOP = threading.Event()  # set on the way out (an error, Ctrl-C): client threads stop before the servers do
ERRORS_SHOWN = 3  # per series: the first few errors are logged, all are counted
_shown: dict[str, int] = {}
_shown_lock = threading.Lock()


@dataclass
class Sample:
    """Timings of one measured series (seconds)."""

    name: str
    times: list[float] = field(default_factory=list)
    errors: int = 0
    wall: float | None = None  # for concurrent phases: first start to last end
    extra: dict[str, list[float]] = field(default_factory=dict)  # e.g. GETs per polled job, server-side spans
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds by role over the phase

    @property
    def median_ms(self) -> float:
        return median(self.times) * 1000

    @property
    def p99_ms(self) -> float:
        return percentile(self.times, 99) * 1000

    @property
    def rate(self) -> float:
        return len(self.times) / self.wall if self.wall else float("nan")

    def merge(self, other: Sample) -> None:
        """Add ``other``'s operations, errors, wall time and CPU to this series."""
        self.times += other.times
        for key, values in other.extra.items():
            self.extra.setdefault(key, []).extend(values)
        self.errors += other.errors
        self.wall = (self.wall or 0.0) + (other.wall or 0.0)
        for role, seconds in other.cpu.items():
            self.cpu[role] = self.cpu.get(role, 0.0) + seconds

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "n": len(self.times),
            "errors": self.errors,
            "median_ms": round(self.median_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "mean_ms": round(mean(self.times) * 1000, 3) if self.times else None,
        }
        if self.wall:
            out |= {"wall_s": round(self.wall, 3), "per_second": round(self.rate, 1)}
        for key, values in self.extra.items():
            if key == "gets":
                out["mean_gets_per_job"] = round(mean(values), 2)
            else:
                out[f"{key}_median_ms"] = round(median(values) * 1000, 3)
        if self.cpu:
            n = max(1, len(self.times))
            out["cpu_ms_per_op"] = {k: round(v * 1000 / n, 3) for k, v in self.cpu.items()}
        return out


def timed(op: Op, state: Any, sample: Sample) -> None:
    """Run ``op`` once into ``sample``: its time if it succeeded, an error (logged, the first few) if not."""
    t0 = time.perf_counter()
    try:
        ok, extra = op(state)
    except Exception as exc:  # counted, reported (the first few); the run goes on
        sample.errors += 1
        with _shown_lock:
            shown = _shown[sample.name] = _shown.get(sample.name, 0) + 1
        if shown <= ERRORS_SHOWN and not STOP.is_set():
            log(f"{sample.name}: {type(exc).__name__}: {str(exc)[:200]}")
        return
    elapsed = time.perf_counter() - t0
    if ok:
        sample.times.append(elapsed)
        for key, value in extra.items():
            sample.extra.setdefault(key, []).append(value)
    else:
        sample.errors += 1


def run_concurrent(
    name: str, op: Op, make_state: Callable[[], Any], clients: int, total: int, meter: CpuMeter
) -> Sample:
    """``clients`` threads share ``total`` operations; wall time is from the start signal to the last end."""
    sample = Sample(name)
    lock = threading.Lock()
    remaining = [total]
    barrier = threading.Barrier(clients + 1)

    def client() -> None:
        state = make_state()
        local = Sample(name)
        barrier.wait()
        while not STOP.is_set():
            with lock:
                if remaining[0] <= 0:
                    break
                remaining[0] -= 1
            timed(op, state, local)
        with lock:
            sample.merge(local)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    cpu_before = meter.snapshot()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    sample.wall = time.perf_counter() - t0
    sample.cpu = CpuMeter.delta(cpu_before, meter.snapshot())
    return sample


def run_rounds(
    phase: str,
    systems: list[System],
    total: int,
    clients: int,
    rounds: int,
    warmup: int,
    meter: CpuMeter,
    record: Recorder,
) -> dict[str, Sample]:
    """Each system in turn, ``rounds`` times over; the first round of each runs inside ``record(phase, label)``.

    Rates are all operations over the summed wall time of the system's rounds.
    """
    merged = {label: Sample(label, wall=0.0) for label, _, _ in systems}
    for label, op, make_state in systems:
        run_concurrent(label, op, make_state, clients, warmup, meter)
    for r in range(rounds):
        count = total // rounds + (1 if r < total % rounds else 0)
        for label, op, make_state in systems:
            with record(phase, label) if r == 0 else contextlib.nullcontext():
                merged[label].merge(run_concurrent(label, op, make_state, clients, count, meter))
    return merged


def run_interleaved(series: list[tuple[str, Op, Any]], count: int, warmup: int) -> list[Sample]:
    """One client: each round runs one operation of every series, so all see the same conditions."""
    for _ in range(warmup):
        for name, op, state in series:
            timed(op, state, Sample(name))
    samples = [Sample(name) for name, _, _ in series]
    for _ in range(count):
        if STOP.is_set():
            break
        for sample, (_, op, state) in zip(samples, series, strict=True):
            timed(op, state, sample)
    return samples
