"""``X-Request-ID``: one id per request, taken from the client (or a proxy) or made here, echoed back.

The id is set for the whole request in ``db.logs`` (so every line the request logs carries it) and
echoed in every response, problem+json answers included. The client's value is used only if it is
short and of a plain charset (at most 128 of ``A-Z a-z 0-9 - _ . : @ + = /``): anything else, a
newline meant to forge a log line, markup meant for a log viewer, a megabyte, is replaced by a fresh
id, never echoed or logged.
"""

from __future__ import annotations

import re
import uuid

from flask import Flask, Response, g, request

from db import logs

HEADER = "X-Request-ID"
MAX_LENGTH = 128
VALID = re.compile(rf"[A-Za-z0-9._:@+=/-]{{1,{MAX_LENGTH}}}")


def accept(value: str | None) -> str:
    """The client's id if it is acceptable, else a new one (32 hex digits)."""
    if value is not None and VALID.fullmatch(value):
        return value
    return uuid.uuid4().hex


def current() -> str:
    """This request's id (made now if the request began before the hook ran, e.g. a routing error)."""
    rid: str | None = g.get("request_id")
    if rid is None:
        rid = g.request_id = accept(request.headers.get(HEADER))
    return rid


def register(app: Flask) -> None:
    """Take the id before any other hook (authentication, limits), echo it after every answer."""

    def take() -> None:
        rid = current()
        g.request_id_token = logs.request_id.set(rid)

    def echo(response: Response) -> Response:
        response.headers[HEADER] = current()
        return response

    def forget(_exc: BaseException | None) -> None:
        token = g.pop("request_id_token", None)
        if token is not None:
            logs.request_id.reset(token)

    app.before_request_funcs.setdefault(None, []).insert(0, take)
    # After-request hooks run last-registered first: first in the list, the echo sees the final response.
    app.after_request_funcs.setdefault(None, []).insert(0, echo)
    app.teardown_request(forget)
