"""The client commands of ``gpujobs`` (submit, jobs, download, events, login) as a user runs them: subprocesses
against a real ``gpujobs api`` and real workers, configured by GPUJOBS_URL/GPUJOBS_KEY or a login profile.

Exit codes are part of the interface (scripts use them): 0 succeeded, 1 failed or canceled, 2 bad input
(usage or a 4xx), 130 interrupted.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from gpujobs.client import Client
from gpujobs.harness.processes import Stack, gpujobs_command


@pytest.fixture(scope="module")
def api_url(services: Any, cluster: Any) -> Iterator[str]:
    stack = Stack(dict(os.environ), services.root / "logs", label="client-cli")
    try:
        _, base_url = stack.start_api(workers=1)
        yield base_url
    finally:
        stack.stop_all()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A config dir of the test's own: no profile unless the test logs in."""
    folder = tmp_path / "config"
    folder.mkdir()
    return folder


def cli_env(home: Path, url: str | None = None, key: str | None = None, **more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GPUJOBS_URL", "GPUJOBS_KEY")}
    env |= {"XDG_CONFIG_HOME": str(home), "COLUMNS": "100", **more}
    if url:
        env["GPUJOBS_URL"] = url
    if key:
        env["GPUJOBS_KEY"] = key
    return env


def gpujobs(
    env: dict[str, str], *args: str, cwd: Path | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*gpujobs_command(), *args],
        env=env,
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        start_new_session=True,  # no controlling terminal: a hidden prompt reads stdin, as in CI
    )


def png_file(folder: Path, width: int = 64, height: int = 48) -> Path:
    path = folder / "teal.png"
    image = Image.new("RGB", (width, height), "teal")
    image.paste((200, 40, 40), (8, 8, 30, 30))
    image.save(path)
    return path


def test_submit_wait_shows_a_live_progress_bar_and_prints_the_output(api_url, keys, gpu_worker, home):
    env = cli_env(home, api_url, keys.admin.secret)
    done = gpujobs(env, "submit", "diagnostic", "steps=6", "sleep_seconds=3", "--wait", "--progress", "bar")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["steps"] == 6
    frames = done.stderr
    assert "\x1b[" in frames and "━" in frames  # a redrawn rich bar
    assert "running" in frames and "6/6" in frames and "100%" in frames, frames
    assert any(f"{n}/6" in frames for n in range(1, 6)), frames  # it moved before the end
    assert "succeeded in" in frames

    plain = gpujobs(
        env, "submit", "diagnostic", "steps=3", "sleep_seconds=0.6", "--wait", "--progress", "plain", "--json"
    )
    assert plain.returncode == 0, plain.stderr
    job = json.loads(plain.stdout)
    assert job["status"] == "succeeded"
    lines = plain.stderr.splitlines()
    assert lines[0] == f"{job['id']} queued" and f"{job['id']} job succeeded" in lines, lines


