"""Process supervision for `gpujobs up`: children restarted with backoff, dependencies watched.

A child (the API, the worker, beat) that crashes is restarted after 1, 2, 4 … s, and
given up on after crashing again and again right after its start. A dependency (an
embedded Redis or S3 server) that dies is fatal: nothing works without it. ``stop``
terminates every child's process group, waits, then kills what is left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import click

from gpujobs import embedded

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
class Child:
    """A supervised process: the API, the worker or beat."""

    name: str
    args: list[str]
    log_path: Path
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    quick_crashes: int = 0
    restart_at: float | None = None

    def start(self, env: dict[str, str]) -> None:
        self.process = embedded.start_process(self.args, self.log_path, env=env)
        self.started_at = time.monotonic()
        self.restart_at = None


@dataclass
class Dependency:
    """An embedded server that everything needs (Redis, S3): if it dies, `up` stops."""

    name: str
    process: subprocess.Popen
    log_path: Path
    stop: Callable[[], None]


@dataclass
class Supervisor:
    env: dict[str, str]
    echo: Callable[[str], None] = click.echo
    children: list[Child] = field(default_factory=list)
    dependencies: list[Dependency] = field(default_factory=list)
    hurry: bool = False

    def add(self, child: Child) -> None:
        self.children.append(child)
        child.start(self.env)

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
        for child in self.children:
            if child.restart_at is not None:
                if now >= child.restart_at:
                    self.echo(f"restarting {child.name}")
                    child.start(self.env)
                continue
            assert child.process is not None
            code = child.process.poll()
            if code is None:
                continue
            embedded.stop_process(child.process, timeout=5)  # whatever it left in its process group
            ran = now - child.started_at
            child.quick_crashes = child.quick_crashes + 1 if ran < STABLE_AFTER_SECONDS else 1
            if child.quick_crashes > MAX_QUICK_CRASHES:
                raise Fatal(
                    f"{child.name} crashed {child.quick_crashes} times in a row within "
                    f"{STABLE_AFTER_SECONDS:g} s of starting; giving up.\n"
                    f"Last lines of {child.log_path}:\n{tail(child.log_path)}"
                )
            delay = min(2.0 ** (child.quick_crashes - 1), MAX_BACKOFF_SECONDS)
            self.echo(
                f"{child.name} exited ({_describe_exit(code)}) after {ran:.0f} s; "
                f"restarting in {delay:g} s (log: {child.log_path})"
            )
            child.restart_at = now + delay

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop every child (SIGTERM to each process group, wait, SIGKILL), then the dependencies."""
        running = [c for c in self.children if c.process is not None and c.process.poll() is None]
        for child in running:
            _signal_group(child.process, signal.SIGTERM)
        if running:
            self.echo(f"waiting up to {timeout:g} s for running jobs and requests to finish (Ctrl-C again: kill now)")
        deadline = time.monotonic() + timeout
        for child in running:
            while child.process.poll() is None and time.monotonic() < deadline and not self.hurry:
                time.sleep(0.05)
            if child.process.poll() is None:
                self.echo(
                    f"{child.name} did not stop in time; killing it (its jobs are requeued when their leases expire)"
                )
                _signal_group(child.process, signal.SIGKILL)
        for child in self.children:
            if child.process is not None:
                embedded.stop_process(child.process, timeout=5)  # reaps it; SIGKILL to what is left of its group
        for dependency in reversed(self.dependencies):
            dependency.stop()


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "  (no log)"
    return "\n".join("  " + line for line in text.splitlines()[-lines:]) or "  (empty log)"
