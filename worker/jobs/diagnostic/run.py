"""``diagnostic``: sleeps in steps (progress, cancel), fails on request, stores a small JSON report."""

from __future__ import annotations

import json
import time

from worker.context import JobContext
from worker.jobs.diagnostic.spec import Input, Output
from worker.jobs.spec import JobError


class DiagnosticFailure(JobError):
    """The failure a client asked for with ``fail: true``."""

    code = "diagnostic_failure"


def run(ctx: JobContext, params: Input) -> Output:
    pause = params.sleep_seconds / params.steps
    for step in range(params.steps):
        ctx.check()
        if pause:
            time.sleep(pause)
        ctx.progress(step + 1, params.steps)
    if params.fail:
        raise DiagnosticFailure("the diagnostic job was asked to fail (`fail: true`)")
    report = {"job_id": ctx.job_id, "attempt": ctx.attempt, "worker": ctx.worker_id, "steps": params.steps}
    artifact = ctx.store("diagnostic.json", json.dumps(report).encode(), "application/json")
    return Output(steps=params.steps, artifact=artifact)
