"""db/logs.py: the line formats, the context ids, and the routine maintenance lines sent to debug."""

from __future__ import annotations

import io
import json
import logging

import pytest

from db import logs


@pytest.fixture
def captured() -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    logger = logging.getLogger("tests.unit.logs")
    logger.handlers = [logs.handler(stream, fmt="json")]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    return logger, stream


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_the_context_ids_only_inside_their_block(captured):
    logger, stream = captured
    with logs.bound(request_id="req-1"):
        logger.info("in a request")
        with logs.bound(job_id="job_1", attempt=2):
            logger.warning("in a job: %s", 'quoted "text"\nand a newline')
    logger.info("outside")
    inside, job, outside = lines(stream)
    assert inside["request_id"] == "req-1" and "job_id" not in inside and inside["level"] == "info"
    assert job["job_id"] == "job_1" and job["attempt"] == 2 and job["request_id"] == "req-1"
    assert job["msg"] == 'in a job: quoted "text"\nand a newline' and job["level"] == "warning"
    assert not {"request_id", "job_id", "attempt"} & set(outside)
    assert outside["logger"] == "tests.unit.logs" and outside["ts"].endswith("Z") and "role" in outside


def test_an_explicit_extra_wins_and_tracebacks_are_one_field(captured):
    logger, stream = captured
    with logs.bound(job_id="job_context"):
        logger.info("submitted", extra={"job_id": "job_given"})
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    given, failed = lines(stream)
    assert given["job_id"] == "job_given"
    assert "ValueError: boom" in failed["exc"] and failed["job_id"] == "job_context"


def test_routine_maintenance_task_lines_go_to_debug_and_job_tasks_stay_at_info():
    stream = io.StringIO()
    out = logs.handler(stream, fmt="text", level=logging.INFO)
    record = logging.LogRecord("celery.app.trace", logging.INFO, __file__, 1, "Task %(name)s[%(id)s] ok", None, None)
    record.args = {"name": "gpujobs.reconcile", "id": "1"}
    assert not out.filter(record) and record.levelno == logging.DEBUG
    job = logging.LogRecord("celery.app.trace", logging.INFO, __file__, 1, "Task %(name)s[%(id)s] ok", None, None)
    job.args = {"name": "gpujobs.run_job", "id": "2"}
    assert out.filter(job) and job.levelno == logging.INFO
    beat = logging.LogRecord(
        "celery.beat", logging.INFO, __file__, 1, "Sending due task %s (%s)", ("reconcile", "gpujobs.reconcile"), None
    )
    assert not out.filter(beat)
    assert logs.handler(stream, fmt="text", level=logging.DEBUG).filter(beat)  # at debug level it is shown


def test_text_lines_name_the_ids_after_the_message():
    stream = io.StringIO()
    logger = logging.getLogger("tests.unit.logs.text")
    logger.handlers = [logs.handler(stream, fmt="text")]
    logger.propagate = False
    with logs.bound(job_id="job_9", attempt=1):
        logger.warning("lease lost")
    assert stream.getvalue().rstrip().endswith("lease lost [job_id=job_9 attempt=1]")


def test_the_format_comes_from_gpujobs_log_format(monkeypatch):
    monkeypatch.setenv("GPUJOBS_LOG_FORMAT", "JSON")
    assert logs.is_json() and isinstance(logs.formatter(), logs.JsonFormatter)
    monkeypatch.setenv("GPUJOBS_LOG_FORMAT", "nonsense")
    assert not logs.is_json() and isinstance(logs.formatter(), logs.TextFormatter)


def test_tracing_off_is_a_shared_nullcontext_and_imports_nothing(monkeypatch):
    import subprocess
    import sys

    from db import tracing

    monkeypatch.delenv(tracing.ENDPOINT_VARIABLE, raising=False)
    assert not tracing.wanted(None) and tracing.wanted(__import__("pathlib").Path("spans.jsonl"))
    # In a fresh interpreter: the API's app and a span, with tracing off, load no OpenTelemetry module.
    code = (
        "import sys, api, db.tracing as t; api.create_app; assert not t.configure('api', None); "
        "assert t.span('x', job_id='j') is t._NULL and t.traceparent() is None and t.job_traceparent('j') is None; "
        "assert not [m for m in sys.modules if m.startswith('opentelemetry')], 'imported'"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != tracing.ENDPOINT_VARIABLE}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr


def test_what_gunicorns_master_imports_loads_no_database_driver() -> None:
    """gunicorn's master imports the logger class and the config module before its gevent workers patch
    the standard library; psycopg imported then picks its blocking C wait, and a hung PostgreSQL stalls
    every request of a worker (the fault matrix's SIGSTOP case caught it)."""
    import subprocess
    import sys

    code = (
        "import sys, api.access_log, api.gunicorn_conf; "
        "print(sorted(m for m in ('psycopg', 'sqlalchemy', 'redis', 'boto3') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
