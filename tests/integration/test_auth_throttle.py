"""Failed authentication is throttled per client address and per key prefix (429 with Retry-After), on /v1 and at the
admin login; valid keys from other addresses (and with other prefixes) keep working; the block ends with its window.

Each test uses an API app of its own with its limits, and addresses and prefixes of its own, so that counts in the
session's Redis never mix with another test's.
"""

from __future__ import annotations

import math
import secrets
import time

import pytest

from tests.integration.admin_client import HTML, csrf_of, login
from tests.integration.client import assert_problem, auth

WINDOW = 15


def _app(**settings):  # type: ignore[no-untyped-def]
    import api
    from db.settings import Settings

    return api.create_app(Settings(**settings))


def _address() -> str:
    return f"10.{secrets.randbelow(250)}.{secrets.randbelow(250)}.{secrets.randbelow(250) + 1}"


def _wrong_key(prefix: str | None = None) -> str:
    return (prefix or f"gpj_{secrets.token_hex(4)}") + secrets.token_urlsafe(24)


def _start_of_a_window(window: int) -> float:
    """Sleep to the start of the next clock-aligned window, so that a burst stays in one window; returns its end."""
    now = time.time()
    start = math.ceil(now / window) * window
    time.sleep(start - now + 0.05)
    return start + window


def _get(client, key: str, address: str, **headers: str):  # type: ignore[no-untyped-def]
    return client.get("/v1/jobs", headers={**auth(key), **headers}, environ_base={"REMOTE_ADDR": address})


def test_sixty_wrong_keys_are_throttled_per_address_and_per_prefix_then_the_block_ends(keys):
    client = _app(auth_failure_limit=20, auth_failure_prefix_limit=10, auth_failure_window_seconds=WINDOW).test_client()
    attacker, neighbour = _address(), _address()
    window_end = _start_of_a_window(WINDOW)

    # One address, 60 different wrong keys: the first 20 are 401s, the other 40 are 429s with Retry-After.
    statuses, retry_afters = [], []
    for _ in range(60):
        response = _get(client, _wrong_key(), attacker)
        statuses.append(response.status_code)
        if response.status_code == 429:
            assert_problem(response, 429)
            retry_afters.append(int(response.headers["Retry-After"]))
            # Every limit's 429 names itself the same way (api/quotas.py too_many).
            assert response.headers["RateLimit-Limit"] == "20" and response.headers["RateLimit-Remaining"] == "0"
            assert response.headers["RateLimit-Reset"] == response.headers["Retry-After"]
            policy = f'20;w={WINDOW};comment="auth_failures_per_address"'
            assert response.headers["RateLimit-Policy"] == policy
            assert response.json["quota"] == "auth_failures_per_address"
    assert statuses == [401] * 20 + [429] * 40, statuses
    assert all(1 <= seconds <= WINDOW for seconds in retry_afters), retry_afters
    assert time.time() < window_end, "the burst did not fit in one window: the machine is too slow for this test"

    # A valid key from that address is refused too (before its lookup: a right guess looks like a wrong one)…
    assert _get(client, keys.user_a.secret, attacker).status_code == 429
    # …but the same valid key from another address works.
    assert _get(client, keys.user_a.secret, neighbour).status_code == 200

    # One prefix, from 11 addresses: past 10 failures that prefix is refused everywhere, other prefixes are not.
    prefix = f"gpj_{secrets.token_hex(4)}"
    spread = [_address() for _ in range(11)]
    statuses = [_get(client, _wrong_key(prefix), address).status_code for address in spread]
    assert statuses == [401] * 10 + [429], statuses
    by_prefix = _get(client, _wrong_key(prefix), neighbour)
    assert by_prefix.status_code == 429
    assert by_prefix.headers["RateLimit-Policy"] == f'10;w={WINDOW};comment="auth_failures_per_key_prefix"'
    assert _get(client, keys.user_b.secret, spread[0]).status_code == 200, "a valid key, another prefix"
    assert _get(client, _wrong_key(), spread[1]).status_code == 401, "another wrong prefix: a plain 401"

    # Whoever knows the first characters of a key cannot lock it out: its own prefix hammered from 11 addresses
    # makes the wrong keys 429s, and the key itself keeps working everywhere.
    own = keys.admin.secret[:12]
    statuses = [_get(client, _wrong_key(own), _address()).status_code for _ in range(11)]
    assert statuses == [401] * 10 + [429], statuses
    assert _get(client, keys.admin.secret, _address()).status_code == 200, "a valid key whose prefix is blocked"

    # The block ends with the window.
    time.sleep(max(0.0, window_end - time.time()) + 0.2)
    assert _get(client, keys.user_a.secret, attacker).status_code == 200
    assert _get(client, _wrong_key(), attacker).status_code == 401
    assert _get(client, _wrong_key(prefix), neighbour).status_code == 401


