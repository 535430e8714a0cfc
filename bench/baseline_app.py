"""The two baselines of ``bench/queue_overhead.py``: what a user would write without gpujobs.

- ``noop`` (queue ``bench_bare``): bare Celery, a trivial task whose result goes through the
  Redis result backend. ``apply_async(...).get()`` is the floor of any Celery round trip.
- The hand-written job service: a Flask route inserts a row (SQLAlchemy) and calls
  ``run_row.delay(id)`` (queue ``bench_hand``); the task puts one small object to S3 and
  updates the row. ``POST /jobs?wait=N`` holds the answer with ``AsyncResult.get`` (Redis
  result backend, pub/sub); ``GET /jobs/<id>`` reads the row for polling.

No auth, no events, no leases, no idempotency: deliberately minimal. Configuration comes from
``BENCH_*`` variables that the benchmark sets: ``BENCH_DATABASE_URL``, ``BENCH_BROKER_URL``,
``BENCH_S3_ENDPOINT``, ``BENCH_S3_BUCKET``, ``BENCH_S3_ACCESS_KEY``, ``BENCH_S3_SECRET_KEY``.

    gunicorn --worker-class gthread ... bench.baseline_app:app
    celery -A bench.baseline_app:celery_app worker -Q bench_bare,bench_hand ...
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import uuid
from datetime import UTC, datetime

import boto3
from botocore.config import Config
from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeout
from flask import Flask, jsonify, request
from sqlalchemy import JSON, Column, DateTime, MetaData, String, Table, create_engine, insert, select, update

DATABASE_URL = os.environ.get("BENCH_DATABASE_URL", "sqlite:///bench-baseline.db")
BROKER_URL = os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/13")
BARE_QUEUE = "bench_bare"
HAND_QUEUE = "bench_hand"

metadata = MetaData()
rows = Table(
    "bench_baseline_jobs",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("status", String(16), nullable=False),
    Column("input", JSON, nullable=False),
    Column("output", JSON),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True)),
)


def _engine_url(url: str) -> str:
    return "postgresql+psycopg://" + url.removeprefix("postgresql://") if url.startswith("postgresql://") else url


# The plain engine a user would write (default pool, no pre-ping).
engine = create_engine(
    _engine_url(DATABASE_URL),
    **({"connect_args": {"timeout": 30, "check_same_thread": False}} if DATABASE_URL.startswith("sqlite") else {}),
)

# --- Celery --------------------------------------------------------------------------------------

celery_app = Celery("bench_baseline", broker=BROKER_URL, backend=BROKER_URL)
celery_app.conf.update(
    task_routes={"bench.noop": {"queue": BARE_QUEUE}, "bench.run_row": {"queue": HAND_QUEUE}},
    result_expires=600,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)

_s3_local = threading.local()


def _s3():  # type: ignore[no-untyped-def]
    client = getattr(_s3_local, "client", None)
    if client is None:
        client = _s3_local.client = boto3.session.Session().client(
            "s3",
            endpoint_url=os.environ.get("BENCH_S3_ENDPOINT") or None,
            aws_access_key_id=os.environ.get("BENCH_S3_ACCESS_KEY"),
            aws_secret_access_key=os.environ.get("BENCH_S3_SECRET_KEY"),
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, signature_version="s3v4"),
        )
    return client


@celery_app.task(name="bench.noop")
def noop(x: int = 0) -> int:
    return x


@celery_app.task(name="bench.run_row")
def run_row(row_id: str) -> str:
    body = json.dumps({"id": row_id, "ok": True}).encode()
    key = f"baseline/{row_id}/result.json"
    _s3().put_object(Bucket=os.environ["BENCH_S3_BUCKET"], Key=key, Body=body, ContentType="application/json")
    with engine.begin() as conn:
        conn.execute(
            update(rows)
            .where(rows.c.id == row_id)
            .values(status="succeeded", output={"key": key, "size": len(body)}, finished_at=datetime.now(UTC))
        )
    return "succeeded"


# --- Flask ---------------------------------------------------------------------------------------

app = Flask(__name__)


def _row_json(row_id: str) -> dict | None:
    with engine.connect() as conn:
        row = conn.execute(select(rows).where(rows.c.id == row_id)).mappings().one_or_none()
    if row is None:
        return None
    return {
        "id": row["id"],
        "status": row["status"],
        "input": row["input"],
        "output": row["output"],
        "created_at": row["created_at"].isoformat(),
        "finished_at": row["finished_at"].isoformat() if row["finished_at"] else None,
    }


@app.get("/healthz")
def healthz():  # type: ignore[no-untyped-def]
    return {"status": "ok"}


@app.post("/jobs")
def create_job():  # type: ignore[no-untyped-def]
    body = request.get_json(force=True)
    row_id = f"row_{uuid.uuid4().hex}"
    with engine.begin() as conn:
        conn.execute(
            insert(rows).values(id=row_id, status="queued", input=body.get("input", {}), created_at=datetime.now(UTC))
        )
    result = run_row.delay(row_id)
    wait = float(request.args.get("wait", 0))
    if wait:
        with contextlib.suppress(CeleryTimeout):  # answered in whatever state the row has then
            result.get(timeout=wait)
    return jsonify(_row_json(row_id)), 202


@app.get("/jobs/<row_id>")
def get_job(row_id: str):  # type: ignore[no-untyped-def]
    row = _row_json(row_id)
    if row is None:
        return {"error": "not found"}, 404
    return jsonify(row)
