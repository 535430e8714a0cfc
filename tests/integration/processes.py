"""gpujobs processes started by the tests through the real `gpujobs` commands.

A ``Stack`` is a set of processes sharing one environment (database, broker, S3): workers,
beat and the API server. Every process runs in its own process group (so a test can SIGKILL
a worker whole), logs to a file (whose tail is printed when a test fails), and is stopped by
the fixture that started it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from gpujobs.embedded import free_port, start_process, stop_process

ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT = 60.0

# Every process the tests started, for the failure report.
STARTED: list[ManagedProcess] = []


def gpujobs_command() -> list[str]:
    """The installed `gpujobs` console script (beside this Python), else `python -m gpujobs`."""
    script = shutil.which("gpujobs", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "gpujobs"]


@dataclass
class ManagedProcess:
    name: str
    args: list[str]
    log_path: Path
    proc: subprocess.Popen
    node: str | None = None  # a worker's Celery node name (before @host)
    started_at: float = field(default_factory=time.time)

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
        return "\n".join(self.log().splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL the whole process group: what a crash or the OOM killer does."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> None:
        stop_process(self.proc, timeout)

    def wait_for_log(self, needle: str, timeout: float = STARTUP_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.log():
                return
            if not self.alive:
                raise RuntimeError(
                    f"{self.name} exited with code {self.proc.returncode} before logging {needle!r}:\n{self.tail()}"
                )
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} did not log {needle!r} within {timeout:g}s:\n{self.tail()}")

    def __repr__(self) -> str:
        return f"<{self.name} pid={self.proc.pid} {'alive' if self.alive else 'exited'}>"


class Stack:
    """Processes of one gpujobs deployment; ``env`` carries its GPUJOBS_* settings."""

    def __init__(self, env: dict[str, str], log_dir: Path, label: str = "session") -> None:
        self.env = {**env, "PYTHONUNBUFFERED": "1"}
        self.log_dir = log_dir
        self.label = label
        self.processes: list[ManagedProcess] = []

    def _start(self, name: str, args: list[str]) -> ManagedProcess:
        log_path = self.log_dir / f"{name}.log"
        proc = start_process(args, log_path, env=self.env, cwd=ROOT)
        managed = ManagedProcess(name=name, args=args, log_path=log_path, proc=proc)
        self.processes.append(managed)
        STARTED.append(managed)
        return managed

    def start_worker(
        self, queues: str = "gpu", concurrency: int = 2, name: str | None = None, wait: bool = True
    ) -> ManagedProcess:
        name = name or f"{self.label}-{queues.replace(',', '-')}-{secrets.token_hex(3)}"
        args = [*gpujobs_command(), "worker", "--queues", queues, "--concurrency", str(concurrency), "--name", name]
        worker = self._start(f"worker-{name}", args)
        worker.node = name
        if wait:
            self.wait_worker_ready(worker)
        return worker

    def wait_worker_ready(self, worker: ManagedProcess, timeout: float = STARTUP_TIMEOUT) -> None:
        # Celery logs "<name>@<host> ready." once its consumers are running.
        worker.wait_for_log(f"{worker.node}@", timeout)
        worker.wait_for_log(" ready.", timeout)

    def start_beat(self) -> ManagedProcess:
        beat = self._start(f"beat-{self.label}", [*gpujobs_command(), "beat"])
        beat.wait_for_log("beat: Starting", STARTUP_TIMEOUT)
        return beat

    def start_api(self, workers: int = 1, threads: int = 4) -> tuple[ManagedProcess, str]:
        port = free_port()
        args = [
            *gpujobs_command(), "api",
            "--host", "127.0.0.1", "--port", str(port),
            "--workers", str(workers), "--threads", str(threads),
        ]  # fmt: skip
        api = self._start(f"api-{self.label}", args)
        base_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if not api.alive:
                raise RuntimeError(f"the API server exited with code {api.proc.returncode}:\n{api.tail()}")
            try:
                if requests.get(f"{base_url}/healthz", timeout=1).status_code == 200:
                    return api, base_url
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"the API server did not answer /healthz within {STARTUP_TIMEOUT:g}s:\n{api.tail()}")

    def stop_all(self) -> None:
        # Workers first finish (or drop) what they run; stop them all at once, not one after another.
        for process in self.processes:
            if process.alive:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for process in self.processes:
            process.stop(timeout=15)
