"""``gpujobs up``: the whole system on one machine, supervised until Ctrl-C.

Order of a start: embedded Redis and S3 (unless their URLs are configured),
migrations, bucket, bootstrap admin key, demo models (``--demo``), then the API,
a worker and beat as supervised children; "ready" once ``GET /readyz`` answers
200 and a worker answers a ping. Every process it starts is supervised: a child or
an embedded server that dies is restarted (with backoff, on the same ports and data
directory) while the others carry on. Ctrl-C or SIGTERM stops the children, then the
embedded servers.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import click

from gpujobs.admin import SETUP_FILE
from gpujobs.harness.processes import Interrupted, Stack, gpujobs_command, interrupt, on_stop_signals
from gpujobs.harness.servers import ServiceError, start_redis, start_s3
from gpujobs.harness.supervisor import STOP_TIMEOUT, Fatal, Supervisor, tail
from worker.jobs.spec import Queue

UP_QUEUES = ",".join(queue.value for queue in Queue)  # one worker serves every queue
READY_TIMEOUT = 120.0
# Ctrl-C: the worker finishes a job within this, else hands it back to the queue (it runs again at the
# next `up`), inside the supervisor's stop timeout; GPUJOBS_WORKER_DRAIN_SECONDS, if set, wins.
UP_DRAIN_SECONDS = 5.0
WORKER_READY_TIMEOUT = 60.0
POLL_SECONDS = 0.25


def run_up(*, host: str, port: int, demo: bool) -> int:
    """Start, supervise until a signal, stop; returns the exit status."""
    from db import logs
    from db.settings import get_settings

    # Warnings only from libraries (and so no Alembic progress lines): the children keep full logs.
    logs.configure("up", logging.WARNING)
    var_dir = get_settings().var_dir.resolve()
    var_dir.mkdir(parents=True, exist_ok=True)
    supervisor = Supervisor(Stack({}, var_dir / "logs"))
    previous = on_stop_signals(interrupt)
    status = 0
    try:
        _start(supervisor, var_dir, host, port, demo)
        while True:
            time.sleep(0.5)
            supervisor.check()
    except Interrupted as stop:
        click.echo(f"\n{stop.args[0]} received: stopping…")
    except Fatal as exc:
        click.echo(f"gpujobs up: {exc}", err=True)
        status = 1
    except ServiceError as exc:
        click.echo(f"gpujobs up: an embedded server did not start: {exc}", err=True)
        status = 1
    finally:

        def hurry(_signum: int, _frame: object) -> None:
            supervisor.hurry = True  # a second Ctrl-C kills instead of waiting

        on_stop_signals(hurry)
        supervisor.stop(timeout=_stop_timeout())
        (var_dir / SETUP_FILE).unlink(missing_ok=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    click.echo("stopped" if status == 0 else "stopped after an error")
    return status


def _start(supervisor: Supervisor, var_dir: Path, host: str, port: int, demo: bool) -> None:
    echo = supervisor.echo
    _check_port_free(host, port)
    embedded_s3 = "GPUJOBS_S3_ENDPOINT_URL" not in os.environ
    env = _configure(supervisor, var_dir)
    os.environ.update(env)
    stack = supervisor.stack
    stack.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    _reload_settings()

    from db.settings import get_settings

    settings = get_settings()
    echo(f"database: {_display_url(settings.database_url)}")
    _migrate(settings.database_url)
    echo("database schema: up to date")
    _ensure_bucket(settings)
    admin_key, key_source = _bootstrap_admin_key(var_dir)
    if demo:
        demo_env = _build_demo_models(var_dir, echo)
        os.environ.update(demo_env)
        stack.env.update(demo_env)

    from db.session import dispose_engines

    dispose_engines()  # children open their own connections
    gpujobs = gpujobs_command()
    stack.start("api", [*gpujobs, "api", "--host", host, "--port", str(port)])
    if "GPUJOBS_WORKER_DRAIN_SECONDS" not in os.environ:
        stack.env["GPUJOBS_WORKER_DRAIN_SECONDS"] = f"{UP_DRAIN_SECONDS:g}"
    stack.start("worker", [*gpujobs, "worker", "--queues", UP_QUEUES, "--name", "up"])
    stack.start("beat", [*gpujobs, "beat"])
    echo(f"api, worker and beat starting (logs in {stack.log_dir})")

    url = f"http://{_probe_host(host)}:{port}"
    _wait_ready(supervisor, f"{url}/readyz")
    _wait_worker(supervisor)
    _record_setup(var_dir, url, settings.database_url, settings.s3_bucket, embedded_s3, key_source)
    echo("")
    echo(f"gpujobs is ready at {url}")
    echo(f"  admin key: {admin_key}  ({key_source})")
    echo(f"  API docs:  {url}/docs")
    echo("  try a job: " + _curl_example(url, admin_key))
    echo("Press Ctrl-C to stop.")


def _record_setup(var_dir: Path, url: str, database_url: str, bucket: str, embedded_s3: bool, key_source: str) -> None:
    """Write ``var/up.json`` (private: it names the S3 key file) for ``gpujobs info``; removed on stop."""
    admin_key_file = var_dir / "admin-key"
    setup = {
        "pid": os.getpid(),
        "api_url": url,
        "database_url": database_url,
        "broker_url": os.environ["GPUJOBS_BROKER_URL"],
        "s3_endpoint_url": os.environ["GPUJOBS_S3_ENDPOINT_URL"],
        "s3_bucket": bucket,
        "s3_credentials_file": str(var_dir / "s3-credentials.json") if embedded_s3 else None,
        "admin_key_file": str(admin_key_file) if "GPUJOBS_ADMIN_KEY" not in key_source else None,
        "model_catalog": os.environ.get("GPUJOBS_MODEL_CATALOG"),  # --demo's, or the configured one
        "var_dir": str(var_dir),
    }
    _write_private(var_dir / SETUP_FILE, json.dumps(setup, indent=2) + "\n")


def _stop_timeout() -> float:
    """Long enough for the worker's drain window and its hand-back (a few seconds more)."""
    from db.settings import get_settings

    drain = get_settings().worker_drain_seconds if "GPUJOBS_WORKER_DRAIN_SECONDS" in os.environ else UP_DRAIN_SECONDS
    return max(STOP_TIMEOUT, drain + 5)


