"""The HTTP contract where the schema and the answers meet (issue 13, item 8), and the wait caps.

- The OpenAPI document validates what the API really answers: a generation job's output (the
  three generation types share one shape), a key's ``revoked_at`` of ``null``, every ``$ref`` of
  the served ``/openapi.json`` resolves (``POST /v1/keys``'s role included).
- 414 and 431 are problem+json from the app (``api/limits.py``); gunicorn's own limits sit above.
- ``Prefer: wait`` is capped per key and per tenant (429 with ``Retry-After``), and a waiting
  request holds no database connection.

The app runs in process on a migrated SQLite file and the in-memory broker (no Redis: waits end
by the periodic re-read, here every 0.2 s).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import jsonschema_rs
import pytest

from db.settings import Settings


@pytest.fixture
def app(database_url: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("GPUJOBS_VAR_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("GPUJOBS_WAIT_RECHECK_SECONDS", "0.2")
    monkeypatch.setenv("GPUJOBS_MAX_WAITS_PER_KEY", "2")
    monkeypatch.setenv("GPUJOBS_MAX_WAITS_PER_TENANT", "3")
    import api

    return api.create_app(Settings())


@pytest.fixture
def doc(app: Any) -> dict[str, Any]:
    response = app.test_client().get("/openapi.json")
    assert response.status_code == 200
    return response.get_json()  # type: ignore[no-any-return]


def _validator(doc: dict[str, Any], component: str) -> Any:
    """A draft 2020-12 validator of ``#/components/schemas/<component>`` within the document."""
    return jsonschema_rs.Draft202012Validator({"$ref": f"#/components/schemas/{component}", **doc})


def _keys(sessions: Any, tenant: str | None = None) -> dict[str, tuple[str, str, str]]:
    """name → (key id, tenant id, secret) for an admin, two users of one tenant and a user of another."""
    from db.keys import create_key
    from db.models import Role

    made = {}
    with sessions() as session:
        admin, admin_secret = create_key(session, "admin", Role.ADMIN)
        first, first_secret = create_key(session, "first", Role.USER)
        second, second_secret = create_key(session, "second", Role.USER, tenant_id=first.tenant_id)
        third, third_secret = create_key(session, "third", Role.USER, tenant_id=first.tenant_id)
        other, other_secret = create_key(session, "other", Role.USER)
        session.commit()
        for name, row, secret in [
            ("admin", admin, admin_secret),
            ("first", first, first_secret),
            ("second", second, second_secret),
            ("third", third, third_secret),
            ("other", other, other_secret),
        ]:
            made[name] = (row.id, row.tenant_id, secret)
    return made


def _auth(secret: str, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}", **headers}


