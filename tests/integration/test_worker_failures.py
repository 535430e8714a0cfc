"""Workers die and messages repeat: leases and guarded claims keep every job run exactly once at a time."""

from __future__ import annotations

import re
import threading
import time

from tests.integration.client import diagnostic, events, get_job, wait_for


def _claimed_by(job_id: str) -> list[str]:
    return [e["message"] for e in events(job_id) if e["kind"] == "claimed"]


def _worker_pid(claim_message: str) -> int:
    # "claimed by <host>:<pid>:<random>"
    match = re.search(r":(\d+):[0-9a-f]+$", claim_message)
    assert match, claim_message
    return int(match.group(1))


def test_concurrent_claims_of_one_job_have_one_winner(client, keys, no_gpu_worker):
    """Eight threads claim the same queued job at the same instant (PostgreSQL here; SQLite on a bare machine)."""
    from db import transitions
    from db.session import session_scope

    job = diagnostic(client, keys.admin.secret)
    barrier = threading.Barrier(8)
    results: list[object] = []
    lock = threading.Lock()

    def claim(n: int) -> None:
        with session_scope() as session:
            barrier.wait()
            outcome = transitions.claim(session, job["id"], f"racer:{n}:0", lease_seconds=30)
        with lock:
            results.append(outcome.attempt if outcome else None)

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(results, key=lambda r: r is None) == [1] + [None] * 7
    assert len(_claimed_by(job["id"])) == 1
    assert get_job(client, keys.admin.secret, job["id"])["attempts"] == 1
    with session_scope() as session:  # the winner ends its run, so the job does not hold a lease for 30 s
        assert transitions.cancel(session, job["id"], 1, "the test's claim race is over")


def test_two_workers_get_the_same_job_and_only_one_runs_it(client, keys, no_gpu_worker, start_worker):
    from worker.celery_app import dispatch

    first, second = start_worker(wait=False), start_worker(wait=False)
    for worker in (first, second):
        no_gpu_worker.stack.wait_worker_ready(worker)

    job = diagnostic(client, keys.admin.secret, steps=4, sleep_seconds=2)
    dispatch(job["id"], "gpu")  # the duplicate message: a redelivery, a reconciler racing the API
    done = wait_for(client, keys.admin.secret, job["id"], "succeeded", timeout=30)

    assert done["attempts"] == 1
    claims = _claimed_by(job["id"])
    assert len(claims) == 1, claims
    runner = first if _worker_pid(claims[0]) == first.pid else second
    other = second if runner is first else first
    assert _worker_pid(claims[0]) == runner.pid
    # The other worker took the duplicate while the first ran the job (prefetch 1), and did nothing.
    deadline = time.monotonic() + 15
    while "'not_claimed'" not in other.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "'not_claimed'" in other.log(), "the second worker never got the duplicate message"
    assert "'not_claimed'" not in runner.log()
    assert [e["kind"] for e in events(job["id"])].count("succeeded") == 1


def test_a_killed_workers_job_is_requeued_and_completes_elsewhere(client, keys, no_gpu_worker, start_worker):
    admin = keys.admin.secret
    doomed = start_worker()
    job = diagnostic(client, admin, steps=20, sleep_seconds=3)
    wait_for(client, admin, job["id"], "running", until=lambda j: j["progress"]["step"] >= 1)
    assert _worker_pid(_claimed_by(job["id"])[0]) == doomed.pid

    doomed.kill()
    rescuer = start_worker()
    done = wait_for(client, admin, job["id"], ("succeeded", "failed"), timeout=60)

    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2
    timeline = events(job["id"])
    requeued = [e for e in timeline if e["kind"] == "requeued"]
    assert len(requeued) == 1 and requeued[0]["attempt"] == 1
    assert "lease expired" in requeued[0]["message"]
    claims = _claimed_by(job["id"])
    assert [_worker_pid(c) for c in claims] == [doomed.pid, rescuer.pid]
    # Lease expiry, not a timeout of hours: the job came back within seconds of the kill.
    killed_claim, second_claim = (e["at"] for e in timeline if e["kind"] == "claimed")
    assert (second_claim - killed_claim).total_seconds() < 30
    assert done["output"]["artifact"]["sha256"]


