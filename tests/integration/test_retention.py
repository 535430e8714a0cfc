"""Retention (worker/retention.py): outputs expire after their tenant's TTL, old jobs are purged in batches.

Real PostgreSQL, S3 and workers. Jobs run on the real worker; to make one "old" without waiting days, its
``finished_at`` is moved back (the same as waiting), and the TTLs used in-process are days, so the other
tests' young jobs in this database are never touched. One test runs the real beat task with a 1 s override.
"""

from __future__ import annotations

import secrets
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from botocore.exceptions import ClientError
from sqlalchemy import delete, func, select, update

from db.models import (
    Artifact,
    File,
    Job,
    JobEvent,
    Model,
    TenantQuota,
    WebhookAttempt,
    WebhookDelivery,
)
from db.session import session_scope
from db.settings import Settings, get_settings
from db.storage import Storage, get_storage
from tests.integration import storage_faults, webhook_fixtures
from tests.integration.admin_client import logged_in, page
from tests.integration.client import assert_problem, auth, diagnostic, get_job, png_bytes, submit, upload, wait_for
from tests.integration.conftest import Key, make_key
from tests.integration.webhook_fixtures import job_with_webhook, wait_deliveries
from worker.retention import RetentionReport, retention_batch

DAY = 86400

private_s3 = storage_faults.private_s3
receiver = webhook_fixtures.receiver
webhooks_worker = webhook_fixtures.webhooks_worker


def fresh_admin() -> Key:
    """An admin key in a tenant of its own: TTL overrides set on it touch no other test's jobs."""
    return make_key(f"retention {secrets.token_hex(4)}", "admin")


def settings(**values: Any) -> Settings:
    return get_settings().model_copy(update=values)


def age(job_ids: list[str], days: float) -> None:
    """Make these finished jobs look ``days`` old (as if that long had passed since they ended): their end and
    their artifacts' (written at the same time by the succeed transition)."""
    ended = datetime.now(UTC) - timedelta(days=days)
    with session_scope() as session:
        for table, column, values in [
            (Job, Job.id, {"finished_at": ended}),
            (Artifact, Artifact.job_id, {"created_at": ended}),
        ]:
            session.execute(
                update(table).where(column.in_(job_ids)).values(**values).execution_options(synchronize_session=False)
            )


def artifact_rows(job_id: str) -> list[Artifact]:
    with session_scope() as session:
        rows = list(session.scalars(select(Artifact).where(Artifact.job_id == job_id)))
        session.expunge_all()
        return rows


def exists_in(storage: Storage, key: str) -> bool:
    try:
        storage.client.head_object(Bucket=storage.bucket, Key=key)
    except ClientError as exc:
        assert exc.response["ResponseMetadata"]["HTTPStatusCode"] == 404, exc.response
        return False
    return True


def http_get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            answer.read()
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def run_until_done(config: Settings, storage: Storage | None = None) -> list[RetentionReport]:
    reports = []
    for _ in range(100):
        report = retention_batch(config, storage)
        reports.append(report)
        if not report.more:
            return reports
    raise AssertionError(f"retention still had work after 100 batches: {reports[-1]}")


def finished_diagnostic(client: Any, key: Key, **params: Any) -> dict[str, Any]:
    job = diagnostic(client, key.secret, **params)
    return wait_for(client, key.secret, job["id"], "succeeded")


def constructed_job(tenant: str, storage: Storage, artifacts: int = 1, days_old: float = 10) -> str:
    """A finished job row with ``artifacts`` objects really stored (for batches bigger than real jobs make)."""
    ended = datetime.now(UTC) - timedelta(days=days_old)
    with session_scope() as session:
        job = Job(
            tenant_id=tenant,
            type="diagnostic",
            queue="gpu",
            status="succeeded",
            input={},
            output={},
            max_attempts=1,
            deadline_seconds=60,
            created_at=ended,
            finished_at=ended,
        )
        session.add(job)
        session.flush()
        for n in range(artifacts):
            obj = storage.put(f"jobs/{job.id}/1/out-{n}.txt", f"{job.id} {n}".encode(), "text/plain")
            session.add(
                Artifact(
                    job_id=job.id,
                    name=f"out-{n}.txt",
                    content_type="text/plain",
                    size=obj.size,
                    sha256=obj.sha256,
                    storage_key=obj.key,
                    created_at=ended,  # as the succeed transition writes it: the job's end
                )
            )
        session.add(JobEvent(job_id=job.id, kind="succeeded", attempt=1, at=ended))
        return job.id


