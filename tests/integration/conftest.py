"""Fixtures: real PostgreSQL (or SQLite), Redis, an S3 server, and gpujobs processes.

One session-wide deployment serves most tests: its database, broker and bucket are set in
``os.environ`` (children inherit them), a maintenance worker and beat run the reconciler,
and a default ``gpu`` worker runs jobs. Tests that need the gpu queue to themselves (worker
kills, races, a job that must stay queued) stop the default worker with ``no_gpu_worker``
and start their own with ``start_worker``; the next test that asks for ``gpu_worker`` gets
the default one back.

Every process reads its settings when it first needs them (and this one again after
``reset_process_caches``), and builds its Celery app from them then: importing ``api`` or
``worker`` connects to nothing.

The run says which database and broker it used (a line at the end of pytest's summary). Under
``CI=true`` a PostgreSQL or Redis that does not answer fails the run instead of the quiet fallback to
SQLite and an embedded Redis; ``GPUJOBS_TEST_EMBEDDED=1`` still asks for that embedded mode on purpose.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gpujobs.harness import processes
from gpujobs.harness.databases import Database, RedisDatabase, provision_database, provision_redis
from gpujobs.harness.processes import ManagedProcess, Stack
from gpujobs.harness.servers import EmbeddedS3, start_s3

ROOT = Path(__file__).resolve().parents[2]

# Small timings so that leases expire, reconciles run and cancels land within a second or two.
TEST_SETTINGS = {
    "GPUJOBS_LEASE_SECONDS": "3",
    "GPUJOBS_CONTROL_POLL_SECONDS": "0.2",
    "GPUJOBS_RECONCILE_INTERVAL_SECONDS": "1",
    "GPUJOBS_LOST_MESSAGE_SECONDS": "2",
    "GPUJOBS_MAX_ATTEMPTS": "2",
    "GPUJOBS_RATE_LIMIT_PER_MINUTE": "1000000",
    "GPUJOBS_MAX_BODY_BYTES": str(1024 * 1024),
    "GPUJOBS_MAX_IMAGE_PIXELS": "1000000",
    "GPUJOBS_S3_BUCKET": "gpujobs-test",
    "GPUJOBS_WORKER_CONCURRENCY": "2",
    # Idle OpenMP threads spin by default; on a small shared machine that slows torch in every process.
    "OMP_WAIT_POLICY": "PASSIVE",
    # Webhook tests send to a receiver on loopback; beat looks for due deliveries every second.
    "GPUJOBS_WEBHOOK_ALLOW_PRIVATE": "true",
    "GPUJOBS_WEBHOOK_SWEEP_SECONDS": "1",
    # A dataset over the image limit is cheap to build at this size.
    "GPUJOBS_FINETUNE_MAX_IMAGES": "20",
}


def embedded_only() -> bool:
    """``GPUJOBS_TEST_EMBEDDED=1``: run as on a bare machine (SQLite and an embedded Redis) even where
    PostgreSQL and Redis answer."""
    return os.environ.get("GPUJOBS_TEST_EMBEDDED", "").lower() in ("1", "true", "yes")


def strict_services() -> bool:
    """``CI=true`` (and not the deliberate embedded mode): PostgreSQL and Redis must answer, no fallback."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes") and not embedded_only()


