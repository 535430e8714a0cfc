"""Supervision for `gpujobs up`: its stack's processes and embedded servers restarted with backoff.

A child (the API, the worker, beat) that crashes is restarted after 1, 2, 4 … s, and
given up on after crashing again and again right after its start. An embedded dependency
(the Redis or S3 server) that dies is restarted the same way, on its ports and data
directory, while the children carry on: they fail open or retry meanwhile (the API answers
from the database, submits are kept for the reconciler, uploads retry), and jobs whose
broker message died with Redis are sent again by the reconciler. ``stop`` terminates every
child's process group, waits, then kills what is left, then stops the embedded servers.
"""

from __future__ import annotations

import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import click

from gpujobs.harness.processes import ManagedProcess, Stack, describe_exit, log_tail, stop_together
from gpujobs.harness.servers import EmbeddedServer, ServiceError

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
    """A process's recent crashes: how many in a row right after a start, and when it starts again."""

    quick: int = 0
    restart_at: float | None = None
    total: int = 0


@dataclass
class Supervisor:
    stack: Stack
    echo: Callable[[str], None] = click.echo
    dependencies: list[EmbeddedServer] = field(default_factory=list)
    hurry: bool = False
    crashes: dict[str, Crashes] = field(default_factory=dict)

    def check(self) -> None:
        """Restart embedded servers and children that exited (with backoff); raise when one keeps crashing."""
        for dependency in self.dependencies:
            self._check_dependency(dependency)
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
            self._crashed(child.name, crashes, describe_exit(code), now - child.started_at, child.log_path)

    def _check_dependency(self, dependency: EmbeddedServer) -> None:
        name = f"the embedded {dependency.name}"
        crashes = self.crashes.setdefault(name, Crashes())
        now = time.monotonic()
        if crashes.restart_at is not None:
            if now < crashes.restart_at:
                return
            crashes.restart_at = None
            self.echo(f"restarting {name} on {dependency.data_dir}")
            try:
                dependency.restart()
            except ServiceError as exc:
                first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                self._crashed(name, crashes, f"restart failed: {first_line}", 0.0, dependency.log_path)
                return
            self.echo(f"{name} is back (pid {dependency.process.pid})")
            return
        code = dependency.process.poll()
        if code is None:
            return
        ran = now - dependency.started_at
        self._crashed(name, crashes, describe_exit(code), ran, dependency.log_path, dependent=True)

    def _crashed(
        self, name: str, crashes: Crashes, how: str, ran: float, log_path: Path, dependent: bool = False
    ) -> None:
        """Schedule a restart with backoff, or raise Fatal after too many quick crashes in a row."""
        crashes.quick = crashes.quick + 1 if ran < STABLE_AFTER_SECONDS else 1
        crashes.total += 1
        if crashes.quick > MAX_QUICK_CRASHES:
            raise Fatal(
                f"{name} crashed {crashes.quick} times in a row within "
                f"{STABLE_AFTER_SECONDS:g} s of starting (last: {how}); giving up.\n"
                f"Last lines of {log_path}:\n{tail(log_path)}"
            )
        delay = min(2.0 ** (crashes.quick - 1), MAX_BACKOFF_SECONDS)
        meanwhile = "; the other processes carry on without it meanwhile" if dependent else ""
        self.echo(f"{name} exited ({how}) after {ran:.0f} s; restarting in {delay:g} s (log: {log_path}){meanwhile}")
        crashes.restart_at = time.monotonic() + delay

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