def _configure(supervisor: Supervisor, var_dir: Path) -> dict[str, str]:
    """Environment for every process: the configured services, or embedded ones started here."""
    echo = supervisor.echo
    env = {"GPUJOBS_VAR_DIR": str(var_dir)}
    if "GPUJOBS_DATABASE_URL" not in os.environ:
        env["GPUJOBS_DATABASE_URL"] = f"sqlite:///{var_dir / 'gpujobs.db'}"
    if "GPUJOBS_BROKER_URL" in os.environ:
        echo(f"broker: {_display_url(os.environ['GPUJOBS_BROKER_URL'])} (GPUJOBS_BROKER_URL)")
    else:
        redis = start_redis(var_dir / "redis")
        supervisor.dependencies.append(redis)
        env["GPUJOBS_BROKER_URL"] = redis.url
        echo(f"broker: embedded Redis at {redis.url}")
    if "GPUJOBS_S3_ENDPOINT_URL" in os.environ:
        echo(f"storage: {os.environ['GPUJOBS_S3_ENDPOINT_URL']} (GPUJOBS_S3_ENDPOINT_URL)")
    else:
        access_key, secret_key = _s3_credentials(var_dir)
        s3 = start_s3(var_dir / "s3", access_key=access_key, secret_key=secret_key)
        supervisor.dependencies.append(s3)
        env |= {
            "GPUJOBS_S3_ENDPOINT_URL": s3.endpoint_url,
            "GPUJOBS_S3_ACCESS_KEY": access_key,
            "GPUJOBS_S3_SECRET_KEY": secret_key,
        }
        echo(f"storage: embedded SeaweedFS S3 at {s3.endpoint_url}")
    return env


def _reload_settings() -> None:
    from db import notify, session, settings, storage

    settings.reset_settings()
    storage.reset_storages()
    notify.reset_clients()
    session.dispose_engines()


def _s3_credentials(var_dir: Path) -> tuple[str, str]:
    """The embedded S3 server's keys: generated once, kept in the var dir."""
    path = var_dir / "s3-credentials.json"
    if path.exists():
        stored = json.loads(path.read_text())
        return stored["access_key"], stored["secret_key"]
    access_key, secret_key = "gpujobs", secrets.token_urlsafe(24)
    _write_private(path, json.dumps({"access_key": access_key, "secret_key": secret_key}) + "\n")
    return access_key, secret_key


def _bootstrap_admin_key(var_dir: Path) -> tuple[str, str]:
    """GPUJOBS_ADMIN_KEY if set, else the key kept in ``var/admin-key`` (created on the first start)."""
    from sqlalchemy import select

    from db.keys import create_key, ensure_admin_key, generate_key, hash_key
    from db.models import ApiKey, Role
    from db.session import session_scope
    from db.settings import get_settings

    configured = get_settings().admin_key
    if configured:
        with session_scope() as session:
            ensure_admin_key(session, configured)
        return configured, "from GPUJOBS_ADMIN_KEY"

    path = var_dir / "admin-key"
    if path.exists():
        plaintext = path.read_text().strip()
        source = f"kept in {path}"
    else:
        plaintext = generate_key()
        _write_private(path, plaintext + "\n")  # the file first: a failed insert is retried next start
        source = f"new; kept in {path}"
    with session_scope() as session:
        existing = session.scalars(select(ApiKey).where(ApiKey.key_hash == hash_key(plaintext))).one_or_none()
        if existing is None:
            create_key(session, "bootstrap admin", Role.ADMIN, plaintext=plaintext)
        elif existing.revoked_at is not None:
            # An operator revoked it on purpose: say so rather than quietly bring it back.
            source = f"REVOKED; delete {path} and restart for a new one"
    return plaintext, source


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    tmp.replace(path)


