"""The OpenAPI document against the real thing: a client generated from it, real answers, and ``/docs`` in a browser.

One ``gpujobs api`` process (gunicorn) and the session's worker serve every test here.

- ``openapi-python-client`` generates a client from the served document, with warnings as failures
  (``--fail-on-warning``); the test imports it from ``tmp_path`` and runs a diagnostic job with it, reading
  typed outputs back. Generated once for the module (about two seconds).
- Every route is called over HTTP and each answer is validated (``jsonschema``) against the schema the
  document gives for its path, method, status and media type, and again with every object closed
  (``unevaluatedProperties: false``): an answer with a field the document does not name fails too.
- ``/docs`` loads in Debian's Chromium with no console error or CSP violation and shows every operation.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import io
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from gpujobs.harness.processes import Stack
from tests.integration.client import auth
from tests.integration.conftest import ROOT, make_key
from tests.integration.test_admin_browser import CHROMIUM_FLAGS, chromium_path

ARTIFACTS = ROOT / "test-artifacts" / "openapi"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def api_server(services: Any, cluster: Any) -> Iterator[str]:
    stack = Stack(dict(os.environ), services.root / "logs", label="openapi")
    try:
        _, base_url = stack.start_api(workers=1)
        yield base_url
    finally:
        stack.stop_all()


@pytest.fixture(scope="module")
def document(api_server: str) -> dict[str, Any]:
    response = requests.get(f"{api_server}/openapi.json", timeout=30)
    assert response.status_code == 200
    return response.json()


SECTION = "## The OpenAPI document, `/docs` and generated clients"


def documented_blocks() -> tuple[str, str]:
    """docs/api.md's shell block (fetch the document, generate the client) and its Python block (use it)."""
    text = (ROOT / "docs" / "api.md").read_text()
    section = text[text.index(SECTION) :]
    shell = re.search(r"```sh\n(.*?)```", section, re.DOTALL)
    python = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert shell and python, f"docs/api.md has no sh and python blocks under {SECTION!r}"
    return shell.group(1), python.group(1)


