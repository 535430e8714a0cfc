"""The job state machine (db/transitions.py) on a real SQLite file made by the migrations.

Every transition is a conditional UPDATE: these tests drive each one from every state, check
that the guarded ones refuse (and change nothing) when their condition is false, that a stale
attempt is fenced off, and that two sessions (two connections) racing for the same job never
both win.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, update

from db import clock, transitions
from db.models import Artifact, Job, JobEvent, JobStatus, Tenant, WebhookDelivery, utcnow
from db.settings import Settings
from db.transitions import LeaseState, TransitionError
from worker import checkpoints

LEASE = 30.0
EXPIRED = -1.0  # a lease that ran out a second before it was granted: the reconciler may take the job


# --- helpers -------------------------------------------------------------------------------------


@pytest.fixture
def db(sessions):  # type: ignore[no-untyped-def]
    session = sessions()
    yield session
    session.rollback()
    session.close()


@pytest.fixture
def tenant_id(db) -> str:  # type: ignore[no-untyped-def]
    tenant = Tenant(name="unit")
    db.add(tenant)
    db.commit()
    return tenant.id


@pytest.fixture
def new_job(db, tenant_id: str) -> Callable[..., str]:  # type: ignore[no-untyped-def]
    def make(**fields: Any) -> str:
        job = Job(
            tenant_id=tenant_id,
            type="diagnostic",
            queue="gpu",
            input={"n": 1},
            max_attempts=3,
            deadline_seconds=60.0,
            **fields,
        )
        transitions.create(db, job)
        db.commit()
        return job.id

    return make


def row(session, job_id: str) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """The job's row as the database has it now (Core read: no identity map in the way)."""
    return dict(session.execute(select(Job.__table__).where(Job.id == job_id)).mappings().one())


def events(session, job_id: str) -> list[tuple[str, int]]:  # type: ignore[no-untyped-def]
    rows = session.execute(
        select(JobEvent.kind, JobEvent.attempt).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
    )
    return [(kind, attempt) for kind, attempt in rows]


def event_messages(session, job_id: str) -> list[str | None]:  # type: ignore[no-untyped-def]
    return list(session.scalars(select(JobEvent.message).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))


def deliveries(session, job_id: str) -> list[tuple[str, int, str]]:  # type: ignore[no-untyped-def]
    rows = session.execute(
        select(WebhookDelivery.event, WebhookDelivery.sequence, WebhookDelivery.payload)
        .where(WebhookDelivery.job_id == job_id)
        .order_by(WebhookDelivery.created_at, WebhookDelivery.id)
    )
    return [(event, sequence, payload["status"]) for event, sequence, payload in rows]


def in_state(db, new_job, state: str) -> str:  # type: ignore[no-untyped-def]
    """A committed job in ``state``; a running one is at attempt 1."""
    job_id = new_job()
    if state == "queued":
        return job_id
    if state == "canceled":
        assert transitions.request_cancel(db, job_id) is JobStatus.CANCELED
        db.commit()
        return job_id
    lease = EXPIRED if state == "running_expired" else LEASE
    assert transitions.claim(db, job_id, "w1", lease) is not None
    if state == "succeeded":
        assert transitions.succeed(db, job_id, 1, {"ok": True}, {"step": 1})
    elif state == "failed":
        assert transitions.fail(db, job_id, 1, "boom", "it broke")
    db.commit()
    return job_id


# --- each transition from each state ---------------------------------------------------------------

STATES = ["queued", "running", "running_expired", "succeeded", "failed", "canceled"]

