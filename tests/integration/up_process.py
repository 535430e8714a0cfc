"""`gpujobs up` as a user starts it, for the tests of it: nothing configured (every service embedded),
its own var dir, output to a log file, in a process group of its own (so a test can SIGINT it all)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from gpujobs.harness.processes import gpujobs_command
from tests.integration.conftest import ROOT


def launch_up(
    var: Path, port: int, admin_key: str | None, log_path: Path, *, demo: bool = False, **settings: str
) -> subprocess.Popen[bytes]:
    """Start ``gpujobs up --port PORT [--demo]`` with only ``settings`` (and the var dir) configured.

    ``admin_key`` is given as ``GPUJOBS_ADMIN_KEY``; None leaves it unset, as ``make up`` does, so ``up``
    makes one and keeps it in ``var/admin-key``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUJOBS_")}  # nothing configured: all embedded
    env.update(settings, GPUJOBS_VAR_DIR=str(var), PYTHONUNBUFFERED="1")
    if admin_key is not None:
        env["GPUJOBS_ADMIN_KEY"] = admin_key
    with log_path.open("w") as log:
        return subprocess.Popen(
            [*gpujobs_command(), "up", "--port", str(port), *(["--demo"] if demo else [])],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