def public_url(url: str) -> str:
    """``url`` without its password, for logs and the run's summary."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


# What the session's deployment runs on, for the line at the end of the run.
USED: dict[str, str] = {}


def reset_process_caches() -> None:
    """Make this process re-read GPUJOBS_* settings and reconnect to what they name."""
    from db.notify import reset_clients
    from db.session import dispose_engines
    from db.settings import reset_settings
    from db.storage import reset_storages

    reset_settings()
    reset_storages()
    reset_clients()
    dispose_engines()


def demo_models() -> Path:
    """The tiny demo models, built by the same code as ``gpujobs models demo``.

    Cached by the hash of the code that builds them (so a changed builder rebuilds),
    under ``GPUJOBS_TEST_MODEL_CACHE`` or ``~/.cache/gpujobs/test-models``.
    """
    import hashlib
    import subprocess

    sources = sorted([ROOT / "worker" / "models" / "demo.py", *(ROOT / "worker" / "jobs").glob("*/demo.py")])
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in sources)).hexdigest()[:16]
    base = Path(os.environ.get("GPUJOBS_TEST_MODEL_CACHE", Path.home() / ".cache" / "gpujobs" / "test-models"))
    folder = base / digest
    catalog = folder / "catalog.toml"
    base.mkdir(parents=True, exist_ok=True)
    # Parallel test processes (make test's xdist pass, or two runs at once) build them once: the
    # first to take the lock builds, the others find the catalog when they get it.
    with open(base / f"{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not catalog.exists():
            # In a child process: the test process itself must not import torch before it needs to.
            subprocess.run([*processes.gpujobs_command(), "models", "demo", str(folder)], check=True, cwd=ROOT)
    return catalog


@dataclass
class Services:
    root: Path
    database: Database
    redis: RedisDatabase
    s3: EmbeddedS3
    env: dict[str, str]


@pytest.fixture(scope="session", autouse=True)
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    root = tmp_path_factory.mktemp("gpujobs")
    saved_environ = dict(os.environ)
    database = redis_db = s3 = None
    try:
        import migrations

        # GPUJOBS_TEST_DATABASE_URL names a database to use instead of a fresh one.
        given = os.environ.get("GPUJOBS_TEST_DATABASE_URL")
        database = provision_database(root / "db", url=given, postgres=not embedded_only())
        if strict_services() and not given and not database.is_postgres:
            from gpujobs.harness.databases import postgres_unavailable_reason

            pytest.fail(
                f"CI=true: {postgres_unavailable_reason() or 'PostgreSQL is not in use'}; CI tests on PostgreSQL, "
                "not on a SQLite fallback. Start it (see .ci/run), or set GPUJOBS_TEST_EMBEDDED=1 to test the "
                "embedded mode on purpose.",
                pytrace=False,
            )
        migrations.upgrade(database.url)
        redis_db = provision_redis(root, machine=not embedded_only())
        if strict_services() and redis_db.embedded is not None:
            pytest.fail(
                "CI=true: the machine's Redis on 127.0.0.1:6379 does not answer (or has no free database index); "
                "CI tests on it, not on an embedded fallback. Start it (see .ci/run), or set "
                "GPUJOBS_TEST_EMBEDDED=1 to test the embedded mode on purpose.",
                pytrace=False,
            )
        USED["database"] = f"{'PostgreSQL' if database.is_postgres else 'SQLite'} {public_url(database.url)}"
        USED["broker"] = f"Redis {public_url(redis_db.url)} ({'embedded' if redis_db.embedded else 'machine'})"
        s3 = start_s3(root / "s3")
        catalog = demo_models()
        env = {
            "GPUJOBS_MODEL_CATALOG": str(catalog),
            **TEST_SETTINGS,
            "GPUJOBS_DATABASE_URL": database.url,
            "GPUJOBS_BROKER_URL": redis_db.url,
            "GPUJOBS_S3_ENDPOINT_URL": s3.endpoint_url,
            "GPUJOBS_S3_ACCESS_KEY": s3.access_key,
            "GPUJOBS_S3_SECRET_KEY": s3.secret_key,
            "GPUJOBS_VAR_DIR": str(root / "var"),
        }
        for name in [name for name in os.environ if name.startswith("GPUJOBS_") and name not in env]:
            if name != "GPUJOBS_TEST_DATABASE_URL":
                del os.environ[name]  # a developer's own settings must not leak into the tests
        os.environ.update(env)
        reset_process_caches()
        from db.storage import get_storage

        get_storage().ensure_bucket()
        yield Services(root=root, database=database, redis=redis_db, s3=s3, env=env)
    finally:
        os.environ.clear()
        os.environ.update(saved_environ)
        if s3 is not None:
            s3.stop()
        if redis_db is not None:
            redis_db.release()
        if database is not None:
            database.drop()


@pytest.fixture(scope="session")
def demo_catalog(services: Services) -> Path:
    """The session's model catalog: every demo model (``gpujobs models demo``), for tests in this process."""
    return Path(services.env["GPUJOBS_MODEL_CATALOG"])


