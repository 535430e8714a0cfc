"""One job is one trace (README "Operate", tracing): a real `gpujobs api` and a real worker, both with
``GPUJOBS_TRACE_FILE`` (the SDK's span exporter in each process appends every finished span to it).

A segmentation job with a webhook, submitted over HTTP, must give spans in three processes (the API,
the worker's job thread, its webhook sender) that all share the request's trace id and nest: request →
dispatch, request → attempt → claim / inference → model load, upload → S3 call, request → webhook
delivery → its HTTP call.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from gpujobs.harness.processes import Stack
from tests.integration.client import auth
from tests.integration.test_segmentation import picture, uploaded
from tests.integration.webhook_fixtures import FAST, receiver  # noqa: F401  (the fixture)


@pytest.fixture(scope="module")
def traced(services: Any, cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, str, Path]]:
    spans = tmp_path_factory.mktemp("traces") / "spans.jsonl"
    env = {**os.environ, **FAST, "GPUJOBS_TRACE_FILE": str(spans)}
    stack = Stack(env, services.root / "logs", label="traced")
    try:
        _, base_url = stack.start_api(workers=1)
        yield stack, base_url, spans
    finally:
        stack.stop_all()


def _spans(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def test_a_job_is_one_trace_from_request_to_webhook(traced, no_gpu_worker, receiver, client, keys):  # noqa: F811
    stack, base_url, path = traced
    key = keys.admin.secret
    worker = stack.start_worker("gpu,webhooks", concurrency=2)
    try:
        image = uploaded(client, key, picture(64, 48))
        response = requests.post(
            f"{base_url}/v1/jobs",
            json={"type": "segmentation", "input": {"image": image, "threshold": 0}, "webhook": receiver.url()},
            headers=auth(key),
            timeout=10,
        )
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        (hook,) = receiver.wait_for("/hook", lambda got: len(got) >= 1, timeout=60)

        def delivered() -> list[dict[str, Any]]:
            return [
                s
                for s in _spans(path)
                if s["name"] == "webhook.deliver" and s["attributes"].get("gpujobs.job_id") == job_id
            ]

        deadline = time.monotonic() + 10
        while not delivered() and time.monotonic() < deadline:
            time.sleep(0.1)
        spans = _spans(path)
    finally:
        worker.stop()

    (request,) = [s for s in spans if s["service"] == "gpujobs-api" and s["name"] == "POST /v1/jobs"]
    trace = [s for s in spans if s["trace_id"] == request["trace_id"]]
    by_name: dict[str, list[dict[str, Any]]] = {}
    for span in trace:
        by_name.setdefault(span["name"], []).append(span)
    names = sorted(by_name)

    def one(name: str) -> dict[str, Any]:
        assert len(by_name.get(name, [])) == 1, (name, names)
        return by_name[name][0]

    def children(parent: dict[str, Any]) -> list[dict[str, Any]]:
        return [s for s in trace if s["parent_id"] == parent["span_id"]]

    dispatch, attempt, deliver = one("job.dispatch"), one("job.attempt"), one("webhook.deliver")
    assert dispatch["parent_id"] == request["span_id"] and dispatch["attributes"]["gpujobs.job_id"] == job_id
    assert attempt["parent_id"] == request["span_id"] and attempt["service"] == "gpujobs-worker"
    assert attempt["attributes"]["gpujobs.attempt"] == 1 and attempt["attributes"]["gpujobs.type"] == "segmentation"
    assert deliver["parent_id"] == request["span_id"] and deliver["service"] == "gpujobs-worker"

    claim, inference = one("job.claim"), one("job.inference")
    assert claim["parent_id"] == attempt["span_id"] and inference["parent_id"] == attempt["span_id"]
    (load,) = [s for s in by_name["model.load"] if s["parent_id"] == inference["span_id"]]
    assert load["attributes"]["gpujobs.model"], load
    uploads = [s for s in by_name["job.upload"] if s["parent_id"] == inference["span_id"]]
    assert {s["attributes"]["gpujobs.artifact"] for s in uploads} >= {"instance_map.png", "overlay.png"}, uploads
    # The instrumentations below our spans: S3 under an upload, the webhook's HTTP POST under its delivery,
    # the job's INSERT under the request.
    assert any("PutObject" in s["name"] for upload in uploads for s in children(upload)), names
    (post,) = [s for s in children(deliver) if s["name"] == "POST"]
    # The endpoint gets the context too (W3C traceparent: version-trace id-span id-flags).
    assert hook.headers["traceparent"].split("-")[1:3] == [request["trace_id"], post["span_id"]], hook.headers
    assert any("INSERT" in s["name"] or "gpujobs" in s["name"] for s in children(request)), names
    # Everything happened inside the request's trace, start to end in order.
    assert request["start"] <= dispatch["start"] and attempt["start"] <= inference["start"] <= load["start"]
    assert attempt["end"] <= deliver["end"]