# --- unused input files ------------------------------------------------------------------------------


def file_used(file_id: str, days_ago: float) -> None:
    """Make this file look last used ``days_ago`` (as if no job had named it since)."""
    used = datetime.now(UTC) - timedelta(days=days_ago)
    with session_scope() as session:
        session.execute(update(File).where(File.id == file_id).values(created_at=used, used_at=used))


def file_row(file_id: str) -> File | None:
    with session_scope() as session:
        row = session.get(File, file_id)
        if row is not None:
            session.expunge(row)
        return row


def constructed_file(tenant: str, storage: Storage, days_unused: float) -> str:
    """An input file really stored (in ``storage``), last used ``days_unused`` ago."""
    used = datetime.now(UTC) - timedelta(days=days_unused)
    file_id = f"file_{secrets.token_hex(8)}"
    obj = storage.put(f"inputs/{file_id}", png_bytes(), "image/png")
    with session_scope() as session:
        session.add(
            File(
                id=file_id,
                tenant_id=tenant,
                purpose="input",
                filename="old.png",
                content_type="image/png",
                size=obj.size,
                sha256=obj.sha256,
                storage_key=obj.key,
                created_at=used,
                used_at=used,
            )
        )
    return file_id


def test_unused_input_files_are_deleted_and_those_a_job_needs_are_kept(client):
    key = fresh_admin()
    ids = {}
    for name in ("unused", "named_again", "backlog", "young"):
        answer = upload(client, key.secret, png_bytes(color=(len(name), 40, 90)), f"{name}.png")
        assert answer.status_code == 201, answer.get_json()
        ids[name] = answer.get_json()["id"]
    storage = get_storage()
    keys = {name: file_row(file_id).storage_key for name, file_id in ids.items()}  # type: ignore[union-attr]
    file_used(ids["unused"], days_ago=12)
    file_used(ids["named_again"], days_ago=12)
    # A queued job as old as the file it names (a long backlog, or an operator's retry of an old job): both
    # are past the TTL, and the file stays while the job may still run. Its queue has no consumer.
    file_used(ids["backlog"], days_ago=10)
    ten_days_ago = datetime.now(UTC) - timedelta(days=10)
    with session_scope() as session:
        backlog = Job(
            tenant_id=key.tenant,
            type="segmentation",
            queue="retention-test-nobody",
            status="queued",
            input={"image": ids["backlog"]},
            max_attempts=1,
            deadline_seconds=60,
            created_at=ten_days_ago,
        )
        session.add(backlog)
        session.flush()
        backlog_id = backlog.id
    try:
        # A submit that names a file marks it used now, in its own transaction (no worker needs to run it).
        named = submit(client, key.secret, {"type": "segmentation", "input": {"image": ids["named_again"]}})
        assert named.status_code == 202, named.get_json()
        row = file_row(ids["named_again"])
        assert row is not None and row.used_at > datetime.now(UTC) - timedelta(minutes=5)

        off = retention_batch(settings(file_ttl=0))
        assert off.files_deleted == 0, "GPUJOBS_FILE_TTL=0 keeps every file"
        report = retention_batch(settings(file_ttl=2 * DAY))
        assert report.files_deleted == 1 and report.storage_errors == 0, report
        assert file_row(ids["unused"]) is None and not exists_in(storage, keys["unused"])
        for kept in ("named_again", "backlog", "young"):
            assert file_row(ids[kept]) is not None and exists_in(storage, keys[kept]), kept
        assert retention_batch(settings(file_ttl=2 * DAY)).files_deleted == 0

        # The deleted file's id is gone everywhere: its description, its content and a new job naming it.
        assert_problem(client.get(f"/v1/files/{ids['unused']}", headers=auth(key.secret)), 404)
        assert_problem(client.get(f"/v1/files/{ids['unused']}/content", headers=auth(key.secret)), 404)
        refused = submit(client, key.secret, {"type": "segmentation", "input": {"image": ids["unused"]}})
        assert_problem(refused, 422, ["body", "input", "image"])
    finally:
        with session_scope() as session:
            session.execute(delete(Job).where(Job.id == backlog_id))
    # Once the backlog's job is gone, its file is an unused one like any other.
    assert retention_batch(settings(file_ttl=2 * DAY)).files_deleted == 1
    assert file_row(ids["backlog"]) is None and not exists_in(storage, keys["backlog"])