@pytest.fixture
def api_catalog(app: Any, demo_catalog: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``use(extra)``: the in-process API's catalog becomes the demo models plus the ``extra`` TOML, for this
    test (the workers keep theirs unless given the returned path)."""

    def use(extra: str) -> Path:
        path = tmp_path / "api-catalog.toml"
        path.write_text(demo_catalog.read_text() + "\n" + extra)
        settings = app.config["GPUJOBS_SETTINGS"].model_copy(update={"model_catalog": path})
        monkeypatch.setitem(app.config, "GPUJOBS_SETTINGS", settings)
        return path

    return use


@pytest.fixture(scope="session")
def database_url(services: Services) -> str:
    return services.database.url


# --- keys ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    id: str
    tenant: str
    secret: str


@dataclass(frozen=True)
class Keys:
    admin: Key
    admin_b: Key  # an admin in another tenant (idempotency keys are per tenant)
    user_a: Key
    user_b: Key


def make_key(name: str, role: str, tenant: str | None = None, database_url: str | None = None) -> Key:
    from db.keys import create_key
    from db.models import Role
    from db.session import session_scope

    with session_scope(database_url) as session:
        row, secret = create_key(session, name, Role(role), tenant_id=tenant)
        return Key(id=row.id, tenant=row.tenant_id, secret=secret)


@pytest.fixture(scope="session")
def keys(services: Services) -> Keys:
    return Keys(
        admin=make_key("test admin", "admin"),
        admin_b=make_key("test admin b", "admin"),
        user_a=make_key("test user a", "user"),
        user_b=make_key("test user b", "user"),
    )


# --- the API ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def app(services: Services) -> Any:
    import api

    return api.create_app()


@pytest.fixture
def client(app: Any) -> Any:
    return app.test_client()


# --- processes -------------------------------------------------------------------------------------


class Cluster:
    """The session's processes: beat and a maintenance worker always; the default gpu worker on demand."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.gpu: ManagedProcess | None = None
        self.beat: ManagedProcess | None = None

    @contextmanager
    def beat_paused(self) -> Iterator[None]:
        """No beat inside the block (so no periodic reconcile or webhook sweep); started again after it."""
        if self.beat is not None:
            self.beat.stop()
        try:
            yield
        finally:
            self.beat = self.stack.start_beat()

    def ensure_gpu_worker(self) -> ManagedProcess:
        if self.gpu is None or not self.gpu.alive:
            self.gpu = self.stack.start_worker("gpu", concurrency=2, name=f"default-gpu-{len(self.stack.processes)}")
        return self.gpu

    def stop_gpu_worker(self) -> None:
        quiesce()
        if self.gpu is not None:
            self.gpu.stop()
            self.gpu = None
        purge_queue("gpu")


def quiesce(timeout: float = 30.0) -> None:
    """Cancel every unfinished job and wait until none runs, so the next test starts from a quiet queue."""
    from sqlalchemy import select

    from db import transitions
    from db.models import Job, JobStatus
    from db.session import session_scope

    with session_scope() as session:
        unfinished = session.scalars(
            select(Job.id).where(Job.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value]))
        ).all()
        for job_id in unfinished:
            # One that finished between the read and the cancel has nothing left to stop.
            with contextlib.suppress(transitions.TransitionError):
                transitions.request_cancel(session, job_id)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope() as session:
            running = session.scalars(select(Job.id).where(Job.status == JobStatus.RUNNING.value)).all()
        if not running:
            return
        time.sleep(0.1)
    raise AssertionError(f"jobs still running {timeout:g}s after their cancel: {running}")


def purge_queue(queue: str) -> int:
    """Drop the messages waiting in ``queue`` (of jobs that are all finished by now)."""
    from worker.celery_app import producer

    with producer().connection_for_write() as connection:
        return connection.default_channel.queue_purge(queue) or 0


@pytest.fixture(scope="session")
def cluster(services: Services) -> Iterator[Cluster]:
    stack = Stack(dict(os.environ), services.root / "logs", label="session")
    try:
        maintenance = stack.start_worker("maintenance", concurrency=2, name="session-maintenance", wait=False)
        cluster = Cluster(stack)
        cluster.ensure_gpu_worker()
        stack.wait_worker_ready(maintenance)
        cluster.beat = stack.start_beat()
        yield cluster
    finally:
        stack.stop_all()


@pytest.fixture
def gpu_worker(cluster: Cluster) -> ManagedProcess:
    """The default worker on the gpu queue (started again if a test stopped it)."""
    return cluster.ensure_gpu_worker()


@pytest.fixture
def no_gpu_worker(cluster: Cluster) -> Cluster:
    """Nothing consumes the gpu queue (and nothing runs) until the test starts its own worker."""
    cluster.stop_gpu_worker()
    return cluster


