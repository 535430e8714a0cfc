"""Operations routes: liveness, readiness (naming what is down), the OpenAPI document and its page."""

from __future__ import annotations

import re

from gpujobs.harness.ports import free_port
from tests.integration.client import assert_problem


def test_healthz(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_readyz_is_200_when_every_service_answers(client):
    response = client.get("/readyz")
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}


def test_readyz_is_503_naming_storage_when_s3_is_down(services):
    import api
    from db.settings import Settings

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    app = api.create_app(settings=Settings(s3_endpoint_url=dead))
    response = app.test_client().get("/readyz")
    body = assert_problem(response, 503)
    assert "storage" in body["detail"]
    assert "database" not in body["detail"] and "broker" not in body["detail"]


def _paths_of(app) -> dict[str, set[str]]:
    routes: dict[str, set[str]] = {}
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)
        routes.setdefault(path, set()).update(m.lower() for m in rule.methods - {"HEAD", "OPTIONS"})
    return routes


def _find_schema_with(document: object, properties: set[str]) -> dict | None:
    """Any schema object in the document whose properties include ``properties``."""
    if isinstance(document, dict):
        if isinstance(document.get("properties"), dict) and properties <= set(document["properties"]):
            return document
        children = document.values()
    elif isinstance(document, list):
        children = document
    else:
        return None
    for child in children:
        found = _find_schema_with(child, properties)
        if found is not None:
            return found
    return None


def test_openapi_lists_the_real_routes_and_the_job_input_schemas(client, app):
    response = client.get("/openapi.json")
    assert response.status_code == 200
    document = response.get_json()
    assert document["openapi"].startswith("3.")
    paths = document["paths"]

    for path in (
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/cancel",
        "/v1/files",
        "/v1/keys",
        "/healthz",
        "/readyz",
        "/metrics",
        "/metrics/cluster",
    ):
        normalized = {re.sub(r"\{[^}]+\}", "{}", p) for p in paths}
        assert re.sub(r"\{[^}]+\}", "{}", path) in normalized, f"{path} is not in the OpenAPI document"
    # Every real route and method is documented (the document is generated from them).
    documented = {re.sub(r"\{[^}]+\}", "{}", p): {m for m in ops if m != "parameters"} for p, ops in paths.items()}
    for path, methods in _paths_of(app).items():
        if (
            path in ("/openapi.json", "/docs")
            or path.startswith(("/docs/", "/admin/", "/replicate/"))
            or path == "/admin"
        ):
            # The admin dashboard is HTML for people with a login session, /docs and its assets are the page
            # that shows this document, and /replicate/ is Replicate's API (described by Replicate's docs).
            continue
        key = re.sub(r"\{[^}]+\}", "{}", path)
        assert key in documented, f"route {path} is missing from /openapi.json"
        assert methods <= documented[key], f"{path}: {methods - documented[key]} undocumented"

    diagnostic = _find_schema_with(document, {"sleep_seconds", "steps", "fail"})
    assert diagnostic is not None, "the diagnostic job's input schema is not in the document"
    steps = diagnostic["properties"]["steps"]
    assert (steps.get("minimum"), steps.get("maximum"), steps.get("default")) == (1, 1000, 1)
    assert steps.get("description")


def test_docs_page(client):
    response = client.get("/docs")
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    assert "openapi.json" in response.get_data(as_text=True)
