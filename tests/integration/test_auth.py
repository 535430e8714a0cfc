"""Keys and tenants: who may call what, and what another tenant's id looks like (an unknown id)."""

from __future__ import annotations

import pytest

from tests.integration.client import assert_problem, auth, diagnostic, png_bytes, upload


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer "},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer gpj_not-a-key-anyone-has"},
        {"Authorization": "gpj_no-scheme"},
    ],
    ids=["none", "empty", "bearer-only", "bearer-blank", "basic", "unknown-key", "no-scheme"],
)
@pytest.mark.parametrize("method,path", [("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", "/v1/keys")])
def test_a_missing_or_unknown_key_is_a_401(client, headers, method, path):
    response = client.open(path, method=method, headers=headers, json={"type": "diagnostic"})
    assert_problem(response, 401)
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_a_revoked_key_is_refused_at_once(client, keys):
    created = client.post("/v1/keys", json={"name": "soon revoked", "role": "user"}, headers=auth(keys.admin.secret))
    assert created.status_code == 201, created.get_data(as_text=True)
    key = created.get_json()
    assert client.get("/v1/jobs", headers=auth(key["key"])).status_code == 200

    revoked = client.delete(f"/v1/keys/{key['id']}", headers=auth(keys.admin.secret))
    assert revoked.status_code == 200, revoked.get_data(as_text=True)
    assert revoked.get_json()["revoked_at"] is not None
    assert_problem(client.get("/v1/jobs", headers=auth(key["key"])), 401)
    assert_problem(client.get("/v1/files/file_x", headers=auth(key["key"])), 401)


def _same_problem_as_unknown(response, unknown_response, the_id: str, unknown_id: str) -> None:
    """Another tenant's id answers exactly as an id that does not exist."""
    assert response.status_code == unknown_response.status_code == 404
    body, unknown = response.get_json(), unknown_response.get_json()
    assert body == {**unknown, "detail": unknown["detail"].replace(unknown_id, the_id)}
    assert response.headers["Content-Type"] == unknown_response.headers["Content-Type"]


def test_another_tenants_job_is_a_404_like_an_unknown_one(client, keys):
    job = diagnostic(client, keys.admin.secret)
    unknown_id = "job_" + "x" * 22
    for user in (keys.user_a, keys.user_b):
        headers = auth(user.secret)
        _same_problem_as_unknown(
            client.get(f"/v1/jobs/{job['id']}", headers=headers),
            client.get(f"/v1/jobs/{unknown_id}", headers=headers),
            job["id"],
            unknown_id,
        )
        _same_problem_as_unknown(
            client.post(f"/v1/jobs/{job['id']}/cancel", headers=headers),
            client.post(f"/v1/jobs/{unknown_id}/cancel", headers=headers),
            job["id"],
            unknown_id,
        )
    # The job was not touched by those attempts.
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth(keys.admin.secret)).get_json()["status"] != "canceled"


def test_another_tenants_file_is_a_404_like_an_unknown_one(client, keys):
    created = upload(client, keys.user_a.secret, png_bytes())
    assert created.status_code == 201, created.get_data(as_text=True)
    file_id = created.get_json()["id"]
    unknown_id = "file_" + "x" * 22

    for path in ("/v1/files/{}", "/v1/files/{}/content"):
        _same_problem_as_unknown(
            client.get(path.format(file_id), headers=auth(keys.user_b.secret)),
            client.get(path.format(unknown_id), headers=auth(keys.user_b.secret)),
            file_id,
            unknown_id,
        )
    assert client.get(f"/v1/files/{file_id}", headers=auth(keys.user_a.secret)).status_code == 200
    assert client.get(f"/v1/files/{file_id}", headers=auth(keys.admin.secret)).status_code == 200  # admins see all


def test_keys_of_one_tenant_share_its_files(client, keys):
    created = upload(client, keys.user_a.secret, png_bytes())
    file_id = created.get_json()["id"]
    teammate = client.post(
        "/v1/keys",
        json={"name": "teammate", "role": "user", "tenant": keys.user_a.tenant},
        headers=auth(keys.admin.secret),
    )
    assert teammate.status_code == 201, teammate.get_data(as_text=True)
    assert teammate.get_json()["tenant"] == keys.user_a.tenant
    assert client.get(f"/v1/files/{file_id}", headers=auth(teammate.get_json()["key"])).status_code == 200


def test_a_user_key_cannot_submit_diagnostic_jobs(client, keys):
    response = client.post("/v1/jobs", json={"type": "diagnostic", "input": {}}, headers=auth(keys.user_a.secret))
    body = assert_problem(response, 403)
    assert "admin" in body["detail"]


@pytest.mark.parametrize(
    "method,path,body",
    [
        ("GET", "/v1/keys", None),
        ("POST", "/v1/keys", {"name": "sneaky", "role": "admin"}),
        ("DELETE", "/v1/keys/key_whatever", None),
    ],
)
def test_a_user_key_cannot_manage_keys(client, keys, method, path, body):
    response = client.open(path, method=method, json=body, headers=auth(keys.user_a.secret))
    assert_problem(response, 403)


def test_public_routes_need_no_key(client):
    assert client.get("/healthz").status_code == 200
    assert client.get("/openapi.json").status_code == 200


def test_too_many_requests_for_one_key_is_a_429_with_retry_after(keys):
    import api
    from db.settings import Settings
    from tests.integration.conftest import make_key

    busy, calm = make_key("busy client", "user"), make_key("calm client", "user")
    client = api.create_app(Settings(rate_limit_per_minute=5)).test_client()
    statuses = [client.get("/v1/jobs", headers=auth(busy.secret)).status_code for _ in range(5)]
    assert statuses == [200] * 5
    # Within 6 more requests the limit is hit (even if a minute boundary reset the count once).
    refused = None
    for _ in range(6):
        response = client.get("/v1/jobs", headers=auth(busy.secret))
        if response.status_code != 200:
            refused = response
            break
    assert refused is not None, "no 429 after 11 requests with a limit of 5 a minute"
    body = assert_problem(refused, 429)
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    # The same fields as a tenant's quotas (test_quotas.py): which limit, and the IETF draft's headers.
    assert body["quota"] == "rate_limit_per_minute" and body["limit"] == 5, body
    assert refused.headers["RateLimit-Limit"] == "5" and refused.headers["RateLimit-Remaining"] == "0"
    assert refused.headers["RateLimit-Reset"] == refused.headers["Retry-After"]
    assert refused.headers["RateLimit-Policy"] == '5;w=60;comment="rate_limit_per_minute"'
    assert client.get("/v1/jobs", headers=auth(calm.secret)).status_code == 200  # the limit is per key
