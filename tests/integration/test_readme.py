"""The README's walkthrough, run as a new user runs it: against ``gpujobs up --demo``, with bash, from a
scratch directory that is not the repository, and judged by what it did, not only by exit codes.

One ``gpujobs up --demo`` serves the module (its own port and var dir, nothing configured, no
``GPUJOBS_ADMIN_KEY``: as ``make up`` runs it). The blocks named in ``WALKTHROUGH`` are read out of
README.md by heading (``readme_blocks``) and run in that order as one ``set -euo pipefail`` script, so
the variables of one block reach the next, as they do in the user's shell. What the test changes, it
changes in the open, and only where the README tells the user to:

- ``GPUJOBS_VAR_DIR`` names this ``up``'s var dir: the README's "from another directory" case, since the
  test is not at the repository's root where ``make up`` keeps ``var/``;
- ``source .venv/bin/activate`` sources this interpreter's venv (the repository's ``.venv`` in a clone;
  the venv's ``bin`` is taken off ``PATH`` first, so the activation is what puts ``gpujobs`` and
  ``python3`` there);
- ``TMPDIR`` is a folder of the test's, so that it finds the scratch directory ``mktemp -d`` makes;
- the fine-tune's ``"steps": 500`` and ``"resolution": 512`` become 20 and 64, as the README says for
  the demo models (measured: about 2 s to train, 4 s for the text-to-image with the LoRA, on a CPU).

To run a new README block, add its heading (and its number among that section's ``sh`` blocks) to
``WALKTHROUGH``, and a check of what it did to the walkthrough test.

Where each ``sh`` block of the README is run is ``RUN_BY`` below (the README's blocks and it must agree:
``test_every_readme_sh_block_says_where_it_is_run``, which needs no ``up``); blocks that need
infrastructure a test machine lacks (a Docker engine, a cluster, a second GPU, Flower) say so there.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from gpujobs.harness.ports import free_port
from tests.integration.readme_blocks import Block, blocks, sh_block
from tests.integration.up_process import launch_up

WALKTHROUGH = [
    ("## Try it with curl", 1),  # the shell: venv, gpujobs info --env, GPUJOBS and KEY, auth, field, scratch dir
    ("## Try it with curl", 2),  # upload, a diagnostic job and its artifact, cancel, segmentation
    ("## Try it with curl", 3),  # the CLI client: one-command segmentation, a job's events, jobs list
    ("## Try it with curl", 4),  # gpujobs keys create, list, revoke
    ("## Fine-tuning", 2),  # the toy dataset
    ("## Fine-tuning", 3),  # fine-tune, wait in a bounded loop, text_to_image with the LoRA
]
SECOND_WORKER = [("## Try it with curl", 1), ("### `gpujobs up`", 1)]
VENV = Path(sys.prefix)
# block: [(what the README says, what the test runs instead)]; each must be found, or the README changed.
SUBSTITUTIONS = {
    ("## Try it with curl", 1): [("source .venv/bin/activate", f"source {VENV}/bin/activate")],
    ("## Fine-tuning", 3): [('\\"steps\\": 500', '\\"steps\\": 20'), ('\\"resolution\\": 512', '\\"resolution\\": 64')],
}
# (heading, number) of every README sh block → the test that runs it, or why none does.
RUN_BY = {
    ("## The two commands", 1): "make up is `gpujobs up --demo`, run by this module; make test is CI itself",
    ("## Try it with curl", 1): "test_the_walkthrough_runs_as_written (the shell set-up)",
    ("## Try it with curl", 2): "test_the_walkthrough_runs_as_written (upload, jobs, cancel, segmentation)",
    ("## Try it with curl", 3): "test_the_walkthrough_runs_as_written (the CLI: submit --wait, events, jobs list)",
    ("## Try it with curl", 4): "test_the_walkthrough_runs_as_written (keys create, list, revoke)",
    ("### Images by URL or data URI", 1): "test_remote_inputs.py (runs the README's block from a temporary directory)",
    ("## Running the parts separately", 1): "test_production_commands.py",
    ("## Deploy", 1): "make deploy-test runs build.sh (tests/deploy/test_images.py uses the images)",
    ("## Deploy", 2): "none runs it (no Docker engine in tests); tests/deploy/test_manifests.py renders the file",
    ("## Deploy", 3): "none runs it (no cluster); tests/deploy/test_manifests.py renders the objects it names",
    ("### `gpujobs up`", 1): "test_a_second_worker_joins_with_gpujobs_info_env",
    ("## Flower beside it", 1): "none (Flower is not a dependency); test_celery_cli.py runs celery -A worker.main",
    ("## Fine-tuning", 1): "none as written (a second GPU); test_production_commands.py runs a gpu,train worker",
    ("## Fine-tuning", 2): "test_the_walkthrough_runs_as_written (the toy dataset)",
    ("## Fine-tuning", 3): "test_the_walkthrough_runs_as_written (fine-tune, bounded wait, LoRA generation)",
}
MARK = ":::readme-block "
UP_READY_SECONDS = 180


@dataclass
class Up:
    url: str
    var: Path
    admin_key: str

    def get(self, path: str, **params: Any) -> Any:
        answer = requests.get(f"{self.url}{path}", params=params, headers=self.auth, timeout=30)
        assert answer.status_code == 200, f"GET {path}: {answer.status_code} {answer.text}"
        return answer.json()

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_key}"}


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    """``gpujobs up --demo`` as ``make up`` starts it, on a port and var dir of its own."""
    root = tmp_path_factory.mktemp("readme-up")
    var, log, port = root / "var", root / "up.log", free_port()
    process = launch_up(var, port, None, log, demo=True)
    try:
        deadline = time.monotonic() + UP_READY_SECONDS
        while "gpujobs is ready" not in log.read_text():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"up --demo not ready in {UP_READY_SECONDS} s:\n{log.read_text()}"
            time.sleep(0.3)
        assert "demo: model catalog" in log.read_text(), log.read_text()
        yield Up(f"http://127.0.0.1:{port}", var, (var / "admin-key").read_text().strip())
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def readme_script(sections: list[tuple[str, int]]) -> tuple[str, list[Block]]:
    """The blocks as one bash script, each after a marker line, with ``SUBSTITUTIONS`` made."""
    chosen = [sh_block(heading, number) for heading, number in sections]
    parts = ["set -euo pipefail"]
    for block in chosen:
        text = block.text
        for documented, replacement in SUBSTITUTIONS.get((block.heading, block.number), []):
            assert documented in text, f"{block.heading} {block.number} no longer says {documented!r}"
            text = text.replace(documented, replacement)
        parts += [f"echo '{MARK}{block.heading} {block.number}'", text]
    return "\n".join(parts), chosen


def user_shell(up: Up, tmp: Path) -> dict[str, str]:
    """A new terminal's environment: no GPUJOBS_* settings and no venv on PATH (the README's first block
    activates it); GPUJOBS_VAR_DIR as the README says for a shell outside the repository."""
    path = [entry for entry in os.environ.get("PATH", "").split(os.pathsep) if Path(entry) != VENV / "bin"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUJOBS_") and k != "VIRTUAL_ENV"}
    tmp.mkdir(parents=True, exist_ok=True)
    return env | {"PATH": os.pathsep.join(path), "GPUJOBS_VAR_DIR": str(up.var), "TMPDIR": str(tmp)}


def by_block(output: str) -> dict[str, list[str]]:
    """The script's output lines under each block's marker (``"## Try it with curl 2"`` → lines)."""
    sections: dict[str, list[str]] = {}
    current: list[str] = []
    for line in output.splitlines():
        if line.startswith(MARK):
            current = sections.setdefault(line.removeprefix(MARK), [])
        else:
            current.append(line)
    return sections


def test_every_readme_sh_block_says_where_it_is_run() -> None:
    """A block added to the README is run by a test (add it to WALKTHROUGH) or says here why none runs it."""
    found = {(block.heading, block.number) for block in blocks() if block.language == "sh"}
    assert found == set(RUN_BY), f"not in RUN_BY: {sorted(found - set(RUN_BY))}; gone: {sorted(set(RUN_BY) - found)}"
    assert {section for section in WALKTHROUGH + SECOND_WORKER} <= found


def test_the_walkthrough_runs_as_written(up: Up, tmp_path: Path) -> None:
    script, _ = readme_script(WALKTHROUGH)
    outside = tmp_path / "elsewhere"  # the user's working directory: not the repository
    outside.mkdir()
    done = subprocess.run(
        ["bash", "-c", script],
        cwd=outside,
        env=user_shell(up, tmp_path / "tmp"),
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert done.returncode == 0, f"the walkthrough failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    (scratch,) = (tmp_path / "tmp").iterdir()  # the directory `cd "$(mktemp -d)"` made
    printed = by_block(done.stdout)

    # 1. The upload: a file of the tenant, the bytes of teal.png.
    uploaded = json.loads((scratch / "file.json").read_text())
    assert uploaded["id"].startswith("file_") and (uploaded["width"], uploaded["height"]) == (64, 48), uploaded
    stored = up.get(f"/v1/files/{uploaded['id']}")
    assert stored["sha256"] == hashlib.sha256((scratch / "teal.png").read_bytes()).hexdigest()

    # 2.–5. The diagnostic job succeeded and its artifact matches; the long one was canceled.
    cli_diagnostic, canceled, succeeded = up.get("/v1/jobs", type="diagnostic")["items"]  # newest first
    assert succeeded["status"] == "succeeded" and succeeded["input"]["steps"] == 5, succeeded
    digest = hashlib.sha256((scratch / "diagnostic.json").read_bytes()).hexdigest()
    assert digest == succeeded["output"]["artifact"]["sha256"]
    curl = printed["## Try it with curl 2"]
    assert f"{digest}  diagnostic.json" in curl and curl[curl.index(f"{digest}  diagnostic.json") + 1] == digest, curl
    assert canceled["status"] == "canceled" and canceled["input"]["steps"] == 60, canceled
    assert curl[-3] in ("canceled", "running") and curl[-2:] == ["canceled", "succeeded"], curl  # 5., 6.

    # 6. The segmentation of the uploaded image, and its instance map a PNG the size of the input.
    cli_segmentation, segmentation = up.get("/v1/jobs", type="segmentation")["items"]  # newest first
    assert segmentation["status"] == "succeeded" and segmentation["input"]["image"] == uploaded["id"], segmentation
    instance_map = (scratch / "instance_map.png").read_bytes()
    assert hashlib.sha256(instance_map).hexdigest() == segmentation["output"]["instance_map"]["sha256"]
    with Image.open(io.BytesIO(instance_map)) as image:
        assert image.format == "PNG" and image.size == (64, 48)

    # The CLI: teal.png uploaded again and segmented in one command, its outputs downloaded and checked;
    # a job's events until it finished; the job list.
    assert cli_segmentation["status"] == "succeeded", cli_segmentation
    assert up.get(f"/v1/files/{cli_segmentation['input']['image']}")["sha256"] == stored["sha256"]
    for name in ("instance_map", "overlay"):
        written = (scratch / "segmentation-out" / f"{name}.png").read_bytes()
        assert hashlib.sha256(written).hexdigest() == cli_segmentation["output"][name]["sha256"], name
    cli = "\n".join(printed["## Try it with curl 3"])
    assert json.loads(cli[: cli.rindex("}") + 1] if cli.startswith("{") else "{}") or cli_segmentation["id"] in cli
    assert cli_diagnostic["status"] == "succeeded" and cli_diagnostic["input"]["steps"] == 5, cli_diagnostic
    assert cli_diagnostic["id"] in cli and "succeeded" in cli, cli

    # Keys: alice's key revoked, alice-ci's in her tenant and active.
    alice = dict(re.findall(r"^(\w+):\s+(\S+)$", (scratch / "alice.txt").read_text(), re.MULTILINE))
    keys = {key["name"]: key for key in up.get("/v1/keys", limit=100)["items"]}
    assert keys["alice"]["id"] == alice["id"] and keys["alice"]["revoked_at"] is not None, keys
    assert keys["alice-ci"]["tenant"] == alice["tenant"] and keys["alice-ci"]["revoked_at"] is None, keys
    listed = "\n".join(printed["## Try it with curl 4"])
    assert alice["id"] in listed and "alice-ci" in listed and f"revoked {alice['id']}" in listed, listed
    refused = requests.get(f"{up.url}/v1/jobs", headers={"Authorization": f"Bearer {alice['key']}"}, timeout=30)
    assert refused.status_code == 401, refused.text

    # The fine-tune: waited for until finished, its model the tenant's, and used by a text_to_image job.
    finetune = json.loads((scratch / "finetune.json").read_text())
    assert finetune["status"] == "succeeded", finetune
    model = finetune["output"]["model"]["id"]
    assert model.startswith("mdl_") and up.get(f"/v1/models/{model}")["kind"] == "lora"
    generated = json.loads((scratch / "image.json").read_text())
    assert generated["status"] == "succeeded" and generated["input"]["loras"][0]["model"] == model, generated
    assert printed["## Fine-tuning 3"][-2:] == ["succeeded", "succeeded"], printed["## Fine-tuning 3"]


def test_a_second_worker_joins_with_gpujobs_info_env(up: Up, tmp_path: Path) -> None:
    """The README's second worker, started with `gpujobs info --env`'s settings, heartbeats into up's
    database; the exported settings are the live ones (the demo catalog, the admin key)."""
    env = user_shell(up, tmp_path / "tmp")
    info = subprocess.run(
        [str(VENV / "bin" / "gpujobs"), "info", "--env"], env=env, capture_output=True, text=True, timeout=60
    )
    assert info.returncode == 0, info.stderr
    exported = dict(re.findall(r"^export (\w+)=(\S+)$", info.stdout, re.MULTILINE))
    assert exported["GPUJOBS_URL"] == up.url and exported["GPUJOBS_KEY"] == up.admin_key, exported
    assert exported["GPUJOBS_MODEL_CATALOG"] == str(up.var / "demo-models" / "catalog.toml"), exported

    script, _ = readme_script(SECOND_WORKER)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    with (tmp_path / "second.log").open("w") as log:
        shell = subprocess.Popen(
            ["bash", "-c", script], cwd=outside, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 120
        while "second" not in worker_metrics(up)[0]:
            assert shell.poll() is None, (tmp_path / "second.log").read_text()[-4000:]
            assert time.monotonic() < deadline, (tmp_path / "second.log").read_text()[-4000:]
            time.sleep(0.5)
        names, consumers = worker_metrics(up)
        assert names == {"up", "second"} and consumers == {"gpu": 2, "train": 1, "webhooks": 1, "maintenance": 1}
    finally:
        os.killpg(shell.pid, signal.SIGTERM)  # the README's Ctrl-C: the worker drains and stops
        try:
            shell.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(shell.pid, signal.SIGKILL)
            raise
    assert worker_metrics(up)[0] == {"up"}, "a stopped worker still counts as alive"


def worker_metrics(up: Up) -> tuple[set[str], dict[str, float]]:
    """The names of the alive workers, and the alive consumers of each queue, from ``/metrics/cluster``."""
    text = requests.get(f"{up.url}/metrics/cluster", timeout=30).text
    names: set[str] = set()
    consumers: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if family.name == "gpujobs_worker_current_jobs":
                names.add(sample.labels["worker"])
            elif family.name == "gpujobs_queue_consumers":
                consumers[sample.labels["queue"]] = sample.value
    return names, consumers