# transition name → (call with attempt 1, the states it is allowed from, the status it leads to)
TRANSITIONS: dict[str, tuple[Callable[[Any, str], Any], set[str], str | None]] = {
    "claim": (lambda s, j: transitions.claim(s, j, "w2", LEASE), {"queued"}, "running"),
    "renew_lease": (
        lambda s, j: transitions.renew_lease(s, j, 1, LEASE, {"step": 7}),
        {"running", "running_expired"},
        None,
    ),
    "succeed": (
        lambda s, j: transitions.succeed(s, j, 1, {"ok": 1}, {"step": 2}),
        {"running", "running_expired"},
        "succeeded",
    ),
    "fail": (lambda s, j: transitions.fail(s, j, 1, "job_failed", "no"), {"running", "running_expired"}, "failed"),
    "cancel": (lambda s, j: transitions.cancel(s, j, 1), {"running", "running_expired"}, "canceled"),
    "requeue": (lambda s, j: transitions.requeue(s, j, 1, "lost"), {"running_expired"}, "queued"),
    "give_up": (lambda s, j: transitions.give_up(s, j, 1, "lost for good"), {"running_expired"}, "failed"),
    "retry": (lambda s, j: transitions.retry(s, j, 2, "admin"), {"failed", "canceled"}, "queued"),
    "checkpointed": (
        lambda s, j: checkpoints.record(s, j, 1, LEASE, 5, "ckpt/5", {}),
        {"running", "running_expired"},
        None,
    ),
}


def _won(result: Any) -> bool:
    if isinstance(result, LeaseState):
        return result.owned
    if isinstance(result, transitions.Claim):
        return True
    assert result in (None, False, True), result
    return bool(result)


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("name", sorted(TRANSITIONS))
def test_every_transition_from_every_state(db, new_job, name: str, state: str) -> None:
    call, allowed, leads_to = TRANSITIONS[name]
    job_id = in_state(db, new_job, state)
    before, events_before = row(db, job_id), events(db, job_id)

    result = call(db, job_id)
    db.commit()

    after = row(db, job_id)
    if state not in allowed:
        assert not _won(result), f"{name} from {state} should be refused"
        assert after == before, f"a refused {name} changed the row"
        assert events(db, job_id) == events_before, f"a refused {name} recorded an event"
        return
    assert _won(result), f"{name} from {state} should be allowed"
    assert after["status"] == (leads_to or before["status"])
    assert len(events(db, job_id)) > len(events_before) or name == "renew_lease"


@pytest.mark.parametrize("state", STATES)
def test_request_cancel_from_every_state(db, new_job, state: str) -> None:
    job_id = in_state(db, new_job, state)
    before = row(db, job_id)
    if JobStatus(before["status"]).finished:
        with pytest.raises(TransitionError, match=rf"^it has already finished \({before['status']}\)$"):
            transitions.request_cancel(db, job_id)
        db.rollback()
        assert row(db, job_id) == before
        return
    status = transitions.request_cancel(db, job_id)
    db.commit()
    after = row(db, job_id)
    if state == "queued":
        assert status is JobStatus.CANCELED
        assert after["status"] == "canceled" and after["finished_at"] is not None
        assert events(db, job_id)[-1] == ("canceled", 0)
        assert event_messages(db, job_id)[-1] == "canceled before it ran"
    else:  # running: only flagged; the worker stops it (or the reconciler, if the worker is dead)
        assert status is JobStatus.RUNNING
        assert after["status"] == "running" and after["cancel_requested_at"] is not None
        assert events(db, job_id)[-1] == ("cancel_requested", 1)


# --- each transition in detail -----------------------------------------------------------------------


def test_create_inserts_a_queued_job_and_its_first_event(db, new_job) -> None:
    job_id = new_job()
    job = row(db, job_id)
    assert job_id.startswith("job_")
    assert job["status"] == "queued" and job["attempts"] == 0
    assert job["progress"] == {} and job["metadata"] == {}
    assert job["webhook_events_filter"] == ["completed"]
    assert job["created_at"].tzinfo is not None
    assert events(db, job_id) == [("queued", 0)]


