"""The one clock of leases, dispatch ages and heartbeats: the database's.

Workers, beat and the API run on hosts whose clocks disagree; a lease written from one host's clock and
checked against another's is shortened or lengthened by their skew (a worker more than a lease behind
would lose every job while alive). So every time that a decision compares is taken from the database
server, inside the statement that writes or compares it: ``now(session)`` is an SQL expression, never a
value computed on the host, and ``db_now(session)`` reads it for the few places that need the value.

- PostgreSQL: ``now()``, the start of the current transaction (so the rows and events one transition writes
  share one time); each transition runs in a short transaction of its own.
- SQLite: SQLite's own clock (``strftime('%Y-%m-%d %H:%M:%f', 'now')``, milliseconds), in the text form
  SQLAlchemy stores, so stored times and the clock compare as text. SQLite runs inside each process that
  opens the file, all on one host: there is no other clock to share.

Values come back as timezone-aware UTC datetimes, like every column (``db.models.UTCDateTime``).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, Interval, String, func, literal, select, type_coerce
from sqlalchemy.orm import Session

from db.models import UTCDateTime


def now(session: Session, plus_seconds: float = 0.0) -> ColumnElement[datetime]:
    """The database's current time, plus ``plus_seconds``, as an SQL expression the database evaluates."""
    return now_on(session.get_bind().dialect.name, plus_seconds)


def now_on(dialect: str, plus_seconds: float = 0.0) -> ColumnElement[datetime]:
    """``now`` for a dialect by name: for statements built once per dialect, before any session."""
    if dialect == "sqlite":
        modifier = f"{plus_seconds:+.6f} seconds"
        # SQLite gives milliseconds; SQLAlchemy stores microseconds: padded, the two compare as text.
        stamp = func.strftime("%Y-%m-%d %H:%M:%f", "now", modifier, type_=String) + "000"
        return type_coerce(stamp, UTCDateTime())
    expression: ColumnElement[datetime] = func.now()
    if plus_seconds:
        expression = expression + literal(timedelta(seconds=plus_seconds), Interval())
    return type_coerce(expression, UTCDateTime())


def db_now(session: Session) -> datetime:
    """The database's current time, read (one round trip): for values a caller needs on this side."""
    return session.execute(select(now(session))).scalar_one()
