"""Idempotency-Key: a retried submit returns the first job; the key is scoped to the tenant."""

from __future__ import annotations

import secrets
import threading

from tests.integration.client import assert_problem, auth, submit

BODY = {"type": "diagnostic", "input": {"steps": 2}, "metadata": {"order": 17}}


def test_a_repeat_with_the_same_key_and_body_returns_the_first_job(client, keys):
    key = {"Idempotency-Key": f"order-17-{secrets.token_hex(4)}"}
    first = submit(client, keys.admin.secret, BODY, key)
    assert first.status_code == 202, first.get_data(as_text=True)
    again = submit(client, keys.admin.secret, BODY, key)
    assert again.status_code == 200, again.get_data(as_text=True)
    assert again.get_json()["id"] == first.get_json()["id"]
    assert again.headers["Location"] == first.headers["Location"]

    # The same body with its members in another order is the same request.
    reordered = {"metadata": {"order": 17}, "input": {"steps": 2}, "type": "diagnostic"}
    assert submit(client, keys.admin.secret, reordered, key).get_json()["id"] == first.get_json()["id"]

    listed = client.get("/v1/jobs?limit=100", headers=auth(keys.admin.secret)).get_json()["items"]
    assert [j["id"] for j in listed].count(first.get_json()["id"]) == 1


def test_the_same_key_with_another_body_is_a_422(client, keys):
    key = {"Idempotency-Key": f"order-18-{secrets.token_hex(4)}"}
    first = submit(client, keys.admin.secret, BODY, key)
    assert first.status_code == 202
    other = {**BODY, "input": {"steps": 3}}
    body = assert_problem(submit(client, keys.admin.secret, other, key), 422, ["Idempotency-Key"])
    assert first.get_json()["id"] in body["detail"]


def test_another_tenants_same_key_is_an_independent_job(client, keys):
    key = {"Idempotency-Key": f"order-19-{secrets.token_hex(4)}"}
    mine = submit(client, keys.admin.secret, BODY, key)
    theirs = submit(client, keys.admin_b.secret, BODY, key)
    assert (mine.status_code, theirs.status_code) == (202, 202)
    assert mine.get_json()["id"] != theirs.get_json()["id"]
    # and each tenant's repeat still finds its own job
    assert submit(client, keys.admin_b.secret, BODY, key).get_json()["id"] == theirs.get_json()["id"]
    assert submit(client, keys.admin.secret, BODY, key).get_json()["id"] == mine.get_json()["id"]


def test_concurrent_repeats_create_one_job(app, keys):
    key = {"Idempotency-Key": f"order-20-{secrets.token_hex(4)}"}
    barrier = threading.Barrier(6)
    answers: list[tuple[int, str]] = []
    lock = threading.Lock()

    def send() -> None:
        client = app.test_client()
        barrier.wait()
        response = submit(client, keys.admin.secret, BODY, key)
        with lock:
            answers.append(
                (response.status_code, (response.get_json() or {}).get("id", response.get_data(as_text=True)))
            )

    threads = [threading.Thread(target=send) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    statuses = sorted(status for status, _ in answers)
    assert statuses == [200] * 5 + [202], answers
    assert len({job_id for _, job_id in answers}) == 1, answers
