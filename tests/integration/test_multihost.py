"""gpujobs on many hosts over a real network (issue 14 item 8): network namespaces on a private subnet.

The ``services`` host runs PostgreSQL, Redis, S3 and ``gpujobs api``; ``ops`` runs beat and a maintenance
worker; worker hosts ``a`` and ``b`` each run ``gpujobs worker --queues gpu --concurrency 1``, all started
through ``ip netns exec`` with settings naming the services host's address (``tests/integration/netns.py``).
The test process is the client, on the same switch. Every test checks that nothing was lost or run twice:
each job it submitted ends ``succeeded`` with exactly one ``succeeded`` event and its artifact's bytes in S3
matching the recorded sha256. Figures (time to requeue after a cut, per-host counts, lost and duplicated jobs)
are printed at the end of the run; jobs/s with one and two worker hosts is ``bench/multihost.py``'s.

Where namespaces cannot be made (not root, no ``ip`` or ``nft``) every test fails and says why.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import requests

from tests.integration import netns
from tests.integration.client import events
from tests.integration.netns import MultiHost, wait_until

WORKER_HOSTS = ("a", "b")
RESENDERS = ("dispatched by the reconciler", "dispatched by the scheduler")


# --- the deployment, and the ledger of what was submitted ----------------------------------------------


class Ledger:
    """Every job the module submitted, and the figures printed at the end of the run."""

    def __init__(self) -> None:
        self.jobs: list[str] = []
        self.figures: dict[str, str] = {}

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.figures:
            terminalreporter.write_sep("=", "multi-host figures (issue 14 item 8)")
            for name, value in self.figures.items():
                terminalreporter.write_line(f"{name}: {value}")


@pytest.fixture(scope="module")
def ledger(request: pytest.FixtureRequest) -> Ledger:
    ledger = Ledger()
    request.config.pluginmanager.register(ledger, "gpujobs-multihost")
    return ledger


@pytest.fixture(scope="module")
def hosts(services: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MultiHost]:
    from db.session import dispose_engines

    reason = netns.unavailable_reason()
    if reason is not None:
        pytest.fail(f"the multi-host tests cannot run here: {reason}", pytrace=False)
    with netns.multihost(tmp_path_factory.mktemp("multihost")) as deployment:
        for host in WORKER_HOSTS:
            deployment.start_worker(host, wait=False)
        for host in WORKER_HOSTS:
            deployment.stack(host).wait_worker_ready(deployment.workers[host][0])
        try:
            yield deployment
        finally:
            dispose_engines()  # the test process's pool to a database that is about to go


def submit(hosts: MultiHost, ledger: Ledger, **params: Any) -> str:
    job_id = hosts.submit(**params)
    ledger.jobs.append(job_id)
    return job_id


def assert_done_once(hosts: MultiHost, job_id: str, attempts: int = 1) -> dict[str, Any]:
    """The job succeeded once, on attempt ``attempts``, and S3 holds its artifact's recorded bytes."""
    job = hosts.wait_for(job_id, timeout=60)
    assert job["attempts"] == attempts, job
    timeline = [event["kind"] for event in events(job_id, hosts.database_url)]
    assert timeline.count("succeeded") == 1, timeline
    artifact = job["output"]["artifact"]
    data = requests.get(artifact["url"], timeout=10).content  # the presigned URL, as a client downloads it
    assert (len(data), hashlib.sha256(data).hexdigest()) == (artifact["size"], artifact["sha256"]), artifact
    with psycopg.connect(hosts.postgres.conninfo()) as conn:
        keys = [row[0] for row in conn.execute("SELECT storage_key FROM artifacts WHERE job_id = %s", (job_id,))]
    assert keys == [f"jobs/{job_id}/{attempts}/diagnostic.json"], keys
    assert hosts.read(keys[0]) == data
    return job


def unsigned(job: dict[str, Any]) -> dict[str, Any]:
    """What a finished job says, without its presigned URL (signed afresh on every read)."""
    artifact = {key: value for key, value in job["output"]["artifact"].items() if key != "url"}
    return {**job, "output": {**job["output"], "artifact": artifact}}


def assert_nothing_lost(hosts: MultiHost, ledger: Ledger) -> None:
    """Every job submitted succeeded exactly once; the ledger's running totals go into the figures."""
    lost, duplicated = hosts.lost_and_duplicated(ledger.jobs)
    ledger.figures["jobs submitted"] = str(len(ledger.jobs))
    ledger.figures["lost jobs (must be 0)"] = str(len(lost))
    ledger.figures["duplicated jobs (must be 0)"] = str(len(duplicated))
    assert not lost and not duplicated, {"lost": lost, "duplicated": duplicated}


