"""How the CLI shows a job it follows: a live rich progress bar, plain lines, or nothing.

Both are driven by the job's server-sent events (``Client.wait``'s callback): the bar moves on each
``progress`` event and its label follows the status events; plain mode prints one line per event, for logs
and for terminals that cannot redraw. ``auto`` picks the bar when stderr is a terminal.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from gpujobs.client import Event

STATUS_OF = {"queued": "queued", "claimed": "running", "requeued": "queued", "resumed": "running"}


def describe(event: Event) -> str:
    """One line for an event: ``progress 3/10 30% denoising``, ``claimed``, ``job succeeded``…"""
    if event.event == "progress" and event.progress is not None:
        p = event.progress
        step, total, fraction = p.get("step"), p.get("total"), p.get("fraction")
        counted = f"{step}/{total}" if total else f"{step}"
        percent = f" {round(100 * fraction)}%" if isinstance(fraction, int | float) else ""
        message = f" {p['message']}" if p.get("message") else ""
        return f"progress {counted}{percent}{message}"
    if event.event == "job":
        job = event.data
        error = job.get("error") or {}
        why = f": {error.get('code')}: {error.get('message')}" if error else ""
        return f"job {job.get('status')}{why}"
    note = event.data.get("message")
    return f"{event.event}{f' {note}' if note else ''}"


class Display:
    """A context manager whose ``__call__`` takes each event of one job."""

    def __init__(self, job_id: str, mode: str) -> None:
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "plain"
        self.job_id, self.mode = job_id, mode
        self.progress: Progress | None = None
        self.task: TaskID | None = None
        self.status = "queued"

    def __enter__(self) -> Display:
        if self.mode == "bar":
            console = Console(stderr=True, force_terminal=True)
            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(bar_width=30),
                MofNCompleteColumn(),
                TextColumn("{task.percentage:>3.0f}%"),
                TimeElapsedColumn(),
                TextColumn("{task.fields[message]}"),
                console=console,
                refresh_per_second=8,
            )
            self.progress.start()
            self.task = self.progress.add_task(self._label(), total=None, message="")
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self.progress is not None:
            self.progress.stop()

    def _label(self) -> str:
        return f"{self.job_id} {self.status:<9}"

    def __call__(self, event: Event) -> None:
        if self.mode == "plain":
            click.echo(f"{self.job_id} {describe(event)}", err=True)
            return
        if self.progress is None or self.task is None:
            return
        update: dict[str, Any] = {}
        if event.event in STATUS_OF:
            self.status = STATUS_OF[event.event]
        elif event.event in ("succeeded", "failed", "canceled"):
            self.status = event.event
        if event.progress is not None:
            self.status = "running"
            step, total = event.progress.get("step") or 0, event.progress.get("total")
            update |= {"completed": step, "message": event.progress.get("message") or ""}
            if total:
                update["total"] = total
        if event.event == "job" and event.data.get("status") == "succeeded":
            task = self.progress.tasks[0]
            update["completed"] = task.total if task.total is not None else 1
            update.setdefault("total", task.total if task.total is not None else 1)
        self.progress.update(self.task, description=self._label(), **update)
        if event.event == "job":
            self.progress.refresh()
