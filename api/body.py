"""Reading a JSON request body safely: a precise 4xx for anything that is not a sane JSON object."""

from __future__ import annotations

import re
from typing import Any

from flask import request

from api.errors import ApiError, validation_error

_NUL = re.compile(rb"\\u0000|\x00", re.IGNORECASE)


def json_object() -> dict[str, Any]:
    if not request.is_json:
        raise ApiError(415, "Send the body as JSON with `Content-Type: application/json`.")
    raw = request.get_data(cache=True)
    if _NUL.search(raw):
        raise validation_error(["body"], "must not contain NUL characters")
    try:
        body = request.get_json(silent=True)
    except RecursionError:
        raise ApiError(400, "The body is nested too deeply.") from None
    if body is None:
        raise ApiError(400, "The body is not valid JSON.")
    if not isinstance(body, dict):
        raise validation_error(["body"], "must be a JSON object")
    return body