def test_claim_takes_a_queued_job_once(db, new_job) -> None:
    job_id = new_job()
    start = utcnow()
    claim = transitions.claim(db, job_id, "worker-1", LEASE)
    db.commit()
    assert claim is not None and claim.attempt == 1
    assert claim.job.id == job_id and claim.job.status == "running" and claim.job.input == {"n": 1}
    job = row(db, job_id)
    assert job["status"] == "running" and job["attempts"] == 1 and job["worker_id"] == "worker-1"
    # The database's clock (SQLite's here) counts milliseconds.
    ms = timedelta(milliseconds=1)
    assert start - ms <= job["started_at"] <= utcnow()
    assert start - ms + timedelta(seconds=LEASE) <= job["lease_expires_at"] <= utcnow() + timedelta(seconds=LEASE)
    assert events(db, job_id) == [("queued", 0), ("claimed", 1)]
    assert event_messages(db, job_id)[-1] == "claimed by worker-1"

    # A duplicate message for the same job: the second claim finds it running and does nothing.
    assert transitions.claim(db, job_id, "worker-2", LEASE) is None
    assert transitions.claim(db, "job_missing", "worker-2", LEASE) is None
    db.commit()
    assert row(db, job_id)["worker_id"] == "worker-1"
    assert events(db, job_id) == [("queued", 0), ("claimed", 1)]


def test_renew_lease_extends_it_saves_progress_and_reports_a_cancel(db, new_job) -> None:
    job_id = new_job()
    transitions.claim(db, job_id, "w1", 1.0)
    db.commit()
    first_expiry = row(db, job_id)["lease_expires_at"]

    state = transitions.renew_lease(db, job_id, 1, LEASE, {"step": 3, "total": 10})
    db.commit()
    assert state == LeaseState(owned=True, cancel_requested=False)
    job = row(db, job_id)
    assert job["lease_expires_at"] >= first_expiry + timedelta(seconds=LEASE - 1.0)
    assert job["progress"] == {"step": 3, "total": 10}

    assert transitions.renew_lease(db, job_id, 1, LEASE) == LeaseState(owned=True, cancel_requested=False)
    assert row(db, job_id)["progress"] == {"step": 3, "total": 10}, "no progress given: the saved one stays"

    assert transitions.request_cancel(db, job_id) is JobStatus.RUNNING
    db.commit()
    assert transitions.renew_lease(db, job_id, 1, LEASE) == LeaseState(owned=True, cancel_requested=True)
    # Asked twice: still running, still flagged once.
    assert transitions.request_cancel(db, job_id) is JobStatus.RUNNING
    db.commit()
    assert [kind for kind, _ in events(db, job_id)].count("cancel_requested") == 1

    assert transitions.renew_lease(db, job_id, 2, LEASE) == LeaseState(owned=False, cancel_requested=False)


def test_succeed_stores_output_artifacts_and_models(db, new_job, tenant_id: str) -> None:
    job_id = new_job()
    transitions.claim(db, job_id, "w1", LEASE)
    artifact = {
        "name": "out.png",
        "content_type": "image/png",
        "size": 3,
        "sha256": "a" * 64,
        "storage_key": "k/out.png",
    }
    model = {
        "id": "mdl_unit",
        "tenant_id": tenant_id,
        "name": "mine",
        "kind": "lora",
        "base_model": "sd",
        "storage_key": "models/mdl_unit/w.safetensors",
        "size": 10,
        "sha256": "b" * 64,
        "details": {"rank": 4},
    }
    assert transitions.succeed(db, job_id, 1, {"image": "out.png"}, {"step": 4, "total": 4}, [artifact], [model])
    db.commit()
    job = row(db, job_id)
    assert job["status"] == "succeeded" and job["output"] == {"image": "out.png"}
    assert job["progress"] == {"step": 4, "total": 4}
    assert job["finished_at"] is not None and job["lease_expires_at"] is None
    stored = db.execute(select(Artifact.name, Artifact.storage_key).where(Artifact.job_id == job_id)).all()
    assert [tuple(r) for r in stored] == [("out.png", "k/out.png")]
    assert events(db, job_id)[-2:] == [("stored", 1), ("succeeded", 1)]
    assert event_messages(db, job_id)[-2] == "1 artifact(s) stored"
    # The rows and events of the success carry its finished_at (returned by its UPDATE).
    ended = select(JobEvent.at).where(JobEvent.job_id == job_id, JobEvent.kind.in_(["stored", "succeeded"]))
    assert db.scalars(ended).all() == [job["finished_at"]] * 2
    assert db.scalars(select(Artifact.created_at).where(Artifact.job_id == job_id)).all() == [job["finished_at"]]
    from db.models import Model

    assert db.get(Model, "mdl_unit").job_id == job_id

    # Finished is final: neither the same attempt nor anyone else changes it again.
    assert not transitions.succeed(db, job_id, 1, {"again": True}, {})
    assert not transitions.fail(db, job_id, 1, "late", "late")
    db.commit()
    assert row(db, job_id)["output"] == {"image": "out.png"}