def _migrate(database_url: str) -> None:
    from sqlalchemy.exc import SQLAlchemyError

    import migrations

    try:
        migrations.upgrade(database_url)
    except SQLAlchemyError as exc:
        raise Fatal(f"could not migrate the database {_display_url(database_url)}: {exc}") from exc


def _ensure_bucket(settings) -> None:  # type: ignore[no-untyped-def]
    from botocore.exceptions import BotoCoreError, ClientError

    from db.storage import get_storage

    try:
        get_storage(settings).ensure_bucket()
    except (BotoCoreError, ClientError) as exc:
        where = settings.s3_endpoint_url or "AWS S3"
        raise Fatal(f"could not reach or create bucket {settings.s3_bucket!r} at {where}: {exc}") from exc


def _build_demo_models(var_dir: Path, echo: Callable[[str], None]) -> dict[str, str]:
    """Build the tiny demo models and point the children at their catalog; returns that environment.

    The build runs in a child process (`gpujobs models demo`), so this supervisor never holds torch.
    """
    if "GPUJOBS_MODEL_CATALOG" in os.environ:
        echo(
            f"demo: GPUJOBS_MODEL_CATALOG is set ({os.environ['GPUJOBS_MODEL_CATALOG']}); using it, not the demo models"
        )
        return {}
    if importlib.util.find_spec("worker.models") is None or importlib.util.find_spec("worker.models.demo") is None:
        echo("demo: no model job types are installed yet; the diagnostic job type works without models")
        return {}
    target = var_dir / "demo-models"
    echo(f"demo: building the tiny demo models in {target} (once)")
    build = subprocess.run(
        [*gpujobs_command(), "models", "demo", str(target)],
        env={**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    catalog = target / "catalog.toml"
    if build.returncode != 0 or not catalog.exists():
        details = "\n".join("  " + line for line in (build.stderr or build.stdout).strip().splitlines()[-15:])
        echo(f"demo: could not build the demo models; only the diagnostic job type can run:\n{details}")
        return {}
    echo(f"demo: model catalog {catalog}")
    return {"GPUJOBS_MODEL_CATALOG": str(catalog)}


def _check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise Fatal(f"cannot listen on {host}:{port} ({exc.strerror}); choose another with --port") from exc


def _wait_ready(supervisor: Supervisor, readyz: str) -> None:
    """Until GET /readyz answers 200 (children are restarted meanwhile if they crash)."""
    deadline = time.monotonic() + READY_TIMEOUT
    last = "no answer yet"
    while time.monotonic() < deadline:
        supervisor.check()
        try:
            with urllib.request.urlopen(readyz, timeout=2) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            last = f"{exc.code}: {exc.read(500).decode(errors='replace')}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(getattr(exc, "reason", exc))
        time.sleep(POLL_SECONDS)
    raise Fatal(
        f"the API did not become ready within {READY_TIMEOUT:g} s; {readyz} said: {last}\n"
        f"Last lines of the API log:\n{tail(supervisor.stack.processes[0].log_path)}"
    )


def _wait_worker(supervisor: Supervisor) -> None:
    """Until a worker answers a ping, so that "ready" means jobs run (a warning, not an error)."""
    from kombu.exceptions import OperationalError

    from worker.celery_app import producer

    app = producer()

    deadline = time.monotonic() + WORKER_READY_TIMEOUT
    while time.monotonic() < deadline:
        supervisor.check()
        try:
            if app.control.ping(timeout=0.5):
                return
        except (OperationalError, OSError):  # broker hiccup: /readyz just said it answers, so try again
            time.sleep(POLL_SECONDS)
    supervisor.echo("warning: no worker answers yet; jobs wait in their queue until one does (see its log)")


def _display_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _probe_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _curl_example(url: str, admin_key: str) -> str:
    return (
        f"curl -s {url}/v1/jobs -H 'Authorization: Bearer {admin_key}' -H 'Prefer: wait=10' "
        '-H \'Content-Type: application/json\' -d \'{"type": "diagnostic", "input": {"steps": 3}}\''
    )
