"""The container images, run for real (issue 14, items 2 and 9): ``make deploy-test`` builds them first.

``migrate`` (API image), ``api`` (API image), a worker and ``beat`` (worker image) run as containers on
the host's network against this machine's PostgreSQL (a fresh database, dropped at the end), a spare
index of its Redis and a SeaweedFS S3 server that the harness starts, each container with a read-only
root filesystem. A ``segmentation`` job on the demo Mask2Former and a ``text_to_image`` job on the demo
Stable Diffusion go through the API over HTTP; both succeed and every artifact downloads with its
recorded size and sha256. The API image holds no ML stack. Every container (and its anonymous volume),
the database, the Redis index and the S3 server are removed at the end, after a failure too.

Not part of ``make test`` (it needs dockerd and the images); run by ``make deploy-test``, which CI runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from gpujobs.harness.databases import provision_database, provision_redis
from gpujobs.harness.ports import free_port
from gpujobs.harness.servers import start_s3
from tests.deploy.containers import API_IMAGE, WORKER_IMAGE, Containers, docker, inspect
from tests.deploy.jobs import artifacts
from tests.integration.conftest import demo_models

JOB_TIMEOUT = 240.0  # a worker on a loaded 2-core machine: torch import, model load, then the job
FINISHED = ("succeeded", "failed", "canceled")
ML_STACK = ("torch", "transformers", "diffusers")


def image_present(image: str) -> None:
    if docker("image", "inspect", image, check=False).returncode != 0:
        pytest.fail(f"image {image} is not built: run `make deploy-test` (deploy/docker/build.sh builds it)")


@dataclass
class Deployment:
    containers: Containers
    url: str  # the API, on the host's loopback
    admin_key: str
    ready_seconds: float  # from `docker run` of the API to its first 200 on /readyz

    def call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.admin_key}", **kwargs.pop("headers", {})}
        return requests.request(method, self.url + path, headers=headers, timeout=30, **kwargs)


def container_models(catalog: Path, directory: Path) -> tuple[Path, Path]:
    """A copy of the demo models that the containers' user can read (safetensors writes its files 0600,
    readable by their owner only), and their catalog with the folders where the containers mount them
    (/models). Returns the models folder and the catalog."""
    models = directory / "models"
    shutil.copytree(catalog.parent, models, copy_function=shutil.copyfile)  # new files: 0644
    rewritten = directory / "catalog.toml"
    rewritten.write_text(catalog.read_text().replace(str(catalog.parent), "/models"))
    return models, rewritten


def wait_ready(url: str, since: float, name: str, containers: Containers, timeout: float = 120.0) -> float:
    """Seconds from ``since`` until ``url`` answers 200; fails (with the container's log) after ``timeout``."""
    while time.monotonic() - since < timeout:
        try:
            if requests.get(url, timeout=3).status_code == 200:
                return time.monotonic() - since
        except requests.RequestException:
            pass
        assert containers.running(name), f"{name} exited\n{containers.logs(name)}"
        time.sleep(0.2)
    raise AssertionError(f"{url} not ready within {timeout:g}s\n{containers.logs(name)}")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    for image in (API_IMAGE, WORKER_IMAGE):
        image_present(image)
    root = tmp_path_factory.mktemp("deploy")
    containers = Containers(run_id=f"deploytest-{secrets.token_hex(4)}")
    with contextlib.ExitStack() as cleanup:  # undone in reverse order, after a failure too
        database = provision_database(root / "db", postgres=True, purpose="deploy")
        cleanup.callback(database.drop)
        if not database.is_postgres:
            pytest.fail("PostgreSQL does not answer on 127.0.0.1:5432: the images are tested against it (.ci/run)")
        redis_db = provision_redis(root, machine=True)
        cleanup.callback(redis_db.release)
        if redis_db.embedded is not None:
            pytest.fail("the machine's Redis on 127.0.0.1:6379 does not answer or has no spare index (.ci/run)")
        s3 = cleanup.enter_context(start_s3(root / "s3"))
        cleanup.callback(containers.remove_all)
        catalog = demo_models()
        admin_key = "gpj_" + secrets.token_urlsafe(32)
        containers.env = {
            "GPUJOBS_DATABASE_URL": database.url,
            "GPUJOBS_BROKER_URL": redis_db.url,
            "GPUJOBS_S3_ENDPOINT_URL": s3.endpoint_url,
            "GPUJOBS_S3_ACCESS_KEY": s3.access_key,
            "GPUJOBS_S3_SECRET_KEY": s3.secret_key,
            "GPUJOBS_S3_BUCKET": "gpujobs-deploy-test",
            "GPUJOBS_MODEL_CATALOG": "/etc/gpujobs/catalog.toml",
            "GPUJOBS_ADMIN_KEY": admin_key,
            "OMP_WAIT_POLICY": "PASSIVE",  # idle OpenMP threads must not spin on a small shared machine
        }
        models, container_catalog = container_models(catalog, root)
        catalog_mount = f"{container_catalog}:/etc/gpujobs/catalog.toml:ro"
        models_mount = f"{models}:/models:ro"

        migrate = containers.once(API_IMAGE, "gpujobs", "migrate")
        assert migrate.returncode == 0, f"migrate failed:\n{migrate.stdout}\n{migrate.stderr}"
        assert "is at the latest schema" in migrate.stdout, migrate.stdout

        port = free_port()
        started = time.monotonic()
        api = containers.start(
            "api",
            API_IMAGE,
            env={"GPUJOBS_API_HOST": "127.0.0.1", "GPUJOBS_API_PORT": str(port)},
            mounts=[catalog_mount],
        )
        url = f"http://127.0.0.1:{port}"
        ready = wait_ready(f"{url}/readyz", started, api, containers)
        print(f"\napi container: /readyz answered 200 {ready:.1f} s after `docker run`")

        mounts = [models_mount, catalog_mount]
        containers.start(
            "worker", WORKER_IMAGE, "gpujobs", "worker", "--queues", "gpu,maintenance,webhooks", mounts=mounts
        )
        containers.start("beat", WORKER_IMAGE, "gpujobs", "beat", mounts=mounts)
        yield Deployment(containers=containers, url=url, admin_key=admin_key, ready_seconds=ready)


def finished(deployment: Deployment, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + JOB_TIMEOUT
    while time.monotonic() < deadline:
        response = deployment.call("GET", f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        job: dict[str, Any] = response.json()
        if job["status"] in FINISHED:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} not finished within {JOB_TIMEOUT:g}s\n{deployment.containers.all_logs()}")


def png(width: int, height: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (180, 40, 60)).save(buffer, "PNG")
    return buffer.getvalue()


def test_the_api_container_reports_healthy_through_its_healthcheck(deployment: Deployment) -> None:
    # First of the tests on the deployment: docker keeps only the last five probes.
    api = f"api-{deployment.containers.run_id}"
    after = deployment.containers.healthy_after(api, timeout=90)
    print(f"api container healthy (its HEALTHCHECK on /healthz, every 10 s) {after:.1f} s after its start")


def test_a_segmentation_and_a_text_to_image_job_succeed_through_the_containers(deployment: Deployment) -> None:
    upload = deployment.call("POST", "/v1/files", files={"file": ("in.png", png(64, 48), "image/png")})
    assert upload.status_code == 201, upload.text
    bodies = [
        {"type": "segmentation", "input": {"image": upload.json()["id"], "threshold": 0}},
        {
            "type": "text_to_image",
            "input": {"prompt": "a lighthouse at dusk", "width": 64, "height": 48, "num_inference_steps": 3, "seed": 7},
        },
    ]
    # Both at once: the worker's two threads load the two model kinds concurrently (their first loads once
    # failed one job in the libraries' lazy imports; the model cache now loads one model at a time).
    submitted = []
    for body in bodies:
        response = deployment.call("POST", "/v1/jobs", json=body)
        assert response.status_code == 202, response.text
        submitted.append(response.json()["id"])
    started = time.monotonic()
    for job_id, body in zip(submitted, bodies, strict=True):
        job = finished(deployment, job_id)
        assert job["status"] == "succeeded", f"{job.get('error')}\n{job}\n{deployment.containers.all_logs()}"
        stored = artifacts(job["output"])
        assert stored, f"{body['type']} job has no artifact: {job['output']}"
        for artifact in stored:
            download = requests.get(artifact["url"], timeout=30)
            assert download.status_code == 200, download.text
            assert len(download.content) == artifact["size"]
            assert hashlib.sha256(download.content).hexdigest() == artifact["sha256"], artifact["name"]
        print(f"{body['type']}: succeeded, {len(stored)} artifacts with matching sha256")
    print(f"both jobs finished {time.monotonic() - started:.1f} s after their submit")
    for name in ("worker", "beat"):
        full = f"{name}-{deployment.containers.run_id}"
        assert deployment.containers.running(full), deployment.containers.logs(full)
    assert "beat: Starting" in deployment.containers.logs(f"beat-{deployment.containers.run_id}", tail=200)


def test_the_api_image_has_no_ml_stack() -> None:
    image_present(API_IMAGE)
    runner = Containers(run_id="unused")
    for module in ML_STACK:
        imported = runner.once(API_IMAGE, "python", "-c", f"import {module}")
        assert imported.returncode != 0 and f"No module named '{module}'" in imported.stderr, imported
    shown = runner.once(API_IMAGE, "pip", "show", *ML_STACK)
    assert shown.returncode != 0 and "not found" in shown.stderr and not shown.stdout.strip(), shown
    installed = runner.once(API_IMAGE, "pip", "list", "--format=freeze").stdout.lower()
    assert "gunicorn==" in installed and "gevent==" in installed and "gpujobs==" in installed, installed
    assert not [line for line in installed.splitlines() if line.split("==")[0] in ML_STACK], installed


@pytest.mark.parametrize("image", [API_IMAGE, WORKER_IMAGE])
def test_images_run_as_non_root_with_only_their_volume_writable(image: str) -> None:
    image_present(image)
    config = inspect(image, "image")["Config"]
    assert config["User"] == "10001:10001"
    assert list(config["Volumes"]) == ["/var/lib/gpujobs"]
    labels = config["Labels"]
    for label in ("title", "version", "revision", "created", "licenses", "base.name"):
        assert labels.get(f"org.opencontainers.image.{label}"), (label, labels)
    # Without --read-only: what the image itself lets its user write.
    probe = (
        "id -u; touch /var/lib/gpujobs/ok && echo volume-writable; "
        "for place in /opt/gpujobs/venv /opt/gpujobs/venv/bin /etc /usr /; do "
        '  touch "$place/x" 2>/dev/null && echo "writable: $place"; done; true'
    )
    done = Containers(run_id="unused").once(image, "sh", "-c", probe, read_only=False)
    assert done.stdout.split() == ["10001", "volume-writable"], done


def test_the_worker_image_has_the_ml_stack_and_serves_beat_and_migrate() -> None:
    image_present(WORKER_IMAGE)
    runner = Containers(run_id="unused")
    versions = runner.once(
        WORKER_IMAGE, "python", "-c", "import torch, transformers, diffusers; print(torch.__version__)"
    )
    assert versions.returncode == 0, versions
    for command in ("beat", "migrate", "worker"):
        shown = runner.once(WORKER_IMAGE, "gpujobs", command, "--help")
        assert shown.returncode == 0 and "Usage: gpujobs" in shown.stdout, shown
    print(f"worker image torch {versions.stdout.strip()}")
