"""The harness behind `gpujobs up`, the tests and the benchmarks: stopping what was started, reporting what died."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest

from gpujobs.harness import supervisor
from gpujobs.harness.processes import Stack, stop_together
from gpujobs.harness.servers import redis_answers, start_redis, start_s3
from gpujobs.harness.supervisor import Fatal, Supervisor


def _running_in_group(pgid: int) -> list[int]:
    """Processes of the group that are not zombies (an orphan's zombie waits for init to reap it)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def test_stop_together_kills_what_ignores_sigterm_and_what_it_forked(tmp_path):
    stack = Stack({**os.environ}, tmp_path)
    stubborn = stack.start("stubborn", ["sh", "-c", "trap '' TERM; echo started; sleep 60 & wait"])
    polite = stack.start("polite", ["sleep", "60"])
    stubborn.wait_for_log("started")
    killed = []
    started = time.monotonic()
    stop_together(stack.processes, timeout=1, on_kill=killed.append)
    assert killed == [stubborn]
    assert time.monotonic() - started < 10
    assert polite.proc.returncode == -signal.SIGTERM and stubborn.proc.returncode == -signal.SIGKILL
    assert _running_in_group(stubborn.pid) == [] and _running_in_group(polite.pid) == []  # its `sleep` went too


def test_a_process_that_exits_while_awaited_is_reported_with_its_log(tmp_path):
    process = Stack({**os.environ}, tmp_path).start("broken", ["sh", "-c", "echo cannot bind; exit 3"])
    with pytest.raises(RuntimeError) as failure:
        process.wait_for_log(" ready.")
    assert "broken exited (exit code 3) before logging ' ready.'" in str(failure.value)
    assert "cannot bind" in str(failure.value)


def test_the_supervisor_restarts_a_crashing_child_then_gives_up(tmp_path, monkeypatch):
    monkeypatch.setattr(supervisor, "MAX_QUICK_CRASHES", 1)
    messages: list[str] = []
    watch = Supervisor(Stack({**os.environ}, tmp_path), echo=messages.append)
    watch.stack.start("crasher", ["sh", "-c", "echo crashing; exit 1"])
    deadline = time.monotonic() + 20
    with pytest.raises(Fatal) as fatal:
        while time.monotonic() < deadline:
            watch.check()
            time.sleep(0.1)
    assert "crasher crashed 2 times in a row" in str(fatal.value) and "crashing" in str(fatal.value)
    assert messages[0].startswith("crasher exited (exit code 1)") and "restarting in 1 s" in messages[0]
    assert messages[1] == "restarting crasher"
    watch.stop()


def test_the_supervisor_restarts_a_dependency_that_dies_on_its_port_while_children_carry_on(tmp_path):
    redis = start_redis(tmp_path / "redis")
    messages: list[str] = []
    watch = Supervisor(Stack({**os.environ}, tmp_path / "logs"), echo=messages.append, dependencies=[redis])
    child = watch.stack.start("child", ["sleep", "60"])
    try:
        watch.check()
        first_pid, port = redis.process.pid, redis.port
        redis.process.kill()
        redis.process.wait(10)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any("is back" in m for m in messages):
            watch.check()
            time.sleep(0.1)
        assert messages[0].startswith("the embedded Redis exited (killed by SIGKILL)"), messages
        assert "restarting in 1 s" in messages[0] and "carry on" in messages[0]
        assert any("is back" in m for m in messages), messages
        assert redis.process.pid != first_pid and redis.port == port and redis_answers(port)
        assert child.alive and child.proc.pid == watch.stack.processes[0].proc.pid, "the child was not touched"
    finally:
        watch.stop()
    assert not child.alive and redis.process.poll() is not None


def test_the_supervisor_gives_up_on_a_dependency_that_cannot_start_again(tmp_path, monkeypatch):
    monkeypatch.setattr(supervisor, "MAX_QUICK_CRASHES", 1)
    redis = start_redis(tmp_path / "redis")
    messages: list[str] = []
    watch = Supervisor(Stack({**os.environ}, tmp_path / "logs"), echo=messages.append, dependencies=[redis])
    squatter = None
    try:
        redis.process.kill()
        redis.process.wait(10)
        squatter = socket.socket()  # someone takes its port: it cannot come back there
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", redis.port))
        squatter.listen()
        deadline = time.monotonic() + 30
        with pytest.raises(Fatal, match=r"the embedded Redis crashed 2 times in a row .*last: restart failed"):
            while time.monotonic() < deadline:
                watch.check()
                time.sleep(0.1)
        assert messages[1].startswith("restarting the embedded Redis on "), messages
    finally:
        if squatter is not None:
            squatter.close()
        watch.stop()


def test_a_restarted_s3_stores_a_put_as_soon_as_restart_returns(tmp_path):
    # weed lists buckets at once after a restart, but may refuse writes for 5 s (the volume server's
    # first heartbeat reached the master before it was leader) or 15 s (the master's warm-up): about
    # one restart in four before restart() waited for a write. Each PUT here is one try (read
    # timeout 5 s): a refused write fails the test instead of being retried past the wait.
    with start_s3(tmp_path / "s3") as s3:
        client = s3.client()
        client.create_bucket(Bucket="probe")
        client.put_object(Bucket="probe", Key="before", Body=b"kept")
        for attempt in range(3):
            s3.kill()
            s3.restart()
            started = time.monotonic()
            client.put_object(Bucket="probe", Key=f"after-{attempt}", Body=b"new")
            took = time.monotonic() - started
            assert took < 2.0, f"restart {attempt}: the PUT took {took:.1f}s"
        assert client.get_object(Bucket="probe", Key="before")["Body"].read() == b"kept"