@pytest.fixture(scope="module")
def generated(api_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """docs/api.md's commands, run: the client ``openapi-python-client`` makes from the served document.

    Its warnings are failures (``--fail-on-warning``, and none printed). Imported as ``gpujobs_client``."""
    root = tmp_path_factory.mktemp("generated")
    shell, _ = documented_blocks()
    lines = [line for line in shell.splitlines() if line.strip()]
    assert lines[-1].startswith("openapi-python-client generate ")
    lines[-1] += " --fail-on-warning"
    run = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", "\n".join(lines)],
        # `openapi-python-client` and the `ruff` its post-hooks run: beside this interpreter.
        env={**os.environ, "GPUJOBS_URL": api_server, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"},
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0 and "warning" not in output.lower(), output
    assert (root / "gpujobs_client" / "__init__.py").is_file(), output
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module("gpujobs_client")
    finally:
        sys.path.remove(str(root))
        for name in [n for n in sys.modules if n == "gpujobs_client" or n.startswith("gpujobs_client.")]:
            del sys.modules[name]


# --- the generated client -------------------------------------------------------------------------------------


def test_a_generated_client_runs_a_diagnostic_job_and_reads_typed_outputs(api_server, generated, keys, gpu_worker):
    from gpujobs_client import AuthenticatedClient
    from gpujobs_client.api.jobs import create_job, get_job
    from gpujobs_client.models import (
        Artifact,
        DiagnosticInput,
        DiagnosticJob,
        DiagnosticJobCreate,
        DiagnosticOutput,
        JobStatus,
        Metadata,
        Problem,
    )

    client = AuthenticatedClient(base_url=api_server, token=keys.admin.secret, raise_on_unexpected_status=True)
    metadata = Metadata.from_dict({"from": "generated client"})
    body = DiagnosticJobCreate(type_="diagnostic", input_=DiagnosticInput(steps=3), metadata=metadata)
    created = create_job.sync_detailed(client=client, body=body)
    assert created.status_code == 202, created.content
    job = created.parsed
    assert isinstance(job, DiagnosticJob) and job.status in (JobStatus.QUEUED, JobStatus.RUNNING)
    assert job.input_.steps == 3 and job.output is None

    for _ in range(6):  # bounded: each read holds up to 10 s for the job to finish
        job = get_job.sync(job.id, client=client, prefer="wait=10")
        assert isinstance(job, DiagnosticJob)
        if job.status == JobStatus.SUCCEEDED:
            break
    assert job.status == JobStatus.SUCCEEDED, job
    assert isinstance(job.output, DiagnosticOutput) and job.output.steps == 3
    artifact = job.output.artifact
    assert isinstance(artifact, Artifact) and artifact.url and artifact.expired is False
    content = requests.get(artifact.url, timeout=30).content
    assert len(content) == artifact.size and hashlib.sha256(content).hexdigest() == artifact.sha256
    assert job.metadata.additional_properties == {"from": "generated client"}
    assert job.finished_at is not None and job.finished_at >= job.created_at

    # Bad input comes back as the typed Problem, naming the field.
    refused = create_job.sync(
        client=client, body=DiagnosticJobCreate(type_="diagnostic", input_=DiagnosticInput(steps=0))
    )
    assert isinstance(refused, Problem) and refused.status == 422
    assert ["body", "input", "steps"] in [error.loc for error in refused.errors]


def test_the_documented_python_example_runs(api_server, generated, keys, gpu_worker, monkeypatch, capsys):
    from gpujobs_client.models import DiagnosticJob, DiagnosticOutput

    _, python = documented_blocks()
    monkeypatch.setenv("GPUJOBS_URL", api_server)
    monkeypatch.setenv("GPUJOBS_KEY", keys.admin.secret)
    names: dict[str, Any] = {}
    exec(compile(python, "docs/api.md", "exec"), names)
    job = names["job"]
    assert isinstance(job, DiagnosticJob) and isinstance(job.output, DiagnosticOutput) and job.output.steps == 3
    assert capsys.readouterr().out.startswith(f"succeeded 3 {job.output.artifact.url}")


def test_a_generated_client_parses_each_job_type_as_its_own_class(generated):
    """The generation types share one output shape; the union is chosen by ``type``, so each parses as its own."""
    from gpujobs_client.models import (
        InpaintingJob,
        InpaintingOutput,
        JobList,
        StyleTransferJob,
        StyleTransferOutput,
        TextToImageJob,
        TextToImageOutput,
    )

    from api.openapi.examples import ARTIFACT, TEXT_TO_IMAGE_QUEUED

    def finished(job_type: str) -> dict[str, Any]:
        job = copy.deepcopy(TEXT_TO_IMAGE_QUEUED)
        if job_type == "inpainting":
            job["input"] = {"image": "file_a", "mask": "file_b", "prompt": "a door"}
        elif job_type == "style_transfer":
            job["input"] = {"content_image": "file_a", "style_image": "file_b"}
        return {
            **job,
            "type": job_type,
            "status": "succeeded",
            "output": {"images": [ARTIFACT], "seed": 7, "seeds": [7]},
        }

    page = JobList.from_dict(
        {"items": [finished(t) for t in ("text_to_image", "inpainting", "style_transfer")], "next_cursor": None}
    )
    kinds = [(type(job), type(job.output)) for job in page.items]
    assert kinds == [
        (TextToImageJob, TextToImageOutput),
        (InpaintingJob, InpaintingOutput),
        (StyleTransferJob, StyleTransferOutput),
    ]
    assert page.items[0].output.images[0].url == ARTIFACT["url"] and page.items[0].output.seed == 7


# --- real answers against the document ----------------------------------------------------------------------


def _closed(node: Any, inside_all_of: bool = False) -> Any:
    """The schema with every object closed to fields it does not name (but ``Problem``, which some answers extend)."""
    if isinstance(node, list):
        return [_closed(item, inside_all_of) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _closed(value, key == "allOf") for key, value in node.items()}
    if ("properties" in node and not inside_all_of) or "allOf" in node:
        out.setdefault("unevaluatedProperties", False)
    return out


class Checker:
    """Validates answers against the document: as it is, and with every object closed."""

    def __init__(self, document: dict[str, Any]) -> None:
        import jsonschema

        self.document = document
        components = copy.deepcopy(document["components"])
        schemas = components["schemas"]
        for name in list(schemas):
            if name not in ("Problem", "JobCommon"):  # JobCommon is closed by the job that includes it
                schemas[name] = _closed(schemas[name])
        self.open = document["components"]
        self.strict = components
        self.validator = jsonschema.Draft202012Validator
        self.seen: set[tuple[str, str, str]] = set()

    def check(self, answer: requests.Response, path: str, method: str) -> Any:
        op = self.document["paths"][path][method]
        status = str(answer.status_code)
        assert status in op["responses"] or "default" in op["responses"], f"{method} {path}: undocumented {status}"
        response = op["responses"].get(status) or op["responses"]["default"]
        if status in ("204", "302"):
            self.seen.add((path, method, status))
            return None
        media = answer.headers["Content-Type"].split(";")[0]
        assert media in response["content"], f"{method} {path} {status}: {media} not documented"
        schema = response["content"][media]["schema"]
        if media.startswith("text/"):
            self.seen.add((path, method, status))
            return answer.text
        body = answer.json()
        for components in (self.open, self.strict):
            errors = list(self.validator({"components": components, "allOf": [schema]}).iter_errors(body))
            assert not errors, f"{method} {path} {status}: " + "; ".join(
                f"{'/'.join(map(str, e.absolute_path))}: {e.message[:300]}" for e in errors[:5]
            )
        self.seen.add((path, method, status))
        return body


def _png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_every_route_answers_as_the_document_says(api_server, document, keys, gpu_worker):
    check = Checker(document)
    owner = make_key("openapi answers", "admin")
    headers = auth(owner.secret)

    def call(method: str, path: str, template: str | None = None, **kwargs: Any) -> Any:
        kwargs["headers"] = {**headers, **kwargs.get("headers", {})}
        answer = requests.request(method, f"{api_server}{path}", timeout=60, **kwargs)
        return answer, check.check(answer, template or path, method.lower())

    call("GET", "/healthz")
    call("GET", "/readyz")
    call("GET", "/metrics")
    call("GET", "/metrics/cluster")
    call("GET", "/docs")

    answer, file = call("POST", "/v1/files", files={"file": ("in.png", _png(), "image/png")})
    assert answer.status_code == 201 and file["width"] == 16
    call("GET", f"/v1/files/{file['id']}", "/v1/files/{file_id}")
    answer, _ = call("GET", f"/v1/files/{file['id']}/content", "/v1/files/{file_id}/content", allow_redirects=False)
    assert answer.status_code == 302

    # A webhook to a closed loopback port: its delivery fails, so the delivery log has attempts to show.
    hook = {"webhook": "http://127.0.0.1:9/hook", "webhook_events_filter": ["start", "completed"]}
    answer, done = call(
        "POST",
        "/v1/jobs",
        json={"type": "diagnostic", "input": {"steps": 2}, "metadata": {"a": 1}, **hook},
        headers={"Prefer": "wait=30", "Idempotency-Key": "openapi-answers-1"},
    )
    assert answer.status_code == 202 and done["status"] == "succeeded", done
    answer, _ = call(
        "POST",
        "/v1/jobs",
        json={"type": "diagnostic", "input": {"steps": 2}, "metadata": {"a": 1}, **hook},
        headers={"Idempotency-Key": "openapi-answers-1"},
    )
    assert answer.status_code == 200  # the repeat
    answer, failed = call(
        "POST",
        "/v1/jobs",
        json={"type": "diagnostic", "input": {"fail": True}},
        headers={"Prefer": "wait=30"},
    )
    assert failed["status"] == "failed" and failed["error"]["code"], failed
    answer, retried = call("POST", f"/v1/jobs/{failed['id']}/retry", "/v1/jobs/{job_id}/retry")
    assert answer.status_code == 202 and retried["retry_of"] == failed["id"]
    _, slow = call("POST", "/v1/jobs", json={"type": "diagnostic", "input": {"sleep_seconds": 60, "steps": 60}})
    answer, canceled = call("POST", f"/v1/jobs/{slow['id']}/cancel", "/v1/jobs/{job_id}/cancel")
    assert answer.status_code == 202 and canceled["id"] == slow["id"]
    answer, _ = call("POST", f"/v1/jobs/{done['id']}/cancel", "/v1/jobs/{job_id}/cancel")
    assert answer.status_code == 409
    answer, bulk = call("POST", "/v1/jobs/cancel", json={"type": "diagnostic", "tenant": owner.tenant})
    assert answer.status_code == 200 and isinstance(bulk["ids"], list)

    call("GET", f"/v1/jobs/{done['id']}", "/v1/jobs/{job_id}")
    call("GET", f"/v1/jobs/{failed['id']}", "/v1/jobs/{job_id}")
    _, page = call("GET", "/v1/jobs", params={"limit": 10})
    assert {done["id"], failed["id"], retried["id"]} <= {job["id"] for job in page["items"]}
    _, timeline = call("GET", f"/v1/jobs/{done['id']}/events", "/v1/jobs/{job_id}/events")
    assert timeline["items"]

    _, deliveries = call("GET", f"/v1/jobs/{done['id']}/webhooks", "/v1/jobs/{job_id}/webhooks")
    assert deliveries["items"], "the job's webhook deliveries"
    delivery = deliveries["items"][0]["id"]
    answer, _ = call(
        "POST",
        f"/v1/jobs/{done['id']}/webhooks/{delivery}/redeliver",
        "/v1/jobs/{job_id}/webhooks/{delivery_id}/redeliver",
    )
    assert answer.status_code == 202
    call("GET", "/v1/webhooks/secret")
    call("POST", "/v1/webhooks/secret/rotate")

    _, models = call("GET", "/v1/models")
    assert models["items"], "the demo catalog's base models"
    base = models["items"][0]["id"]
    call("GET", f"/v1/models/{base}", "/v1/models/{model_id}")
    answer, _ = call("DELETE", f"/v1/models/{base}", "/v1/models/{model_id}")
    assert answer.status_code == 409

    answer, created = call("POST", "/v1/keys", json={"name": "openapi answers user", "role": "user"})
    assert answer.status_code == 201 and created["key"]
    call("GET", "/v1/keys", params={"limit": 5})
    call("DELETE", f"/v1/keys/{created['id']}", "/v1/keys/{key_id}")
    call("GET", "/v1/tenants", params={"limit": 5})
    call("GET", f"/v1/tenants/{owner.tenant}", "/v1/tenants/{tenant_id}")
    call(
        "PUT",
        f"/v1/tenants/{created['tenant']}/quotas",
        "/v1/tenants/{tenant_id}/quotas",
        json={"max_queued_jobs": 50, "weight": 2.0},
    )

    # Errors: each a Problem the document describes.
    answer, problem = call("POST", "/v1/jobs", json={"type": "diagnostic", "input": {"steps": "many"}})
    assert answer.status_code == 422 and problem["errors"][0]["loc"] == ["body", "input", "steps"]
    answer, _ = call("GET", "/v1/jobs/job_nothing", "/v1/jobs/{job_id}")
    assert answer.status_code == 404

    documented = {(path, method) for path, item in document["paths"].items() for method in item}
    called = {(path, method) for path, method, _ in check.seen}
    assert documented - called == {("/openapi.json", "get")}, sorted(documented - called)


# --- /docs in a browser ------------------------------------------------------------------------------------


def test_the_docs_page_shows_every_operation_and_schema_with_no_csp_violation(api_server, document):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS, timeout=60_000)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(30_000)
            page.on("console", lambda msg: errors.append(msg.text) if msg.type in ("error", "warning") else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            answer = page.goto(f"{api_server}/docs")
            assert answer is not None and "script-src 'self'" in answer.headers["content-security-policy"]
            page.wait_for_selector(".opblock")
            operations = sum(len(item) for item in document["paths"].values())
            assert page.locator(".opblock").count() == operations
            tags = page.locator(".opblock-tag").all_inner_texts()
            for tag in ("jobs", "files", "models", "webhooks", "keys", "tenants", "operations"):
                assert any(text.strip().startswith(tag) for text in tags), (tag, tags)

            # Open "Create a job": its request body example and the schemas are there.
            page.locator("#operations-jobs-create_job .opblock-summary").click()
            body = page.locator("#operations-jobs-create_job .opblock-body")
            body.wait_for()
            assert "text_to_image" in body.inner_text()
            models = page.locator("section.models")
            models.wait_for()
            (ARTIFACTS / "models.txt").write_text(models.inner_text())
            page.screenshot(path=str(ARTIFACTS / "docs.png"), full_page=True)
            shown = models.inner_text().lower()  # Swagger UI shows each schema's title, capitalized
            assert "text_to_imagejob" in shown and "diagnostic output" in shown and "jobcommon" in shown
        finally:
            browser.close()
    assert not errors, errors