def test_one_command_segments_an_image_and_downloads_the_result(api_url, keys, gpu_worker, home, tmp_path):
    env = cli_env(home, api_url, keys.user_a.secret)
    image = png_file(tmp_path)
    done = gpujobs(env, "submit", "segmentation", "image=@teal.png", "threshold=0", "--wait", "-o", "out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    output = json.loads(done.stdout)
    assert output["width"] == 64 and output["height"] == 48
    for name in ("instance_map", "overlay"):
        written = tmp_path / "out" / output[name]["name"]
        assert f"wrote {written.relative_to(tmp_path)}" in done.stderr or f"wrote {written}" in done.stderr
        assert hashlib.sha256(written.read_bytes()).hexdigest() == output[name]["sha256"]
    assert image.exists()

    # The same job through `jobs list`, `jobs get`, `download` and `events`.
    listed = gpujobs(env, "jobs", "list", "--type", "segmentation", "--limit", "1")
    assert listed.returncode == 0 and listed.stdout.splitlines()[0].split() == [
        "ID",
        "TYPE",
        "STATUS",
        "PROGRESS",
        "CREATED",
    ]
    job_id = listed.stdout.splitlines()[1].split()[0]
    got = json.loads(gpujobs(env, "jobs", "get", job_id).stdout)
    assert got["status"] == "succeeded" and got["output"]["instance_map"]["sha256"] == output["instance_map"]["sha256"]
    again = gpujobs(env, "download", job_id, "-o", str(tmp_path / "again"))
    assert again.returncode == 0 and sorted(Path(p).name for p in again.stdout.split()) == sorted(
        p.name for p in (tmp_path / "out").iterdir()
    )
    events = gpujobs(env, "events", job_id)
    assert events.returncode == 0, events.stderr
    names = [line.split()[1] for line in events.stdout.splitlines()]
    assert names[0] == "queued" and names[-2:] == ["succeeded", "job"], events.stdout
    as_json = [json.loads(line) for line in gpujobs(env, "events", job_id, "--json").stdout.splitlines()]
    assert as_json[-1]["event"] == "job" and as_json[-1]["data"]["id"] == job_id


def test_a_failed_job_exits_1_and_cancel_and_retry_work(api_url, keys, gpu_worker, home):
    env = cli_env(home, api_url, keys.admin.secret)
    failed = gpujobs(env, "submit", "diagnostic", "fail=true", "--wait", "--progress", "none")
    assert failed.returncode == 1, failed.stderr
    assert "failed" in failed.stderr and failed.stdout == ""

    job_id = gpujobs(env, "submit", "diagnostic", "steps=40", "sleep_seconds=40").stdout.strip()
    assert job_id.startswith("job_")
    canceled = gpujobs(env, "jobs", "cancel", job_id)
    assert canceled.returncode == 0 and canceled.stdout.startswith(job_id), canceled.stderr
    Client(api_url, keys.admin.secret).wait(job_id, timeout=30)
    again = gpujobs(env, "jobs", "cancel", job_id)
    assert again.returncode == 2 and "409" in again.stderr  # finished: a conflict, the caller's mistake
    retried = gpujobs(env, "jobs", "retry", job_id, "--json")
    assert retried.returncode == 0, retried.stderr
    new = json.loads(retried.stdout)
    assert new["retry_of"] == job_id
    assert gpujobs(env, "jobs", "cancel", new["id"]).returncode == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["submit", "diagnostic", "steps"], "give each input as key=value"),
        (["submit", "diagnostic", "steps=1", "steps=2"], "'steps' is given twice"),
        (["submit", "diagnostic", "9x=1"], "is not an input name"),
        (["submit", "segmentation", "image=@missing.png"], "missing.png: no such file"),
        (["submit", "diagnostic", "steps={1"], "looks like JSON but does not parse"),
        (["submit", "diagnostic", "--metadata", "[1]"], "--metadata must be a JSON object"),
        (["submit", "diagnostic", "-o", "x"], "needs --wait"),
        (["submit", "diagnostic", "--priority", "10"], "--priority"),
        (["submit"], "Missing argument 'JOB_TYPE'"),
        (["submit", "diagnostic", "steps=0"], "body.input.steps"),  # the server's 422, field by field
        (["submit", "no_such_type"], "422"),
        (["jobs", "get", "job_doesnotexist"], "404"),
        (["events", "job_doesnotexist"], "404"),
        (["download", "job_doesnotexist"], "404"),
    ],
)
def test_bad_input_exits_2_with_a_message_naming_it(api_url, keys, home, args, message):
    done = gpujobs(cli_env(home, api_url, keys.admin.secret), *args)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_login_writes_a_private_profile_that_the_environment_overrides(api_url, keys, home, tmp_path):
    env = cli_env(home)
    missing = gpujobs(env, "jobs", "list")
    assert missing.returncode == 2 and "gpujobs login" in missing.stderr

    refused = gpujobs(env, "login", "--url", api_url, "--key", "gpj_wrong")
    assert refused.returncode == 2 and "401" in refused.stderr
    assert not (home / "gpujobs" / "profile.json").exists()

    logged = gpujobs(env, "login", "--url", api_url, stdin=f"{keys.user_b.secret}\n")  # the key prompted, hidden
    assert logged.returncode == 0, logged.stderr
    assert keys.user_b.secret not in logged.stdout
    profile = home / "gpujobs" / "profile.json"
    assert stat.S_IMODE(profile.stat().st_mode) == 0o600
    assert json.loads(profile.read_text()) == {"url": api_url, "key": keys.user_b.secret}

    assert gpujobs(env, "jobs", "list").returncode == 0
    # user_b may not run diagnostic jobs (403 → 2); the admin key from the environment may.
    assert gpujobs(env, "submit", "diagnostic", "steps=1").returncode == 2
    overridden = gpujobs({**env, "GPUJOBS_KEY": keys.admin.secret}, "submit", "diagnostic", "steps=1")
    assert overridden.returncode == 0 and overridden.stdout.startswith("job_"), overridden.stderr
    wrong_url = gpujobs({**env, "GPUJOBS_URL": "ftp://example"}, "jobs", "list")
    assert wrong_url.returncode == 2 and "http://" in wrong_url.stderr


def test_ctrl_c_while_waiting_exits_130_and_leaves_the_job_running(api_url, keys, gpu_worker, home):
    env = cli_env(home, api_url, keys.admin.secret)
    process = subprocess.Popen(
        [*gpujobs_command(), "submit", "diagnostic", "steps=30", "sleep_seconds=30", "--wait", "--progress", "plain"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # SIGINT as a terminal delivers it: not ignored (a shell's background job would inherit it ignored).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert process.stderr is not None
        first = process.stderr.readline()  # "job_… queued": it is following the stream now
        job_id = first.split()[0]
        assert job_id.startswith("job_"), first
        process.send_signal(signal.SIGINT)
        _, rest = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, rest
    assert f"interrupted: job {job_id} goes on (gpujobs jobs cancel {job_id})" in rest
    assert "Traceback" not in rest
    client = Client(api_url, keys.admin.secret)
    assert client.get(job_id).status in ("queued", "running")
    client.cancel(job_id)
