"""Calls the admin-dashboard tests make through Flask's test client: log in, read the CSRF token, post forms."""

from __future__ import annotations

import re
from typing import Any

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
HTML = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


def csrf_of(html: str) -> str:
    match = CSRF.search(html)
    assert match, f"no CSRF field in the page:\n{html[:2000]}"
    return match.group(1)


def login(client: Any, key: str, next_path: str | None = None) -> Any:
    """GET the login form, POST the key with its CSRF token; returns the POST's response (not followed)."""
    page = client.get("/admin/login", headers=HTML)
    assert page.status_code == 200, page.get_data(as_text=True)
    form = {"csrf_token": csrf_of(page.get_data(as_text=True)), "key": key}
    if next_path:
        form["next"] = next_path
    return client.post("/admin/login", data=form, headers=HTML)


def logged_in(client: Any, key: str) -> Any:
    response = login(client, key)
    assert response.status_code == 303, response.get_data(as_text=True)
    return client


def page(client: Any, path: str, status: int = 200) -> str:
    response = client.get(path, headers=HTML)
    text = response.get_data(as_text=True)
    assert response.status_code == status, f"{path}: expected {status}, got {response.status_code}:\n{text[:3000]}"
    return text


def post_form(client: Any, path: str, data: dict[str, str] | None = None, token_from: str = "/admin/") -> Any:
    """POST a dashboard form with the session's CSRF token (read from ``token_from``)."""
    token = csrf_of(page(client, token_from))
    return client.post(path, data={"csrf_token": token, **(data or {})}, headers=HTML)
