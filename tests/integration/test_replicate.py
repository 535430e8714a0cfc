"""The Replicate-compatible surface (``/replicate/v1``) driven by the official ``replicate`` Python client,
unchanged, against a real ``gpujobs api`` (gunicorn, gevent), PostgreSQL, S3 and the session's worker.

The client makes ``FileOutput``s only of ``https:`` URLs, so this module's API presigns its artifact URLs
for a TLS proxy in front of the test S3 server (``tls_proxy``); the clients trust the proxy's throwaway CA.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import replicate
import requests
from replicate.exceptions import ModelError, ReplicateError
from replicate.helpers import FileOutput

from gpujobs.harness.processes import Stack
from tests.integration.conftest import make_key
from tests.integration.test_segmentation import picture
from tests.integration.tls_proxy import TlsProxy

ROOT = Path(__file__).resolve().parents[2]


class Deployment:
    def __init__(self, base_url: str, proxy: TlsProxy) -> None:
        self.base_url = base_url
        self.proxy = proxy

    def client(self, key: str, **kwargs: Any) -> replicate.Client:
        # The client wraps the transport it is given (its own is built without `verify`).
        transport = httpx.HTTPTransport(verify=self.proxy.client_context())
        client = replicate.Client(api_token=key, base_url=f"{self.base_url}/replicate", transport=transport, **kwargs)
        client.poll_interval = 0.2
        return client


@pytest.fixture(scope="module")
def deployment(services: Any, cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    s3 = urlsplit(os.environ["GPUJOBS_S3_ENDPOINT_URL"])
    proxy = TlsProxy((s3.hostname or "127.0.0.1", s3.port or 80), tmp_path_factory.mktemp("replicate-tls"))
    env = {**os.environ, "GPUJOBS_S3_PUBLIC_URL": proxy.url, "GPUJOBS_MAX_WAIT_SECONDS": "20"}
    stack = Stack(env, services.root / "logs", label="replicate")
    try:
        _, base_url = stack.start_api(workers=1)
        yield Deployment(base_url, proxy)
    finally:
        stack.stop_all()
        proxy.stop()


def _v1_job(deployment: Deployment, key: str, job_id: str) -> dict[str, Any]:
    response = requests.get(f"{deployment.base_url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    return response.json()


def _png(seed: int = 0) -> io.BytesIO:
    data = io.BytesIO(picture(48, 40, seed))
    data.name = "picture.png"
    return data


# --- run ----------------------------------------------------------------------------------------------------


def test_run_a_diagnostic_returns_its_artifact_as_a_file_output_that_downloads(deployment, keys, gpu_worker):
    client = deployment.client(keys.admin.secret)
    output = client.run("gpujobs/diagnostic", input={"steps": 3})
    assert output["steps"] == 3
    artifact = output["artifact"]
    assert isinstance(artifact, FileOutput) and artifact.url.startswith(deployment.proxy.url)
    data = artifact.read()

    # The same job through /v1: its recorded sha256 is that of the bytes the client read.
    job_id = next(p for p in client.predictions.list() if p.model == "gpujobs/diagnostic").id
    job = _v1_job(deployment, keys.admin.secret, job_id)
    assert job["status"] == "succeeded" and job["output"]["artifact"]["sha256"] == hashlib.sha256(data).hexdigest()


def test_run_a_segmentation_uploads_the_file_and_returns_masks_that_download(deployment, keys, gpu_worker):
    client = deployment.client(keys.user_a.secret)
    output = client.run("gpujobs/segmentation", input={"image": _png(1), "threshold": 0})
    assert output["width"] == 48 and output["height"] == 40 and isinstance(output["instances"], list)
    for name in ("instance_map", "overlay"):
        assert isinstance(output[name], FileOutput), output[name]
        assert output[name].read().startswith(b"\x89PNG"), name

    # The upload became a file of the tenant, and the job's input names it by its id.
    prediction = client.predictions.list()[0]
    assert prediction.model == "gpujobs/segmentation" and prediction.version == "segmentation"
    assert re.fullmatch(r"file_[A-Za-z0-9_-]+", prediction.input["image"]), prediction.input
    assert prediction.status == "succeeded" and prediction.metrics["predict_time"] > 0
    assert prediction.urls["get"].endswith(f"/replicate/v1/predictions/{prediction.id}")
    assert "claimed" in prediction.logs and "succeeded" in prediction.logs


def test_a_failing_run_raises_the_clients_model_error(deployment, keys, gpu_worker):
    client = deployment.client(keys.admin.secret)
    with pytest.raises(ModelError) as raised:
        client.run("gpujobs/diagnostic", input={"fail": True})
    assert raised.value.prediction.status == "failed" and raised.value.prediction.error


# --- predictions --------------------------------------------------------------------------------------------


def test_create_wait_get_and_the_files_namespace(deployment, keys, gpu_worker):
    client = deployment.client(keys.admin.secret)
    # A wait that runs out answers `starting` (as Replicate does), so `run()` and `wait()` go on polling.
    prediction = client.predictions.create(version="diagnostic", input={"steps": 4, "sleep_seconds": 2}, wait=1)
    assert prediction.status == "starting" and prediction.output is None
    prediction.wait()
    assert prediction.status == "succeeded" and prediction.output["steps"] == 4
    assert prediction.started_at and prediction.completed_at and prediction.metrics["predict_time"] >= 1.5
    again = client.predictions.get(prediction.id)
    assert again.status == "succeeded" and again.output["steps"] == 4

    # `version` may be the full reference too; and models.predictions.create takes the model path.
    for created in (
        client.predictions.create(version="gpujobs/diagnostic:diagnostic", input={}),
        client.models.predictions.create(model="gpujobs/diagnostic", input={}),
    ):
        created.wait()
        assert created.status == "succeeded" and created.model == "gpujobs/diagnostic"

    # The model and its one version, as `run("owner/name:version")` fetches it.
    model = client.models.get("gpujobs/diagnostic")
    assert model.owner == "gpujobs" and model.name == "diagnostic" and model.latest_version.id == "diagnostic"
    assert "steps" in model.latest_version.openapi_schema["components"]["schemas"]["Input"]["properties"]
    assert client.run("gpujobs/diagnostic:diagnostic", input={"steps": 2})["steps"] == 2

    uploaded = client.files.create(_png(2))
    assert uploaded.content_type == "image/png" and uploaded.size > 0
    assert client.files.get(uploaded.id).urls["get"] == uploaded.urls["get"]
    assert uploaded.id in [f.id for f in client.files.list()]


def test_cancel_and_list_with_its_pages(deployment, keys, no_gpu_worker):
    key = make_key("replicate pages", "admin")  # a tenant of its own: its list holds only this test's jobs
    client = deployment.client(key.secret)
    made = [client.predictions.create(version="diagnostic", input={"steps": 1}) for _ in range(3)]
    assert all(p.status == "starting" for p in made)  # no worker: they stay queued

    first = requests.get(
        f"{deployment.base_url}/replicate/v1/predictions?limit=2", headers={"Authorization": f"Bearer {key.secret}"}
    ).json()
    assert [p["id"] for p in first["results"]] == [made[2].id, made[1].id] and first["previous"] is None
    second = client.predictions.list(first["next"])
    assert [p.id for p in second] == [made[0].id] and second.next is None
    assert [p.id for p in client.predictions.list()] == [p.id for p in reversed(made)]

    made[0].cancel()
    assert made[0].status == "canceled"
    assert client.predictions.cancel(made[1].id).status == "canceled"
    made[1].wait()
    # Canceling a finished prediction answers it as it is (no error, as Replicate does).
    assert client.predictions.cancel(made[1].id).status == "canceled"
    client.predictions.cancel(made[2].id)


def test_stream_sends_logs_output_and_done_in_replicates_format(deployment, keys, gpu_worker):
    client = deployment.client(keys.admin.secret)
    events = list(client.stream("gpujobs/diagnostic", input={"steps": 5, "sleep_seconds": 1.5}))
    names = [event.event.value for event in events]
    assert names[-1] == "done" and names[-2] == "output" and set(names[:-2]) == {"logs"}, names
    logs = [event.data for event in events if event.event.value == "logs"]
    assert any(" queued" in line for line in logs) and any(" succeeded" in line for line in logs)
    assert any(re.match(r"^\s*\d+%\|.+\| \d+/5", line) for line in logs), logs  # the progress line
    output = events[-2].data
    assert isinstance(output, FileOutput) and output.read()

    # A failed prediction's stream ends in an `error` event, which the client raises.
    failing = client.predictions.create(version="diagnostic", input={"fail": True})
    with pytest.raises(RuntimeError, match="diagnostic"):
        list(failing.stream())


# --- trainings ----------------------------------------------------------------------------------------------


def test_a_training_is_a_finetune_created_read_listed_and_canceled(deployment, keys, no_gpu_worker):
    key = make_key("replicate trainer", "user")
    client = deployment.client(key.secret)
    training = client.trainings.create(
        model="gpujobs/finetune",
        version="finetune",
        input={"images": [_png(3)], "steps": 1, "resolution": 64},
        destination="me/teal-lora",
    )
    assert training.status == "starting" and training.destination == "me/teal-lora"
    job = _v1_job(deployment, key.secret, training.id)
    assert job["type"] == "finetune" and job["input"]["name"] == "teal-lora"
    assert re.fullmatch(r"file_[A-Za-z0-9_-]+", job["input"]["images"][0])
    assert client.trainings.get(training.id).input["steps"] == 1
    assert [t.id for t in client.trainings.list()] == [training.id]
    assert client.predictions.list().results == []  # trainings are not listed as predictions
    training.cancel()
    assert training.status == "canceled"

    with pytest.raises(ReplicateError) as raised:
        client.trainings.create(model="gpujobs/segmentation", version="segmentation", input={}, destination="me/x")
    assert raised.value.status == 404


# --- auth, isolation and bad input --------------------------------------------------------------------------


def test_bearer_and_token_auth_and_another_tenants_prediction_is_a_404(deployment, keys, no_gpu_worker):
    mine = deployment.client(keys.user_a.secret).predictions.create(
        version="segmentation", input={"image": _png(4), "threshold": 0}
    )
    url = f"{deployment.base_url}/replicate/v1/predictions/{mine.id}"
    for scheme in ("Bearer", "Token"):
        response = requests.get(url, headers={"Authorization": f"{scheme} {keys.user_a.secret}"})
        assert response.status_code == 200 and response.json()["id"] == mine.id, (scheme, response.text)
    # `Token` is Replicate's: the /v1 API takes Bearer only.
    token = {"Authorization": f"Token {keys.user_a.secret}"}
    assert requests.get(f"{deployment.base_url}/v1/jobs/{mine.id}", headers=token).status_code == 401
    assert requests.get(url, headers={"Authorization": "Token gpj_nope"}).status_code == 401

    with pytest.raises(ReplicateError) as raised:
        deployment.client(keys.user_b.secret).predictions.get(mine.id)
    assert raised.value.status == 404
    with pytest.raises(ReplicateError) as raised:
        deployment.client(keys.user_b.secret).predictions.cancel(mine.id)
    assert raised.value.status == 404
    deployment.client(keys.user_a.secret).predictions.cancel(mine.id)


@pytest.mark.parametrize(
    ("ref", "input", "status", "names"),
    [
        ("gpujobs/nonexistent", {}, 404, "gpujobs/nonexistent"),
        ("someone/segmentation", {}, 404, "someone/segmentation"),
        ("gpujobs/diagnostic", {}, 404, "gpujobs/diagnostic"),  # admin only: a user key does not see it
        ("gpujobs/segmentation", {"threshold": 0.5}, 422, "body.input.image"),
        ("gpujobs/segmentation", {"image": "@image", "threshold": 7}, 422, "body.input.threshold"),
        ("gpujobs/segmentation", {"image": "file_nope"}, 422, "body.input.image"),
        ("gpujobs/segmentation", {"image": "@image", "colour": "red"}, 422, "body.input.colour"),
    ],
)
def test_bad_models_and_inputs_are_precise_errors(deployment, keys, no_gpu_worker, ref, input, status, names):
    client = deployment.client(keys.user_a.secret)
    if input.get("image") == "@image":
        input = {**input, "image": _png(5)}
    with pytest.raises(ReplicateError) as raised:
        client.run(ref, input=input)
    assert raised.value.status == status and names in (raised.value.detail or ""), raised.value


def test_bad_bodies_name_their_field(deployment, keys, no_gpu_worker):
    headers = {"Authorization": f"Bearer {keys.user_a.secret}"}
    base = f"{deployment.base_url}/replicate/v1"
    cases = [
        ("/predictions", {"input": {}}, ["body", "version"]),
        ("/predictions", {"version": "nope", "input": {}}, ["body", "version"]),
        ("/predictions", {"version": "segmentation:other", "input": {}}, ["body", "version"]),
        ("/predictions", {"version": "segmentation", "input": "x"}, ["body", "input"]),
        (
            "/predictions",
            {"version": "segmentation", "input": {}, "webhook_events_filter": ["nope"]},
            ["body", "webhook_events_filter", 0],
        ),
        ("/predictions", {"version": "segmentation", "input": {}, "webhook": "ftp://x"}, ["body", "webhook"]),
        ("/predictions", {"version": "segmentation", "input": {}, "surprise": 1}, ["body", "surprise"]),
        ("/trainings", {"version": "finetune", "input": {}}, ["body", "destination"]),
        ("/trainings", {"version": "finetune", "input": {}, "destination": "nobody"}, ["body", "destination"]),
    ]
    for path, body, loc in cases:
        response = requests.post(f"{base}{path}", json=body, headers=headers)
        assert response.status_code == 422, (body, response.text)
        assert response.headers["Content-Type"] == "application/problem+json"
        assert response.json()["errors"][0]["loc"] == loc, (body, response.json())
    broken = requests.post(f"{base}/predictions", data="{", headers={**headers, "Content-Type": "application/json"})
    assert broken.status_code == 400
    bad_cursor = requests.get(f"{base}/predictions?cursor=zzz", headers=headers)
    assert bad_cursor.status_code == 422 and bad_cursor.json()["errors"][0]["loc"] == ["query", "cursor"]

    not_an_image = requests.post(f"{base}/files", files={"content": ("x.png", b"not a png")}, headers=headers)
    assert not_an_image.status_code == 422 and not_an_image.json()["errors"][0]["loc"] == ["body", "content"]
    wrong_field = requests.post(f"{base}/files", files={"file": ("x.png", b"x")}, headers=headers)
    assert wrong_field.status_code == 422 and wrong_field.json()["errors"][0]["loc"] == ["body", "content"]


def test_webhook_options_map_to_the_jobs_webhook(deployment, keys, no_gpu_worker):
    client = deployment.client(keys.user_a.secret)
    hook = "http://127.0.0.1:9/replicate"  # loopback only: the canceled job's `completed` delivery is refused there
    made = client.predictions.create(
        version="segmentation", input={"image": _png(6)}, webhook=hook, webhook_events_filter=["start", "logs"]
    )
    job = _v1_job(deployment, keys.user_a.secret, made.id)
    assert job["webhook"] == hook and job["webhook_events_filter"] == ["start", "progress"]
    completed = client.predictions.create(version="segmentation", input={"image": _png(6)}, webhook_completed=hook)
    assert _v1_job(deployment, keys.user_a.secret, completed.id)["webhook_events_filter"] == ["completed"]
    for prediction in (made, completed):
        prediction.cancel()


def test_an_idempotency_key_makes_one_prediction(deployment, keys, no_gpu_worker):
    """The create goes through POST /v1/jobs' path: its `Idempotency-Key` holds here too."""
    image = deployment.client(keys.user_a.secret).files.create(_png(8)).urls["get"]
    headers = {"Authorization": f"Token {keys.user_a.secret}", "Idempotency-Key": "replicate-once"}
    url = f"{deployment.base_url}/replicate/v1/models/gpujobs/segmentation/predictions"
    body = {"input": {"image": image}}
    first, again = (requests.post(url, json=body, headers=headers) for _ in range(2))
    assert (first.status_code, again.status_code) == (201, 200), (first.text, again.text)
    assert first.json()["id"] == again.json()["id"] and first.json()["input"]["image"].startswith("file_")
    other = requests.post(url, json={"input": {"image": image, "threshold": 0.1}}, headers=headers)
    assert other.status_code == 422 and other.json()["errors"][0]["loc"] == ["header", "Idempotency-Key"]
    deployment.client(keys.user_a.secret).predictions.cancel(first.json()["id"])


def test_a_data_uri_input_runs(deployment, keys, gpu_worker):
    client = deployment.client(keys.user_a.secret)
    output = client.run(
        "gpujobs/segmentation", input={"image": _png(7), "threshold": 0}, file_encoding_strategy="base64"
    )
    assert output["overlay"].read().startswith(b"\x89PNG")


# --- the README's example -----------------------------------------------------------------------------------


def test_the_readmes_replicate_example_runs_as_written(deployment, keys, gpu_worker, tmp_path):
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- replicate-example -->\n```python\n(.*?)```", text, re.S)
    assert block, "README.md has no replicate example"
    (tmp_path / "teal.png").write_bytes(picture(64, 48))
    env = {
        **os.environ,
        "GPUJOBS": deployment.base_url,
        "KEY": keys.user_a.secret,
        "SSL_CERT_FILE": str(deployment.proxy.ca_file),
    }
    done = subprocess.run(
        [sys.executable, "-c", block.group(1)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert re.search(r"^\d+ instances$", done.stdout, re.M), done.stdout
    assert (tmp_path / "overlay.png").read_bytes().startswith(b"\x89PNG")