# --- expiry ------------------------------------------------------------------------------------------


def test_outputs_past_the_default_ttl_are_deleted_and_the_job_says_expired(app, client, gpu_worker):
    key = fresh_admin()
    old = finished_diagnostic(client, key)
    young = finished_diagnostic(client, key)
    url = old["output"]["artifact"]["url"]
    assert old["output"]["artifact"]["expired"] is False and old["outputs_expired_at"] is None
    assert http_get(url) == 200
    [row] = artifact_rows(old["id"])
    storage = get_storage()
    assert exists_in(storage, row.storage_key)
    age([old["id"]], days=3)

    report = retention_batch(settings(artifact_ttl=2 * DAY))

    assert report.artifacts_expired == 1 and report.objects_deleted == 1 and report.storage_errors == 0
    assert not exists_in(storage, row.storage_key)
    assert http_get(url) == 404  # the URL handed out before: the object is gone
    job = get_job(client, key.secret, old["id"])
    artifact = job["output"]["artifact"]
    assert artifact["url"] is None and artifact["expired"] is True
    assert (artifact["name"], artifact["size"], artifact["sha256"]) == (row.name, row.size, row.sha256)
    assert job["outputs_expired_at"] is not None
    listed = client.get("/v1/jobs?limit=100", headers=auth(key.secret)).get_json()["items"]
    # (An admin key lists every tenant's jobs: the other modules of this process share the database.)
    ours = {j["id"]: j["outputs_expired_at"] is not None for j in listed if j["id"] in (old["id"], young["id"])}
    assert ours == {old["id"]: True, young["id"]: False}
    # The young job keeps its outputs; a second run finds nothing more to do.
    assert get_job(client, key.secret, young["id"])["output"]["artifact"]["url"]
    again = retention_batch(settings(artifact_ttl=2 * DAY))
    assert again.artifacts_expired == 0 and again.objects_deleted == 0
    # The admin page shows the artifact as expired, without a link to the gone object.
    html = page(logged_in(app.test_client(), key.secret), f"/admin/jobs/{old['id']}")
    figure = html[html.index('data-artifact="diagnostic.json"') :]
    figure = figure[: figure.index("</figure>")]
    assert "expired" in figure and "href" not in figure


def test_a_tenant_override_wins_over_the_default_both_ways(client, gpu_worker):
    forever, short, default = fresh_admin(), fresh_admin(), fresh_admin()
    with session_scope() as session:
        session.add(TenantQuota(tenant_id=forever.tenant, artifact_ttl_seconds=0))
        session.add(TenantQuota(tenant_id=short.tenant, artifact_ttl_seconds=DAY))
    jobs = {name: finished_diagnostic(client, key) for name, key in [("forever", forever), ("short", short)]}
    jobs["default"] = finished_diagnostic(client, default)
    age([j["id"] for j in jobs.values()], days=3)

    # Default 5 days: the 3-day-old job of the 1-day tenant expires; "forever" and the default tenant's do not.
    retention_batch(settings(artifact_ttl=5 * DAY))
    expired = {
        name: get_job(client, key.secret, jobs[name]["id"])["output"]["artifact"]["expired"]
        for name, key in [("forever", forever), ("short", short), ("default", default)]
    }
    assert expired == {"forever": False, "short": True, "default": False}

    # Default 2 days: now the default tenant's expires too; "forever" (0) still keeps its outputs.
    retention_batch(settings(artifact_ttl=2 * DAY))
    assert get_job(client, default.secret, jobs["default"]["id"])["output"]["artifact"]["expired"] is True
    assert get_job(client, forever.secret, jobs["forever"]["id"])["output"]["artifact"]["expired"] is False