def test_fail_records_the_error_and_the_traceback(db, new_job) -> None:
    job_id = new_job()
    transitions.claim(db, job_id, "w1", LEASE)
    assert transitions.fail(db, job_id, 1, "invalid_image", "the input image could not be decoded", "Traceback…")
    db.commit()
    job = row(db, job_id)
    assert job["status"] == "failed"
    assert job["error"] == {"code": "invalid_image", "message": "the input image could not be decoded"}
    assert job["traceback"] == "Traceback…" and job["lease_expires_at"] is None
    assert events(db, job_id)[-1] == ("failed", 1)
    assert db.scalar(select(JobEvent.data).where(JobEvent.job_id == job_id).order_by(JobEvent.id.desc())) == {
        "code": "invalid_image"
    }


def test_cancel_by_the_worker_keeps_the_progress_it_stopped_at(db, new_job) -> None:
    job_id = new_job()
    transitions.claim(db, job_id, "w1", LEASE)
    transitions.request_cancel(db, job_id)
    assert transitions.cancel(db, job_id, 1, progress={"step": 2, "total": 5})
    db.commit()
    job = row(db, job_id)
    assert job["status"] == "canceled" and job["progress"] == {"step": 2, "total": 5}
    assert events(db, job_id)[-2:] == [("cancel_requested", 1), ("canceled", 1)]
    assert event_messages(db, job_id)[-1] == "stopped at the client's request"


def test_requeue_waits_for_the_lease_to_expire_and_fences_the_lost_attempt(db, new_job) -> None:
    job_id = new_job()
    transitions.claim(db, job_id, "w1", LEASE)
    db.commit()
    assert not transitions.requeue(db, job_id, 1, "too early"), "a live lease is never taken away"
    assert not transitions.give_up(db, job_id, 1, "too early")
    db.commit()
    assert row(db, job_id)["status"] == "running"

    transitions.renew_lease(db, job_id, 1, EXPIRED)  # the worker's last renewal, then it went silent
    db.commit()
    assert [j.id for j in transitions.expired_leases(db)] == [job_id]
    assert transitions.requeue(db, job_id, 1, "attempt 1 lost its worker")
    db.commit()
    job = row(db, job_id)
    assert job["status"] == "queued" and job["worker_id"] is None and job["lease_expires_at"] is None
    assert job["attempts"] == 1 and job["dispatched_at"] is None
    assert transitions.expired_leases(db) == []

    claim = transitions.claim(db, job_id, "w2", LEASE)
    db.commit()
    assert claim is not None and claim.attempt == 2

    # The first worker comes back: every move of attempt 1 is refused, attempt 2 is untouched.
    assert transitions.renew_lease(db, job_id, 1, LEASE, {"step": 99}) == LeaseState(False, False)
    assert not checkpoints.record(db, job_id, 1, LEASE, 9, "ckpt/9", {})
    assert not transitions.succeed(db, job_id, 1, {"stale": True}, {})
    assert not transitions.fail(db, job_id, 1, "stale", "stale")
    assert not transitions.cancel(db, job_id, 1)
    db.commit()
    job = row(db, job_id)
    assert job["status"] == "running" and job["worker_id"] == "w2" and job["progress"] == {}

    assert transitions.succeed(db, job_id, 2, {"fresh": True}, {})
    db.commit()
    assert row(db, job_id)["output"] == {"fresh": True}
    assert events(db, job_id) == [("queued", 0), ("claimed", 1), ("requeued", 1), ("claimed", 2), ("succeeded", 2)]


def test_give_up_fails_an_expired_job_as_worker_lost(db, new_job) -> None:
    job_id = new_job()
    transitions.claim(db, job_id, "w1", EXPIRED)
    assert transitions.give_up(db, job_id, 1, "The job's worker stopped responding on each of its 1 attempts")
    db.commit()
    job = row(db, job_id)
    assert job["status"] == "failed"
    assert job["error"] == {
        "code": "worker_lost",
        "message": "The job's worker stopped responding on each of its 1 attempts",
    }
    assert events(db, job_id)[-1] == ("failed", 1)


