"""How the tests run a benchmark script: ``python -m bench.<name>`` in a subprocess, as from a shell.

The environment drops this test process's ``GPUJOBS_*`` settings, so the benchmark starts its own
services as it would for a user, and puts the repository on ``PYTHONPATH``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_bench(module: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUJOBS_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO
    )
