"""Bad input on every route: a precise 4xx problem+json naming what is wrong; never a 500."""

from __future__ import annotations

import base64
import json

import pytest

from tests.integration.client import PROBLEM_JSON, assert_problem, auth, submit


def _cursor(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


# --- POST /v1/jobs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body,loc",
    [
        ({"type": "no_such_type", "input": {}}, ["body", "type"]),
        ({"input": {}}, ["body", "type"]),
        ({"type": 5, "input": {}}, ["body", "type"]),
        ({"type": "diagnostic", "input": {"steps": 0}}, ["body", "input", "steps"]),
        ({"type": "diagnostic", "input": {"steps": 1001}}, ["body", "input", "steps"]),
        ({"type": "diagnostic", "input": {"steps": "x"}}, ["body", "input", "steps"]),
        ({"type": "diagnostic", "input": {"steps": 1.5}}, ["body", "input", "steps"]),
        ({"type": "diagnostic", "input": {"sleep_seconds": -1}}, ["body", "input", "sleep_seconds"]),
        ({"type": "diagnostic", "input": {"sleep_seconds": 601}}, ["body", "input", "sleep_seconds"]),
        ({"type": "diagnostic", "input": {"fail": "perhaps"}}, ["body", "input", "fail"]),
        ({"type": "diagnostic", "input": {"stpes": 3}}, ["body", "input", "stpes"]),
        ({"type": "diagnostic", "input": 5}, ["body", "input"]),
        ({"type": "diagnostic", "input": {}, "priority": 10}, ["body", "priority"]),
        ({"type": "diagnostic", "input": {}, "metadata": [1, 2]}, ["body", "metadata"]),
        ({"type": "diagnostic", "input": {}, "metadata": {"blob": "x" * 20_000}}, ["body", "metadata"]),
        ({"type": "diagnostic", "input": {}, "webhook": "ftp://example.com/x"}, ["body", "webhook"]),
        ({"type": "diagnostic", "input": {}, "webhook": "not a url"}, ["body", "webhook"]),
        (
            {"type": "diagnostic", "input": {}, "webhook_events_filter": ["sometimes"]},
            ["body", "webhook_events_filter", 0],
        ),
    ],
    ids=lambda v: json.dumps(v)[:60] if isinstance(v, dict) else None,
)
def test_a_job_that_fails_its_schema_is_a_422_naming_the_field(client, keys, body, loc):
    response = submit(client, keys.admin.secret, body)
    assert_problem(response, 422, loc)


def test_an_unknown_type_lists_the_known_ones(client, keys):
    body = assert_problem(submit(client, keys.admin.secret, {"type": "no_such_type"}), 422, ["body", "type"])
    assert "no_such_type" in body["detail"] and "diagnostic" in body["detail"]


def test_several_problems_are_all_named(client, keys):
    body = assert_problem(
        submit(client, keys.admin.secret, {"type": "diagnostic", "input": {"steps": 0, "sleep_seconds": -1}}), 422
    )
    locs = {tuple(error["loc"]) for error in body["errors"]}
    assert {("body", "input", "steps"), ("body", "input", "sleep_seconds")} <= locs


@pytest.mark.parametrize("payload", [b"{not json", b"", b'{"type": "diagnostic",}', b"\xff\xfe"])
def test_a_body_that_is_not_json_is_a_400(client, keys, payload):
    response = client.post(
        "/v1/jobs", data=payload, headers={**auth(keys.admin.secret), "Content-Type": "application/json"}
    )
    assert_problem(response, 400)


@pytest.mark.parametrize("payload", [b"[]", b'"diagnostic"', b"42", b"null"])
def test_json_that_is_not_an_object_is_refused(client, keys, payload):
    response = client.post(
        "/v1/jobs", data=payload, headers={**auth(keys.admin.secret), "Content-Type": "application/json"}
    )
    assert response.status_code in (400, 422), response.get_data(as_text=True)
    assert_problem(response, response.status_code)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_a_body_that_is_not_declared_json_is_a_415(client, keys, content_type):
    headers = auth(keys.admin.secret)
    if content_type:
        headers["Content-Type"] = content_type
    response = client.post("/v1/jobs", data=b'{"type": "diagnostic"}', headers=headers)
    assert_problem(response, 415)


def test_an_oversized_job_body_is_a_413(client, keys):
    from db.settings import get_settings

    blob = "x" * (get_settings().max_body_bytes + 1)
    response = submit(client, keys.admin.secret, {"type": "diagnostic", "input": {}, "metadata": {"blob": blob}})
    assert_problem(response, 413)


def test_an_overlong_idempotency_key_is_a_422(client, keys):
    response = submit(client, keys.admin.secret, {"type": "diagnostic"}, {"Idempotency-Key": "k" * 256})
    assert_problem(response, 422, ["Idempotency-Key"])


