"""Logging for every gpujobs process: one set-up, text or JSON lines, with the ids of what is being handled.

Every role (``gpujobs api|worker|beat|up|migrate``) calls :func:`configure` once at start, so the lines
of all processes look alike and an operator (or a log shipper) can follow one request or one job across
them. ``GPUJOBS_LOG_FORMAT=json`` writes one JSON object a line (``ts``, ``level``, ``logger``, ``role``,
``msg``, and ``request_id``, ``job_id``, ``attempt`` when known); the default, ``text``, is for people
(``gpujobs up`` in a terminal).

The ids come from context variables: the API sets ``request_id`` for each request (``api.request_ids``),
the worker sets ``job_id`` and ``attempt`` while it runs a job (``worker.runner``). Context variables,
not thread-locals, because the API serves a request per gevent greenlet and the worker a job per thread;
each sees only its own. A call may also pass them as ``extra=`` (the submit line names the job it made).

The module lives in ``db``, the bottom layer, so that the API, the workers and the command line can all
import it (``[tool.importlinter]``); it imports nothing of the project.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

FORMATS = ("text", "json")
CONTEXT_FIELDS = ("request_id", "job_id", "attempt")

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("gpujobs_request_id", default=None)
job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("gpujobs_job_id", default=None)
attempt: contextvars.ContextVar[int | None] = contextvars.ContextVar("gpujobs_attempt", default=None)
_VARS: dict[str, contextvars.ContextVar[Any]] = {"request_id": request_id, "job_id": job_id, "attempt": attempt}

# Celery's per-task lines ("Received task", "succeeded in") and beat's "Sending due task" for the periodic
# maintenance tasks: a few a second on a quiet system. They go to debug, so the info log shows work.
ROUTINE_TASKS = ("gpujobs.reconcile", "gpujobs.sweep_webhooks", "gpujobs.retention", "gpujobs.send_webhooks")
_TASK_LOGGERS = frozenset({"celery.app.trace", "celery.worker.strategy", "celery.beat"})

_role = "gpujobs"
_configured = False


def role() -> str:
    """The role this process was configured as (``api``, ``worker``, …)."""
    return _role


def configured() -> bool:
    return _configured


@contextlib.contextmanager
def bound(**values: Any) -> Iterator[None]:
    """Set some of ``request_id``, ``job_id``, ``attempt`` for the block (this thread or greenlet only)."""
    tokens = [(_VARS[name], _VARS[name].set(value)) for name, value in values.items()]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class ContextFilter(logging.Filter):
    """Puts the role and the context ids on every record (unless the call passed its own in ``extra``), and
    sends the routine maintenance tasks' Celery lines to debug."""

    def __init__(self, threshold: int = logging.INFO) -> None:
        super().__init__()
        self.threshold = threshold

    def filter(self, record: logging.LogRecord) -> bool:
        record.role = _role
        for name, var in _VARS.items():
            if getattr(record, name, None) is None:
                setattr(record, name, var.get())
        if record.name in _TASK_LOGGERS and record.levelno == logging.INFO and _routine(record):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return self.threshold <= logging.DEBUG
        return True


def _routine(record: logging.LogRecord) -> bool:
    args = record.args
    if isinstance(args, dict):
        text = str(args.get("name", ""))
    elif args:
        text = " ".join(map(str, args))
    else:
        text = str(record.msg)
    return any(task in text for task in ROUTINE_TASKS)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: what log shippers parse without a grok pattern."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "role": getattr(record, "role", _role),
            "msg": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        for name, value in getattr(record, "fields", {}).items():
            line.setdefault(name, value)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``2026-12-02 06:30:00,123 INFO worker worker.runner: message [job_id=… attempt=1]``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(role)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if not hasattr(record, "role"):
            record.role = _role
        text = super().format(record)
        ids = " ".join(f"{name}={getattr(record, name)}" for name in CONTEXT_FIELDS if getattr(record, name, None))
        if not ids:
            return text
        first, newline, rest = text.partition("\n")  # after the message, before a traceback
        return f"{first} [{ids}]{newline}{rest}"


def _timestamp(created: float) -> str:
    seconds = int(created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int((created - seconds) * 1000):03d}Z"


def formatter(fmt: str | None = None) -> logging.Formatter:
    return JsonFormatter() if (fmt or _format()) == "json" else TextFormatter()


def handler(stream: TextIO | None = None, fmt: str | None = None, level: int = logging.INFO) -> logging.Handler:
    """A stream handler (stderr by default) with this module's filter and formatter (gunicorn uses it too)."""
    # sys.__stderr__: the real stream, not a stand-in Celery puts in sys.stderr later (it logs what is
    # written there, and would loop).
    out = logging.StreamHandler(stream or sys.__stderr__ or sys.stderr)
    out.addFilter(ContextFilter(level))
    out.setFormatter(formatter(fmt))
    out.gpujobs = True  # type: ignore[attr-defined]
    return out


def configure(process_role: str, level: int | str = logging.INFO, fmt: str | None = None) -> None:
    """Set up the root logger of this process for ``process_role``; again replaces the handler it added."""
    global _role, _configured
    _role, _configured = process_role, True
    level = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(level, int):
        level = logging.INFO
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "gpujobs", False)]:
        root.removeHandler(old)
    root.addHandler(handler(fmt=fmt, level=level))
    root.setLevel(level)
    logging.captureWarnings(True)


def is_json() -> bool:
    return _format() == "json"


def _format() -> str:
    """``GPUJOBS_LOG_FORMAT`` (the setting), read without building every setting: logging starts first."""
    import os

    value = os.environ.get("GPUJOBS_LOG_FORMAT", "text").strip().lower()
    return value if value in FORMATS else "text"
