"""Request-line and header limits, answered by the app as problem+json (414, 431).

gunicorn refuses over-long request lines and header fields itself, with a small HTML page,
before the app sees them. ``gpujobs api`` therefore sets gunicorn's limits a little above
these (``GUNICORN_*``), so that everything between the two gets a precise problem+json from
here; only what is over gunicorn's limits (or over its 100 header fields) still gets its HTML
answer (docs/api.md says so).
"""

from __future__ import annotations

from flask import Flask, request

from api.errors import ApiError

MAX_URL_BYTES = 4096  # the request target: path and query, as sent
MAX_HEADER_FIELD_BYTES = 8192  # one header line, `Name: value`
MAX_HEADER_BYTES = 32 * 1024  # every header line together

# gunicorn's own limits (`gpujobs api`): above the app's so the app answers first.
GUNICORN_LIMIT_REQUEST_LINE = 8190  # its largest: method, target and version together
GUNICORN_LIMIT_REQUEST_FIELD_SIZE = 10 * 1024
GUNICORN_LIMIT_REQUEST_FIELDS = 100  # its default; past it gunicorn answers 431 itself


def _target_bytes() -> int:
    environ = request.environ
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw is not None:
        return len(str(raw).encode("latin-1", "replace"))
    query = environ.get("QUERY_STRING", "")
    return len(environ.get("PATH_INFO", "").encode("latin-1", "replace")) + (len(query) + 1 if query else 0)


def check_request() -> None:
    """Before anything else (authentication and the database included): 414 or 431 past a limit."""
    length = _target_bytes()
    if length > MAX_URL_BYTES:
        raise ApiError(
            414,
            f"The request target is {length} bytes long; the limit is {MAX_URL_BYTES} bytes (path and query).",
            title="URI Too Long",  # RFC 9110's name (Python's is still "Request-URI Too Long")
        )
    total = 0
    for name, value in request.headers.items():
        size = len(name) + 2 + len(value.encode("latin-1", "replace"))
        if size > MAX_HEADER_FIELD_BYTES:
            raise ApiError(
                431,
                f"The header field {name!r} is {size} bytes long; the limit is {MAX_HEADER_FIELD_BYTES} bytes.",
                extra={"header": name},
            )
        total += size + 2
    if total > MAX_HEADER_BYTES:
        raise ApiError(431, f"The header fields take {total} bytes; the limit is {MAX_HEADER_BYTES} bytes in all.")


def register(app: Flask) -> None:
    """Run ``check_request`` first of the app's ``before_request`` functions."""
    app.before_request_funcs.setdefault(None, []).insert(0, check_request)
