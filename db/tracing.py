"""OpenTelemetry tracing, off (and free) unless asked for: one job is one trace, whatever process runs a step.

Tracing is on when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (spans go there over OTLP/HTTP, the standard
``OTEL_*`` variables apply) or ``GPUJOBS_TRACE_FILE`` names a file (each finished span is appended as
one JSON line: tests and debugging). Off, nothing of OpenTelemetry is imported and :func:`span` is a
``nullcontext``: a job pays one module-level boolean test per step. The packages are the ``otel`` extra.

On, :func:`configure` installs the instrumentations of Flask (the API's requests), SQLAlchemy (every
statement), botocore (S3) and urllib3 (webhook deliveries). Celery's message headers are not used to
carry the context: the scheduler sends a job's message later, from whichever process runs a dispatch
pass, so the context is stored with the job instead (``jobs.traceparent``, the W3C header of the
submitting request's span). The dispatch, the attempt (claim, model load, inference, upload) and each
webhook delivery start their spans as children of it (:func:`span` with ``parent``), so they all share
the request's trace id.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

ENDPOINT_VARIABLE = "OTEL_EXPORTER_OTLP_ENDPOINT"
TRACER_NAME = "gpujobs"

_enabled = False
_tracer: Any = None
_NULL: AbstractContextManager[None] = nullcontext()


def enabled() -> bool:
    return _enabled


def wanted(trace_file: Path | None) -> bool:
    """Whether this process should trace: an OTLP endpoint or a span file is configured."""
    return bool(os.environ.get(ENDPOINT_VARIABLE) or trace_file)


def configure(role: str, trace_file: Path | None) -> bool:
    """Turn tracing on for this process if it is wanted (idempotent); whether it is on."""
    global _enabled, _tracer
    if _enabled or not wanted(trace_file):
        return _enabled
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": f"gpujobs-{role}", "gpujobs.role": role}))
    if os.environ.get(ENDPOINT_VARIABLE):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    if trace_file:
        provider.add_span_processor(SimpleSpanProcessor(_file_exporter(trace_file)))  # written as each span ends
    trace.set_tracer_provider(provider)
    _tracer = trace.get_tracer(TRACER_NAME)
    _instrument()
    _enabled = True
    return True


def _instrument() -> None:
    from opentelemetry.instrumentation.botocore import BotocoreInstrumentor
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
    from opentelemetry.instrumentation.urllib3 import URLLib3Instrumentor

    # Wraps sqlalchemy.create_engine: engines made from now on. Its declared range stops below SQLAlchemy
    # 2.1, which it instruments all the same (tests/integration/test_tracing.py checks the SQL spans).
    SQLAlchemyInstrumentor().instrument(skip_dep_check=True)
    import sqlalchemy

    from db import session

    session.create_engine = sqlalchemy.create_engine  # type: ignore[attr-defined]  # db.session imported the original
    BotocoreInstrumentor().instrument()
    URLLib3Instrumentor().instrument()


def instrument_flask(app: Any) -> None:
    """The API's requests as server spans (their context is what a submitted job stores)."""
    if _enabled:
        from opentelemetry.instrumentation.flask import FlaskInstrumentor

        FlaskInstrumentor().instrument_app(app)


def traceparent() -> str | None:
    """The W3C ``traceparent`` of the current span (None when tracing is off or no span is current)."""
    if not _enabled:
        return None
    from opentelemetry.propagate import inject

    carrier: dict[str, str] = {}
    inject(carrier)
    return carrier.get("traceparent")


def job_traceparent(job_id: str) -> str | None:
    """The stored traceparent of ``job_id`` (one indexed read, only while tracing is on)."""
    if not _enabled:
        return None
    from sqlalchemy import select

    from db.models import Job
    from db.session import session_scope

    with session_scope() as session:
        value: str | None = session.scalar(select(Job.traceparent).where(Job.id == job_id))
        return value


def span(
    name: str, parent: str | None = None, start_time: int | None = None, **attributes: Any
) -> AbstractContextManager[Any]:
    """A span around the block, a child of the ``parent`` traceparent if given (else of the current span).

    Off, a shared ``nullcontext``: no allocation, no import."""
    if not _enabled:
        return _NULL
    return _span(name, parent, start_time, attributes)


@contextlib.contextmanager
def _span(name: str, parent: str | None, start_time: int | None, attributes: dict[str, Any]) -> Iterator[Any]:
    from opentelemetry.propagate import extract

    context = extract({"traceparent": parent}) if parent else None
    attrs = {f"gpujobs.{key}": value for key, value in attributes.items() if value is not None}
    with _tracer.start_as_current_span(name, context=context, attributes=attrs, start_time=start_time) as current:
        yield current


def now_ns() -> int | None:
    """A span's start time, taken before the block knows its parent (None when off)."""
    if not _enabled:
        return None
    import time

    return time.time_ns()


def _file_exporter(path: Path) -> Any:
    """An SDK span exporter that appends each span as a JSON line (one ``write`` a span, so processes can share
    the file): name, trace and span ids, parent span id, start and end (ns), attributes, service."""
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    lock = threading.Lock()

    class FileSpanExporter(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            lines = "".join(json.dumps(_as_dict(s), default=str) + "\n" for s in spans)
            with lock:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, lines.encode())
                finally:
                    os.close(fd)
            return SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            pass

    return FileSpanExporter()


def _as_dict(span: Any) -> dict[str, Any]:
    context, parent = span.get_span_context(), span.parent
    return {
        "name": span.name,
        "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}",
        "parent_id": f"{parent.span_id:016x}" if parent else None,
        "start": span.start_time,
        "end": span.end_time,
        "kind": str(span.kind),
        "service": span.resource.attributes.get("service.name"),
        "attributes": dict(span.attributes or {}),
    }