def test_retry_runs_a_failed_job_again_with_a_fresh_budget(db, new_job) -> None:
    job_id = new_job()
    transitions.claim(db, job_id, "w1", LEASE)
    transitions.renew_lease(db, job_id, 1, LEASE, {"step": 1})
    transitions.fail(db, job_id, 1, "job_failed", "broke", "Traceback: broke")
    db.commit()

    assert transitions.retry(db, job_id, 2, "admin@example")
    db.commit()
    job = row(db, job_id)
    assert job["status"] == "queued" and job["max_attempts"] == 1 + 2
    assert job["error"] is None and job["traceback"] is None and job["output"] is None and job["progress"] == {}
    assert job["started_at"] is None and job["finished_at"] is None
    assert events(db, job_id)[-1] == ("retried", 1)
    data = db.scalar(select(JobEvent.data).where(JobEvent.job_id == job_id).order_by(JobEvent.id.desc()))
    assert data == {
        "previous_status": "failed",
        "previous_error": {"code": "job_failed", "message": "broke"},
        "traceback": "Traceback: broke",
    }
    assert not transitions.retry(db, job_id, 2, "admin@example"), "a queued job is not retried"
    assert not transitions.retry(db, "job_missing", 2, "admin@example")

    claim = transitions.claim(db, job_id, "w2", LEASE)
    assert claim is not None and claim.attempt == 2


def test_checkpoints_are_recorded_by_the_running_attempt_and_found_by_the_next(db, new_job) -> None:
    job_id = new_job()
    assert checkpoints.latest(db, job_id) is None
    transitions.claim(db, job_id, "w1", LEASE)
    assert checkpoints.record(db, job_id, 1, LEASE, 10, "ckpt/10", {"latents_key": "lat"})
    assert checkpoints.record(db, job_id, 1, EXPIRED, 20, "ckpt/20", {"latents_key": "lat"})
    db.commit()
    assert transitions.requeue(db, job_id, 1, "lost")
    transitions.claim(db, job_id, "w2", LEASE)
    checkpoint = checkpoints.latest(db, job_id)
    assert checkpoint == checkpoints.Checkpoint(step=20, key="ckpt/20", attempt=1, details={"latents_key": "lat"})
    checkpoints.resumed(db, job_id, 2, checkpoint, 0.5)
    db.commit()
    assert events(db, job_id)[-1] == ("resumed", 2)
    assert event_messages(db, job_id)[-1] == "resumed from the checkpoint at step 20"


def test_webhook_deliveries_are_written_with_the_transitions_once_each(db, new_job) -> None:
    job_id = new_job(webhook="https://hooks.example/in", webhook_events_filter=["start", "completed"])
    transitions.claim(db, job_id, "w1", EXPIRED)
    db.commit()
    assert deliveries(db, job_id) == [("start", 0, "running")]

    transitions.requeue(db, job_id, 1, "lost")
    transitions.claim(db, job_id, "w2", LEASE)
    db.commit()
    assert deliveries(db, job_id) == [("start", 0, "running")], "a job starts once, however often it runs"

    transitions.fail(db, job_id, 2, "job_failed", "broke")
    db.commit()
    transitions.retry(db, job_id, 1, "admin")
    transitions.claim(db, job_id, "w3", LEASE)
    transitions.succeed(db, job_id, 3, {"ok": True}, {})
    db.commit()
    assert deliveries(db, job_id) == [
        ("start", 0, "running"),
        ("completed", 0, "failed"),
        ("completed", 1, "succeeded"),
    ]

    quiet = new_job()  # no webhook: no deliveries
    transitions.claim(db, quiet, "w1", LEASE)
    transitions.succeed(db, quiet, 1, {}, {})
    only_completed = new_job(webhook="https://hooks.example/in")  # the default filter: completed only
    transitions.request_cancel(db, only_completed)
    db.commit()
    assert deliveries(db, quiet) == []
    assert deliveries(db, only_completed) == [("completed", 0, "canceled")]


