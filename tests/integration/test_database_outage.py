"""PostgreSQL refused, hung or slow: bounded calls, and the API answers 503 (never 500, never a hang).

In this process, with Flask's test client (plain threads, no gevent: the fault matrix runs the same
through `gpujobs api`), against a private PostgreSQL that the tests freeze and kill.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import exc as sa
from sqlalchemy import text

from db.session import PING_AFTER_IDLE_SECONDS
from tests.integration.admin_client import HTML, logged_in
from tests.integration.client import assert_problem, auth
from tests.integration.conftest import make_key
from tests.integration.private_services import PrivatePostgres, postgres_bin

CONNECT = 2  # libpq's least connect_timeout
STATEMENT = 1.0
CLIENT_BOUND = STATEMENT + 2  # db.session.CLIENT_GRACE_SECONDS
# A request on a hung server: the ping of its pooled connection, then one new connection.
REQUEST_BOUND = 2 * CONNECT + 1.0


@pytest.fixture(scope="module")
def postgres(services: Any) -> Iterator[PrivatePostgres]:
    import migrations

    if postgres_bin() is None:
        pytest.fail("these tests need PostgreSQL's server binaries (/usr/lib/postgresql/*/bin)")
    server = PrivatePostgres.create()
    try:
        migrations.upgrade(server.url)
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def settings(postgres: PrivatePostgres) -> Any:
    from db.settings import get_settings

    return get_settings().model_copy(
        update={
            "database_url": postgres.url,
            "database_connect_timeout_seconds": CONNECT,
            "database_statement_timeout_seconds": STATEMENT,
            "database_pool_timeout_seconds": 2.0,
            "readiness_timeout_seconds": 1.0,
            "readiness_cache_seconds": 0.0,
        }
    )


@pytest.fixture(scope="module")
def outage_app(settings: Any) -> Any:
    import api

    return api.create_app(settings)


@pytest.fixture
def engine(settings: Any) -> Any:
    from db.session import get_engine

    return get_engine(settings.database_url, settings)


@pytest.fixture(autouse=True)
def running(postgres: PrivatePostgres) -> Iterator[None]:
    """Every test starts and ends with the server up."""
    yield
    if postgres.process is not None and postgres.process.poll() is None:
        postgres.thaw()
    else:
        postgres.start()


def test_a_statement_past_the_statement_timeout_is_canceled_and_its_connection_kept(engine: Any) -> None:
    with engine.connect() as connection:
        started = time.monotonic()
        with pytest.raises(sa.OperationalError) as raised:
            connection.execute(text("SELECT pg_sleep(5)"))
        assert isinstance(raised.value.orig, psycopg.errors.QueryCanceled)
        assert STATEMENT <= time.monotonic() - started < STATEMENT + 1
        connection.rollback()
        assert connection.execute(text("SELECT 1")).scalar() == 1  # the same connection, still good


def test_a_frozen_server_costs_a_query_the_client_bound_then_a_connect_the_connect_timeout(
    postgres: PrivatePostgres, engine: Any
) -> None:
    connection = engine.connect()
    connection.execute(text("SELECT 1"))
    postgres.freeze()
    started = time.monotonic()
    with pytest.raises(sa.OperationalError) as raised:
        connection.execute(text("SELECT 2"))
    elapsed = time.monotonic() - started
    assert raised.value.connection_invalidated, "the connection must be dropped, not reused"
    assert CLIENT_BOUND <= elapsed < CLIENT_BOUND + 1, elapsed
    connection.close()

    started = time.monotonic()
    with pytest.raises(sa.OperationalError), engine.connect() as fresh:
        fresh.execute(text("SELECT 3"))
    assert time.monotonic() - started < CONNECT + 1

    postgres.thaw()
    started = time.monotonic()
    with engine.connect() as fresh:
        assert fresh.execute(text("SELECT 4")).scalar() == 4
    assert time.monotonic() - started < 1


def test_a_connection_returned_moments_ago_goes_out_unpinged_and_an_idle_one_is_pinged(
    postgres: PrivatePostgres, engine: Any
) -> None:
    engine.dispose()
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))
    postgres.freeze()
    # Returned a moment ago: handed out at once, no ping; its first statement then meets the client bound.
    started = time.monotonic()
    connection = engine.connect()
    assert time.monotonic() - started < 0.2
    with pytest.raises(sa.OperationalError) as raised:
        connection.execute(text("SELECT 2"))
    assert raised.value.connection_invalidated
    assert CLIENT_BOUND <= time.monotonic() - started < CLIENT_BOUND + 1
    connection.close()
    postgres.thaw()

    with engine.connect() as connection:
        connection.execute(text("SELECT 3"))
    time.sleep(PING_AFTER_IDLE_SECONDS + 0.1)
    postgres.freeze()
    # Idle past the window: the checkout pings (the connect timeout), then tries one fresh connection.
    started = time.monotonic()
    with pytest.raises(sa.OperationalError):
        engine.connect()
    assert CONNECT <= time.monotonic() - started < REQUEST_BOUND


def _timed(client: Any, path: str, **kwargs: Any) -> tuple[Any, float]:
    started = time.monotonic()
    response = client.get(path, **kwargs)
    return response, time.monotonic() - started


@pytest.mark.parametrize("fault", ["frozen", "killed"])
def test_the_api_answers_503_while_the_database_is_down_and_200_once_it_is_back(
    postgres: PrivatePostgres, outage_app: Any, fault: str
) -> None:
    key = make_key("outage admin", "admin", database_url=postgres.url)
    client = outage_app.test_client()
    headers = auth(key.secret)
    response, _ = _timed(client, "/v1/jobs", headers=headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    dashboard = logged_in(outage_app.test_client(), key.secret)
    time.sleep(PING_AFTER_IDLE_SECONDS)  # the pooled connections are pinged at their next checkout

    postgres.freeze() if fault == "frozen" else postgres.kill()
    page, elapsed = _timed(dashboard, "/admin/jobs", headers=HTML)
    assert page.status_code == 503 and page.mimetype == "text/html", page.get_data(as_text=True)[:500]
    assert page.headers["Retry-After"].isdigit() and elapsed < REQUEST_BOUND
    for path in ("/v1/jobs", "/v1/keys", "/v1/models", "/metrics/cluster", "/v1/jobs/job_AAAAAAAAAAAAAAAAAAAAAA"):
        response, elapsed = _timed(client, path, headers=headers)
        body = assert_problem(response, 503)
        assert response.headers["Retry-After"].isdigit()
        assert body["dependency"] == "database", body
        assert elapsed < REQUEST_BOUND, f"{path}: {elapsed:.2f}s"
    submit = client.post("/v1/jobs", json={"type": "diagnostic", "input": {}}, headers=headers)
    assert_problem(submit, 503)

    with outage_app.test_request_context("/healthz"):
        # /healthz opens no session: nothing of the request hooks runs for it.
        outage_app.preprocess_request()
        from flask import g

        assert "db" not in g
    response, elapsed = _timed(client, "/healthz")
    assert response.status_code == 200 and elapsed < 0.5  # no database call: not the bounds of seconds
    response, elapsed = _timed(client, "/readyz")
    body = assert_problem(response, 503)
    assert elapsed < 2.0
    assert body["checks"]["database"].startswith("down"), body
    assert "database" in body["detail"]

    postgres.thaw() if fault == "frozen" else postgres.start()
    returned = time.monotonic()
    response = client.get("/v1/jobs", headers=headers)
    # The first request after the return succeeds: stale pooled connections fail their ping and are replaced.
    assert response.status_code == 200, response.get_data(as_text=True)
    assert time.monotonic() - returned < 1.5  # not a 2 s statement bound spent on a stale connection