def test_a_dead_workers_job_is_requeued_as_its_lease_expires_not_at_the_next_beat(
    client, keys, no_gpu_worker, start_worker
):
    """With beat stopped, one reconcile run shortly before the lease expires must requeue the job on time:
    it schedules a reconcile of its own for the moment of expiry (beat's next run may be a period later)."""
    from db.models import Job, utcnow
    from db.session import session_scope
    from db.settings import get_settings
    from worker.celery_app import schedule_reconcile

    admin = keys.admin.secret
    interval = get_settings().reconcile_interval_seconds
    doomed = start_worker()
    # Long enough (10 s) that the kill lands mid-run however slowly this test's polls come back under load.
    job = diagnostic(client, admin, steps=30, sleep_seconds=10)
    wait_for(client, admin, job["id"], "running", until=lambda j: j["progress"]["step"] >= 1)
    with no_gpu_worker.beat_paused():
        doomed.kill()
        with session_scope() as session:
            expires_at = session.get(Job, job["id"]).lease_expires_at
        # A run that would leave the lease to a next beat: it expires within one interval of this run.
        wait = (expires_at - utcnow()).total_seconds() - interval / 2
        assert wait > 0, "the lease expired before the test could reconcile: a longer lease is needed"
        time.sleep(wait)
        schedule_reconcile(0, expires=interval)
        requeued = wait_for(client, admin, job["id"], "queued", timeout=10, until=lambda j: j["attempts"] == 1)
    assert requeued["status"] == "queued"
    (event,) = [e for e in events(job["id"]) if e["kind"] == "requeued"]
    late = (event["at"] - expires_at).total_seconds()
    assert 0 <= late < 0.5, f"requeued {late:.2f} s after the lease expired"
    start_worker()  # the job runs to the end on another worker
    assert wait_for(client, admin, job["id"], ("succeeded", "failed"), timeout=60)["status"] == "succeeded"


def test_only_a_lease_that_missed_its_renewals_gets_a_reconcile_of_its_own(client, keys, no_gpu_worker, monkeypatch):
    """A live worker keeps its lease about ``lease_seconds`` ahead, so even with beat's period longer than the
    lease, a live job schedules no follow-up (else each beat would start a chain of them); a lease that fell
    behind by more than two renewals does, for its expiry."""
    from datetime import timedelta

    from db import transitions
    from db.models import Job, utcnow
    from db.session import session_scope
    from db.settings import get_settings
    from worker import reconciler

    settings = get_settings().model_copy(update={"reconcile_interval_seconds": 60.0})
    monkeypatch.setattr(reconciler, "get_settings", lambda: settings)
    live, behind = diagnostic(client, keys.admin.secret), diagnostic(client, keys.admin.secret)
    with session_scope() as session:
        for job in (live, behind):
            assert transitions.claim(session, job["id"], "test:0:0", lease_seconds=settings.lease_seconds)
    assert reconciler.reconcile().next_expiry is None, "a fresh lease scheduled a follow-up"

    missed = 2 * settings.control_poll_seconds + 0.3  # renewals that never came
    with session_scope() as session:
        due = utcnow() + timedelta(seconds=settings.lease_seconds - missed)
        session.get(Job, behind["id"]).lease_expires_at = due
    report = reconciler.reconcile()
    assert report.next_expiry == due
    delay = reconciler.follow_up(report)
    assert delay is not None and 0 < delay <= settings.lease_seconds - missed + reconciler.FOLLOW_UP_DELAY
    with session_scope() as session:
        for job in (live, behind):
            assert transitions.cancel(session, job["id"], 1, "the test is over")


def test_a_job_whose_worker_dies_on_every_attempt_fails_as_worker_lost(client, keys, no_gpu_worker, start_worker):
    from db.settings import get_settings

    admin = keys.admin.secret
    max_attempts = get_settings().max_attempts
    job = diagnostic(client, admin, steps=100, sleep_seconds=60)
    for attempt in range(1, max_attempts + 1):
        worker = start_worker()
        wait_for(
            client,
            admin,
            job["id"],
            "running",
            timeout=60,
            until=lambda j, n=attempt: j["attempts"] == n and j["progress"]["step"] >= 1,
        )
        worker.kill()

    failed = wait_for(client, admin, job["id"], ("failed", "succeeded", "canceled"), timeout=30)
    assert failed["status"] == "failed", failed
    assert failed["attempts"] == max_attempts
    assert failed["error"]["code"] == "worker_lost"
    message = failed["error"]["message"]
    assert "stopped responding" in message and str(max_attempts) in message, message
    kinds = [e["kind"] for e in events(job["id"])]
    assert kinds.count("claimed") == max_attempts
    assert kinds.count("requeued") == max_attempts - 1
    assert kinds[-1] == "failed"


def test_a_job_whose_message_the_broker_lost_is_sent_again(client, keys, no_gpu_worker, start_worker):
    """The API marked the job sent, but its message vanished (a broker restart without persistence):
    once the job has waited ``lost_message_seconds`` with its queue empty, the reconciler sends it again."""
    from tests.integration.conftest import purge_queue

    job = diagnostic(client, keys.admin.secret, steps=1)
    assert purge_queue("gpu") >= 1  # the message is gone; the row still says it was sent
    start_worker("gpu")
    done = wait_for(client, keys.admin.secret, job["id"], timeout=30)
    assert done["status"] == "succeeded"
    assert "dispatched" in [event["kind"] for event in events(job["id"])]