# --- lists -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/keys", "/v1/models"])
@pytest.mark.parametrize("limit", ["0", "101", "-1", "x", "1.5", ""])
def test_a_bad_limit_is_a_422(client, keys, path, limit):
    response = client.get(f"{path}?limit={limit}", headers=auth(keys.admin.secret))
    if limit == "":
        assert response.status_code in (200, 422)  # an empty value may mean "the default"
        if response.status_code == 200:
            return
    assert_problem(response, 422, ["limit"])


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/keys", "/v1/models"])
@pytest.mark.parametrize(
    "cursor",
    [
        "not-a-cursor",
        "!!!",
        _cursor(5),
        _cursor(["yesterday", "job_x"]),
        _cursor({"created": "2024-01-01T00:00:00+00:00"}),
        _cursor(["2024-01-01T00:00:00", "job_x"]),  # no time zone
        _cursor(["2024-01-01T00:00:00+00:00"]),
        base64.urlsafe_b64encode(b"\xff\xfe\xfd").decode(),
    ],
    ids=["text", "punctuation", "a-number", "not-a-time", "an-object", "naive-time", "no-id", "not-utf8"],
)
def test_a_bad_cursor_is_a_422(client, keys, path, cursor):
    response = client.get(f"{path}?cursor={cursor}", headers=auth(keys.admin.secret))
    assert_problem(response, 422, ["cursor"])


@pytest.mark.parametrize(
    "path,query,loc",
    [
        ("/v1/jobs", "status=done", "status"),
        ("/v1/jobs", "type=no_such_type", "type"),
        ("/v1/models", "kind=x", "kind"),
    ],
)
def test_a_bad_list_filter_is_a_422(client, keys, path, query, loc):
    assert_problem(client.get(f"{path}?{query}", headers=auth(keys.admin.secret)), 422, [loc])


# --- keys ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body,loc",
    [
        ({"role": "user"}, ["body", "name"]),
        ({"name": "", "role": "user"}, ["body", "name"]),
        ({"name": "x", "role": "root"}, ["body", "role"]),
        ({"name": "x", "role": "user", "tenant": "ten_nope"}, ["body", "tenant"]),
        ({"name": "x", "role": "user", "scopes": ["all"]}, ["body", "scopes"]),
        ({"name": ["x"], "role": "user"}, ["body", "name"]),
    ],
)
def test_a_bad_key_request_is_a_422_naming_the_field(client, keys, body, loc):
    assert_problem(client.post("/v1/keys", json=body, headers=auth(keys.admin.secret)), 422, loc)


def test_key_bodies_that_are_not_json(client, keys):
    headers = auth(keys.admin.secret)
    assert_problem(client.post("/v1/keys", data="name=x", headers=headers, content_type="text/plain"), 415)
    response = client.post("/v1/keys", data="{oops", headers=headers, content_type="application/json")
    assert_problem(response, 400)


def test_revoking_an_unknown_key_is_a_404(client, keys):
    assert_problem(client.delete("/v1/keys/key_nope", headers=auth(keys.admin.secret)), 404)


# --- routes and methods ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/v1/nothing-here",
        "/v1/jobs/job_nope",
        "/v1/jobs/job_nope/nope",
        "/nothing",
        "/v2/jobs",
        "/v1/models/mdl_nope",
        "/v1/models/no-such-base-model",
    ],
)
def test_an_unknown_route_or_id_is_a_404(client, keys, path):
    assert_problem(client.get(path, headers=auth(keys.admin.secret)), 404)


@pytest.mark.parametrize(
    "method,path,allowed",
    [
        ("DELETE", "/v1/jobs", {"GET", "POST"}),
        ("PUT", "/v1/jobs/job_x", {"GET"}),
        ("GET", "/v1/jobs/job_x/cancel", {"POST"}),
        ("PATCH", "/v1/files", {"POST"}),
        ("PUT", "/v1/keys", {"GET", "POST"}),
        ("POST", "/healthz", {"GET"}),
        ("POST", "/v1/models", {"GET"}),
        ("PUT", "/v1/models/mdl_x", {"GET", "DELETE"}),
    ],
)
def test_a_wrong_method_is_a_405_with_allow(client, keys, method, path, allowed):
    response = client.open(path, method=method, headers=auth(keys.admin.secret))
    assert_problem(response, 405)
    assert allowed <= {m.strip() for m in response.headers["Allow"].split(",")}


# --- nothing a client sends is a 500 -----------------------------------------------------------------


