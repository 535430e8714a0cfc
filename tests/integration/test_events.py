"""``GET /v1/jobs/{id}/events``: the job's timeline as server-sent events, read with a real SSE client
(``sseclient-py``) from a real `gpujobs api` (gunicorn, gevent) while a real worker runs the job.

The first API re-reads a stream's job only at each keep-alive (every 3 s) while Redis is up, so
several progress events within a 3 s job come from the Redis wake-up, not from the fallback. The
second API's Redis is a closed port: its streams end by the periodic re-read alone.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import sseclient

from gpujobs.harness.ports import free_port
from gpujobs.harness.processes import Stack
from tests.integration.conftest import make_key

KEEPALIVE = 3
STREAM_CAP = 3


@pytest.fixture(scope="module")
def events_api(services: Any, cluster: Any) -> Iterator[str]:
    env = {
        **os.environ,
        "GPUJOBS_SSE_KEEPALIVE_SECONDS": str(KEEPALIVE),
        "GPUJOBS_SSE_RECHECK_SECONDS": "30",
        "GPUJOBS_MAX_STREAMS_PER_KEY": str(STREAM_CAP),
    }
    stack = Stack(env, services.root / "logs", label="events")
    try:
        _, base_url = stack.start_api(workers=1)
        yield base_url
    finally:
        stack.stop_all()


@pytest.fixture(scope="module")
def redisless_api(services: Any, cluster: Any) -> Iterator[str]:
    """An API whose Redis (notifications, rate limits) is a port nobody listens on; the broker is the real one."""
    env = {
        **os.environ,
        "GPUJOBS_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "GPUJOBS_SSE_RECHECK_SECONDS": "0.5",
        "GPUJOBS_SSE_KEEPALIVE_SECONDS": "60",
    }
    stack = Stack(env, services.root / "logs", label="events-no-redis")
    try:
        _, base_url = stack.start_api(workers=1)
        yield base_url
    finally:
        stack.stop_all()


def _auth(key: str, **more: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **more}


def _submit(base_url: str, key: str, **diagnostic: Any) -> str:
    response = requests.post(
        f"{base_url}/v1/jobs", json={"type": "diagnostic", "input": diagnostic}, headers=_auth(key), timeout=10
    )
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def _open(base_url: str, key: str, job_id: str, query: str = "", **headers: str) -> requests.Response:
    return requests.get(
        f"{base_url}/v1/jobs/{job_id}/events{query}",
        headers=_auth(key, Accept="text/event-stream", **headers),
        stream=True,
        timeout=30,
    )


def _read_all(response: requests.Response) -> list[sseclient.Event]:
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/event-stream")
    return list(sseclient.SSEClient(response).events())  # returns when the server ends the stream


def test_a_job_streams_queued_running_progress_and_succeeded_then_ends(events_api, keys, gpu_worker):
    job_id = _submit(events_api, keys.admin.secret, steps=10, sleep_seconds=3)
    started = time.monotonic()
    events = _read_all(_open(events_api, keys.admin.secret, job_id))
    assert time.monotonic() - started < 25
    names = [event.event for event in events]
    assert names[0] == "queued" and names[-2:] == ["succeeded", "job"], names
    assert names.index("claimed") < names.index("progress") < names.index("stored") < names.index("succeeded")
    progress = [json_of(e)["progress"] for e in events if e.event == "progress"]
    steps = [p["step"] for p in progress]
    # Progress is saved every 0.2 s and streamed on its Redis notice; re-reads alone (every 3 s) would give 1 or 2.
    assert len(steps) >= 3 and steps == sorted(steps) and len(set(steps)) == len(steps), steps
    assert all(p["total"] == 10 for p in progress)
    ids = [int(e.id) for e in events if e.id]
    assert ids == sorted(ids) and len(ids) == len(set(ids)) == len([n for n in names if n not in ("progress", "job")])
    assert all(not e.id for e in events if e.event in ("progress", "job"))
    job = json_of(events[-1])
    assert job["id"] == job_id and job["status"] == "succeeded" and job["output"]["steps"] == 10
    assert json_of(events[0])["kind"] == "queued" and json_of(events[0])["job_id"] == job_id

    # The same timeline as JSON without `Accept: text/event-stream`.
    listed = requests.get(f"{events_api}/v1/jobs/{job_id}/events", headers=_auth(keys.admin.secret), timeout=10)
    assert listed.status_code == 200 and listed.headers["Content-Type"].startswith("application/json")
    assert [item["id"] for item in listed.json()["items"]] == ids


def test_resuming_after_last_event_id_sends_only_later_events(events_api, keys, gpu_worker):
    job_id = _submit(events_api, keys.admin.secret, steps=2, sleep_seconds=0.5)
    everything = _read_all(_open(events_api, keys.admin.secret, job_id))
    timeline = [e for e in everything if e.id]
    claimed = next(e for e in timeline if e.event == "claimed")
    later = [e.id for e in timeline if int(e.id) > int(claimed.id)]
    assert later, [e.event for e in timeline]

    for resumed in (
        _read_all(_open(events_api, keys.admin.secret, job_id, **{"Last-Event-ID": claimed.id})),
        _read_all(_open(events_api, keys.admin.secret, job_id, query=f"?last_event_id={claimed.id}")),
    ):
        assert [e.id for e in resumed if e.id] == later
        assert resumed[-1].event == "job" and json_of(resumed[-1])["status"] == "succeeded"

    # After the last event: only the final job, and the end.
    last = _read_all(_open(events_api, keys.admin.secret, job_id, **{"Last-Event-ID": timeline[-1].id}))
    assert [e.event for e in last] == ["job"]
    listed = requests.get(
        f"{events_api}/v1/jobs/{job_id}/events?last_event_id={claimed.id}", headers=_auth(keys.admin.secret), timeout=10
    )
    assert [str(item["id"]) for item in listed.json()["items"]] == later


def test_an_idle_stream_gets_keep_alives_and_ends_when_the_job_is_canceled(events_api, keys, gpu_worker):
    job_id = _submit(events_api, keys.admin.secret, steps=1, sleep_seconds=0)  # warm: the next one is claimed at once
    _read_all(_open(events_api, keys.admin.secret, job_id))
    job_id = _submit(events_api, keys.admin.secret, steps=4, sleep_seconds=32)  # 8 s steps: no progress for 8 s
    response = _open(events_api, keys.admin.secret, job_id)
    assert response.status_code == 200
    lines = response.iter_lines(decode_unicode=True)
    keepalives, seen, started = 0, [], time.monotonic()
    for line in lines:
        if line == ": keep-alive":
            keepalives += 1
            if keepalives == 1:
                canceled = requests.post(
                    f"{events_api}/v1/jobs/{job_id}/cancel", headers=_auth(keys.admin.secret), timeout=10
                )
                assert canceled.status_code == 202, canceled.text
        elif line.startswith("event: "):
            seen.append(line.removeprefix("event: "))
        assert time.monotonic() - started < 25, seen
    assert keepalives >= 1
    assert seen[-2:] == ["canceled", "job"] and "cancel_requested" in seen, seen


def test_another_tenants_job_and_an_unknown_job_are_404_before_streaming(events_api, keys, gpu_worker):
    job_id = _submit(events_api, keys.admin.secret, steps=1)
    for key, target in ((keys.user_b.secret, job_id), (keys.admin.secret, "job_doesnotexist")):
        for accept in ("text/event-stream", "application/json"):
            response = requests.get(
                f"{events_api}/v1/jobs/{target}/events", headers=_auth(key, Accept=accept), timeout=10
            )
            assert response.status_code == 404, response.text
            assert response.headers["Content-Type"] == "application/problem+json"


@pytest.mark.parametrize(
    ("where", "value"),
    [
        ("header", "abc"),
        ("header", "-1"),
        ("header", "1.5"),
        ("header", "99999999999999999999"),
        ("header", "١٢"),  # digits, but not ASCII ones
        ("query", "x"),
        ("query", "%00"),
        ("query", "&last_event_id=x"),  # twice, the first empty (found by schemathesis: the second was ignored)
        ("query", "3&last_event_id=4"),
        ("query", ""),  # an integer parameter (found by schemathesis); an empty header means "no id"
    ],
)
def test_a_bad_last_event_id_is_422_naming_it(events_api, keys, where, value):
    job_id = _submit(events_api, keys.admin.secret, steps=1)
    if where == "header":
        response = requests.get(
            f"{events_api}/v1/jobs/{job_id}/events",
            headers=_auth(keys.admin.secret, Accept="text/event-stream", **{"Last-Event-ID": value.encode()}),  # type: ignore[dict-item]
            timeout=10,
        )
        field = "Last-Event-ID"
    else:
        response = requests.get(
            f"{events_api}/v1/jobs/{job_id}/events?last_event_id={value}",
            headers=_auth(keys.admin.secret, Accept="text/event-stream"),
            timeout=10,
        )
        field = "last_event_id"
    assert response.status_code == 422, response.text
    assert response.headers["Content-Type"] == "application/problem+json"
    assert field in response.text


def test_streams_over_the_keys_cap_are_429(events_api, gpu_worker):
    capped = make_key("events cap", "admin")
    job_id = _submit(events_api, capped.secret, steps=20, sleep_seconds=20)
    held = [_open(events_api, capped.secret, job_id) for _ in range(STREAM_CAP)]
    try:
        assert [r.status_code for r in held] == [200] * STREAM_CAP
        over = _open(events_api, capped.secret, job_id)
        assert over.status_code == 429, over.text
        assert over.headers["Content-Type"] == "application/problem+json"
        assert int(over.headers["Retry-After"]) >= 1
        assert over.headers["RateLimit-Reset"] == over.headers["Retry-After"]
        assert over.headers["RateLimit-Policy"] == f'{STREAM_CAP};comment="streams_per_key"'
        assert over.json()["quota"] == "streams_per_key" and over.json()["limit"] == STREAM_CAP
        assert "event streams" in over.json()["detail"]
    finally:
        requests.post(f"{events_api}/v1/jobs/{job_id}/cancel", headers=_auth(capped.secret), timeout=10)
        for response in held:
            assert _read_all(response)[-1].event == "job"  # the cancel ends them
    again = _open(events_api, capped.secret, job_id)  # the ended streams were released
    assert again.status_code == 200 and _read_all(again)[-1].event == "job"


def test_with_redis_down_the_periodic_reread_still_ends_the_stream(redisless_api, keys, gpu_worker):
    job_id = _submit(redisless_api, keys.admin.secret, steps=4, sleep_seconds=2)
    started = time.monotonic()
    events = _read_all(_open(redisless_api, keys.admin.secret, job_id))
    assert time.monotonic() - started < 20
    names = [e.event for e in events]
    assert names[-2:] == ["succeeded", "job"] and "claimed" in names, names
    assert json_of(events[-1])["status"] == "succeeded"


def json_of(event: sseclient.Event) -> Any:
    return json.loads(event.data)
