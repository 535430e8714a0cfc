"""Docker from the deploy tests: the ``docker`` command, host networking only, every container labelled.

Every container a run starts carries the label ``gpujobs.test=<run id>``, so that ``remove_all`` finds and
removes them (with their anonymous volumes) whatever happened in between, a failed assertion included.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

API_IMAGE = "gpujobs-api:latest"
WORKER_IMAGE = "gpujobs-worker:latest"
LABEL = "gpujobs.test"


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``docker ARGS`` with its output captured; raises with that output when it fails and ``check``."""
    if shutil.which("docker") is None:
        raise AssertionError("no docker command here: `make deploy-test` installs docker.io and starts dockerd")
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def timestamp(text: str) -> datetime:
    """Docker's RFC 3339 time (nanoseconds, ``Z``) as a datetime (microseconds)."""
    return datetime.fromisoformat(re.sub(r"(\.\d{6})\d*", r"\1", text).replace("Z", "+00:00"))


def inspect(ref: str, kind: str = "container") -> dict[str, Any]:
    document: list[dict[str, Any]] = json.loads(docker(kind, "inspect", ref).stdout)
    return document[0]


@dataclass
class Containers:
    """The containers of one test run: started with ``run``, all removed by ``remove_all``."""

    run_id: str
    env: dict[str, str] = field(default_factory=dict)  # given to every container

    def args(self, env: dict[str, str], mounts: Sequence[str], read_only: bool) -> list[str]:
        args = ["--network", "host", "--label", f"{LABEL}={self.run_id}"]
        if read_only:  # only the image's volume (and a tmpfs /tmp) is writable
            args += ["--read-only", "--tmpfs", "/tmp"]
        for name, value in {**self.env, **env}.items():
            args += ["--env", f"{name}={value}"]
        for mount in mounts:
            args += ["--volume", mount]
        return args

    def once(
        self,
        image: str,
        *command: str,
        env: dict[str, str] | None = None,
        read_only: bool = True,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``command`` in a new container of ``image`` to its end (removed after); not checked."""
        return docker(
            "run", "--rm", *self.args(env or {}, (), read_only), image, *command, timeout=timeout, check=False
        )

    def start(
        self,
        name: str,
        image: str,
        *command: str,
        env: dict[str, str] | None = None,
        mounts: Sequence[str] = (),
        read_only: bool = True,
    ) -> str:
        """Start a detached container ``<name>-<run id>``; returns its name."""
        full = f"{name}-{self.run_id}"
        docker("run", "--detach", "--name", full, *self.args(env or {}, mounts, read_only), image, *command)
        return full

    def running(self, name: str) -> bool:
        return bool(inspect(name)["State"]["Running"])

    def logs(self, name: str, tail: int = 60) -> str:
        done = docker("logs", "--tail", str(tail), name, check=False)
        return f"--- {name} (last {tail} lines) ---\n{done.stdout}{done.stderr}"

    def healthy_after(self, name: str, timeout: float) -> float:
        """Wait until docker reports the container's HEALTHCHECK healthy; returns the seconds from the
        container's start to the end of its first passing probe (docker keeps the last five probes)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = inspect(name)["State"]
            health = state.get("Health") or {}
            if health.get("Status") == "healthy":
                probes = health["Log"]
                assert len(probes) < 5, f"more probes than docker keeps: the first passing one is gone ({probes})"
                passed = next(probe for probe in probes if probe["ExitCode"] == 0)
                return (timestamp(passed["End"]) - timestamp(state["StartedAt"])).total_seconds()
            assert state["Running"], f"{name} exited\n{self.logs(name)}"
            time.sleep(0.5)
        raise AssertionError(f"{name} not healthy within {timeout:g}s\n{self.logs(name)}")

    def all_logs(self) -> str:
        names = docker("ps", "--all", "--filter", f"label={LABEL}={self.run_id}", "--format", "{{.Names}}").stdout
        return "\n".join(self.logs(name) for name in names.split())

    def remove_all(self) -> None:
        """Remove every container of this run, running or not, with its anonymous volumes."""
        ids = docker("ps", "--all", "--quiet", "--filter", f"label={LABEL}={self.run_id}", check=False).stdout.split()
        if ids:
            docker("rm", "--force", "--volumes", *ids, check=False)
