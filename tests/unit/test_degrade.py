"""Degrade, don't fail: which errors are a dependency's outage (503, never 500), and readiness's bounds.

Pure logic: no services. The same behaviour through real servers is tested in
``tests/integration/test_database_outage.py`` and ``tests/integration/test_fault_matrix.py``.
"""

from __future__ import annotations

import threading
import time

import kombu.exceptions
import psycopg
import pytest
import redis
from botocore.exceptions import EndpointConnectionError, ReadTimeoutError
from flask import Flask
from sqlalchemy import exc as sa

from api import errors
from api.errors import ApiError, unavailable
from api.health import Readiness
from db.session import postgres_connect_args
from db.settings import Settings
from db.storage import StorageError


def _sa(kind: type[sa.DBAPIError], orig: Exception) -> sa.DBAPIError:
    return kind("SELECT 1", {}, orig)


@pytest.mark.parametrize(
    ("error", "dependency"),
    [
        (_sa(sa.OperationalError, psycopg.OperationalError("connection refused")), "database"),
        (_sa(sa.OperationalError, psycopg.errors.QueryCanceled("statement timeout")), "database"),
        (_sa(sa.InterfaceError, psycopg.InterfaceError("the connection is closed")), "database"),
        (sa.TimeoutError("QueuePool limit of size 10 overflow 20 reached"), "database"),
        (psycopg.OperationalError("consuming input failed"), "database"),
        (StorageError("could not store inputs/x"), "storage"),
        (EndpointConnectionError(endpoint_url="http://s3"), "storage"),
        (ReadTimeoutError(endpoint_url="http://s3"), "storage"),
        (redis.ConnectionError("Error 111 connecting"), "redis"),
        (redis.TimeoutError("Timeout reading from socket"), "redis"),
        (kombu.exceptions.OperationalError("Error 111 connecting"), "broker"),
        (ConnectionRefusedError(111, "refused"), "dependency"),
        (TimeoutError("timed out"), "dependency"),
    ],
)
def test_an_outage_is_a_503_naming_the_dependency_with_retry_after(error: Exception, dependency: str) -> None:
    outage = unavailable(error)
    assert outage is not None
    assert outage.status == 503
    assert outage.extra == {"dependency": dependency}
    assert int(outage.headers["Retry-After"]) > 0


def test_an_outage_raised_from_is_still_an_outage() -> None:
    try:
        try:
            raise sa.OperationalError("SELECT 1", {}, psycopg.OperationalError("server closed the connection"))
        except sa.OperationalError as exc:
            raise RuntimeError("could not record the job") from exc
    except RuntimeError as wrapped:
        outage = unavailable(wrapped)
    assert outage is not None and outage.extra["dependency"] == "database"


@pytest.mark.parametrize(
    "error",
    [
        ValueError("a bug"),
        KeyError("x"),
        _sa(sa.IntegrityError, psycopg.errors.UniqueViolation("duplicate key")),
        _sa(sa.ProgrammingError, psycopg.errors.UndefinedColumn("no such column")),
    ],
)
def test_other_errors_are_not_outages(error: Exception) -> None:
    assert unavailable(error) is None


def _app() -> Flask:
    app = Flask(__name__)
    errors.register(app)

    @app.get("/database")
    def database() -> str:
        raise sa.OperationalError("SELECT 1", {}, psycopg.OperationalError("connection refused"))

    @app.get("/pool")
    def pool() -> str:
        raise sa.TimeoutError("QueuePool limit reached, connection timed out, timeout 5")

    @app.get("/storage-view")
    def storage_view() -> str:
        raise ApiError(503, "Storage is unavailable; the file was not saved. Try again.")

    @app.get("/bug")
    def bug() -> str:
        raise ValueError("a bug")

    return app


@pytest.mark.parametrize("path", ["/database", "/pool"])
def test_the_app_answers_an_outage_with_a_503_problem(path: str) -> None:
    response = _app().test_client().get(path)
    assert response.status_code == 503
    assert response.mimetype == "application/problem+json"
    assert response.headers["Retry-After"] == str(errors.UNAVAILABLE_RETRY_AFTER_SECONDS)
    body = response.get_json()
    assert body["status"] == 503 and body["dependency"] == "database"
    assert "database" in body["detail"]


def test_every_503_carries_retry_after_and_a_bug_stays_a_500() -> None:
    client = _app().test_client()
    assert client.get("/storage-view").headers["Retry-After"] == str(errors.UNAVAILABLE_RETRY_AFTER_SECONDS)
    bug = client.get("/bug")
    assert bug.status_code == 500 and "Retry-After" not in bug.headers


# --- readiness --------------------------------------------------------------------------------------


def test_readiness_answers_within_its_timeout_while_a_check_hangs() -> None:
    release = threading.Event()
    calls = {"hung": 0, "fine": 0}

    def hung() -> None:
        calls["hung"] += 1
        release.wait(30)

    def fine() -> None:
        calls["fine"] += 1

    def broken() -> None:
        raise ConnectionRefusedError(111, "Connection refused")

    readiness = Readiness({"database": fine, "broker": hung, "storage": broken}, timeout=0.3, cache_seconds=0)
    try:
        started = time.monotonic()
        states = readiness.states()
        assert time.monotonic() - started < 1.0
        assert states["database"] == "ok"
        assert states["broker"] == "down: no answer within 0.3 s"
        assert states["storage"].startswith("down: ConnectionRefusedError")
        # Probes while it still hangs wait for the same run: no second call to the hung dependency.
        for _ in range(5):
            assert readiness.states()["broker"].startswith("down: no answer")
        assert calls == {"hung": 1, "fine": 6}
    finally:
        release.set()
    deadline = time.monotonic() + 5
    while readiness.states()["broker"] != "ok" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert readiness.states()["broker"] == "ok"  # once it answers, the next probe starts a fresh check


def test_readiness_reuses_its_result_within_the_cache_period() -> None:
    calls = []
    readiness = Readiness({"database": lambda: calls.append(1)}, timeout=1, cache_seconds=60)
    for _ in range(50):
        assert readiness.states() == {"database": "ok"}
    assert len(calls) == 1


def test_readiness_checks_run_concurrently() -> None:
    def slow() -> None:
        time.sleep(0.3)

    readiness = Readiness({name: slow for name in ("a", "b", "c", "d")}, timeout=2, cache_seconds=0)
    started = time.monotonic()
    assert set(readiness.states().values()) == {"ok"}
    assert time.monotonic() - started < 0.9  # not 4 × 0.3 s


# --- PostgreSQL bounds --------------------------------------------------------------------------------


def test_postgres_connections_carry_their_bounds() -> None:
    settings = Settings(database_connect_timeout_seconds=4, database_statement_timeout_seconds=12.5)
    args = postgres_connect_args(settings)
    assert args["connect_timeout"] == 4
    assert args["options"] == "-c statement_timeout=12500"
    assert args["tcp_user_timeout"] == 14500  # the client's own bound: statement timeout + 2 s
    assert args["keepalives"] == 1
