"""A live API (gunicorn) whose Redis (rate limits, failed-login counters, finish notices) is a private redis-server
that the test freezes (SIGSTOP), kills (SIGKILL) and starts again: authenticated requests keep answering, and
quickly; rate limiting comes back with Redis. Never the machine's shared Redis: only this test's own server.
"""

from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from gpujobs.harness.processes import Stack
from gpujobs.harness.servers import start_redis
from tests.integration.conftest import make_key

RATE_LIMIT = 40  # per key and minute, low enough to reach in a test
SOCKET_TIMEOUT = 2.0  # the default of GPUJOBS_REDIS_SOCKET_TIMEOUT_SECONDS
BREAKER = 5.0  # the default of GPUJOBS_REDIS_BREAKER_SECONDS


@pytest.fixture
def private_redis(tmp_path):
    server = start_redis(tmp_path / "redis")
    yield server
    server.stop()


@pytest.fixture
def api_on(private_redis, tmp_path, services):
    env = {**os.environ, "GPUJOBS_REDIS_URL": private_redis.url, "GPUJOBS_RATE_LIMIT_PER_MINUTE": str(RATE_LIMIT)}
    stack = Stack(env, tmp_path / "logs", label="redis-outage")
    try:
        _process, base_url = stack.start_api(workers=1)
        yield base_url
    finally:
        stack.stop_all()


def _timed_get(base_url: str, key: str) -> tuple[int, float]:
    started = time.monotonic()
    response = requests.get(f"{base_url}/v1/jobs?limit=1", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    return response.status_code, time.monotonic() - started


def test_requests_answer_quickly_with_redis_frozen_or_killed_and_rate_limits_come_back(private_redis, api_on):
    base_url = api_on
    calm, busy = make_key("redis outage calm", "user"), make_key("redis outage busy", "user")
    assert [_timed_get(base_url, calm.secret)[0] for _ in range(3)] == [200] * 3

    # Frozen: the first requests pay at most the socket timeout, then the breaker skips Redis.
    private_redis.freeze()
    with ThreadPoolExecutor(6) as pool:
        first = list(pool.map(lambda _: _timed_get(base_url, calm.secret), range(6)))
    assert [status for status, _ in first] == [200] * 6
    assert max(seconds for _, seconds in first) < SOCKET_TIMEOUT + 1.0, first
    frozen = []
    deadline = time.monotonic() + 2 * BREAKER + 1  # long enough for the breaker to let a probe through, twice
    while time.monotonic() < deadline:
        frozen.append(_timed_get(base_url, calm.secret))
        time.sleep(0.02)
    assert {status for status, _ in frozen} == {200}
    slow = [seconds for _, seconds in frozen if seconds > 0.5]
    assert len(slow) <= 3, f"only a probe per breaker period may wait for the hung Redis: {slow}"
    assert max(seconds for _, seconds in frozen) < SOCKET_TIMEOUT + 1.0
    fast = [seconds for _, seconds in frozen if seconds <= 0.5]
    assert len(fast) >= 20 and statistics.median(fast) < 0.05, statistics.median(fast)

    # Killed: refused connections cost nothing, and the breaker skips them anyway.
    private_redis.kill()
    killed = [_timed_get(base_url, calm.secret) for _ in range(30)]
    assert {status for status, _ in killed} == {200}
    assert max(seconds for _, seconds in killed) < 0.5 and statistics.median(s for _, s in killed) < 0.05, killed

    # Back (same port): within one breaker period, a key over its limit is refused again.
    private_redis.restart()
    time.sleep(BREAKER + 0.5)
    statuses = []
    for _ in range(RATE_LIMIT + 20):
        status, _ = _timed_get(base_url, busy.secret)
        statuses.append(status)
        if status == 429:
            break
    assert statuses[-1] == 429, f"no 429 after {len(statuses)} requests with a limit of {RATE_LIMIT} a minute"
    print(
        f"frozen: first {max(s for _, s in first):.2f} s, then median {statistics.median(fast) * 1000:.1f} ms "
        f"({len(slow)} probes over {len(frozen)} requests); killed: median "
        f"{statistics.median(s for _, s in killed) * 1000:.1f} ms, max {max(s for _, s in killed) * 1000:.1f} ms"
    )
