"""deploy/compose.yaml brought up for real with docker-compose, and a job with its webhook through it.

The documented commands (docs/deployment.md, "Compose") are `cp deploy/.env.example deploy/.env`, then
`docker compose -f deploy/compose.yaml up -d`. This test does that, with the file changed only where
this machine forces it (``derive`` below, each change said there):

- the three registry images (PostgreSQL, Redis, SeaweedFS) cannot be pulled here: one stand-in image,
  built from the gpujobs debootstrap base with Debian's packages (tests/deploy/standins/), takes their
  place, with SeaweedFS's own `weed` binary bound in;
- containers use the host's network (no bridges on this machine): every service gets
  ``network_mode: host``, the service names resolve to 127.0.0.1, nothing is published, what bound
  every interface binds loopback, and PostgreSQL, Redis and the two workers' metrics move to free ports
  (the machine's own PostgreSQL and Redis hold 5432 and 6379);
- there is no GPU: ``worker-gpu`` runs without its NVIDIA device request, on the CPU;
- the webhook receiver is this test, on loopback: the API and workers may call private addresses.

Everything else is the shipped file: the images the build made (gpujobs-api, gpujobs-worker), the
commands, the shared settings, the order (healthchecks, the one-shot migrate), the volumes, the catalog
mount. The `.env` is `.env.example` with each `change-me` replaced. Then: every service runs (migrate
exited 0), the API reports ready, and a diagnostic job submitted with the admin key succeeds, its
output downloads from the presigned URL on the S3 port, and its `completed` webhook arrives (delivered
by `worker-cpu`, the consumer of the webhooks queue that the first production instructions lacked).
`docker-compose down -v` removes it all at the end, after a failure too.

Not part of `make test` (it needs dockerd and the images); run by `make deploy-test`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from gpujobs.harness.ports import free_port, port_free
from gpujobs.harness.servers import weed_executable
from tests.deploy.containers import API_IMAGE, WORKER_IMAGE, docker
from tests.deploy.jobs import artifacts
from tests.integration.webhook_receiver import Receiver

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
STANDINS = Path(__file__).resolve().parent / "standins"
API_URL = "http://127.0.0.1:8000"  # the shipped api command's port, and its healthcheck's
S3_URL = "http://127.0.0.1:8333"  # GPUJOBS_S3_PUBLIC_URL of .env.example
UP_TIMEOUT = 420.0  # first start on a loaded 2-core machine: initdb, migrate, workers importing torch
JOB_TIMEOUT = 120.0
LONG_RUNNING = ("postgres", "redis", "s3", "api", "worker-gpu", "worker-cpu", "beat")


@dataclass(frozen=True)
class Ports:
    postgres: int
    redis: int
    gpu_metrics: int
    cpu_metrics: int


def derive(shipped: dict[str, Any], standin: str, weed: str, ports: Ports) -> dict[str, Any]:
    """The shipped compose document with this machine's changes (the module's docstring says why)."""
    document = copy.deepcopy(shipped)
    services: dict[str, dict[str, Any]] = document["services"]
    for service in services.values():
        service["network_mode"] = "host"
        service["extra_hosts"] = ["postgres:127.0.0.1", "redis:127.0.0.1", "s3:127.0.0.1"]
        service.pop("ports", None)
        environment = service.get("environment")
        if isinstance(environment, dict) and "GPUJOBS_DATABASE_URL" in environment:
            environment["GPUJOBS_DATABASE_URL"] = environment["GPUJOBS_DATABASE_URL"].replace(
                "@postgres:5432/", f"@postgres:{ports.postgres}/"
            )
            environment["GPUJOBS_BROKER_URL"] = environment["GPUJOBS_BROKER_URL"].replace(
                "@redis:6379/", f"@redis:{ports.redis}/"
            )
            environment["GPUJOBS_WEBHOOK_ALLOW_PRIVATE"] = "true"

    postgres = services["postgres"]
    postgres["image"] = standin
    postgres["entrypoint"] = ["standin-postgres"]
    postgres["environment"] |= {"PGPORT": str(ports.postgres), "LISTEN_ADDRESSES": "127.0.0.1"}

    redis = services["redis"]
    redis["image"] = standin
    redis["command"] = [*redis["command"], "--port", str(ports.redis), "--bind", "127.0.0.1"]
    check = redis["healthcheck"]["test"]
    redis["healthcheck"]["test"] = [*check[: check.index("redis-cli") + 1], "-p", str(ports.redis), *check[2:]]

    s3 = services["s3"]
    s3["image"] = standin
    s3["entrypoint"] = ["weed"]
    s3["command"] = [arg.replace("-ip.bind=0.0.0.0", "-ip.bind=127.0.0.1") for arg in s3["command"]]
    s3["volumes"] = [*s3["volumes"], f"{weed}:/usr/local/bin/weed:ro"]

    api = services["api"]
    api["command"] = ["127.0.0.1" if arg == "0.0.0.0" else arg for arg in api["command"]]

    gpu = services["worker-gpu"]
    del gpu["deploy"]  # the NVIDIA device request
    gpu["environment"] |= {"GPUJOBS_DEVICE": "cpu", "GPUJOBS_WORKER_METRICS_PORT": str(ports.gpu_metrics)}
    services["worker-cpu"]["environment"]["GPUJOBS_WORKER_METRICS_PORT"] = str(ports.cpu_metrics)
    return document


class _Dumper(yaml.SafeDumper):
    """Writes every value in place: no YAML anchors for the settings blocks that services share."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def env_file(example: str) -> tuple[str, dict[str, str]]:
    """``.env.example`` with every ``change-me`` value replaced by a secret; the text and its values."""
    values: dict[str, str] = {}
    lines = []
    for line in example.splitlines():
        match = re.match(r"^([A-Z0-9_]+)=(.*)$", line)
        if match and match[2].startswith("change-me"):
            name = match[1]
            value = "gpj_" + secrets.token_urlsafe(32) if name == "GPUJOBS_ADMIN_KEY" else secrets.token_hex(24)
            line = f"{name}={value}"
        if match:
            values[match[1]] = line.split("=", 1)[1]
        lines.append(line)
    return "\n".join(lines) + "\n", values


