"""Processes of a gpujobs deployment, as ``gpujobs up``, the tests and the benchmarks start them.

Every process runs in its own process group (so that it can be stopped or SIGKILLed whole, with
what it forked), appends its output to a log file (whose tail goes into error messages), and is
stopped when this process exits normally or, if started from the main thread, dies (Linux
``PR_SET_PDEATHSIG``). A :class:`Stack` is the processes of one deployment sharing one
environment: API servers, workers and beat, through the real ``gpujobs`` commands.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpujobs.harness.ports import free_port

STOP_TIMEOUT = 10.0
STARTUP_TIMEOUT = 60.0
POLL_SECONDS = 0.1
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
LOOPBACK = "127.0.0.1"


# --- one process ---------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
except (OSError, AttributeError):  # pragma: no cover - exotic libc
    _prctl = None


def _die_with(parent_pid: int):  # type: ignore[no-untyped-def]
    def arrange() -> None:
        # Runs in the child between fork and exec: the kernel sends SIGTERM when the parent dies.
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent_pid:  # the parent died before the line above took effect
            os._exit(1)

    return arrange


_children: weakref.WeakSet[subprocess.Popen] = weakref.WeakSet()


def start_process(
    args: list[str], log_path: Path, *, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.Popen:
    """Start ``args`` in a new process group, output appended to ``log_path``; stopped at exit.

    From the main thread the child also gets SIGTERM if this process dies (not from other
    threads: Linux ties that signal to the thread that started the child).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    on_main_thread = threading.current_thread() is threading.main_thread()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_die_with(os.getpid()) if on_main_thread and _prctl is not None else None,
        )
    _children.add(proc)
    return proc


def stop_process(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT) -> int | None:
    """SIGTERM the child's process group, wait up to ``timeout``, then SIGKILL it; returns the exit code."""
    if proc.poll() is None:
        signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            signal_group(proc, signal.SIGKILL)
            proc.wait(timeout)
    # Whatever the leader left in its group (a forked helper) goes with it.
    signal_group(proc, signal.SIGKILL)
    _children.discard(proc)
    return proc.returncode


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to the child's whole process group (nothing if it is gone)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


@atexit.register
def _stop_children() -> None:
    for proc in list(_children):
        stop_process(proc, timeout=5)


