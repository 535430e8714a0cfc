"""Outputs and timeline events fenced by the attempt, bounded storage calls, and riding out a storage outage.

The database is the migrated SQLite file of the unit layer; the "storage" of the bounded-call tests is a
closed loopback port (connection refused) or a loopback listener that never answers (a hung S3): no
service is started, and the retry loop is driven with plain callables that fail as an outage does.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from db import transitions
from db.models import Artifact, EventKind, Job, JobEvent
from db.settings import Settings
from db.storage import Storage, StorageError, StorageUnavailable, StoredObject, _storage_error
from tests.unit.test_context import Clock, context, expire_lease, running_job
from worker import checkpoints
from worker.context import Canceled, LeaseLost, StorageGaveUp


def _artifact(attempt: int) -> dict[str, Any]:
    return {
        "name": "diagnostic.json",
        "content_type": "application/json",
        "size": attempt,
        "sha256": str(attempt) * 64,
        "storage_key": f"jobs/j/{attempt}/diagnostic.json",
    }


def _second_attempt(sessions: Any, job_id: str, attempt: int) -> int:
    """The first attempt's lease runs out, the job is requeued and claimed again: the new attempt's number."""
    with sessions() as session:
        expire_lease(session, job_id)
        assert transitions.requeue(session, job_id, attempt, "lease expired")
        claim = transitions.claim(session, job_id, "worker-2", lease_seconds=30)
        session.commit()
    assert claim is not None
    return claim.attempt


def _events(sessions: Any, job_id: str, kind: EventKind) -> list[tuple[int, str | None]]:
    with sessions() as session:
        rows = session.execute(
            select(JobEvent.attempt, JobEvent.message)
            .where(JobEvent.job_id == job_id, JobEvent.kind == kind.value)
            .order_by(JobEvent.id)
        ).all()
    return [(row.attempt, row.message) for row in rows]


# --- the fence in the database ------------------------------------------------------------------------


def test_owns_is_true_for_the_running_attempt_only(sessions):
    job_id, first = running_job(sessions)
    with sessions() as session:
        assert transitions.owns(session, job_id, first)
        assert not transitions.owns(session, job_id, first + 1)
    second = _second_attempt(sessions, job_id, first)
    with sessions() as session:
        assert not transitions.owns(session, job_id, first)
        assert transitions.owns(session, job_id, second)
        assert transitions.succeed(session, job_id, second, {}, {})
        session.commit()
    with sessions() as session:
        assert not transitions.owns(session, job_id, second), "a finished job is nobody's"


def test_a_stale_attempt_cannot_change_a_finished_jobs_artifacts(sessions):
    job_id, first = running_job(sessions)
    second = _second_attempt(sessions, job_id, first)
    with sessions() as session:
        assert transitions.succeed(session, job_id, second, {"attempt": second}, {"step": 1}, [_artifact(second)])
        session.commit()
    with sessions() as session:  # the thawed first attempt finishes too, and is told it lost
        assert not transitions.succeed(session, job_id, first, {"attempt": first}, {"step": 9}, [_artifact(first)])
        assert not transitions.fail(session, job_id, first, "late", "late")
        session.commit()
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.output == {"attempt": second} and job.progress == {"step": 1}
        rows = session.execute(select(Artifact.storage_key, Artifact.sha256).where(Artifact.job_id == job_id)).all()
    assert [tuple(r) for r in rows] == [(f"jobs/j/{second}/diagnostic.json", str(second) * 64)]
    assert [attempt for attempt, _ in _events(sessions, job_id, EventKind.STORED)] == [second]


def test_progress_milestones_and_resumed_events_of_a_stale_attempt_are_not_recorded(sessions, database_url):
    job_id, first = running_job(sessions)
    stale = context(database_url, job_id, first, Clock())
    stale.progress(1, 4, "warming up")
    second = _second_attempt(sessions, job_id, first)
    current = context(database_url, job_id, second, Clock())
    current.progress(1, 4, "warming up")

    stale.progress(2, 4, "denoising")  # a new stage, from the attempt that lost the job
    assert stale.should_stop()
    with pytest.raises(LeaseLost):
        stale.check()
    found = checkpoints.Checkpoint(step=1, key="k", attempt=first, details={})
    stale.resumed(found, load_seconds=0.1)
    current.resumed(found, load_seconds=0.1)
    assert _events(sessions, job_id, EventKind.PROGRESS) == [(first, "warming up"), (second, "warming up")]
    assert [attempt for attempt, _ in _events(sessions, job_id, EventKind.RESUMED)] == [second]
    current.check()  # the running attempt is not disturbed


def test_a_stale_attempt_stops_before_it_stores_anything(sessions, database_url, tmp_path):
    job_id, first = running_job(sessions)
    # An endpoint where nothing listens: had the stale attempt tried to store, it would have spooled.
    stale = context(database_url, job_id, first, Clock(), s3_endpoint_url=_closed_port_url(), var_dir=tmp_path)
    _second_attempt(sessions, job_id, first)
    with pytest.raises(LeaseLost):
        stale.store("diagnostic.json", b"{}", "application/json")
    assert stale.stored == {} and not (tmp_path / "spool").exists()
    stale.drop_scratch()  # nothing to delete for a stale attempt: no storage call at all


def test_each_attempt_stores_under_its_own_keys(sessions, database_url):
    job_id, first = running_job(sessions)
    ctx = context(database_url, job_id, first, Clock())
    assert ctx.output_prefix == f"jobs/{job_id}/{first}/"
    assert context(database_url, job_id, first + 1, Clock()).output_prefix == f"jobs/{job_id}/{first + 1}/"


class Recorded:
    """Storage that keeps what is put (the fence, not S3, is under test here)."""

    def __init__(self) -> None:
        self.keys: list[str] = []

    def put(self, key: str, data: bytes, content_type: str) -> StoredObject:
        self.keys.append(key)
        return StoredObject(key=key, size=len(data), sha256="0" * 64, content_type=content_type)


def test_a_store_is_fenced_before_and_at_the_next_check_not_after(sessions, database_url, monkeypatch):
    storage = Recorded()
    monkeypatch.setattr("worker.context.get_storage", lambda _settings: storage)
    job_id, first = running_job(sessions)
    ctx = context(database_url, job_id, first, Clock())
    reads = []
    owns = transitions.owns
    monkeypatch.setattr(transitions, "owns", lambda *args: reads.append(args[1:]) or owns(*args))
    ctx.store("a.json", b"{}", "application/json")
    assert reads == [(job_id, first)], "one fenced read, before the put"
    ctx.check(fence=False)  # the runner's check before the success (fenced itself): no read
    assert len(reads) == 1
    _second_attempt(sessions, job_id, first)  # the job moved on while the stored attempt went on
    with pytest.raises(LeaseLost):
        ctx.check()  # the next step reads the fence and stops
    assert len(reads) == 2 and storage.keys == [f"jobs/{job_id}/{first}/a.json"]
    with pytest.raises(LeaseLost):
        ctx.store("b.json", b"{}", "application/json")
    assert storage.keys == [f"jobs/{job_id}/{first}/a.json"], "nothing more stored by the stale attempt"


# --- riding out an outage ----------------------------------------------------------------------------


class Outage:
    """A storage call that fails as an outage does ``failures`` times, then answers."""

    def __init__(self, failures: int, error: StorageError | None = None) -> None:
        self.failures = failures
        self.calls = 0
        self.error = error or StorageUnavailable("connection refused")

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "stored"


def test_an_outage_is_retried_until_storage_answers_and_the_deadline_moves_with_it(sessions, database_url):
    job_id, attempt = running_job(sessions)
    ctx = context(database_url, job_id, attempt, time.monotonic, storage_retry_window_seconds=30)  # type: ignore[arg-type]
    deadline = ctx.deadline
    outage = Outage(failures=2)
    assert ctx._riding_out_outages("store k", outage) == "stored"
    assert outage.calls == 3
    assert ctx.deadline > deadline, "time spent waiting on storage is not counted against the job's deadline"


def test_storage_that_stays_down_past_the_window_gives_up(sessions, database_url):
    job_id, attempt = running_job(sessions)
    ctx = context(database_url, job_id, attempt, time.monotonic, storage_retry_window_seconds=1)  # type: ignore[arg-type]
    outage = Outage(failures=1000)
    started = time.monotonic()
    with pytest.raises(StorageGaveUp) as raised:
        ctx._riding_out_outages("store k", outage)
    assert 1 <= time.monotonic() - started < 3
    assert raised.value.seconds == 1 and "connection refused" in str(raised.value)
    assert outage.calls >= 2


def test_an_error_that_is_not_an_outage_is_not_retried(sessions, database_url):
    job_id, attempt = running_job(sessions)
    ctx = context(database_url, job_id, attempt, Clock(), storage_retry_window_seconds=600)
    missing = Outage(failures=1, error=StorageError("could not read k: NoSuchKey"))
    with pytest.raises(StorageError, match="NoSuchKey"):
        ctx._riding_out_outages("read k", missing)
    assert missing.calls == 1


@pytest.mark.parametrize("event", ["lease lost", "cancel"])
def test_a_lost_lease_or_a_cancel_ends_the_wait_at_once(sessions, database_url, event):
    job_id, attempt = running_job(sessions)
    ctx = context(database_url, job_id, attempt, time.monotonic, storage_retry_window_seconds=600)  # type: ignore[arg-type]
    with sessions() as session:
        if event == "cancel":
            transitions.request_cancel(session, job_id)
        else:
            expire_lease(session, job_id)
            assert transitions.requeue(session, job_id, attempt, "lease expired")
        session.commit()
    ctx.start()  # the control thread sees it within a poll and wakes the waiting job
    started = time.monotonic()
    try:
        with pytest.raises(Canceled if event == "cancel" else LeaseLost):
            ctx._riding_out_outages("store k", Outage(failures=1000))
    finally:
        ctx.close()
    assert time.monotonic() - started < 5


# --- bounded storage calls, errors as StorageError ----------------------------------------------------


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # closed again: connecting is refused


class HungEndpoint:
    """A loopback port that accepts connections and never answers, like a frozen (SIGSTOPped) S3."""

    def __init__(self) -> None:
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(64)
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.held: list[socket.socket] = []  # one connection per try: a timed-out one is not reused
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        self.server.settimeout(0.1)
        while not self.stop.is_set():
            try:
                self.held.append(self.server.accept()[0])
            except OSError:
                continue

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        for conn in self.held:
            conn.close()
        self.server.close()


@pytest.fixture
def hung_endpoint() -> Iterator[HungEndpoint]:
    endpoint = HungEndpoint()
    yield endpoint
    endpoint.close()


def _storage(endpoint: str, **settings: Any) -> Storage:
    return Storage(
        Settings(s3_endpoint_url=endpoint, s3_access_key="k", s3_secret_key="s", s3_bucket="bucket", **settings)
    )


def test_every_call_to_a_refusing_storage_raises_storage_unavailable_quickly():
    storage = _storage(_closed_port_url())
    calls = {
        "put": lambda: storage.put("k", b"x", "text/plain"),
        "get": lambda: storage.get("k"),
        "delete": lambda: storage.delete("k"),
        "delete_prefix": lambda: storage.delete_prefix("jobs/"),
        "ping": storage.ping,
        "ensure_bucket": storage.ensure_bucket,
    }
    for name, call in calls.items():
        started = time.monotonic()
        with pytest.raises(StorageUnavailable):
            call()
        assert time.monotonic() - started < 5, name
    assert storage.presigned_url("k").startswith(storage.settings.s3_endpoint_url or "")  # signed locally


def test_a_hung_storage_is_given_up_on_within_the_timeouts_and_attempts(hung_endpoint):
    storage = _storage(hung_endpoint.url, s3_read_timeout_seconds=0.5, s3_max_attempts=2)
    started = time.monotonic()
    with pytest.raises(StorageUnavailable, match="timeout"):
        storage.put("k", b"x", "text/plain")
    took = time.monotonic() - started
    # Exactly s3_max_attempts tries (each on a fresh connection), each bounded: a PutObject waits up
    # to 1 s for the server's "100 Continue" (botocore's Expect header), then the 0.5 s read timeout.
    # About 3.1 s on a quiet machine; the ceiling is for a loaded CI host (4.0 s seen), not a third try.
    assert len(hung_endpoint.held) == 2, f"{len(hung_endpoint.held)} tries, not s3_max_attempts=2"
    assert 2.0 <= took < 8, f"two tries of 1 s + 0.5 s each, not {took:.1f} s"
    tries_before = len(hung_endpoint.held)
    started = time.monotonic()
    with pytest.raises(StorageUnavailable):
        storage.ping(timeout=0.3)  # one try, with the probe's own timeout (not the 0.5 s read timeout, twice)
    took = time.monotonic() - started
    assert len(hung_endpoint.held) == tries_before + 1, "the probe tries once"
    assert took < 2.0, f"one try of 0.3 s, not {took:.1f} s"


def test_errors_are_classified_as_outages_or_not():
    from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

    def client_error(status: int, code: str) -> ClientError:
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")

    assert isinstance(_storage_error("x", client_error(503, "SlowDown")), StorageUnavailable)
    assert isinstance(_storage_error("x", client_error(500, "InternalError")), StorageUnavailable)
    assert isinstance(_storage_error("x", EndpointConnectionError(endpoint_url="http://s3")), StorageUnavailable)
    assert isinstance(_storage_error("x", ReadTimeoutError(endpoint_url="http://s3")), StorageUnavailable)
    for status, code in ((404, "NoSuchKey"), (403, "AccessDenied"), (400, "InvalidBucketName")):
        error = _storage_error("x", client_error(status, code))
        assert type(error) is StorageError, code


def test_the_spool_of_an_attempt_and_of_earlier_dead_ones_is_removed_when_it_ends(
    sessions, database_url, tmp_path: Path
):
    job_id, attempt = running_job(sessions)
    crashed = context(database_url, job_id, attempt, Clock(), var_dir=tmp_path)
    left = crashed._spool(f"jobs/{job_id}/{attempt}/out.png", b"old")  # its process died: never closed
    ctx = context(database_url, job_id, attempt + 1, Clock(), var_dir=tmp_path)
    spooled = ctx._spool(f"jobs/{job_id}/{attempt + 1}/out.png", b"png")
    assert spooled.read_bytes() == b"png" and spooled.is_relative_to(tmp_path / "spool" / job_id / str(attempt + 1))
    assert left.exists()
    ctx.close()
    assert not (tmp_path / "spool" / job_id).exists(), "this attempt's spool and the dead one's are removed"
