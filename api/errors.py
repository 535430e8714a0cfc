"""RFC 9457 problem+json for every error the API can answer, 404/405/413 included."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from flask import Flask, Response, json
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)

PROBLEM = "application/problem+json"


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


def register(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        return problem(exc.status, exc.detail, exc.title, exc.errors, exc.headers, exc.extra)

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
    def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return problem(500, "An internal error occurred; it has been logged.")