def standin_image() -> str:
    """The stand-in image (built once per content of tests/deploy/standins/ and of the base)."""
    base = subprocess.run(
        [str(DEPLOY / "docker" / "base.sh")], capture_output=True, text=True, timeout=900, check=False
    )
    assert base.returncode == 0, base.stderr[-3000:]
    base_tag = base.stdout.strip()
    digest = hashlib.sha256(base_tag.encode())
    for path in sorted(STANDINS.iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    tag = f"gpujobs-standin:{digest.hexdigest()[:12]}"
    if docker("image", "inspect", tag, check=False).returncode != 0:
        docker(
            *("build", "--network", "host", "--build-arg", f"BASE_IMAGE={base_tag}", "--tag", tag, str(STANDINS)),
            timeout=900,
        )
    return tag


@dataclass
class Stack:
    project: str
    files: list[str]  # the docker-compose options naming the project, the file and the env file
    admin_key: str

    def compose(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["docker-compose", *self.files, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"docker-compose {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
            )
        return done

    def logs(self) -> str:
        return self.compose("logs", "--no-color", "--tail", "60", check=False).stdout[-12000:]

    def container(self, service: str) -> dict[str, Any]:
        ids = self.compose("ps", "-q", service).stdout.split()
        assert len(ids) == 1, (service, ids)
        document: list[dict[str, Any]] = json.loads(docker("inspect", ids[0]).stdout)
        return document[0]

    def call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.admin_key}", **kwargs.pop("headers", {})}
        return requests.request(method, API_URL + path, headers=headers, timeout=30, **kwargs)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose is missing: `make deploy-lint` installs Debian's (make deploy-test runs it)")
    for image in (API_IMAGE, WORKER_IMAGE):
        if docker("image", "inspect", image, check=False).returncode != 0:
            pytest.fail(f"image {image} is not built: run `make deploy-test` (deploy/docker/build.sh builds it)")
    for port in (8000, 8333):
        if not port_free(port):
            pytest.fail(f"127.0.0.1:{port} is taken: the shipped stack serves it (stop `make up` or what holds it)")
    root = tmp_path_factory.mktemp("compose")
    ports = Ports(postgres=free_port(), redis=free_port(), gpu_metrics=free_port(), cpu_metrics=free_port())
    shipped = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    derived = root / "compose.yaml"
    document = derive(shipped, standin_image(), weed_executable(), ports)
    derived.write_text(yaml.dump(document, Dumper=_Dumper, sort_keys=False))
    text, values = env_file((DEPLOY / ".env.example").read_text())
    (root / ".env").write_text(text)
    project = f"gpujobs-compose-{secrets.token_hex(3)}"
    # deploy/ stays the project directory: the file's relative paths (the catalog) resolve as shipped.
    options = ["-p", project, "-f", str(derived), "--project-directory", str(DEPLOY), "--env-file", str(root / ".env")]
    stack = Stack(project, options, values["GPUJOBS_ADMIN_KEY"])
    try:
        started = time.monotonic()
        up = stack.compose("up", "-d", "--no-color", timeout=UP_TIMEOUT, check=False)
        assert up.returncode == 0, f"{up.stdout}\n{up.stderr}\n{stack.logs()}"
        while time.monotonic() - started < UP_TIMEOUT:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{API_URL}/readyz", timeout=3).status_code == 200:
                    break
            time.sleep(1)
        else:
            raise AssertionError(f"/readyz not 200 within {UP_TIMEOUT:g} s\n{stack.logs()}")
        print(f"\ncompose: `up -d` to a ready API in {time.monotonic() - started:.1f} s")
        yield stack
    finally:
        down = stack.compose("down", "--volumes", "--remove-orphans", "--timeout", "20", timeout=180, check=False)
        left = docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={project}").stdout.split()
        volumes = docker("volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={project}").stdout.split()
        assert down.returncode == 0 and not left and not volumes, (down.stdout, down.stderr, left, volumes)


def test_every_service_runs_and_migrate_ran_once_to_its_end(stack: Stack) -> None:
    for service in LONG_RUNNING:
        state = stack.container(service)["State"]
        assert state["Running"] and not state["Restarting"], (service, state, stack.logs())
    migrate = stack.container("migrate")["State"]
    assert migrate["Status"] == "exited" and migrate["ExitCode"] == 0, migrate
    assert "is at the latest schema" in stack.compose("logs", "--no-color", "migrate").stdout


def test_a_job_succeeds_its_output_downloads_and_its_webhook_arrives(stack: Stack) -> None:
    receiver = Receiver()
    try:
        response = stack.call(
            "POST",
            "/v1/jobs",
            json={"type": "diagnostic", "input": {"sleep_seconds": 0, "steps": 2}, "webhook": receiver.url()},
        )
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        deadline = time.monotonic() + JOB_TIMEOUT
        while True:
            job = stack.call("GET", f"/v1/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "canceled") or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert job["status"] == "succeeded", (job, stack.logs())
        stored = artifacts(job["output"])
        assert stored and all(artifact["url"].startswith(S3_URL + "/") for artifact in stored), job["output"]
        for artifact in stored:
            body = requests.get(artifact["url"], timeout=30)
            assert body.status_code == 200 and len(body.content) == artifact["size"], artifact
            assert hashlib.sha256(body.content).hexdigest() == artifact["sha256"]

        def completed(found: list[Any]) -> bool:
            return any(r.json().get("type") == "job.completed" for r in found)

        deliveries = receiver.wait_for("/hook", completed, timeout=60)
        done = next(r.json() for r in deliveries if r.json().get("type") == "job.completed")
        assert done["data"]["id"] == job_id and done["data"]["status"] == "succeeded", done
        assert {"webhook-id", "webhook-timestamp", "webhook-signature"} <= set(deliveries[-1].headers)
    finally:
        receiver.stop()
