"""Helpers of the storage fault tests: an S3 server of the test's own that it may kill, freeze and restart,
workers pointed at it, and checks that what the database recorded is what storage holds.

The session's S3 (the ``services`` fixture) is never touched: other tests use it.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpujobs.harness.processes import ManagedProcess, Stack, signal_group
from gpujobs.harness.servers import EmbeddedS3, start_s3


class PrivateS3:
    """``weed mini`` on a data folder of the test's own; killed, frozen and restarted on the same folder and port."""

    def __init__(self, data_dir: Path, bucket: str) -> None:
        self.data_dir = data_dir
        self.bucket = bucket
        self.server: EmbeddedS3 = start_s3(data_dir)
        self.server.client().create_bucket(Bucket=bucket)

    @property
    def env(self) -> dict[str, str]:
        return {
            "GPUJOBS_S3_ENDPOINT_URL": self.server.endpoint_url,
            "GPUJOBS_S3_ACCESS_KEY": self.server.access_key,
            "GPUJOBS_S3_SECRET_KEY": self.server.secret_key,
            "GPUJOBS_S3_BUCKET": self.bucket,
        }

    def kill(self) -> None:
        self.server.kill()

    def restart(self) -> None:
        """The same data folder on the same ports (the workers' endpoint does not change)."""
        self.server.restart()

    def freeze(self) -> None:
        self.server.freeze()

    def thaw(self) -> None:
        self.server.thaw()

    def read(self, key: str) -> bytes:
        data: bytes = self.server.client().get_object(Bucket=self.bucket, Key=key)["Body"].read()
        return data

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture
def private_s3(tmp_path: Path) -> Iterator[PrivateS3]:
    s3 = PrivateS3(tmp_path / "s3", bucket="gpujobs-faults")
    try:
        yield s3
    finally:
        s3.stop()


class Workers:
    """Workers of the session's deployment (database, broker, reconciler) with settings of the test's own."""

    def __init__(self, log_dir: Path, var_dir: Path) -> None:
        self.log_dir = log_dir
        self.var_dir = var_dir
        self.started: list[ManagedProcess] = []

    def start(self, env: dict[str, str], concurrency: int = 1, wait: bool = True) -> ManagedProcess:
        stack = Stack(
            {**os.environ, "GPUJOBS_VAR_DIR": str(self.var_dir), **env},
            self.log_dir,
            label=f"faults-{secrets.token_hex(2)}",
        )
        worker = stack.start_worker("gpu", concurrency=concurrency, wait=wait)
        self.started.append(worker)
        return worker

    def spooled(self) -> list[Path]:
        """Files left in the workers' spool (outputs storage has not taken yet)."""
        spool = self.var_dir / "spool"
        return sorted(path for path in spool.rglob("*") if path.is_file()) if spool.exists() else []

    def stop_all(self) -> None:
        for worker in self.started:
            signal_group(worker.proc, signal.SIGCONT)  # a frozen worker cannot die of SIGKILL's reaping wait
            if worker.alive:
                worker.kill()


@pytest.fixture
def fault_workers(no_gpu_worker: Any, tmp_path: Path) -> Iterator[Workers]:
    """Nothing else serves the gpu queue; the workers the test starts are killed at its end."""
    workers = Workers(tmp_path / "logs", tmp_path / "var")
    try:
        yield workers
    finally:
        workers.stop_all()


def recorded_artifacts(job_id: str) -> list[dict[str, Any]]:
    from sqlalchemy import select

    from db.models import Artifact
    from db.session import session_scope

    with session_scope() as session:
        rows = session.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.id)).all()
        return [{"name": r.name, "key": r.storage_key, "size": r.size, "sha256": r.sha256} for r in rows]


def assert_artifacts_match_storage(job: dict[str, Any], read: Any) -> list[dict[str, Any]]:
    """Every artifact the job recorded is under its winning attempt's keys, and storage holds exactly the bytes
    whose size and sha256 were recorded; returns the rows."""
    rows = recorded_artifacts(job["id"])
    assert rows, f"job {job['id']} recorded no artifact"
    for row in rows:
        assert row["key"].startswith(f"jobs/{job['id']}/{job['attempts']}/"), row
        data = read(row["key"])
        assert (len(data), hashlib.sha256(data).hexdigest()) == (row["size"], row["sha256"]), row
    return rows
