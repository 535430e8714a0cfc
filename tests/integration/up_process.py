"""`gpujobs up` as a user starts it, for the tests of it: nothing configured (every service embedded),
its own var dir, output to a log file, in a process group of its own (so a test can SIGINT it all)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from gpujobs.harness.processes import gpujobs_command
from tests.integration.conftest import ROOT


def launch_up(var: Path, port: int, admin_key: str, log_path: Path, **settings: str) -> subprocess.Popen[bytes]:
    """Start ``gpujobs up --port PORT`` with only ``settings`` (and the var dir and admin key) configured."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUJOBS_")}  # nothing configured: all embedded
    env.update(settings, GPUJOBS_VAR_DIR=str(var), GPUJOBS_ADMIN_KEY=admin_key, PYTHONUNBUFFERED="1")
    with log_path.open("w") as log:
        return subprocess.Popen(
            [*gpujobs_command(), "up", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
