"""Supervision for `gpujobs up`: its stack's processes restarted with backoff, dependencies watched.

A child (the API, the worker, beat) that crashes is restarted after 1, 2, 4 … s, and
given up on after crashing again and again right after its start. A dependency (an
embedded Redis or S3 server) that dies is fatal: nothing works without it. ``stop``
terminates every child's process group, waits, then kills what is left.
"""

from __future__ import annotations

import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import click

from gpujobs.harness.processes import ManagedProcess, Stack, describe_exit, log_tail, stop_together
from gpujobs.harness.servers import EmbeddedServer

# A child that dies sooner than this after starting counts as crashing in a loop.
STABLE_AFTER_SECONDS = 30.0
MAX_QUICK_CRASHES = 5
MAX_BACKOFF_SECONDS = 30.0
# Children stop gracefully within this (gunicorn's graceful timeout is 10 s; a worker
# finishes its running jobs), then they are killed; a killed job is requeued by its lease.
STOP_TIMEOUT = 10.0


class Fatal(Exception):
    """Something `up` cannot repair; the message says what and where to look."""


@dataclass
class Crashes:
    """A child's recent crashes: how many in a row right after a start, and when it starts again."""

    quick: int = 0
    restart_at: float | None = None


@dataclass
class Supervisor:
    stack: Stack
    echo: Callable[[str], None] = click.echo
    dependencies: list[EmbeddedServer] = field(default_factory=list)
    hurry: bool = False
    crashes: dict[str, Crashes] = field(default_factory=dict)

    def check(self) -> None:
        """Raise if a dependency died; restart children that exited (with backoff)."""
        for dependency in self.dependencies:
            code = dependency.process.poll()
            if code is not None:
                raise Fatal(
                    f"the embedded {dependency.name} (pid {dependency.process.pid}) exited with code {code}; "
                    f"nothing works without it, so everything is stopping.\n"
                    f"Last lines of {dependency.log_path}:\n{tail(dependency.log_path)}"
                )
        now = time.monotonic()
        for child in self.stack.processes:
            crashes = self.crashes.setdefault(child.name, Crashes())
            if crashes.restart_at is not None:
                if now >= crashes.restart_at:
                    self.echo(f"restarting {child.name}")
                    child.restart()
                    crashes.restart_at = None
                continue
            code = child.proc.poll()
            if code is None:
                continue
            child.stop(timeout=5)  # whatever it left in its process group
            ran = now - child.started_at
            crashes.quick = crashes.quick + 1 if ran < STABLE_AFTER_SECONDS else 1
            if crashes.quick > MAX_QUICK_CRASHES:
                raise Fatal(
                    f"{child.name} crashed {crashes.quick} times in a row within "
                    f"{STABLE_AFTER_SECONDS:g} s of starting; giving up.\n"
                    f"Last lines of {child.log_path}:\n{tail(child.log_path)}"
                )
            delay = min(2.0 ** (crashes.quick - 1), MAX_BACKOFF_SECONDS)
            self.echo(
                f"{child.name} exited ({describe_exit(code)}) after {ran:.0f} s; "
                f"restarting in {delay:g} s (log: {child.log_path})"
            )
            crashes.restart_at = now + delay

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop every child (SIGTERM to each process group, wait, SIGKILL), then the dependencies."""
        if any(child.alive for child in self.stack.processes):
            self.echo(f"waiting up to {timeout:g} s for running jobs and requests to finish (Ctrl-C again: kill now)")

        def killing(child: ManagedProcess) -> None:
            self.echo(f"{child.name} did not stop in time; killing it (its jobs are requeued when their leases expire)")

        stop_together(self.stack.processes, timeout, hurry=lambda: self.hurry, on_kill=killing)
        for dependency in reversed(self.dependencies):
            dependency.stop()


def tail(path: Path, lines: int = 20) -> str:
    """A log's last lines, indented under the message that quotes them."""
    return textwrap.indent(log_tail(path, lines), "  ")