def _login_from(client, key: str, address: str):  # type: ignore[no-untyped-def]
    form_page = client.get("/admin/login", headers=HTML, environ_base={"REMOTE_ADDR": address})
    form = {"csrf_token": csrf_of(form_page.get_data(as_text=True)), "key": key}
    return client.post("/admin/login", data=form, headers=HTML, environ_base={"REMOTE_ADDR": address})


def test_admin_login_is_throttled_with_a_clear_message(keys):
    app = _app(auth_failure_limit=5, auth_failure_prefix_limit=0, auth_failure_window_seconds=60)
    attacker, operator = _address(), _address()
    statuses = []
    for _ in range(8):
        response = _login_from(app.test_client(), _wrong_key(), attacker)
        statuses.append(response.status_code)
    # 5 refusals (401), then 429s (a window boundary in the middle can only add 401s, never remove 429s).
    assert statuses[:5] == [401] * 5 and statuses[-1] == 429, statuses
    browser = app.test_client()
    refused = _login_from(browser, keys.admin.secret, attacker)  # the right key, from the blocked address
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    text = refused.get_data(as_text=True)
    assert "Too many failed logins" in text and f"try again in {refused.headers['Retry-After']} s" in text
    assert browser.get("/admin/", headers=HTML).status_code == 303, "no session was opened"

    welcomed = _login_from(app.test_client(), keys.admin.secret, operator)
    assert welcomed.status_code == 303, welcomed.get_data(as_text=True)


def test_failures_count_in_the_process_when_redis_is_unavailable(keys):
    from gpujobs.harness.ports import free_port

    nothing_there = f"redis://127.0.0.1:{free_port()}/0"
    client = _app(
        redis_url=nothing_there, auth_failure_limit=5, auth_failure_prefix_limit=0, auth_failure_window_seconds=60
    ).test_client()
    attacker = _address()
    durations, statuses = [], []
    for _ in range(8):
        started = time.monotonic()
        statuses.append(_get(client, _wrong_key(), attacker).status_code)
        durations.append(time.monotonic() - started)
    assert statuses[:5] == [401] * 5 and statuses[-1] == 429, statuses
    assert max(durations) < 0.5, durations  # refused connections and then the open breaker: no waiting
    started = time.monotonic()
    assert _get(client, keys.user_a.secret, _address()).status_code == 200  # the rate limit fails open
    assert time.monotonic() - started < 0.5


@pytest.mark.parametrize("hops", [0, 1])
def test_the_counted_address_is_the_peer_or_the_trusted_proxys_entry(keys, hops):
    client = _app(
        auth_failure_limit=2, auth_failure_prefix_limit=0, auth_failure_window_seconds=60, trusted_proxy_hops=hops
    ).test_client()
    proxy, client_a, client_b = _address(), _address(), _address()
    # Through the proxy, client A fails 3 times (its own X-Forwarded-For entry is a lie it adds in front).
    for _ in range(3):
        _get(client, _wrong_key(), proxy, **{"X-Forwarded-For": f"6.6.6.6, {client_a}"})
    through_b = _get(client, keys.user_a.secret, proxy, **{"X-Forwarded-For": client_b}).status_code
    through_a = _get(client, keys.user_a.secret, proxy, **{"X-Forwarded-For": f"7.7.7.7, {client_a}"}).status_code
    if hops == 0:
        assert (through_a, through_b) == (429, 429), "without trusted proxies the proxy's address is the client"
    else:
        assert (through_a, through_b) == (429, 200), "behind one trusted proxy each client counts on its own"


def test_a_missing_or_malformed_header_is_not_a_failure(keys):
    client = _app(auth_failure_limit=2, auth_failure_prefix_limit=0, auth_failure_window_seconds=60).test_client()
    address = _address()
    for headers in ({}, {"Authorization": "Basic eDp5"}, {"Authorization": "Bearer "}) * 3:
        response = client.get("/v1/jobs", headers=headers, environ_base={"REMOTE_ADDR": address})
        assert_problem(response, 401)
    assert _get(client, keys.user_a.secret, address).status_code == 200


def test_a_user_key_at_the_admin_login_is_not_a_failure(keys):
    app = _app(auth_failure_limit=2, auth_failure_prefix_limit=0, auth_failure_window_seconds=60)
    address = _address()
    for _ in range(4):
        assert _login_from(app.test_client(), keys.user_a.secret, address).status_code == 403
    assert login(app.test_client(), keys.admin.secret).status_code == 303