def test_a_rolled_back_transition_leaves_nothing(db, new_job) -> None:
    job_id = new_job(webhook="https://hooks.example/in")
    transitions.claim(db, job_id, "w1", LEASE)
    transitions.succeed(db, job_id, 1, {"ok": True}, {})
    db.rollback()
    assert row(db, job_id)["status"] == "queued"
    assert events(db, job_id) == [("queued", 0)]
    assert deliveries(db, job_id) == []


def test_a_waiting_job_is_marked_sent_once_and_can_be_undone(db, new_job) -> None:
    job_id = new_job()
    assert transitions.mark_dispatched(db, [job_id]) == {job_id}
    assert transitions.mark_dispatched(db, [job_id]) == set(), "sent just now: not again"
    db.commit()
    transitions.undo_dispatch(db, job_id)
    assert transitions.mark_dispatched(db, [job_id, "job_unknown"]) == {job_id}
    db.commit()


def test_a_marked_job_gets_its_dispatched_event_and_a_failed_send_takes_it_back(db, new_job) -> None:
    sent, submitted = new_job(), new_job()
    assert transitions.mark_dispatched(db, [sent, submitted], "a test", silent=[submitted]) == {sent, submitted}
    db.commit()
    assert events(db, sent) == [("queued", 0), ("dispatched", 0)]
    assert events(db, submitted) == [("queued", 0)], "the submitted job's own pass records no event"
    transitions.undo_dispatch(db, sent)
    db.commit()
    assert events(db, sent) == [("queued", 0)], "the send failed: not dispatched after all"
    assert transitions.mark_dispatched(db, [sent], "a second pass") == {sent}
    db.commit()
    assert events(db, sent) == [("queued", 0), ("dispatched", 0)]


def test_a_lost_message_is_resent_once_and_can_be_undone(db, new_job) -> None:
    settings = Settings(redispatch_seconds=900, lost_message_seconds=30)
    job_id = new_job(dispatched_at=utcnow())
    db.execute(update(Job).values(dispatched_at=clock.now(db, -31.0)).where(Job.id == job_id))
    db.commit()
    assert transitions.lost_messages(db, settings, idle_queues=[]) == [], "its queue still holds messages"
    assert [j.id for j in transitions.lost_messages(db, settings, idle_queues=["gpu"])] == [job_id]
    assert transitions.claim_resend(db, job_id, settings, idle_queues=["gpu"])
    assert not transitions.claim_resend(db, job_id, settings, idle_queues=["gpu"]), "sent just now: not again"
    db.commit()
    assert transitions.lost_messages(db, settings, idle_queues=["gpu"]) == []
    transitions.undo_dispatch(db, job_id)
    assert transitions.lost_messages(db, settings, idle_queues=["gpu"]) == [], "never sent: the scheduler's"
    db.commit()


# --- two sessions racing ----------------------------------------------------------------------------


def race(sessions, *moves: Callable[[Any], Any]) -> list[Any]:  # type: ignore[no-untyped-def]
    """Run each move in its own thread and session (its own SQLite connection), all released at
    once, each committing its own transaction; their results in order."""
    barrier = threading.Barrier(len(moves))

    def run(move: Callable[[Any], Any]) -> Any:
        session = sessions()
        try:
            barrier.wait(timeout=10)
            result = move(session)
            session.commit()
            return result
        finally:
            session.close()

    with ThreadPoolExecutor(len(moves)) as pool:
        futures = [pool.submit(run, move) for move in moves]
        return [future.result(timeout=60) for future in futures]


ROUNDS = 8


def test_two_sessions_claiming_one_job_exactly_one_wins(sessions, db, new_job) -> None:
    for _ in range(ROUNDS):
        job_id = new_job()
        first, second = race(
            sessions,
            lambda s, job_id=job_id: transitions.claim(s, job_id, "w1", LEASE),
            lambda s, job_id=job_id: transitions.claim(s, job_id, "w2", LEASE),
        )
        assert (first is None) != (second is None), (first, second)
        winner = "w1" if first is not None else "w2"
        job = row(db, job_id)
        assert job["status"] == "running" and job["attempts"] == 1 and job["worker_id"] == winner
        assert events(db, job_id) == [("queued", 0), ("claimed", 1)]


