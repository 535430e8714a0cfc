"""The README's production commands ("Running the parts separately"), run as written.

The test reads the commands out of README.md, points them at a deployment of its own (a fresh
database, a Redis database index, the session's S3 server) through the same ``GPUJOBS_*``
variables the README exports, and runs them: ``gpujobs migrate``, ``gpujobs keys create``,
``gpujobs api`` (on a free loopback port instead of 0.0.0.0:8000), every ``gpujobs worker`` line
and ``gpujobs beat``, then ``gpujobs models list``. A job with a webhook must then succeed and its
webhook be delivered, and no queue may be stalled: the documented set-up leaves nothing pending.
``gpujobs models demo`` is the command the session's fixtures run to build the demo catalog
(``conftest.demo_models``), so it is not run twice here.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from gpujobs.harness.databases import provision_database, provision_redis
from gpujobs.harness.ports import free_port
from gpujobs.harness.processes import ManagedProcess, Stack, gpujobs_command
from tests.integration import webhook_fixtures
from tests.integration.conftest import embedded_only
from tests.integration.readme_blocks import sh_block

receiver = webhook_fixtures.receiver

SECTION = "## Running the parts separately"
EXPORTED = {"GPUJOBS_DATABASE_URL", "GPUJOBS_BROKER_URL", "GPUJOBS_S3_ENDPOINT_URL"}


def documented_commands() -> tuple[set[str], list[tuple[dict[str, str], list[str]]]]:
    """The variables the README's block exports and its commands: ``(env assignments, argv)`` each."""
    exported: set[str] = set()
    commands = []
    for line in sh_block(SECTION).text.splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        if words[0] == "export":
            exported |= {word.split("=", 1)[0] for word in words[1:] if "=" in word}
            continue
        env = {}
        while "=" in words[0] and not words[0].startswith("-"):
            name, value = words.pop(0).split("=", 1)
            env[name] = value
        assert words[0] == "gpujobs", f"not a gpujobs command: {line!r}"
        commands.append((env, words[1:]))
    return exported, commands


def _api_args(args: list[str], port: int) -> list[str]:
    """The documented ``api`` line, on loopback and a free port (the test must not listen on 0.0.0.0:8000)."""
    out = list(args)
    out[out.index("--host") + 1] = "127.0.0.1"
    out[out.index("--port") + 1] = str(port)
    return out


@pytest.fixture
def deployment_env(services, tmp_path) -> Iterator[dict[str, str]]:
    database = provision_database(tmp_path / "db", postgres=not embedded_only())
    redis = provision_redis(tmp_path, machine=not embedded_only())
    try:
        yield {
            **os.environ,
            "GPUJOBS_DATABASE_URL": database.url,
            "GPUJOBS_BROKER_URL": redis.url,
            "GPUJOBS_VAR_DIR": str(tmp_path / "var"),
            "GPUJOBS_S3_BUCKET": "gpujobs-production-commands",
        }
    finally:
        redis.release()
        database.drop()


def _run(env: dict[str, str], args: list[str], cwd: Path) -> str:
    done = subprocess.run(
        [*gpujobs_command(), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, f"gpujobs {shlex.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}"
    return done.stdout


def test_the_readme_production_commands_run_every_queue_and_deliver_webhooks(deployment_env, receiver, tmp_path):
    exported, commands = documented_commands()
    assert exported == EXPORTED | {"GPUJOBS_S3_ACCESS_KEY", "GPUJOBS_S3_SECRET_KEY"}, exported
    verbs = [args[0] if args[0] not in ("keys", "models") else " ".join(args[:2]) for _, args in commands]
    assert verbs == ["migrate", "keys create", "api", "worker", "worker", "beat", "models list", "models demo"], verbs

    stack = Stack(deployment_env, tmp_path / "logs", label="readme", cwd=tmp_path)
    workers: list[ManagedProcess] = []
    admin_key = ""
    base_url = ""
    try:
        for env, args in commands:
            child_env = {**deployment_env, **env}
            if args[0] == "migrate":
                _run(child_env, args, tmp_path)
            elif args[:2] == ["keys", "create"]:
                printed = re.search(r"^key:\s+(\S+)", _run(child_env, args, tmp_path), re.MULTILINE)
                assert printed, "gpujobs keys create printed no key"
                admin_key = printed.group(1)
            elif args[0] == "api":
                port = free_port()
                api = stack.start("api-readme", [*gpujobs_command(), *_api_args(args, port)])
                base_url = f"http://127.0.0.1:{port}"
                api.wait_for_http(f"{base_url}/healthz")
            elif args[0] == "worker":
                worker = ManagedProcess.start(
                    f"worker-readme-{len(workers)}",
                    [*gpujobs_command(), *args],
                    tmp_path / "logs" / f"worker-{len(workers)}.log",
                    env=child_env,
                    cwd=tmp_path,
                )
                stack.processes.append(worker)
                workers.append(worker)
            elif args[0] == "beat":
                stack.start("beat-readme", [*gpujobs_command(), *args]).wait_for_log("beat: Starting")
            elif args[:2] == ["models", "list"]:
                assert _run(child_env, args, tmp_path).strip()
        for worker in workers:
            worker.wait_for_log(" ready.")
        assert admin_key and base_url

        headers = {"Authorization": f"Bearer {admin_key}"}
        body = {"type": "diagnostic", "input": {"steps": 2}, "webhook": receiver.url("/readme")}
        submitted = requests.post(
            f"{base_url}/v1/jobs", json=body, headers={**headers, "Prefer": "wait=30"}, timeout=60
        )
        assert submitted.status_code == 202 and submitted.json()["status"] == "succeeded", submitted.text
        job_id = submitted.json()["id"]
        got = receiver.wait_for("/readme", lambda found: any(r.json()["type"] == "job.completed" for r in found), 30)
        assert [r.json()["data"]["id"] for r in got] == [job_id]
        delivered = _wait_delivered(base_url, headers, job_id)
        assert delivered["status"] == "delivered" and delivered["attempts"] == 1, delivered

        consumers, stalled = _queue_metrics(base_url)
        assert set(consumers) == {"gpu", "train", "webhooks", "maintenance"}
        assert all(count >= 1 for count in consumers.values()), consumers
        assert not any(stalled.values()), stalled
    finally:
        stack.stop_all()


def _wait_delivered(base_url: str, headers: dict[str, str], job_id: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        response = requests.get(f"{base_url}/v1/jobs/{job_id}/webhooks", headers=headers, timeout=10)
        assert response.status_code == 200, response.text
        (delivery,) = response.json()["items"]
        if delivery["status"] != "pending" or time.monotonic() > deadline:
            return delivery
        time.sleep(0.1)


def _queue_metrics(base_url: str) -> tuple[dict[str, float], dict[str, float]]:
    text = requests.get(f"{base_url}/metrics/cluster", timeout=10).text
    consumers: dict[str, float] = {}
    stalled: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "gpujobs_queue_consumers":
                consumers[sample.labels["queue"]] = sample.value
            elif sample.name == "gpujobs_queue_stalled":
                stalled[sample.labels["queue"]] = sample.value
    return consumers, stalled
