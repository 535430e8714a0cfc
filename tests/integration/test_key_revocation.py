"""Revoking keys safely: the key making the request, or the last active admin key, only when forced (409 otherwise),
through the API and the dashboard alike."""

from __future__ import annotations

import pytest

from tests.integration.admin_client import logged_in, page, post_form
from tests.integration.client import assert_problem, auth
from tests.integration.conftest import make_key


def test_an_admin_key_cannot_revoke_itself_unless_forced(client, keys):
    admin = make_key("revokes itself", "admin")
    refused = client.delete(f"/v1/keys/{admin.id}", headers=auth(admin.secret))
    body = assert_problem(refused, 409)
    assert "key making the request" in body["detail"] and "force=true" in body["detail"]
    assert client.get("/v1/jobs", headers=auth(admin.secret)).status_code == 200, "the refusal changed nothing"

    assert_problem(client.delete(f"/v1/keys/{admin.id}?force=maybe", headers=auth(admin.secret)), 422)
    assert_problem(client.delete(f"/v1/keys/{admin.id}?force=", headers=auth(admin.secret)), 422)  # schemathesis
    forced = client.delete(f"/v1/keys/{admin.id}?force=true", headers=auth(admin.secret))
    assert forced.status_code == 200, forced.get_data(as_text=True)
    assert forced.get_json()["revoked_at"] is not None
    assert_problem(client.get("/v1/jobs", headers=auth(admin.secret)), 401)


def test_another_admin_key_is_revoked_without_force(client, keys):
    other = make_key("another admin", "admin")
    response = client.delete(f"/v1/keys/{other.id}", headers=auth(keys.admin.secret))
    assert response.status_code == 200, response.get_data(as_text=True)
    assert_problem(client.get("/v1/jobs", headers=auth(other.secret)), 401)


def test_the_openapi_document_names_force_and_the_409(client):
    operation = client.get("/openapi.json").get_json()["paths"]["/v1/keys/{key_id}"]["delete"]
    assert {"name": "force", "in": "query"}.items() <= operation["parameters"][1].items()
    assert "409" in operation["responses"]


@pytest.fixture
def lone_admin_app(tmp_path):
    """An API on a database of its own (SQLite) whose only admin key is the one returned."""
    import api
    import migrations
    from db.settings import Settings

    url = f"sqlite:///{tmp_path / 'lone.db'}"
    migrations.upgrade(url)
    app = api.create_app(Settings(database_url=url))
    admin = make_key("the only admin", "admin", database_url=url)
    user = make_key("a user", "user", database_url=url)
    yield app, admin, user
    from db.session import dispose_engines

    dispose_engines()


def test_the_last_admin_key_is_kept_unless_forced(lone_admin_app):
    app, admin, user = lone_admin_app
    client = app.test_client()
    body = assert_problem(client.delete(f"/v1/keys/{admin.id}", headers=auth(admin.secret)), 409)
    assert "last active admin key" in body["detail"] and "key making the request" in body["detail"]
    assert client.delete(f"/v1/keys/{user.id}", headers=auth(admin.secret)).status_code == 200  # a user key: fine
    assert client.get("/v1/keys", headers=auth(admin.secret)).status_code == 200


def test_the_dashboard_applies_the_same_rule_and_offers_to_force(app, client, keys):
    admin = make_key("dashboard self-revoker", "admin")
    browser = logged_in(app.test_client(), admin.secret)
    refused = post_form(browser, f"/admin/keys/{admin.id}/revoke", token_from="/admin/keys")
    text = refused.get_data(as_text=True)
    assert refused.status_code == 409, text
    assert "key making the request" in text and 'id="force-revoke"' in text and "Not revoked" in text
    page(browser, "/admin/keys")  # still logged in
    assert client.get("/v1/jobs", headers=auth(admin.secret)).status_code == 200

    forced = post_form(browser, f"/admin/keys/{admin.id}/revoke", {"force": "true"}, token_from="/admin/keys")
    assert forced.status_code == 303
    assert_problem(client.get("/v1/jobs", headers=auth(admin.secret)), 401)
    assert "/admin/login" in browser.get("/admin/keys").headers["Location"]  # the session ended with its key
