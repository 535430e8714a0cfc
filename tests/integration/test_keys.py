"""/v1/keys (admin): create, list, revoke; keys are stored hashed and shown once."""

from __future__ import annotations

import hashlib

from tests.integration.client import assert_problem, auth


def test_create_list_and_revoke_a_key(client, keys):
    admin = auth(keys.admin.secret)
    response = client.post("/v1/keys", json={"name": "ci runner", "role": "user"}, headers=admin)
    assert response.status_code == 201, response.get_data(as_text=True)
    created = response.get_json()
    assert {"id", "name", "role", "tenant", "key", "created_at"} <= set(created)
    assert created["id"].startswith("key_") and created["key"].startswith("gpj_")
    assert (created["name"], created["role"]) == ("ci runner", "user")
    assert created["tenant"] not in (keys.admin.tenant, keys.user_a.tenant, keys.user_b.tenant)  # a new tenant
    assert client.get("/v1/jobs", headers=auth(created["key"])).status_code == 200

    listed: dict[str, dict] = {}
    cursor = None
    while True:
        page = client.get("/v1/keys?limit=100" + (f"&cursor={cursor}" if cursor else ""), headers=admin).get_json()
        listed.update({item["id"]: item for item in page["items"]})
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert created["id"] in listed and keys.user_a.id in listed
    assert all("key" not in item for item in listed.values())  # shown once, at creation
    assert listed[created["id"]]["revoked_at"] is None

    revoked = client.delete(f"/v1/keys/{created['id']}", headers=admin)
    assert revoked.status_code == 200, revoked.get_data(as_text=True)
    assert revoked.get_json()["revoked_at"] is not None and "key" not in revoked.get_json()
    assert_problem(client.get("/v1/jobs", headers=auth(created["key"])), 401)
    # revoking again is harmless
    assert client.delete(f"/v1/keys/{created['id']}", headers=admin).status_code == 200


def test_an_admin_key_made_over_the_api_can_run_diagnostics(client, keys):
    response = client.post("/v1/keys", json={"name": "ops", "role": "admin"}, headers=auth(keys.admin.secret))
    assert response.status_code == 201
    new_admin = response.get_json()["key"]
    submitted = client.post("/v1/jobs", json={"type": "diagnostic", "input": {}}, headers=auth(new_admin))
    assert submitted.status_code == 202, submitted.get_data(as_text=True)


def test_keys_are_stored_hashed(client, keys):
    from db.models import ApiKey
    from db.session import session_scope

    created = client.post("/v1/keys", json={"name": "hashed"}, headers=auth(keys.admin.secret)).get_json()
    with session_scope() as session:
        row = session.get(ApiKey, created["id"])
        stored = {attr.key: getattr(row, attr.key) for attr in ApiKey.__mapper__.column_attrs}
    assert created["key"] not in {str(value) for value in stored.values()}
    assert stored["key_hash"] == hashlib.sha256(created["key"].encode()).hexdigest()
    assert created["role"] == "user"  # the default role


def test_keys_page_newest_first(client, keys):
    admin = auth(keys.admin.secret)
    made = [client.post("/v1/keys", json={"name": f"page {n}"}, headers=admin).get_json()["id"] for n in range(3)]
    first = client.get("/v1/keys?limit=2", headers=admin).get_json()
    assert [item["id"] for item in first["items"]] == [made[2], made[1]]
    second = client.get(f"/v1/keys?limit=2&cursor={first['next_cursor']}", headers=admin).get_json()
    assert second["items"][0]["id"] == made[0]