def test_a_claim_waits_for_the_other_writer_then_finds_the_job_taken(sessions, db, new_job) -> None:
    job_id = new_job()
    first = sessions()
    try:
        assert transitions.claim(first, job_id, "w1", LEASE) is not None  # not committed: it holds the write lock

        def second_claim() -> Any:
            session = sessions()
            try:
                result = transitions.claim(session, job_id, "w2", LEASE)
                session.commit()
                return result
            finally:
                session.close()

        with ThreadPoolExecutor(1) as pool:
            second = pool.submit(second_claim)
            time.sleep(0.3)
            assert not second.done(), "the second writer waits (busy timeout) instead of failing or reading stale data"
            first.commit()
            assert second.result(timeout=30) is None
    finally:
        first.close()
    assert row(db, job_id)["worker_id"] == "w1"
    assert events(db, job_id) == [("queued", 0), ("claimed", 1)]


def test_worker_succeeding_and_reconciler_requeueing_exactly_one_wins(sessions, db, new_job) -> None:
    for _ in range(ROUNDS):
        job_id = new_job()
        transitions.claim(db, job_id, "w1", EXPIRED)  # its lease ran out just as it finished
        db.commit()
        succeeded, requeued = race(
            sessions,
            lambda s, job_id=job_id: transitions.succeed(s, job_id, 1, {"ok": True}, {"step": 1}),
            lambda s, job_id=job_id: transitions.requeue(
                s, job_id, 1, "attempt 1 lost its worker (lease expired); requeued"
            ),
        )
        assert succeeded != requeued, (succeeded, requeued)
        job = row(db, job_id)
        if succeeded:
            assert job["status"] == "succeeded" and job["output"] == {"ok": True}
            assert events(db, job_id) == [("queued", 0), ("claimed", 1), ("succeeded", 1)]
        else:
            assert job["status"] == "queued" and job["output"] is None and job["worker_id"] is None
            assert events(db, job_id) == [("queued", 0), ("claimed", 1), ("requeued", 1)]


def test_two_reconcilers_requeue_a_lost_job_once(sessions, db, new_job) -> None:
    job_id = new_job()
    transitions.claim(db, job_id, "w1", EXPIRED)
    db.commit()
    results = race(sessions, *[lambda s: transitions.requeue(s, job_id, 1, "lost")] * 2)
    assert sorted(results) == [False, True]
    assert events(db, job_id) == [("queued", 0), ("claimed", 1), ("requeued", 1)]


def test_a_cancel_racing_a_claim_is_never_lost(sessions, db, new_job) -> None:
    for _ in range(ROUNDS):
        job_id = new_job()
        claim, status = race(
            sessions,
            lambda s, job_id=job_id: transitions.claim(s, job_id, "w1", LEASE),
            lambda s, job_id=job_id: transitions.request_cancel(s, job_id),
        )
        job = row(db, job_id)
        if claim is None:  # the cancel came first: the job never runs
            assert status is JobStatus.CANCELED and job["status"] == "canceled"
            assert events(db, job_id) == [("queued", 0), ("canceled", 0)]
        else:  # the claim came first: the running job is flagged, its worker sees it at the next renewal
            assert status is JobStatus.RUNNING and job["status"] == "running"
            assert job["cancel_requested_at"] is not None
            assert events(db, job_id) == [("queued", 0), ("claimed", 1), ("cancel_requested", 1)]


def test_two_reconcilers_resend_a_lost_message_once(sessions, db, new_job) -> None:
    settings = Settings(redispatch_seconds=900, lost_message_seconds=30)
    job_id = new_job(dispatched_at=utcnow())
    db.execute(update(Job).values(dispatched_at=clock.now(db, -31.0)).where(Job.id == job_id))
    db.commit()
    results = race(sessions, *[lambda s: transitions.claim_resend(s, job_id, settings, ["gpu"])] * 2)
    assert sorted(results) == [False, True]
    assert (
        db.scalar(select(func.count()).select_from(Job).where(Job.dispatched_at > utcnow() - timedelta(seconds=5))) == 1
    )