def test_the_beat_task_on_a_real_maintenance_worker_expires_a_one_second_override(client, gpu_worker, cluster):
    from worker.celery_app import RETENTION, producer

    key = fresh_admin()
    with session_scope() as session:
        session.add(TenantQuota(tenant_id=key.tenant, artifact_ttl_seconds=1))
    job = finished_diagnostic(client, key)
    [row] = artifact_rows(job["id"])
    time.sleep(1.2)
    producer().send_task(RETENTION, queue="maintenance", retry=False)
    job = wait_for(client, key.secret, job["id"], "succeeded", timeout=30, until=lambda j: j["outputs_expired_at"])
    assert job["output"]["artifact"]["url"] is None
    assert not exists_in(get_storage(), row.storage_key)


def test_a_models_weights_object_is_never_deleted_and_its_job_never_purged(client, gpu_worker):
    key = fresh_admin()
    job = finished_diagnostic(client, key)
    [row] = artifact_rows(job["id"])
    # A fine-tune's `weights` artifact is its model's object: the same rule, with a model row made by hand.
    with session_scope() as session:
        model = Model(
            tenant_id=key.tenant,
            name="kept",
            base_model="tiny-sd",
            job_id=job["id"],
            storage_key=row.storage_key,
            size=row.size,
            sha256=row.sha256,
        )
        session.add(model)
        session.flush()
        model_id = model.id
    age([job["id"]], days=10)

    reports = run_until_done(settings(artifact_ttl=DAY, job_retention=5 * DAY))

    assert sum(r.objects_kept_for_models for r in reports) == 1
    storage = get_storage()
    assert exists_in(storage, row.storage_key)
    shown = get_job(client, key.secret, job["id"])  # not purged: a model points to it
    assert shown["output"]["artifact"]["expired"] is True  # expired on the job; the model owns the object
    weights = client.get(f"/v1/models/{model_id}", headers=auth(key.secret)).get_json()["weights"]
    assert http_get(weights["url"]) == 200
    # Once the model is deleted (with its object), the job is purged like any other.
    assert client.delete(f"/v1/models/{model_id}", headers=auth(key.secret)).status_code == 204
    run_until_done(settings(artifact_ttl=DAY, job_retention=5 * DAY))
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth(key.secret)).status_code == 404


def test_a_webhook_redelivered_after_expiry_says_expired(client, gpu_worker, webhooks_worker, receiver):
    key = fresh_admin()
    webhooks_worker()
    job = job_with_webhook(client, key.secret, receiver.url("/expiry"))
    [delivery] = wait_deliveries(client, key.secret, job["id"], lambda ds: ds and ds[0]["status"] == "delivered")
    [first] = receiver.wait_for("/expiry", lambda found: len(found) >= 1, 30)
    assert first.json()["data"]["output"]["artifact"]["url"]
    age([job["id"]], days=3)
    retention_batch(settings(artifact_ttl=DAY))

    response = client.post(f"/v1/jobs/{job['id']}/webhooks/{delivery['id']}/redeliver", headers=auth(key.secret))
    assert response.status_code == 202, response.get_data(as_text=True)
    _, second = receiver.wait_for("/expiry", lambda found: len(found) >= 2, 30)
    data = second.json()["data"]
    assert data["output"]["artifact"]["url"] is None and data["output"]["artifact"]["expired"] is True
    assert data["outputs_expired_at"] is not None


