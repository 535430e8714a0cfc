"""The Redis circuit breaker (db/notify.py) and the failed-authentication throttle (api/throttle.py), without services.

With no Redis configured (a RabbitMQ broker and no ``redis_url``), the throttle counts in this process:
the same code path as when Redis is down.
"""

from __future__ import annotations

from db.notify import Breaker
from db.settings import Settings


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_the_breaker_skips_redis_after_an_error_then_lets_one_probe_through() -> None:
    clock = Clock()
    breaker = Breaker(open_seconds=5, probe_seconds=3, clock=clock)
    assert breaker.available() and breaker.available()  # closed: everybody uses Redis
    breaker.failed("test", OSError("refused"))
    assert breaker.open and not breaker.available()
    clock.now += 4.9
    assert not breaker.available()
    clock.now += 0.2
    assert breaker.available(), "after open_seconds, one caller probes"
    assert not breaker.available(), "…and the others keep skipping while it does"
    clock.now += 1
    breaker.failed("probe", TimeoutError("hung"))  # the probe failed: open again for open_seconds
    clock.now += 4.9
    assert not breaker.available()
    clock.now += 0.2
    assert breaker.available()
    breaker.succeeded()
    assert not breaker.open and breaker.available() and breaker.available()


def test_a_probe_that_never_reports_back_lets_the_next_caller_probe() -> None:
    clock = Clock()
    breaker = Breaker(open_seconds=5, probe_seconds=3, clock=clock)
    breaker.failed("test", OSError("refused"))
    clock.now += 5
    assert breaker.available()
    clock.now += 3
    assert breaker.available(), "a probe lost in a killed thread must not keep Redis skipped for good"


def _throttle(clock: Clock, **limits: int):  # type: ignore[no-untyped-def]
    from api.throttle import AuthThrottle

    settings = Settings(broker_url="amqp://guest@127.0.0.1//", redis_url=None, **limits)  # type: ignore[arg-type]
    assert settings.effective_redis_url is None
    return AuthThrottle(settings, clock=clock)


def test_an_address_past_its_limit_is_refused_until_the_window_ends() -> None:
    clock = Clock(6000.0)  # the start of a 60 s window
    throttle = _throttle(clock, auth_failure_limit=3, auth_failure_prefix_limit=0, auth_failure_window_seconds=60)
    for n in range(3):
        assert throttle.check("10.0.0.1", f"gpj_guess{n:04d}xx") is None
        assert throttle.failed("10.0.0.1", f"gpj_guess{n:04d}xx") is None  # the first 3 failures stay 401s
    clock.now += 10
    refusal = throttle.check("10.0.0.1", "gpj_valid-key-of-anyone")
    assert refusal is not None and refusal.retry_after == 50 and "address" in refusal.detail
    assert throttle.check("10.0.0.2", "gpj_guess0000xx") is None, "another address is not affected"
    clock.now += 50
    assert throttle.check("10.0.0.1", "gpj_guess0000xx") is None, "the next window starts afresh"
    assert throttle.failed("10.0.0.1", "gpj_guess0000xx") is None


def test_a_prefix_past_its_limit_refuses_failing_keys_from_any_address_and_never_a_valid_one() -> None:
    clock = Clock(6030.0)
    throttle = _throttle(clock, auth_failure_limit=0, auth_failure_prefix_limit=2, auth_failure_window_seconds=60)
    assert throttle.failed("10.0.0.1", "gpj_samepfx-one") is None
    assert throttle.failed("10.0.0.2", "gpj_samepfx-two") is None  # same 12-character prefix, another address
    # Before the lookup nothing is refused: a valid key with that prefix must not be locked out by others' failures…
    assert throttle.check("10.0.0.3", "gpj_samepfx-valid") is None
    # …but one more failure with it, from anywhere, is a 429.
    refusal = throttle.failed("10.0.0.3", "gpj_samepfx-three")
    assert refusal is not None and refusal.retry_after == 30 and "prefix" in refusal.detail
    assert throttle.check("10.0.0.1", "gpj_otherpfx-valid") is None
    # A failure past the limit (another process had not blocked it yet) is itself a 429.
    other = _throttle(clock, auth_failure_limit=0, auth_failure_prefix_limit=1, auth_failure_window_seconds=60)
    assert other.failed("10.0.0.1", "gpj_pfx-aaaaaa") is None
    over = other.failed("10.0.0.1", "gpj_pfx-aaaaaa-again")
    assert over is not None and over.retry_after == 30


def test_limits_of_zero_count_nothing() -> None:
    throttle = _throttle(Clock(), auth_failure_limit=0, auth_failure_prefix_limit=0)
    for _ in range(100):
        assert throttle.failed("10.0.0.1", "gpj_x") is None
    assert throttle.check("10.0.0.1", "gpj_x") is None


def test_the_local_counters_stay_bounded_under_a_flood_of_addresses() -> None:
    from api import throttle as module

    clock = Clock()
    throttle = _throttle(clock, auth_failure_limit=1, auth_failure_prefix_limit=0)
    for n in range(module.LOCAL_MAX_ENTRIES + 500):
        throttle.failed(f"10.{n // 65536}.{n // 256 % 256}.{n % 256}", "gpj_x")
    assert len(throttle._local) <= module.LOCAL_MAX_ENTRIES
    assert len(throttle._blocked) <= module.LOCAL_MAX_ENTRIES


def test_the_redis_client_is_bounded_by_the_settings_and_never_retries() -> None:
    from db import notify

    settings = Settings(
        redis_url="redis://127.0.0.1:1/0", redis_connect_timeout_seconds=0.3, redis_socket_timeout_seconds=0.7
    )
    notify.reset_clients()
    try:
        client = notify.redis_client(settings)
        assert client is not None
        options = client.connection_pool.connection_kwargs
        assert (options["socket_connect_timeout"], options["socket_timeout"]) == (0.3, 0.7)
        assert options["retry"].get_retries() == 0  # a retry would multiply the bound
        assert notify.breaker(settings).open_seconds == settings.redis_breaker_seconds
    finally:
        notify.reset_clients()


def test_no_redis_client_is_made_outside_the_bounded_factory() -> None:
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    making = re.compile(r"\b(redis\.Redis\(|Redis\.from_url\(|StrictRedis\(|redis\.from_url\()")
    offenders = [
        str(path.relative_to(root))
        for folder in ("api", "db", "worker")
        for path in (root / folder).rglob("*.py")
        if making.search(path.read_text()) and path != root / "db" / "notify.py"
    ]
    assert offenders == [], "make Redis clients with db.notify.redis_client (bounded, breaker)"
