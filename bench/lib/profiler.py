"""py-spy recordings of a benchmark's server processes while one phase runs, to see where their time goes."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path

from gpujobs.harness.processes import start_process, stop_process


class Profiler:
    """Optional py-spy recordings (collapsed stacks) of the API and worker processes during a phase."""

    def __init__(self, py_spy: str | None, out_dir: Path | None) -> None:
        self.py_spy, self.out_dir = py_spy, out_dir
        self.targets: dict[str, int] = {}  # label -> pid (a gunicorn master: its workers are included)

    @contextlib.contextmanager
    def record(self, phase: str, system: str) -> Iterator[None]:
        if not (self.py_spy and self.out_dir):
            yield
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        recorders = []
        for label, pid in self.targets.items():
            if not label.startswith(system):
                continue
            out = self.out_dir / f"{phase}-{label.replace(' ', '-')}.txt"
            args = [
                self.py_spy,
                "record",
                "--pid",
                str(pid),
                "--subprocesses",
                "--nonblocking",
                "--gil",
                "--rate",
                "250",
                "--format",
                "raw",
                "--output",
                str(out),
            ]
            recorders.append(start_process(args, self.out_dir / "py-spy.log"))
        time.sleep(0.5 if recorders else 0)  # let py-spy attach
        try:
            yield
        finally:
            for proc in recorders:
                proc.send_signal(signal.SIGINT)
            for proc in recorders:
                with contextlib.suppress(Exception):
                    proc.wait(15)
                stop_process(proc)
