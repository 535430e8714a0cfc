"""A real Prometheus (Debian's ``prometheus`` package) for the tests: started on loopback with a
configuration file the test writes, a one-second scrape interval and its TSDB in a temporary folder;
queried through its HTTP API. ``make test`` installs the package (the ``prometheus`` target); without
it the tests that need it fail and say how to get it, they never skip."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from gpujobs.harness.ports import free_port
from gpujobs.harness.processes import ManagedProcess, Stack


def binary(name: str) -> str:
    """``prometheus`` or ``promtool``: GPUJOBS_TEST_PROMETHEUS_DIR's, else the one on PATH."""
    folder = os.environ.get("GPUJOBS_TEST_PROMETHEUS_DIR")
    found = str(Path(folder) / name) if folder else shutil.which(name)
    if not found or not Path(found).is_file():
        pytest.fail(
            f"`{name}` not found: run `make prometheus` (Debian's prometheus package), or set "
            "GPUJOBS_TEST_PROMETHEUS_DIR to the folder that holds it",
            pytrace=False,
        )
    return found


def promtool(*args: str, stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [binary("promtool"), *args], input=stdin, capture_output=True, text=True, timeout=60, cwd=cwd, check=False
    )


class Prometheus:
    def __init__(self, url: str, process: ManagedProcess) -> None:
        self.url = url
        self.process = process

    def get(self, path: str, **params: Any) -> Any:
        response = requests.get(f"{self.url}{path}", params=params, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params = {"query": expr} | ({"time": f"{at:.3f}"} if at is not None else {})
        result: list[dict[str, Any]] = self.get("/api/v1/query", **params)["result"]
        return result

    def scalar(self, expr: str, at: float | None = None) -> float:
        """The one sample ``expr`` gives (failing when it gives none or several)."""
        result = self.query(expr, at)
        assert len(result) == 1, f"{expr}: {result}"
        return float(result[0]["value"][1])

    def wait(self, what: str, check: Any, timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                found = check()
            except (requests.RequestException, AssertionError, ValueError, KeyError):
                found = None
            if found:
                return found
            time.sleep(0.25)
        pytest.fail(f"Prometheus at {self.url}: {what} within {timeout:.0f} s\n{self.process.tail()}")


def start_prometheus(
    stack: Stack, root: Path, jobs: dict[str, tuple[str, str]], rule_files: Sequence[str] = ()
) -> Prometheus:
    """Prometheus scraping ``jobs`` (job name → (target host:port, metrics path)) every second."""
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": list(rule_files),
        "scrape_configs": [
            {"job_name": name, "metrics_path": path, "static_configs": [{"targets": [target]}]}
            for name, (target, path) in jobs.items()
        ],
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    args = [
        binary("prometheus"),
        f"--config.file={root / 'prometheus.yml'}",
        f"--storage.tsdb.path={root / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    process = stack.start(f"prometheus-{stack.label}", args)
    server = Prometheus(f"http://127.0.0.1:{port}", process)
    server.wait("ready", lambda: requests.get(f"{server.url}/-/ready", timeout=2).ok)
    return server