# --- schema bugs of the issue ----------------------------------------------------------------------


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_every_ref_of_the_served_document_resolves(doc: dict[str, Any]) -> None:
    refs = set(_refs(doc))
    assert "#/components/schemas/Role" in refs  # POST /v1/keys's role, once an unresolvable #/$defs/Role
    for ref in refs:
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.removeprefix("#/components/schemas/") in doc["components"]["schemas"], f"{ref} does not resolve"
    body = doc["paths"]["/v1/keys"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    valid = jsonschema_rs.Draft202012Validator({**body, "components": doc["components"]})
    assert valid.is_valid({"name": "ci", "role": "admin"})
    assert not valid.is_valid({"name": "ci", "role": "owner"})


def test_every_component_is_a_valid_2020_12_schema(doc: dict[str, Any]) -> None:
    for name in doc["components"]["schemas"]:
        _validator(doc, name)  # raises on an invalid schema or an unresolvable reference


# A valid input of each type, as a job echoes it (the Job schema takes each type's input schema).
INPUTS = {
    "text_to_image": {"prompt": "a lighthouse"},
    "inpainting": {"image": "file_a", "mask": "file_b"},
    "style_transfer": {"content_image": "file_a", "style_image": "file_b"},
    "segmentation": {"image": "file_a"},
    "diagnostic": {},
}


def _job(job_type: str, output: Any, status: str = "succeeded") -> dict[str, Any]:
    return {
        "id": "job_x",
        "type": job_type,
        "status": status,
        "input": INPUTS[job_type],
        "metadata": {},
        "output": output,
        "error": None,
        "progress": {"step": 1, "total": 1, "fraction": 1.0, "message": None},
        "attempts": 1,
        "priority": 5,
        "created_at": "2026-12-01T10:00:00Z",
        "started_at": "2026-12-01T10:00:01Z",
        "finished_at": "2026-12-01T10:00:02Z",
        "metrics": {"queue_seconds": 1.0, "run_seconds": 1.0},
        "webhook": None,
        "webhook_events_filter": ["completed"],
        "outputs_expired_at": None,
        "retry_of": None,
        "retried_as": [],
        "urls": {"self": "/v1/jobs/job_x", "cancel": "/v1/jobs/job_x/cancel", "retry": "/v1/jobs/job_x/retry"},
    }


def test_a_generation_jobs_output_is_valid_for_its_type_only(doc: dict[str, Any]) -> None:
    from worker.jobs.diffusion.spec import Output as GenerationOutput
    from worker.jobs.spec import Artifact

    artifact = Artifact(name="image-0.png", content_type="image/png", size=10, sha256="0" * 64, url="http://s3/x")
    output = GenerationOutput(images=[artifact], seed=7, seeds=[7]).model_dump(mode="json")
    job = _validator(doc, "Job")
    for job_type in ("text_to_image", "inpainting", "style_transfer"):
        # Was a oneOf of three identical branches: every generation output matched three, so none was valid.
        job.validate(_job(job_type, output))
        job.validate(_job(job_type, None, status="queued"))
    assert not job.is_valid(_job("segmentation", output)), "a segmentation job with a generation output"
    assert not job.is_valid(_job("text_to_image", {"steps": 1, "artifact": artifact.model_dump()}))


def test_a_key_answer_is_valid_revoked_or_not(app: Any, doc: dict[str, Any], sessions: Any) -> None:
    client = app.test_client()
    admin = _keys(sessions)["admin"][2]
    key_schema = _validator(doc, "Key")
    created = client.post("/v1/keys", json={"name": "ci", "role": "user"}, headers=_auth(admin))
    assert created.status_code == 201, created.get_data(as_text=True)
    assert created.get_json()["revoked_at"] is None
    key_schema.validate(created.get_json())
    revoked = client.delete(f"/v1/keys/{created.get_json()['id']}", headers=_auth(admin))
    assert revoked.status_code == 200 and revoked.get_json()["revoked_at"]
    key_schema.validate(revoked.get_json())
    listed = client.get("/v1/keys", headers=_auth(admin))
    _validator(doc, "KeyList").validate(listed.get_json())


# --- 414 and 431 ----------------------------------------------------------------------------------


def _problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/problem+json"
    body: dict[str, Any] = response.get_json()
    assert body["status"] == status and body["detail"]
    return body


def test_an_over_long_url_is_a_414_problem_before_authentication(app: Any) -> None:
    from api import limits

    client = app.test_client()
    assert client.get("/healthz?" + "a" * (limits.MAX_URL_BYTES - 10)).status_code == 200
    body = _problem(client.get("/v1/jobs?" + "a" * limits.MAX_URL_BYTES), 414)  # no key: 414 comes first
    assert body["title"] == "URI Too Long" and str(limits.MAX_URL_BYTES) in body["detail"]
    _problem(client.get("/v1/jobs/" + "j" * limits.MAX_URL_BYTES), 414)
    assert limits.MAX_URL_BYTES + 100 < limits.GUNICORN_LIMIT_REQUEST_LINE <= 8190  # gunicorn's largest


def test_over_long_headers_are_a_431_problem(app: Any) -> None:
    from api import limits

    client = app.test_client()
    assert client.get("/healthz", headers={"X-Big": "b" * (limits.MAX_HEADER_FIELD_BYTES - 100)}).status_code == 200
    body = _problem(client.get("/healthz", headers={"X-Big": "b" * limits.MAX_HEADER_FIELD_BYTES}), 431)
    assert body["title"] == "Request Header Fields Too Large" and body["header"] == "X-Big"
    many = {f"X-Part-{i}": "p" * 4000 for i in range(limits.MAX_HEADER_BYTES // 4000 + 1)}
    _problem(client.get("/healthz", headers=many), 431)
    assert limits.MAX_HEADER_FIELD_BYTES + 1024 <= limits.GUNICORN_LIMIT_REQUEST_FIELD_SIZE


# --- Prefer: wait ---------------------------------------------------------------------------------


def _submit(client: Any, secret: str, **headers: str) -> Any:
    return client.post(
        "/v1/jobs", json={"type": "text_to_image", "input": {"prompt": "x"}}, headers=_auth(secret, **headers)
    )


def test_concurrent_waits_are_capped_per_key_and_per_tenant_with_a_429(app: Any, sessions: Any) -> None:
    """Caps of 2 per key and 3 per tenant; nothing runs the jobs (in-memory broker), so waits last their time."""
    keys = _keys(sessions)
    job = _submit(app.test_client(), keys["first"][2])
    assert job.status_code == 202, job.get_data(as_text=True)
    job_id = job.get_json()["id"]
    answers: dict[str, list[Any]] = {}

    def wait(name: str, seconds: int) -> None:
        response = app.test_client().get(f"/v1/jobs/{job_id}", headers=_auth(keys[name][2], Prefer=f"wait={seconds}"))
        answers.setdefault(name, []).append(response)

    threads = [threading.Thread(target=wait, args=(name, 4)) for name in ("first", "first", "second")]
    for thread in threads:
        thread.start()
    from api import waiting

    waits = waiting.listener(app.config["GPUJOBS_SETTINGS"])
    deadline = time.monotonic() + 10
    while waits.waits() < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert waits.waits() == 3
    client = app.test_client()
    # The key's third wait: 429 (before any job is made, for a submit).
    body = _problem(client.get(f"/v1/jobs/{job_id}", headers=_auth(keys["first"][2], Prefer="wait=4")), 429)
    assert body["detail"].startswith("This API key already holds 2 waiting requests")
    assert (body["quota"], body["limit"], body["used"]) == ("waits_per_key", 2, 2)
    refused = _submit(client, keys["first"][2], Prefer="wait=4")
    _problem(refused, 429)
    assert 1 <= int(refused.headers["Retry-After"]) <= 4
    assert refused.headers["RateLimit-Reset"] == refused.headers["Retry-After"]
    assert refused.headers["RateLimit-Limit"] == "2" and refused.headers["RateLimit-Remaining"] == "0"
    assert refused.headers["RateLimit-Policy"] == '2;comment="waits_per_key"'
    # The tenant's fourth wait, from its third key: 429 too.
    body = _problem(client.get(f"/v1/jobs/{job_id}", headers=_auth(keys["third"][2], Prefer="wait=4")), 429)
    assert body["detail"].startswith("This tenant already holds 3 waiting requests")
    assert (body["quota"], body["limit"]) == ("waits_per_tenant", 3)
    # Another tenant, and the same key without waiting, are not held back.
    assert client.get(f"/v1/jobs/{job_id}", headers=_auth(keys["first"][2])).status_code == 200
    admin_wait = client.get(f"/v1/jobs/{job_id}", headers=_auth(keys["admin"][2], Prefer="wait=1"))
    assert admin_wait.status_code == 200 and admin_wait.headers["Preference-Applied"] == "wait=1"
    for thread in threads:
        thread.join(15)
    assert [r.status_code for r in answers["first"] + answers["second"]] == [200, 200, 200]
    assert waits.waits() == 0
    # The waits ended: the key may wait again.
    assert client.get(f"/v1/jobs/{job_id}", headers=_auth(keys["first"][2], Prefer="wait=1")).status_code == 200
    with sessions() as session:
        from sqlalchemy import func, select

        from db.models import Job

        assert session.scalar(select(func.count()).select_from(Job)) == 1, "a refused submit made a job"


def test_a_waiting_request_holds_no_database_connection_and_wakes_on_the_re_read(app: Any, sessions: Any) -> None:
    from sqlalchemy import update

    from db.models import Job
    from db.session import get_engine

    keys = _keys(sessions)
    job_id = _submit(app.test_client(), keys["first"][2]).get_json()["id"]
    answer: list[Any] = []
    started = time.monotonic()
    thread = threading.Thread(
        target=lambda: answer.append(
            app.test_client().get(f"/v1/jobs/{job_id}", headers=_auth(keys["first"][2], Prefer="wait=20"))
        )
    )
    thread.start()
    from api import waiting

    waits = waiting.listener(app.config["GPUJOBS_SETTINGS"])
    deadline = time.monotonic() + 10
    while waits.waits() < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.5)  # a few re-reads pass
    assert waits.waits() == 1 and not answer
    pool = get_engine(app.config["GPUJOBS_SETTINGS"].database_url).pool
    assert pool.checkedout() == 0, "the waiting request holds a database connection"  # type: ignore[attr-defined]
    with sessions() as session:  # finished behind the API's back: no notification, only the re-read sees it
        session.execute(update(Job).where(Job.id == job_id).values(status="canceled"))
        session.commit()
    thread.join(10)
    elapsed = time.monotonic() - started
    assert answer and answer[0].status_code == 200 and answer[0].get_json()["status"] == "canceled"
    assert elapsed < 5, f"the re-read (every 0.2 s) took {elapsed:.1f}s to end the wait"


def test_smaller_contract_fixes_schemathesis_found(app: Any, doc: dict[str, Any], sessions: Any) -> None:
    """`input` is required for types whose input has required fields; `/docs` and `/metrics` are text;
    `?status=` and `?type=` (empty) are refused like any value outside their enum."""
    schemas = doc["components"]["schemas"]
    assert doc["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/JobCreate"
    }
    variants = {
        schemas[v["$ref"].rsplit("/", 1)[1]]["properties"]["type"]["const"]: schemas[v["$ref"].rsplit("/", 1)[1]]
        for v in schemas["JobCreate"]["oneOf"]
    }
    assert "input" in variants["inpainting"]["required"] and "input" not in variants["diagnostic"]["required"]
    assert list(doc["paths"]["/docs"]["get"]["responses"]["200"]["content"]) == ["text/html"]
    assert list(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    client = app.test_client()
    admin = _keys(sessions)["admin"][2]
    _problem(client.get("/v1/jobs?status=", headers=_auth(admin)), 422)
    _problem(client.get("/v1/jobs?type=", headers=_auth(admin)), 422)
    assert client.get("/v1/jobs?status=queued", headers=_auth(admin)).status_code == 200