def log_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` of a log, for an error message."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def describe_exit(code: int) -> str:
    """``exit code 1`` or ``killed by SIGKILL``."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


@dataclass
class ManagedProcess:
    """A started command with its log: waited for until ready, stopped, killed or started again."""

    name: str
    args: list[str]
    log_path: Path
    proc: subprocess.Popen
    env: dict[str, str] | None = None
    cwd: Path | None = None
    node: str | None = None  # a worker's Celery node name (before @host)
    started_at: float = field(default_factory=time.monotonic)

    @classmethod
    def start(
        cls, name: str, args: list[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> ManagedProcess:
        return cls(name, args, log_path, start_process(args, log_path, env=env, cwd=cwd), env, cwd)

    def restart(self) -> None:
        """The same command again, appending to the same log."""
        self.proc = start_process(self.args, self.log_path, env=self.env, cwd=self.cwd)
        self.started_at = time.monotonic()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 60) -> str:
        return log_tail(self.log_path, lines)

    def kill(self) -> None:
        """SIGKILL the whole process group: what a crash or the OOM killer does."""
        signal_group(self.proc, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> None:
        stop_process(self.proc, timeout)

    def wait_until(self, ready: Callable[[], Any], what: str, timeout: float = STARTUP_TIMEOUT) -> None:
        """Until ``ready()`` is true (its errors count as not yet); raises, with the log's tail, if the
        process exits first or ``timeout`` passes. ``what`` names the wait in those errors."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(Exception):
                if ready():
                    return
            if not self.alive:
                raise RuntimeError(
                    f"{self.name} exited ({describe_exit(self.proc.returncode)}) before {what}:\n{self.tail()}"
                )
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.name} was still not {what} after {timeout:g}s:\n{self.tail()}")
            time.sleep(POLL_SECONDS)

    def wait_for_log(self, needle: str, timeout: float = STARTUP_TIMEOUT) -> None:
        self.wait_until(lambda: needle in self.log(), f"logging {needle!r}", timeout)

    def wait_for_http(self, url: str, timeout: float = STARTUP_TIMEOUT) -> None:
        """Until ``url`` answers 200 (an API server's ``/healthz``)."""

        def answers() -> bool:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status == 200

        self.wait_until(answers, f"answering {url}", timeout)

    def __repr__(self) -> str:
        return f"<{self.name} pid={self.proc.pid} {'alive' if self.alive else 'exited'}>"


def stop_together(
    processes: Iterable[ManagedProcess],
    timeout: float,
    hurry: Callable[[], bool] = lambda: False,
    on_kill: Callable[[ManagedProcess], None] = lambda _: None,
) -> None:
    """SIGTERM every process group at once, give them ``timeout`` between them (less once ``hurry()``),
    then SIGKILL the late ones (``on_kill`` is told); reap all, and kill what any left in its group."""
    processes = list(processes)
    running = [process for process in processes if process.alive]
    for process in running:
        signal_group(process.proc, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for process in running:
        while process.alive and time.monotonic() < deadline and not hurry():
            time.sleep(0.05)
        if process.alive:
            on_kill(process)
            signal_group(process.proc, signal.SIGKILL)
    for process in processes:
        stop_process(process.proc, timeout=5)


# --- a deployment's processes ----------------------------------------------------------------------

# Every process a Stack started in this interpreter, stopped or not: the tests print the tails of
# the logs a failed test touched.
STARTED: list[ManagedProcess] = []


def gpujobs_command() -> list[str]:
    """The installed `gpujobs` console script (beside this Python), else `python -m gpujobs`."""
    script = shutil.which("gpujobs", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "gpujobs"]


class Stack:
    """Processes of one gpujobs deployment; ``env`` carries its GPUJOBS_* settings, ``log_dir`` their logs.

    ``host`` is the address an API listens on; ``wrap`` a command prefix that runs every process of the
    stack on another host (``ip netns exec <namespace>``, in the multi-host tests)."""

    def __init__(
        self,
        env: dict[str, str],
        log_dir: Path,
        label: str = "session",
        cwd: Path | None = None,
        timeout: float = STARTUP_TIMEOUT,
        host: str = LOOPBACK,
        wrap: Sequence[str] = (),
    ) -> None:
        self.env = {**env, "PYTHONUNBUFFERED": "1"}
        self.log_dir = log_dir
        self.label = label
        self.cwd = cwd
        self.timeout = timeout
        self.host = host
        self.wrap = list(wrap)
        self.processes: list[ManagedProcess] = []

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> ManagedProcess:
        """``args`` in this deployment's environment (plus ``env``), logging to ``<log_dir>/<name>.log``; stopped
        by ``stop_all``."""
        args = [*self.wrap, *args]
        env = {**self.env, **(env or {})}
        process = ManagedProcess.start(name, args, self.log_dir / f"{name}.log", env=env, cwd=self.cwd)
        self.processes.append(process)
        STARTED.append(process)
        return process

    def start_worker(
        self,
        queues: str = "gpu",
        concurrency: int = 2,
        name: str | None = None,
        wait: bool = True,
        metrics_port: int | None = None,
    ) -> ManagedProcess:
        """A worker; with ``metrics_port``, serving its ``/metrics`` there on this stack's host."""
        name = name or f"{self.label}-{queues.replace(',', '-')}-{secrets.token_hex(3)}"
        args = [*gpujobs_command(), "worker", "--queues", queues, "--concurrency", str(concurrency), "--name", name]
        env = {}
        if metrics_port is not None:
            env = {"GPUJOBS_WORKER_METRICS_PORT": str(metrics_port), "GPUJOBS_WORKER_METRICS_HOST": self.host}
        worker = self.start(f"worker-{name}", args, env)
        worker.node = name
        if wait:
            self.wait_worker_ready(worker)
        return worker

    def wait_worker_ready(self, worker: ManagedProcess, timeout: float | None = None) -> None:
        # Celery logs "<name>@<host> ready." once its consumers are running.
        worker.wait_for_log(f"{worker.node}@", timeout or self.timeout)
        worker.wait_for_log(" ready.", timeout or self.timeout)

    def start_beat(self) -> ManagedProcess:
        beat = self.start(f"beat-{self.label}", [*gpujobs_command(), "beat"])
        beat.wait_for_log("beat: Starting", self.timeout)
        return beat

    def start_api(self, workers: int = 1, extra_args: Sequence[str] = ()) -> tuple[ManagedProcess, str]:
        """``gpujobs api`` on a free port of ``host``, once its ``/healthz`` answers; the process and its base URL."""
        port = free_port()
        args = [
            *gpujobs_command(),
            "api",
            "--host",
            self.host,
            "--port",
            str(port),
            "--workers",
            str(workers),
            *extra_args,
        ]
        api = self.start(f"api-{self.label}", args)
        base_url = f"http://{self.host}:{port}"
        api.wait_for_http(f"{base_url}/healthz", self.timeout)
        return api, base_url

    def stop_all(self, timeout: float = 15.0) -> None:
        """Every process at once (workers finish or drop what they run meanwhile), then SIGKILL the late ones."""
        stop_together(self.processes, timeout)


# --- signals ---------------------------------------------------------------------------------------


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM (its name is the argument): unwinds the main thread, so that the ``finally``
    blocks stop what was started."""


def interrupt(signum: int, _frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


def on_stop_signals(handler: Any) -> dict[int, Any]:
    """Route SIGINT and SIGTERM to ``handler`` (even where the shell started us with SIGINT ignored);
    the handlers they had."""
    return {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