@pytest.fixture
def start_worker(cluster: Cluster) -> Iterator[Any]:
    """Start workers of the session's deployment for this test only; all stopped at its end."""
    started: list[ManagedProcess] = []

    def start(queues: str = "gpu", concurrency: int = 1, wait: bool = True) -> ManagedProcess:
        worker = cluster.stack.start_worker(queues, concurrency=concurrency, wait=wait)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        if worker.alive:
            worker.kill()  # whatever it still runs was the test's; a warm shutdown would wait for it


# --- what the run used, failure reports ----------------------------------------------------------------


# Test modules that must run alone, after the parallel pass (`make test` runs them with `-m serial`):
# each measures timing under injected faults (freezes, kills, shifted clocks, floods) or drives the
# machine hard enough that a neighbour test on 2 cores would blur what it measures or asserts.
SERIAL_MODULES = frozenset(
    {
        "test_auth_throttle",
        "test_fault_matrix",
        "test_lease_clock",
        "test_multihost",
        "test_redis_outage",
        "test_scheduling",
        "test_stale_attempts",
        "test_storage_outage",
        "test_up_supervision",
        "test_wait_flood",
        "test_waiting",  # a wait answered within a second of the job's end: a loaded neighbour delays it
        "test_webhooks_fairness",
        "test_worker_failures",
    }
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "serial: runs alone, after the parallel pass (SERIAL_MODULES)")
    missing = sorted(name for name in SERIAL_MODULES if not (Path(__file__).parent / f"{name}.py").exists())
    if missing:  # a renamed module would silently join the parallel pass
        raise pytest.UsageError(f"SERIAL_MODULES names missing test modules: {', '.join(missing)}")


# The parallel pass hands whole modules to its processes in collection order (`make test` passes
# `--no-loadscope-reorder`; xdist's own order, most tests first, put the one-test schemathesis run of
# 150 s last, alone, at the end of the pass). The longest modules go first, the way a longest-first
# schedule keeps the processes busy to the end; every other module keeps its place after them.
# From `--durations` of the parallel pass (2026-12-02, seconds of test time per module, longest first).
LONGEST_MODULES = (
    "test_bench_gpu",  # 196 in the fresh-clone CI of 2026-12-03 (three benchmarks at toy sizes)
    "test_schemathesis",  # 156 (its bound was 150 s; 100 s now)
    "test_finetune",  # 87
    "test_webhooks",  # 75
    "test_drain",  # 52
    "test_batching",  # about 35 (2026-12-03)
    "test_readme",  # 49
    "test_segmentation",  # 42
    "test_diffusion",  # 34
    "test_replicate",  # 34
    "test_worker_faults",  # 34
    "test_client_sdk",  # 31
    "test_broker_outage",  # 29
    "test_admin_browser",  # 29
    "test_up",  # 28
    "test_client_cli",  # 28
    "test_remote_inputs",  # 28
    "test_drain_finetune",  # 27
    "test_events",  # 25
    "test_warm_start",  # about 25 (2026-12-03)
    "test_database_outage",  # 25
    "test_bench_scale",  # 24
)


def _module_name(item: pytest.Item) -> str:
    return item.module.__name__.rsplit(".", 1)[-1] if item.module is not None else ""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _module_name(item) in SERIAL_MODULES:
            item.add_marker(pytest.mark.serial)
    rank = {name: place for place, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: rank.get(_module_name(item), len(rank)))  # stable: the rest keep their order


def pytest_sessionfinish(session: pytest.Session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: tell the controller what it used
        workeroutput["gpujobs_used"] = dict(USED)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """The xdist controller: the services each worker used, for the summary line."""
    used = getattr(node, "workeroutput", {}).get("gpujobs_used") or {}
    for what, value in used.items():
        USED.setdefault(what, value)
        if value not in USED[what]:
            USED[what] += f"; {value}"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if USED:
        mode = (
            "embedded on purpose (GPUJOBS_TEST_EMBEDDED=1)"
            if embedded_only()
            else "strict (CI=true)"
            if strict_services()
            else "fallback to SQLite/embedded Redis allowed (no CI=true)"
        )
        terminalreporter.write_line(
            f"gpujobs integration services: database {USED['database']}; broker {USED['broker']}; {mode}"
        )


_STARTED_AT = pytest.StashKey[float]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[_STARTED_AT] = time.time()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    since = item.stash.get(_STARTED_AT, 0.0) - 1
    for process in processes.STARTED:
        try:
            touched = process.log_path.stat().st_mtime >= since
        except OSError:
            continue
        if touched:
            report.sections.append((f"log tail of {process.name} (pid {process.pid})", process.tail(80)))
