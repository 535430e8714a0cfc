"""RFC 9457 problem+json for every error the API can answer, 404/405/413 included.

A dependency that is down or does not answer in time (the database, storage, the broker or
Redis) is a 503 with ``Retry-After``, never a 500: :func:`unavailable` is the one place that
recognises those errors, whatever route or request hook they come from.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

import kombu.exceptions
import psycopg
import redis
from botocore.exceptions import BotoCoreError
from flask import Flask, Response, current_app, json
from flask.typing import ResponseReturnValue
from pydantic import ValidationError
from sqlalchemy import exc as sa
from sqlalchemy.orm import Session
from werkzeug.exceptions import HTTPException

from db.storage import StorageError

log = logging.getLogger(__name__)

PROBLEM = "application/problem+json"
# What a 503 for a dependency outage suggests to the client (readiness probes run every few seconds).
UNAVAILABLE_RETRY_AFTER_SECONDS = 5


class ApiError(Exception):
    """An error answered as problem+json; raise it from views and helpers."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        title: str | None = None,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.title = title
        self.errors = errors
        self.headers = headers or {}
        self.extra = extra or {}


def validation_error(loc: Sequence[str | int], msg: str, detail: str | None = None) -> ApiError:
    return ApiError(422, detail or f"{'.'.join(map(str, loc))}: {msg}", errors=[{"loc": list(loc), "msg": msg}])


def from_pydantic(exc: ValidationError, prefix: list[str | int]) -> ApiError:
    errors = [{"loc": [*prefix, *err["loc"]], "msg": err["msg"]} for err in exc.errors()]
    first = errors[0]
    detail = f"{'.'.join(map(str, first['loc']))}: {first['msg']}"
    if len(errors) > 1:
        detail += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return ApiError(422, detail, errors=errors)


def problem(
    status: int,
    detail: str,
    title: str | None = None,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> Response:
    title = title or HTTPStatus(status).phrase
    body: dict[str, Any] = {
        "type": f"urn:gpujobs:problem:{title.lower().replace(' ', '-')}",
        "title": title,
        "status": status,
        "detail": detail,
    }
    if errors:
        body["errors"] = errors
    body.update(extra or {})
    response = Response(json.dumps(body), status=status, mimetype=PROBLEM)
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


_DETAILS = {
    "database": "The database is unavailable or did not answer in time; try again shortly.",
    "storage": "Storage is unavailable or did not answer in time; try again shortly.",
    "broker": "The message broker is unavailable or did not answer in time; try again shortly.",
    "redis": "Redis is unavailable or did not answer in time; try again shortly.",
    "dependency": "A service this request needs is unavailable or did not answer in time; try again shortly.",
}


def unavailable(exc: BaseException) -> ApiError | None:
    """The 503 for an error that means a dependency is down or hung (None for anything else).

    Looks at ``exc`` and what it was raised ``from``: SQLAlchemy's operational and interface
    errors (lost or refused connections, statement timeouts, SQLite's locks) and pool checkout
    timeouts, psycopg's own, storage errors, botocore's connection errors, Redis connection errors,
    the broker's, and bare connection errors and timeouts.
    """
    seen: BaseException | None = exc
    while seen is not None:
        dependency = _dependency(seen)
        if dependency is not None:
            return ApiError(
                503,
                _DETAILS[dependency],
                headers={"Retry-After": str(UNAVAILABLE_RETRY_AFTER_SECONDS)},
                extra={"dependency": dependency},
            )
        seen = seen.__cause__
    return None


def _dependency(exc: BaseException) -> str | None:
    if isinstance(exc, sa.TimeoutError | sa.OperationalError | sa.InterfaceError | sa.DisconnectionError):
        return "database"
    if isinstance(exc, sa.DBAPIError) and exc.connection_invalidated:
        return "database"
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return "database"
    if isinstance(exc, StorageError | BotoCoreError):
        return "storage"
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        return "redis"
    if isinstance(exc, kombu.exceptions.OperationalError):
        return "broker"
    if isinstance(exc, ConnectionError | TimeoutError):
        return "dependency"
    return None


def close_quietly(session: Session) -> None:
    """Close a request's session; a connection lost meanwhile must not turn a sent answer into an error."""
    try:
        session.close()
    except (sa.SQLAlchemyError, psycopg.Error) as exc:
        log.warning("closing the request's database session failed: %s", exc)


def register(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        return problem(exc.status, exc.detail, exc.title, exc.errors, exc.headers, exc.extra)

    @app.after_request
    def _retry_after(response: Response) -> Response:
        # Every 503 tells the client when to try again, whichever view or handler made it.
        if response.status_code == 503 and "Retry-After" not in response.headers:
            response.headers["Retry-After"] = str(UNAVAILABLE_RETRY_AFTER_SECONDS)
        return response

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        detail = {
            404: "No such resource.",
            405: "This method is not allowed on this resource.",
            413: f"The request body is larger than the limit of {app.config.get('MAX_CONTENT_LENGTH')} bytes.",
        }.get(status, exc.description or "")
        headers = {}
        if status == 405 and getattr(exc, "valid_methods", None):
            headers["Allow"] = ", ".join(exc.valid_methods)  # type: ignore[attr-defined]
        return problem(status, detail, headers=headers)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> ResponseReturnValue:
        outage = unavailable(exc)
        if outage is not None:
            first_line = next(iter(str(exc).splitlines()), "")
            log.warning("answering 503 (%s): %s: %s", outage.extra["dependency"], type(exc).__name__, first_line)
            # Through Flask's handlers for ApiError, so that a blueprint's own (the dashboard's HTML page) answers.
            return current_app.handle_user_exception(outage)
        log.exception("unhandled error")
        return problem(500, "An internal error occurred; it has been logged.")