def _weird_requests(admin: str) -> list[tuple[str, str, dict]]:
    h = auth(admin)
    j = {**h, "Content-Type": "application/json"}
    return [
        ("POST", "/v1/jobs", {"headers": j, "data": b"\x00" * 100}),
        ("POST", "/v1/jobs", {"headers": j, "data": json.dumps({"type": "diagnostic", "input": {"steps": 10**40}})}),
        ("POST", "/v1/jobs", {"headers": j, "data": json.dumps({"type": "diagnostic", "input": {"steps": None}})}),
        (
            "POST",
            "/v1/jobs",
            {"headers": j, "data": json.dumps({"type": "diagnostic", "input": {"sleep_seconds": "NaN"}})},
        ),
        ("POST", "/v1/jobs", {"headers": j, "data": b'{"type": "diagnostic", "input": {"sleep_seconds": NaN}}'}),
        ("POST", "/v1/jobs", {"headers": j, "data": b'{"type": "diagnostic", "input": {"sleep_seconds": 1e999}}'}),
        ("POST", "/v1/jobs", {"headers": j, "data": json.dumps({"type": "\x00", "input": {}})}),
        ("POST", "/v1/jobs", {"headers": j, "data": json.dumps({"type": "diagnostic", "metadata": {"\ud800": 1}})}),
        ("POST", "/v1/jobs", {"headers": j, "data": "[" * 5000 + "]" * 5000}),
        (
            "POST",
            "/v1/jobs",
            {"headers": j, "data": json.dumps({"type": "diagnostic", "metadata": {"nul": "a\u0000b"}})},
        ),
        ("POST", "/v1/jobs", {"headers": {**j, "Prefer": "wait=99999999999999999999"}, "data": "{}"}),
        ("POST", "/v1/jobs", {"headers": {**j, "Idempotency-Key": ""}, "data": json.dumps({"type": "diagnostic"})}),
        ("GET", "/v1/jobs?limit=99999999999999999999999", {"headers": h}),
        ("GET", "/v1/jobs?cursor=" + "A" * 5000, {"headers": h}),
        ("GET", "/v1/jobs?cursor=%00", {"headers": h}),
        ("GET", "/v1/jobs/" + "j" * 5000, {"headers": h}),
        ("GET", "/v1/jobs/%00", {"headers": h}),
        ("GET", "/v1/jobs/job_x", {"headers": {**h, "Prefer": "wait=-5"}}),
        (
            "POST",
            "/v1/files",
            {"headers": {**h, "Content-Type": "multipart/form-data; boundary=zzz"}, "data": b"--zzz\r\n"},
        ),
        ("POST", "/v1/files", {"headers": {**h, "Content-Type": "multipart/form-data"}, "data": b"garbage"}),
        ("POST", "/v1/keys", {"headers": j, "data": json.dumps({"name": "x" * 10_000, "role": "user"})}),
        ("POST", "/v1/keys", {"headers": j, "data": json.dumps({"name": "x", "role": "user", "tenant": "t" * 500})}),
        ("DELETE", "/v1/keys/" + "k" * 5000, {"headers": h}),
        ("DELETE", "/v1/keys/key_%00", {"headers": h}),
        ("GET", "/v1/files/file_%00", {"headers": h}),
        ("POST", "/v1/jobs/job_%00/cancel", {"headers": h}),
        ("GET", "/v1/jobs?cursor=" + _cursor(["2024-01-01T00:00:00+00:00", "job_\u0000"]), {"headers": h}),
        ("POST", "/v1/keys", {"headers": j, "data": json.dumps({"name": "a\u0000b", "role": "user"})}),
        ("POST", "/v1/keys", {"headers": j, "data": json.dumps({"name": "x", "role": "user", "tenant": "ten_\u0000"})}),
        ("GET", "/v1/jobs", {"headers": {"Authorization": "Bearer " + "x" * 10_000}}),
        ("GET", "/v1/jobs", {"headers": {"Authorization": "Bearer \u00e9\u00e9"}}),
        ("GET", "/v1/models/" + "m" * 5000, {"headers": h}),
        ("GET", "/v1/models/mdl_%00", {"headers": h}),
        ("DELETE", "/v1/models/mdl_%00", {"headers": h}),
        ("GET", "/v1/models?cursor=%00&kind=%00", {"headers": h}),
        ("POST", "/v1/jobs", {"headers": j, "data": json.dumps({"type": "finetune", "input": {"images": [None] * 3}})}),
        (
            "POST",
            "/v1/jobs",
            {
                "headers": j,
                "data": json.dumps(
                    {
                        "type": "text_to_image",
                        "input": {"prompt": "x", "loras": [{"model": "mdl_\u0000", "scale": "NaN"}]},
                    }
                ),
            },
        ),
    ]


def test_nothing_a_client_sends_is_a_500(client, keys):
    problems = []
    for method, path, kwargs in _weird_requests(keys.admin.secret):
        response = client.open(path, method=method, **kwargs)
        answer = response.get_data(as_text=True)[:200]
        described = f"{method} {path[:60]} {str(kwargs)[:160]} -> {response.status_code} {answer}"
        if response.status_code >= 500:
            problems.append(described)
        elif response.status_code >= 400 and not response.headers["Content-Type"].startswith(PROBLEM_JSON):
            problems.append(f"not problem+json: {described}")
    assert not problems, "\n".join(problems)


def test_an_unknown_type_from_a_user_key_is_a_422(client, keys):
    response = submit(client, keys.user_a.secret, {"type": "segmentation_v9", "input": {"image": "file_x"}})
    body = assert_problem(response, 422, ["body", "type"])
    assert "diagnostic" not in body["detail"]  # users are not told about admin-only types
