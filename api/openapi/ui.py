"""``GET /docs``: Swagger UI over ``/openapi.json``, from vendored assets, under a strict Content-Security-Policy.

The assets are the ``swagger-ui-bundle-v2`` wheel's (Swagger UI 5, Apache-2.0, in the ``api`` extra):
served from the installed package, so nothing is fetched from a CDN and no minified megabyte is
committed here. The page has no inline script or style; ``static/docs.js`` starts Swagger UI. The
policy allows images from ``data:`` (Swagger UI's CSS draws its icons so) and nothing else but this
origin; ``tests/integration/test_openapi_docs.py`` loads the page in Chromium and finds no violation.
"""

from __future__ import annotations

from pathlib import Path

from flask import Response, render_template, send_from_directory

from api.errors import ApiError
from api.openapi import bp, document

ASSETS = {"swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png", "favicon-16x16.png"}
POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
)
DOCS_ENDPOINTS = {"openapi.docs", "openapi.swagger_ui_asset", "openapi.static"}


def swagger_ui_dir() -> Path:
    """The installed Swagger UI files (503 when the ``api`` extra's bundle is missing)."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        raise ApiError(503, "Swagger UI is not installed (`pip install 'gpujobs[api]'`).") from None
    return Path(str(swagger_ui_path))


@bp.get("/docs")
@document("Interactive API reference (Swagger UI)", public=True, responses={200: "text/html"})
def docs() -> str:
    return render_template("swagger.html")


@bp.get("/docs/swagger-ui/<name>")
def swagger_ui_asset(name: str) -> Response:
    if name not in ASSETS:
        raise ApiError(404, f"No asset {name!r}.")
    return send_from_directory(swagger_ui_dir(), name, max_age=3600)


@bp.after_app_request
def _docs_policy(response: Response) -> Response:
    from flask import request

    if request.endpoint in DOCS_ENDPOINTS:
        response.headers["Content-Security-Policy"] = POLICY
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "same-origin"
    return response