# --- purge --------------------------------------------------------------------------------------------


def count(model: Any, *where: Any) -> int:
    with session_scope() as session:
        return int(session.scalar(select(func.count()).select_from(model).where(*where)) or 0)


def test_purge_deletes_old_finished_jobs_with_everything_in_bounded_batches_and_leaves_the_rest(
    client,
    gpu_worker,
    webhooks_worker,
    receiver,
):
    key = fresh_admin()
    storage = get_storage()
    webhooks_worker()
    # An old job with a webhook (deliveries and attempts), four more old ones, a young one.
    hooked = job_with_webhook(client, key.secret, receiver.url("/purge"))
    wait_deliveries(client, key.secret, hooked["id"], lambda ds: ds and ds[0]["status"] == "delivered")
    old = [hooked["id"]] + [finished_diagnostic(client, key)["id"] for _ in range(4)]
    young = finished_diagnostic(client, key)["id"]
    old_keys = [a.storage_key for job_id in old for a in artifact_rows(job_id)]
    assert len(old_keys) == 5 and all(exists_in(storage, k) for k in old_keys)
    age(old, days=10)
    # A queued and a running job, however old, are never purged.
    with session_scope() as session:
        long_ago = datetime.now(UTC) - timedelta(days=30)
        unfinished = [
            Job(
                tenant_id=key.tenant,
                type="diagnostic",
                queue="none",
                status=status,
                input={},
                max_attempts=1,
                deadline_seconds=60,
                created_at=long_ago,
            )
            for status in ("queued", "running")
        ]
        session.add_all(unfinished)
        session.flush()
        unfinished_ids = [j.id for j in unfinished]
    assert (
        count(
            WebhookAttempt,
            WebhookAttempt.delivery_id.in_(select(WebhookDelivery.id).where(WebhookDelivery.job_id == hooked["id"])),
        )
        >= 1
    )

    reports = run_until_done(settings(job_retention=5 * DAY, retention_batch_size=2))

    assert [r.jobs_purged for r in reports] == [2, 2, 1]  # bounded: never more than the batch size at once
    assert sum(r.deliveries_purged for r in reports) >= 1
    for table, column in [
        (Job, Job.id),
        (JobEvent, JobEvent.job_id),
        (Artifact, Artifact.job_id),
        (WebhookDelivery, WebhookDelivery.job_id),
    ]:
        assert count(table, column.in_(old)) == 0, table.__tablename__
    assert count(WebhookAttempt) == count(WebhookAttempt, WebhookAttempt.delivery_id.in_(select(WebhookDelivery.id)))
    assert not any(exists_in(storage, k) for k in old_keys)
    assert client.get(f"/v1/jobs/{old[0]}", headers=auth(key.secret)).status_code == 404
    assert get_job(client, key.secret, young)["output"]["artifact"]["url"]
    assert count(Job, Job.id.in_(unfinished_ids)) == 2
    with session_scope() as session:  # they are the test's rows, not a worker's: remove them
        session.execute(update(Job).where(Job.id.in_(unfinished_ids)).values(status="canceled"))


def test_a_job_whose_webhook_is_still_retried_is_purged_only_once_the_delivery_ends():
    key = fresh_admin()
    job_id = constructed_job(key.tenant, get_storage())
    with session_scope() as session:
        delivery = WebhookDelivery(job_id=job_id, event="completed", payload={}, status="pending")
        session.add(delivery)
        session.flush()
        delivery_id = delivery.id
    config = settings(job_retention=5 * DAY)
    run_until_done(config)
    assert count(Job, Job.id == job_id) == 1
    with session_scope() as session:
        session.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery_id).values(status="gave_up"))
    run_until_done(config)
    assert count(Job, Job.id == job_id) == 0
    assert count(WebhookDelivery, WebhookDelivery.id == delivery_id) == 0


# --- concurrency and outages ----------------------------------------------------------------------


