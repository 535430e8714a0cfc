"""Liveness and readiness."""

from __future__ import annotations

from flask import Blueprint, Response, g, jsonify
from kombu.connection import Connection
from sqlalchemy import text

from api import config
from api.errors import problem
from api.openapi import document

bp = Blueprint("health", __name__)


@bp.get("/healthz")
@document("Liveness: 200 while the process lives", public=True)
def healthz() -> Response:
    return jsonify({"status": "ok"})


def _check_database() -> None:
    g.db.execute(text("SELECT 1"))


def _check_broker() -> None:
    with Connection(config.settings().broker_url, connect_timeout=2) as connection:
        connection.ensure_connection(max_retries=1, timeout=2)


def _check_storage() -> None:
    config.storage().ping()


@bp.get("/readyz")
@document("Readiness: 200 when the database, broker and storage answer, else 503", public=True)
def readyz() -> Response:
    checks: dict[str, str] = {}
    for name, check in [("database", _check_database), ("broker", _check_broker), ("storage", _check_storage)]:
        try:
            check()
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"down: {type(exc).__name__}: {str(exc)[:200]}"
    down = [name for name, state in checks.items() if state != "ok"]
    if down:
        return problem(503, f"Not ready: {', '.join(down)} down.", extra={"checks": checks})
    return jsonify({"status": "ready", "checks": checks})
