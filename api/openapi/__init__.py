"""The OpenAPI document (``GET /openapi.json``) and its reference page (``GET /docs``).

Views describe themselves with ``@document(...)``; ``builder.build`` turns the app's real routes and
each job type's pydantic models into the document (``schemas`` and ``job_schemas`` hold the component
schemas, ``examples`` the examples). ``/docs`` is Swagger UI, served from the ``swagger-ui-bundle-v2``
wheel's files (no CDN) with our own start-up script, under a Content-Security-Policy with no inline
script (``ui``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from flask import Blueprint, Response, current_app, jsonify
from pydantic import BaseModel

F = TypeVar("F", bound=Callable[..., Any])

bp = Blueprint("openapi", __name__, static_folder="static", static_url_path="/docs/static", template_folder="templates")


def document(
    summary: str,
    *,
    body: type[BaseModel] | None = None,
    form: dict[str, Any] | None = None,
    query: list[str] | None = None,
    responses: dict[int, str] | None = None,
    public: bool = False,
    stream: str | None = None,
) -> Callable[[F], F]:
    """Attach what the OpenAPI document says about a view; the path and method come from the route.

    ``responses`` maps a status to a component schema's name, ``object``, or a media type such as
    ``text/html`` (a text body of that type). ``stream`` is a media type the 200 answer may also
    have (``text/event-stream``), chosen by ``Accept``."""

    def attach(view: F) -> F:
        view._openapi = {  # type: ignore[attr-defined]
            "summary": summary,
            "body": body,
            "form": form,
            "query": query or [],
            "responses": responses or {200: "object"},
            "public": public,
            "stream": stream,
        }
        return view

    return attach


@bp.get("/openapi.json")
@document("This document", public=True)
def openapi_json() -> Response:
    return jsonify(build(current_app))


from api.openapi import ui  # noqa: E402  (the /docs routes, on this blueprint)
from api.openapi.builder import build  # noqa: E402

__all__ = ["bp", "build", "document", "ui"]
