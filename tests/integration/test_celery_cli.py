"""Celery's own command line reaches the workers through ``worker.main`` (README: Flower beside it)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.integration.conftest import ROOT


def test_celery_inspect_through_worker_main_sees_the_running_workers(cluster, gpu_worker):
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker.main", "inspect", "ping", "--timeout", "5"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "session-maintenance@" in result.stdout and "pong" in result.stdout, result.stdout