# --- the tests ---------------------------------------------------------------------------------------


def test_jobs_spread_over_both_worker_hosts(hosts: MultiHost, ledger: Ledger) -> None:
    job_ids = [submit(hosts, ledger, steps=2, sleep_seconds=0.6) for _ in range(8)]
    for job_id in job_ids:
        assert_done_once(hosts, job_id)
    per_host = Counter(host for job_id in job_ids for host in hosts.claims(job_id))
    ledger.figures["diagnostic jobs per worker host (8 submitted)"] = ", ".join(
        f"{host}: {per_host[host]}" for host in WORKER_HOSTS
    )
    assert sorted(per_host) == sorted(WORKER_HOSTS) and sum(per_host.values()) == len(job_ids), per_host

    # They ran over the network: each worker process lives in its host's namespace, and PostgreSQL sees
    # the workers' connections coming from the worker hosts' addresses.
    for host in WORKER_HOSTS:
        worker = hosts.workers[host][0]
        namespace = os.stat(f"/run/netns/{hosts.host(host).netns}")
        assert os.stat(f"/proc/{worker.pid}/ns/net").st_ino == namespace.st_ino, host
    with psycopg.connect(hosts.postgres.conninfo()) as conn:
        clients = {str(row[0]) for row in conn.execute("SELECT client_addr FROM pg_stat_activity") if row[0]}
    assert {hosts.host(host).address for host in WORKER_HOSTS} <= clients, clients
    assert_nothing_lost(hosts, ledger)


def test_a_cut_worker_hosts_job_is_finished_on_the_other_and_its_late_writes_are_refused(
    hosts: MultiHost, ledger: Ledger
) -> None:
    stale = hosts.workers["a"][0]
    lease_lost_before = stale.log().count("'lease_lost'")
    # One job per worker host (one slot each): 8 steps of 0.5 s.
    job_ids = [submit(hosts, ledger, steps=8, sleep_seconds=4) for _ in range(2)]
    wait_until(lambda: all(len(hosts.claims(job_id)) == 1 for job_id in job_ids), "both jobs claimed", 30)
    on_a = next(job_id for job_id in job_ids if hosts.claims(job_id) == ["a"])
    wait_until(lambda: hosts.job(on_a)["progress"]["step"] >= 2, "the job on host a at step 2", 30)

    cut_at, cut_wall = time.monotonic(), time.time()
    hosts.network.cut(hosts.host("a"))
    try:
        hosts.wait_for(on_a, "running", timeout=30, attempts=2)
        requeue_seconds = time.monotonic() - cut_at
        timeline = events(on_a, hosts.database_url)
        requeued = next(event for event in timeline if event["kind"] == "requeued")
        requeued_after = requeued["at"].timestamp() - cut_wall
        done = assert_done_once(hosts, on_a, attempts=2)
        assert hosts.claims(on_a) == ["a", "b"]
        report = requests.get(done["output"]["artifact"]["url"], timeout=10).json()
        assert report["attempt"] == 2 and report["worker"].startswith("b-"), report
        finished = events(on_a, hosts.database_url)
    finally:
        hosts.network.restore(hosts.host("a"))

    # The link is back: the stale attempt's renewal, lease check or success is refused by the attempt fence,
    # and its run_job task ends as 'lease_lost', having changed nothing of the job (at most it stored an object
    # under its own attempt's key, which nothing records).
    restored_at = time.monotonic()
    wait_until(lambda: stale.log().count("'lease_lost'") > lease_lost_before, "host a's stale attempt ended", 60)
    stale_ended = time.monotonic() - restored_at
    refused = re.search(rf"job {on_a}(?: attempt 1 no longer owns the job|: could not record)", stale.log())
    assert refused, stale.tail(40)
    assert events(on_a, hosts.database_url) == finished, "the stale attempt added to the timeline"
    after = assert_done_once(hosts, on_a, attempts=2)
    assert unsigned(after) == unsigned(done), "the stale attempt changed the finished job"
    other = next(job_id for job_id in job_ids if job_id != on_a)
    assert_done_once(hosts, other)
    ledger.figures["time to requeue after a worker host's link is cut (3 s lease)"] = (
        f"{requeue_seconds:.2f} s to running elsewhere; requeued {requeued_after:.2f} s after the cut; "
        f"the stale attempt refused {stale_ended:.2f} s after the link came back"
    )
    assert requeue_seconds < 15, requeue_seconds  # about one lease, not a broker timeout
    # Host a serves again with its link back: two jobs of a second, one slot on each host.
    again = [submit(hosts, ledger, steps=2, sleep_seconds=1) for _ in range(2)]
    for job_id in again:
        assert_done_once(hosts, job_id)
    assert sorted(host for job_id in again for host in hosts.claims(job_id)) == ["a", "b"]
    assert_nothing_lost(hosts, ledger)


