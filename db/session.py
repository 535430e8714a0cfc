"""Engine and sessions: one engine per process and database URL.

PostgreSQL calls are bounded, so that a database that refuses, drops or stops answering costs a
caller a few seconds and an error, never a hang (``db/settings.py``, "PostgreSQL bounds"):

- **connect**: libpq's ``connect_timeout`` (``database_connect_timeout_seconds``; libpq's
  minimum is 2 s). A frozen server still completes TCP handshakes (the kernel does that), so
  only this timeout ends the wait for its startup answer.
- **statements**: the server-side ``statement_timeout`` (``database_statement_timeout_seconds``)
  cancels a slow statement and keeps the connection. A *frozen* server (SIGSTOP, a stalled VM)
  cannot cancel anything, and its kernel still acknowledges what we send, so neither the
  statement timeout nor TCP (``tcp_user_timeout``, keepalives) ends the wait: each round trip is
  also bounded on the client, at the statement timeout plus :data:`CLIENT_GRACE_SECONDS`, after
  which the connection is closed and the caller gets an ``OperationalError`` that SQLAlchemy
  treats as a disconnect (the pool drops its other connections too). ``tcp_user_timeout`` is set
  as well: it ends a connection whose peer vanished (host down, network cut) even between calls.
- **checkout**: before a pooled connection is handed out it is pinged with a short bound (the
  connect timeout), so a dead or hung server is noticed in seconds rather than at the statement
  bound; a failed ping replaces the connection once. A connection checked in less than
  :data:`PING_AFTER_IDLE_SECONDS` ago is handed out without a ping: it answered a moment ago (HikariCP
  skips its check for 500 ms the same way; PgBouncer's ``server_check_delay`` is 30 s). So a server
  that froze more than that before a checkout is still noticed at the ping's bound; one that froze
  within it costs that caller the statement bound, as it does a caller whose statement was already on
  the wire. The pool hands out the most recently returned connection first (LIFO), so a busy process
  mostly reuses connections inside that window, and the extra ones age out. ``database_pool_timeout_seconds``
  bounds the wait for a free connection when all are in use.

The client-side bound works the same in threads and gevent greenlets: it is checked by the
generator that psycopg's wait loop drives, on each of its 0.1 s ticks.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from sqlalchemy import Engine, create_engine, event, exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker

from db.settings import Settings, get_settings

# How much longer than the server's statement_timeout the client waits for any answer: the
# server's own cancel (a clean error, the connection kept) must normally come first.
CLIENT_GRACE_SECONDS = 2.0
# A pooled connection returned less than this long ago is handed out again without a ping (see above):
# a job's four short transactions, or a request's, then cost no round trip each before their work.
PING_AFTER_IDLE_SECONDS = 0.5

_lock = threading.Lock()
_engines: dict[tuple[str, bool], Engine] = {}
_factories: dict[str, sessionmaker[Session]] = {}


class DatabaseUnresponsive(psycopg.OperationalError):
    """The server did not answer a round trip within the client-side bound; the connection is closed."""


class BoundedConnection(psycopg.Connection[Any]):
    """A psycopg connection whose every wait for the server ends after ``response_timeout`` seconds.

    psycopg runs each operation as a generator driven by a wait loop that wakes at least every
    0.1 s; wrapping that generator lets us give up on a server that never answers. The connection
    is then in an unknown state (a query sent, no answer read), so it is closed.
    """

    response_timeout: float | None = None
    returned_at = float("-inf")  # when the pool last took it back (time.monotonic); never: -inf

    def wait(self, gen: Any, *args: Any, **kwargs: Any) -> Any:
        if self.response_timeout is None:
            return super().wait(gen, *args, **kwargs)
        return super().wait(self._bounded(gen, self.response_timeout), *args, **kwargs)

    def _bounded(self, gen: Generator[Any, Any, Any], seconds: float) -> Generator[Any, Any, Any]:
        deadline = time.monotonic() + seconds
        try:
            state = next(gen)
            while True:
                ready = yield state
                if not ready and time.monotonic() >= deadline:
                    self.pgconn.finish()  # broken, not closed: SQLAlchemy sees a disconnect
                    raise DatabaseUnresponsive(
                        f"the database did not answer within {seconds:g} s; the connection was closed"
                    )
                state = gen.send(ready)
        except StopIteration as stop:
            return stop.value

    @contextmanager
    def bounded_by(self, seconds: float) -> Iterator[None]:
        """Within the block, waits end after ``seconds`` (a ping's shorter bound)."""
        saved = self.response_timeout
        self.response_timeout = seconds
        try:
            yield
        finally:
            self.response_timeout = saved


def postgres_connect_args(settings: Settings) -> dict[str, Any]:
    """libpq parameters bounding connects, statements and dead peers (see the module's docstring)."""
    statement_ms = int(settings.database_statement_timeout_seconds * 1000)
    response = settings.database_statement_timeout_seconds + CLIENT_GRACE_SECONDS
    return {
        "connect_timeout": settings.database_connect_timeout_seconds,
        "options": f"-c statement_timeout={statement_ms}",
        "tcp_user_timeout": int(response * 1000),
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 5,
        "keepalives_count": 3,
    }


def _postgres_engine(url: URL, settings: Settings, bounded: bool) -> Engine:
    connect_args = postgres_connect_args(settings)
    response_timeout: float | None = settings.database_statement_timeout_seconds + CLIENT_GRACE_SECONDS
    if not bounded:  # migrations: a schema change may rightly take long
        connect_args["options"] = "-c statement_timeout=0"
        response_timeout = None
    engine = create_engine(
        url,
        pool_size=10,
        max_overflow=20,
        pool_timeout=settings.database_pool_timeout_seconds,
        pool_use_lifo=True,  # the connection returned last goes out first: mostly inside the no-ping window
        connect_args=connect_args,
    )
    ping_timeout = float(settings.database_connect_timeout_seconds)

    @event.listens_for(engine, "do_connect")
    def _connect(_dialect, _record, cargs, cparams):  # type: ignore[no-untyped-def]
        connection = BoundedConnection.connect(*cargs, **cparams)
        connection.response_timeout = response_timeout
        return connection

    @event.listens_for(engine, "checkin")
    def _returned(dbapi_connection, _record):  # type: ignore[no-untyped-def]
        if dbapi_connection is not None:  # None: invalidated on its way back
            dbapi_connection.returned_at = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping(dbapi_connection, _record, _proxy):  # type: ignore[no-untyped-def]
        # Like pool_pre_ping, with a ping bounded by the connect timeout instead of the statement bound,
        # and none for a connection that answered moments ago.
        if time.monotonic() - dbapi_connection.returned_at < PING_AFTER_IDLE_SECONDS:
            return
        try:
            with dbapi_connection.bounded_by(ping_timeout), dbapi_connection.cursor() as cursor:
                cursor.execute(";")
        except psycopg.Error as error:
            # The pool invalidates this connection and hands out a fresh one (whose connect is bounded).
            raise exc.DisconnectionError(f"pooled connection failed its ping: {error}") from error

    return engine


def _make_engine(url: str, settings: Settings, bounded: bool = True) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):  # type: ignore[no-untyped-def]
            # WAL lets readers run beside the one writer; busy_timeout makes writers wait, not fail.
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() == "psycopg":
        return _postgres_engine(parsed, settings, bounded)
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def _engine(url: str, settings: Settings | None, bounded: bool) -> Engine:
    with _lock:
        if (url, bounded) not in _engines:
            _engines[url, bounded] = _make_engine(url, settings or get_settings(), bounded)
        return _engines[url, bounded]


def get_engine(url: str | None = None, settings: Settings | None = None) -> Engine:
    """This process's engine for ``url`` (default: the settings' database). Its bounds come from
    ``settings`` (default: the process settings) when it is first made."""
    url = url or (settings or get_settings()).database_url
    engine = _engine(url, settings, bounded=True)
    with _lock:
        if url not in _factories:
            _factories[url] = sessionmaker(engine, expire_on_commit=False)
    return engine


def migration_engine(url: str | None = None) -> Engine:
    """An engine whose statements have no time limit (connects are still bounded): schema changes."""
    return _engine(url or get_settings().database_url, None, bounded=False)


def session_factory(url: str | None = None, settings: Settings | None = None) -> sessionmaker[Session]:
    url = url or (settings or get_settings()).database_url
    get_engine(url, settings)
    return _factories[url]


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = session_factory(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        with contextlib.suppress(exc.SQLAlchemyError, psycopg.Error):
            session.rollback()  # on a lost connection the rollback fails too; the first error is the one
        raise
    finally:
        with contextlib.suppress(exc.SQLAlchemyError, psycopg.Error):
            session.close()


def dispose_engines() -> None:
    """Drop every pooled connection (after fork, and in tests)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
        _factories.clear()