def test_two_retention_runs_at_once_neither_double_delete_nor_fail():
    key = fresh_admin()
    storage = get_storage()
    job_ids = [constructed_job(key.tenant, storage, artifacts=2) for _ in range(20)]
    stored = [a.storage_key for job_id in job_ids for a in artifact_rows(job_id)]
    config = settings(artifact_ttl=DAY, job_retention=5 * DAY, retention_batch_size=4)
    reports: list[list[RetentionReport]] = [[], []]
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def run(n: int) -> None:
        try:
            barrier.wait()
            for _ in range(100):
                report = retention_batch(config)
                reports[n].append(report)
                if not report.more:
                    return
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    flat = [r for rs in reports for r in rs]
    assert all(r.storage_errors == 0 for r in flat)
    # Each object deleted exactly once (by expiry or, for the rest, by the purge) and each job purged once.
    assert sum(r.objects_deleted for r in flat) == 40
    assert 0 < sum(r.artifacts_expired for r in flat) <= 40
    assert sum(r.jobs_purged for r in flat) == 20
    assert count(Job, Job.id.in_(job_ids)) == 0
    assert not any(exists_in(storage, k) for k in stored)


def test_a_batch_skips_the_rows_another_run_holds_instead_of_waiting(services):
    from db import retention

    if not services.database.is_postgres:
        pytest.skip("SKIP LOCKED is PostgreSQL's; SQLite lets one process write at a time")
    key = fresh_admin()
    job_id = constructed_job(key.tenant, get_storage(), artifacts=2, days_old=3)
    config = settings(artifact_ttl=DAY)
    with session_scope() as held:  # another run's transaction, between its select and its write
        locked = [
            due for scope in retention.ttl_scopes(held, DAY) for due in retention.due_artifacts(held, scope, 1000)
        ]
        assert {due.job_id for due in locked} >= {job_id}
        started = time.monotonic()
        report = retention_batch(config)
        assert time.monotonic() - started < 5  # it did not wait for the locks
        assert report.artifacts_expired == 0 and report.objects_deleted == 0
        held.rollback()
    assert retention_batch(config).artifacts_expired >= 2
    assert count(Artifact, Artifact.job_id == job_id, Artifact.expired_at.is_not(None)) == 2


def test_storage_down_leaves_the_batch_for_the_next_run_with_nothing_marked(private_s3):
    config = settings(
        artifact_ttl=DAY,
        job_retention=5 * DAY,
        file_ttl=2 * DAY,
        s3_max_attempts=1,
        s3_connect_timeout_seconds=1.0,
        s3_read_timeout_seconds=2.0,
        **{name.removeprefix("GPUJOBS_").lower(): value for name, value in private_s3.env.items()},
    )
    storage = Storage(config)
    key = fresh_admin()
    expiring = constructed_job(key.tenant, storage, artifacts=2, days_old=3)  # past the TTL, not the retention
    purged = constructed_job(key.tenant, storage, artifacts=1, days_old=10)
    keys = [a.storage_key for job_id in (expiring, purged) for a in artifact_rows(job_id)]
    unused = constructed_file(key.tenant, storage, days_unused=3)
    keys.append(f"inputs/{unused}")

    private_s3.kill()
    down = retention_batch(config, storage)
    assert down.storage_errors == 3 and down.artifacts_expired == 0 and down.jobs_purged == 0
    assert down.files_deleted == 0 and file_row(unused) is not None
    assert count(Artifact, Artifact.job_id.in_([expiring, purged]), Artifact.expired_at.is_not(None)) == 0
    assert count(Job, Job.id == purged) == 1

    private_s3.restart()
    assert all(exists_in(storage, k) for k in keys)  # nothing was deleted while it was down
    reports = run_until_done(config, storage)
    assert sum(r.storage_errors for r in reports) == 0
    assert count(Artifact, Artifact.job_id == expiring, Artifact.expired_at.is_not(None)) == 2
    assert count(Job, Job.id == purged) == 0
    assert file_row(unused) is None
    assert not any(exists_in(storage, k) for k in keys)