def test_a_worker_partitioned_from_s3_alone_keeps_its_job_and_stores_it_when_healed(
    hosts: MultiHost, ledger: Ledger
) -> None:
    """Worker host a still reaches the database and Redis, not S3: its job keeps its lease (no requeue) and
    waits with its output spooled; host b goes on; once healed, a's job succeeds on its first attempt."""
    worker_a = hosts.workers["a"][0]
    with hosts.network.partition(hosts.host("a"), hosts.services.address, hosts.s3.port):
        job_ids = [submit(hosts, ledger, steps=2, sleep_seconds=1) for _ in range(4)]
        wait_until(lambda: any(hosts.claims(job_id) == ["a"] for job_id in job_ids), "a job on host a", 30)
        on_a = [job_id for job_id in job_ids if hosts.claims(job_id) == ["a"]]
        assert len(on_a) == 1, on_a  # one slot, held while it waits for S3
        waiting = f"job {on_a[0]}: could not store jobs/{on_a[0]}/1/diagnostic.json"
        wait_until(lambda: waiting in worker_a.log(), "host a's job waiting for S3", 30)
        for job_id in set(job_ids) - set(on_a):
            assert_done_once(hosts, job_id)  # host b ran the others meanwhile
        held_since = time.monotonic()
        while time.monotonic() - held_since < 7:  # over two 3 s leases: renewed, never requeued
            job = hosts.job(on_a[0])
            assert (job["status"], job["attempts"]) == ("running", 1), job
            time.sleep(0.5)
    assert_done_once(hosts, on_a[0], attempts=1)
    assert f"job {on_a[0]}: store jobs/{on_a[0]}/1/diagnostic.json done after" in worker_a.log()
    assert "requeued" not in [event["kind"] for event in events(on_a[0], hosts.database_url)]
    assert_nothing_lost(hosts, ledger)


def test_the_api_partitioned_from_redis_alone_still_accepts_jobs_and_the_reconciler_sends_them(
    hosts: MultiHost, ledger: Ledger
) -> None:
    """The API reaches the database, not Redis: submits are still accepted (202, within the broker timeout), the
    reconciler on the ops host sends them, workers run them, and ``Prefer: wait`` answers from the database;
    ``/readyz`` says the broker is down. Healed, the API sends jobs itself again."""
    redis = (hosts.services.address, hosts.redis.port)
    with hosts.network.partition(hosts.services, *redis):
        started = time.monotonic()
        job_ids = [submit(hosts, ledger, steps=1, sleep_seconds=0.2) for _ in range(3)]
        assert time.monotonic() - started < 30, "a submit waited on the unreachable broker past its timeout"
        ready = requests.get(f"{hosts.base_url}/readyz", timeout=10)
        assert ready.status_code == 503, ready.text
        checks = ready.json()["checks"]
        assert checks["database"] == "ok" and checks["broker"].startswith("down"), checks
        for job_id in job_ids:
            waited = hosts.job(job_id, wait=30)
            assert waited["status"] == "succeeded", waited  # answered from the database, Redis unreachable
            assert_done_once(hosts, job_id)
            timeline = events(job_id, hosts.database_url)
            sent_by = [event["message"] for event in timeline if event["kind"] == "dispatched"]
            # Not by its submit (the broker was unreachable): by the reconciler's pass once the broker was
            # back, or by a worker's pass when an earlier job ended and freed a slot.
            assert len(sent_by) == 1 and sent_by[0] in RESENDERS, sent_by
    wait_until(
        lambda: requests.get(f"{hosts.base_url}/readyz", timeout=10).status_code == 200, "the API ready again", 30
    )
    job_id = submit(hosts, ledger, steps=1)
    assert_done_once(hosts, job_id)
    assert "dispatched" not in [event["kind"] for event in events(job_id, hosts.database_url)]  # the API sent it
    assert_nothing_lost(hosts, ledger)
