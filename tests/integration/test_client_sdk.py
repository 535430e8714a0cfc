"""The Python SDK (``gpujobs.client``) against a real ``gpujobs api`` (gunicorn) and real workers.

Faults come from a TCP proxy in front of the API (``flaky_proxy.py``): an answer lost after the server
committed the submit, an event stream cut mid-job, a 503 with ``Retry-After``. Each exception type comes
from a real answer of a real API: a second API process is configured to refuse (a rate limit of 3 a
minute, a 50 kB body limit, an S3 endpoint nobody listens on).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from gpujobs.client import (
    AuthenticationError,
    BadRequest,
    Client,
    Conflict,
    ConnectionFailed,
    Event,
    GpujobsError,
    JobCanceled,
    JobFailed,
    NotFound,
    PermissionDenied,
    RateLimited,
    ServiceUnavailable,
    ValidationError,
)
from gpujobs.harness.ports import free_port
from gpujobs.harness.processes import Stack
from tests.integration.conftest import make_key
from tests.integration.flaky_proxy import FlakyProxy

ROOT = Path(__file__).resolve().parents[2]
STREAM_CAP = 2  # event streams one key may hold on the API


@pytest.fixture(scope="module")
def api_url(services: Any, cluster: Any) -> Iterator[str]:
    env = {**os.environ, "GPUJOBS_MAX_STREAMS_PER_KEY": str(STREAM_CAP)}
    stack = Stack(env, services.root / "logs", label="client-sdk")
    try:
        _, base_url = stack.start_api(workers=1)
        yield base_url
    finally:
        stack.stop_all()


@pytest.fixture(scope="module")
def strict_api(services: Any, cluster: Any) -> Iterator[str]:
    """An API that says no: 3 requests a minute per key, 50 kB bodies, and an S3 server that goes away once
    the API has started (it reaches S3 through a proxy that is then closed)."""
    s3 = FlakyProxy(tuple_of(services.s3.endpoint_url))
    env = {
        **os.environ,
        "GPUJOBS_RATE_LIMIT_PER_MINUTE": "3",
        "GPUJOBS_MAX_BODY_BYTES": "50000",
        "GPUJOBS_S3_ENDPOINT_URL": s3.url,
    }
    stack = Stack(env, services.root / "logs", label="client-sdk-strict")
    try:
        _, base_url = stack.start_api(workers=1)
        s3.close()
        yield base_url
    finally:
        stack.stop_all()


def tuple_of(url: str) -> tuple[str, int]:
    host, port = url.split("://", 1)[1].rstrip("/").split(":")
    return host, int(port)


@pytest.fixture
def proxy(api_url: str) -> Iterator[FlakyProxy]:
    flaky = FlakyProxy(tuple_of(api_url))
    yield flaky
    flaky.close()


def png(width: int = 64, height: int = 48) -> bytes:
    image = Image.new("RGB", (width, height), "teal")
    image.paste((200, 40, 40), (8, 8, 30, 30))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_the_sdk_imports_without_the_service_or_ml_stack():
    code = (
        "import sys; from gpujobs.client import Client; "
        "heavy = {'torch', 'flask', 'sqlalchemy', 'celery', 'boto3', 'pydantic', 'numpy', 'click', 'rich', 'PIL'}; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_run_follows_a_diagnostic_job_and_downloads_its_artifact(api_url, keys, gpu_worker, tmp_path):
    seen: list[Event] = []
    with Client(api_url, keys.admin.secret) as client:
        job = client.run("diagnostic", steps=5, sleep_seconds=1.5, progress=seen.append)
    assert job.status == "succeeded" and job.output["steps"] == 5
    names = [event.event for event in seen]
    assert names[0] == "queued" and names[-2:] == ["succeeded", "job"], names
    steps = [event.progress["step"] for event in seen if event.progress]
    assert steps and steps == sorted(steps) and all(e.progress["total"] == 5 for e in seen if e.progress), seen

    [artifact] = job.artifacts
    assert artifact.where == "artifact" and artifact.url
    [path] = job.download(tmp_path / "out")
    assert path == tmp_path / "out" / artifact.name
    assert hashlib.sha256(path.read_bytes()).hexdigest() == artifact.sha256
    assert client.get(job.id).status == "succeeded"


def test_run_uploads_each_kind_of_file_input_for_a_segmentation(api_url, keys, gpu_worker, tmp_path):
    source = tmp_path / "street.png"
    source.write_bytes(png(64, 48))
    client = Client(api_url, keys.user_a.secret)
    with source.open("rb") as opened:
        files = [opened, source, source.read_bytes()]  # an open file, a Path, bytes
        for given in files:
            job = client.run("segmentation", image=given, threshold=0, timeout=120)
            assert job.input["image"].startswith("file_"), job.input
            assert {a.where for a in job.artifacts} == {"instance_map", "overlay"}
            assert job.output["width"] == 64 and job.output["height"] == 48
    written = client.download(job.id, tmp_path / "seg")
    assert sorted(p.name for p in written) == sorted(a.name for a in job.artifacts)
    with Image.open(next(p for p in written if p.name == job.artifacts[0].name)) as mask:
        assert mask.size == (64, 48)
    # A file id (a string) is passed through as it is.
    again = client.run("segmentation", image=job.input["image"], threshold=0, timeout=120)
    assert again.input["image"] == job.input["image"]


def test_a_failed_job_raises_job_failed_and_a_canceled_one_job_canceled(api_url, keys, gpu_worker):
    client = Client(api_url, keys.admin.secret)
    with pytest.raises(JobFailed) as failed:
        client.run("diagnostic", fail=True)
    assert failed.value.job.status == "failed" and failed.value.code and failed.value.message
    assert not isinstance(failed.value, JobCanceled)

    job = client.submit("diagnostic", steps=50, sleep_seconds=50)
    canceled = client.cancel(job.id)
    assert canceled.status in ("canceled", "running")
    finished = client.wait(job.id, timeout=30)
    assert finished.status == "canceled"
    with pytest.raises(JobCanceled):
        finished.raise_for_status()
    with pytest.raises(Conflict) as conflict:
        client.cancel(job.id)  # finished: 409
    assert conflict.value.status == 409 and conflict.value.type and conflict.value.title
    retried = client.retry(job.id)
    assert retried.raw["retry_of"] == job.id and retried.id != job.id
    client.cancel(retried.id)


def test_each_refusal_of_the_api_is_its_own_exception(api_url, strict_api, keys):
    admin, user = Client(api_url, keys.admin.secret), Client(api_url, keys.user_a.secret)
    with pytest.raises(AuthenticationError) as raised:
        Client(api_url, "gpj_not-a-key").list()
    assert raised.value.status == 401
    with pytest.raises(NotFound):
        admin.get("job_doesnotexist")
    with pytest.raises(PermissionDenied):
        user.submit("diagnostic", steps=1)  # an admin-only job type
    with pytest.raises(ValidationError) as invalid:
        admin.submit("diagnostic", steps=0, sleep_seconds="soon")
    assert isinstance(invalid.value, BadRequest) and invalid.value.status == 422
    assert {tuple(e["loc"]) for e in invalid.value.errors} >= {("body", "input", "steps")}
    with pytest.raises(ValidationError) as not_an_image:
        admin.upload(b"this is not an image", filename="x.png")
    assert "file" in str(not_an_image.value.errors)

    # The strict API: each scenario with a key of its own (the rate limit counts per key).
    too_big = Client(strict_api, make_key("sdk big", "user").secret, max_retries=0)
    with pytest.raises(BadRequest) as large:
        too_big.upload(os.urandom(60_000), filename="big.png")
    assert large.value.status == 413 and not isinstance(large.value, ValidationError)

    storage_down = Client(strict_api, make_key("sdk s3", "user").secret, max_retries=1, max_retry_wait=5)
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable) as unavailable:
        storage_down.upload(png())
    assert unavailable.value.status == 503 and "Storage" in unavailable.value.detail
    assert unavailable.value.retry_after is not None
    assert time.monotonic() - started >= unavailable.value.retry_after  # it waited once before its one retry

    limited = Client(strict_api, make_key("sdk rate", "user").secret, max_retry_wait=5)
    # The limit's window is the clock minute: within 10 s of its end the refusal's Retry-After would be
    # short enough to wait out, and the retry would land in the next minute and succeed. Start in a fresh one.
    if 60 - time.time() % 60 < 10:
        time.sleep(60 - time.time() % 60 + 0.5)
    for _ in range(3):
        limited.list()
    started = time.monotonic()
    with pytest.raises(RateLimited) as rate:
        limited.list()  # Retry-After is the rest of the clock minute: retried only when that is ≤ 5 s
    assert rate.value.status == 429 and rate.value.retry_after is not None and rate.value.retry_after >= 0
    if rate.value.retry_after > 5:
        assert time.monotonic() - started < 2  # raised at once, not slept through
    assert all(isinstance(e, GpujobsError) for e in (rate.value, unavailable.value, large.value))


def test_a_submit_whose_answer_is_lost_is_retried_into_the_same_job(proxy, keys, gpu_worker):
    client = Client(proxy.url, keys.admin.secret)
    tag = secrets.token_hex(6)
    proxy.arm("POST /v1/jobs ", "drop_answer")
    job = client.submit("diagnostic", steps=1, metadata={"tag": tag})
    assert proxy.fired == ["drop_answer POST /v1/jobs "]
    posts = [r for r in proxy.requests if r.startswith("POST /v1/jobs ")]
    assert len(posts) == 2  # the first (committed, answer lost) and the retry
    keys_sent = {
        line.split(":", 1)[1].strip()
        for r in posts
        for line in r.split("\r\n")
        if line.lower().startswith("idempotency-key:")
    }
    assert len(keys_sent) == 1, posts
    mine = [j for j in client.iter_jobs(type="diagnostic") if (j.metadata or {}).get("tag") == tag]
    assert [j.id for j in mine] == [job.id]


def test_a_503_with_retry_after_is_waited_out_then_sent_again(proxy, keys):
    client = Client(proxy.url, keys.admin.secret)
    proxy.arm("GET /v1/jobs", "refuse", status=503, retry_after=1)
    started = time.monotonic()
    page = client.list(limit=1)
    assert time.monotonic() - started >= 1.0 and page.items is not None
    assert proxy.fired == ["refuse GET /v1/jobs"] and len(proxy.requests) == 2


def test_a_cut_event_stream_is_resumed_after_the_last_event(proxy, keys, gpu_worker):
    client = Client(proxy.url, keys.admin.secret)
    job = client.submit("diagnostic", steps=4, sleep_seconds=2)
    proxy.arm(f"GET /v1/jobs/{job.id}/events", "cut_stream", after=b"event: queued")
    seen = list(client.events(job.id))
    assert proxy.fired and seen[-1].event == "job" and seen[-1].data["status"] == "succeeded"
    ids = [event.id for event in seen if event.id is not None]
    assert ids == sorted(set(ids)), ids  # none lost, none twice
    timeline = [item["id"] for item in client.transport.request("GET", f"/v1/jobs/{job.id}/events").json()["items"]]
    assert ids == timeline
    streams = [r for r in proxy.requests if r.startswith(f"GET /v1/jobs/{job.id}/events") and "event-stream" in r]
    # The cut comes after the first event's bytes; a read may have carried the next event too, so the
    # resume names the last event the client saw before the cut: one of the first ones, not the end.
    assert len(streams) == 2, streams
    resumed = re.search(r"Last-Event-ID: (\d+)", streams[1])
    assert resumed is not None and int(resumed.group(1)) in ids[:-1], streams


def test_a_key_out_of_streams_waits_by_polling_instead(proxy, gpu_worker):
    key = make_key("sdk streams", "admin")
    client = Client(proxy.url, key.secret, max_retries=0)
    job = client.submit("diagnostic", steps=3, sleep_seconds=1.5)
    path, accept = f"/v1/jobs/{job.id}/events", {"Accept": "text/event-stream"}
    held = [client.transport.open_stream(path, accept, 30) for _ in range(STREAM_CAP)]
    try:
        with pytest.raises(RateLimited):
            client.transport.open_stream(path, accept, 30)
        finished = client.wait(job.id, timeout=30)
    finally:
        for stream in held:
            stream.close()
    assert finished.status == "succeeded"
    polls = [r for r in proxy.requests if r.startswith(f"GET /v1/jobs/{job.id} ")]
    assert polls and all("Prefer: wait=" in r for r in polls), proxy.requests


def test_no_service_is_a_connection_error_after_the_retries():
    client = Client(f"http://127.0.0.1:{free_port()}", "gpj_x", max_retries=2, timeout=2)
    started = time.monotonic()
    with pytest.raises(ConnectionFailed) as raised:
        client.get("job_x")
    assert raised.value.status is None and "3 tries" in str(raised.value)
    assert time.monotonic() - started < 10


@pytest.mark.parametrize(("doc", "section"), [("README.md", "## Python client"), ("docs/clients.md", "## Python SDK")])
def test_the_documented_python_example_runs(api_url, keys, gpu_worker, tmp_path, doc, section):
    text = (ROOT / doc).read_text()
    after = text[text.index(section) :]
    example = after[after.index("```python\n") + len("```python\n") :]
    example = example[: example.index("```")]
    assert 'Client("http://127.0.0.1:8000", key)' in example
    (tmp_path / "teal.png").write_bytes(png())
    (tmp_path / "street.png").write_bytes(png())
    script = "import os\nkey = os.environ['GPUJOBS_KEY']\n" + example.replace("http://127.0.0.1:8000", api_url)
    env = {**os.environ, "GPUJOBS_KEY": keys.admin.secret, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "succeeded" in done.stdout or "instance_map.png" in done.stdout, done.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["instance_map.png", "overlay.png"]
