"""Webhook endpoints (db/endpoints.py): what an endpoint is, and the circuit breaker's transitions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from db.endpoints import Breaker, after_attempt, endpoint_id, origin
from db.models import BreakerState
from db.settings import Settings

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
SETTINGS = Settings(webhook_breaker_failures=3, webhook_breaker_open_seconds=10, webhook_breaker_max_open_seconds=35)
CLOSED = Breaker(BreakerState.CLOSED, 0, 0, None)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://hooks.example.com/a/b?x=1", "https://hooks.example.com:443"),
        ("HTTPS://Hooks.Example.COM:443/other", "https://hooks.example.com:443"),
        ("http://user:secret@example.com/hook", "http://example.com:80"),
        ("http://example.com:8080/hook", "http://example.com:8080"),
        ("http://[2001:db8::1]:9000/hook", "http://[2001:db8::1]:9000"),
        ("http://example.com:99999/hook", "http://example.com:0"),
    ],
)
def test_the_origin_is_scheme_host_and_port_without_path_or_credentials(url: str, expected: str) -> None:
    assert origin(url) == expected


def test_an_endpoint_is_a_tenant_and_an_origin() -> None:
    assert endpoint_id("ten_a", "https://h.example/x") == endpoint_id("ten_a", "https://H.example:443/y")
    assert endpoint_id("ten_a", "https://h.example/x") != endpoint_id("ten_b", "https://h.example/x")
    assert endpoint_id("ten_a", "https://h.example/x") != endpoint_id("ten_a", "http://h.example/x")
    assert len(endpoint_id("ten_a", "https://h.example/x")) <= 40


def fail(breaker: Breaker, now: datetime = NOW) -> Breaker:
    return after_attempt(breaker, True, SETTINGS, now)


def test_it_opens_after_k_consecutive_failures_and_a_success_resets_the_count() -> None:
    two = fail(fail(CLOSED))
    assert two == Breaker(BreakerState.CLOSED, 2, 0, None)
    assert after_attempt(two, False, SETTINGS, NOW) == CLOSED
    opened = fail(two)
    assert opened == Breaker(BreakerState.OPEN, 3, 1, NOW + timedelta(seconds=10))


def test_a_late_failure_while_open_is_counted_without_moving_the_probe() -> None:
    opened = fail(fail(fail(CLOSED)))
    later = fail(opened, NOW + timedelta(seconds=3))
    assert later == Breaker(BreakerState.OPEN, 4, 1, opened.open_until)


def test_a_failed_probe_opens_it_again_for_twice_as_long_up_to_the_cap_and_a_good_probe_closes_it() -> None:
    breaker = fail(fail(fail(CLOSED)))
    waits = []
    for _ in range(4):
        probing = Breaker(BreakerState.HALF_OPEN, breaker.consecutive_failures, breaker.trips, breaker.open_until)
        breaker = fail(probing)
        assert breaker.state == BreakerState.OPEN
        assert breaker.open_until is not None
        waits.append((breaker.open_until - NOW).total_seconds())
    assert waits == [20, 35, 35, 35]
    probing = Breaker(BreakerState.HALF_OPEN, breaker.consecutive_failures, breaker.trips, breaker.open_until)
    assert after_attempt(probing, False, SETTINGS, NOW) == CLOSED
