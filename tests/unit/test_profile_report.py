"""bench.profile_report: which part of a server each sampled stack is given to (pure logic, no services)."""

from __future__ import annotations

import json
from pathlib import Path

from bench import profile_report

ROUTE = "create_job (/srv/app/api/jobs.py:90);submit (/srv/app/api/jobs.py:218)"
INSERT = ROUTE + ";insert_and_send (/srv/app/api/jobs.py:283)"
PASS = INSERT + ";dispatch_soon (/srv/app/worker/dispatcher.py:114);dispatch_pass (/srv/app/worker/dispatcher.py:80)"
SERVER = "GeventWorker.handle (/venv/lib/python3.11/site-packages/gunicorn/workers/ggevent.py:9)"


def lines(*stacks: tuple[str, int]) -> list[str]:
    return [f"{stack} {count}" for stack, count in stacks]


def test_a_stack_goes_to_the_innermost_part_it_names_and_the_rest_to_the_machinery() -> None:
    total, parts = profile_report.split(
        lines(
            (f"{SERVER};{PASS};Connection.execute (/venv/lib/python3.11/site-packages/sqlalchemy/x.py:1)", 30),
            (f"{SERVER};{INSERT};Session.commit (/venv/lib/python3.11/site-packages/sqlalchemy/orm.py:2)", 20),
            (f"{SERVER};{ROUTE}", 10),
            (SERVER, 40),
        ),
        profile_report.GPUJOBS_API,
        "machinery",
    )
    assert total == 100
    assert parts == {
        "job insert (files, job, event), commit": 20,
        "dispatch pass after the submit": 30,
        "route: body, validation, the rest": 10,
        "machinery": 40,
    }
    assert list(parts)[-1] == "machinery"  # the parts' order, the machinery last


def test_a_part_can_name_a_step_by_its_caller() -> None:
    route = "create_job (/repo/bench/baseline_app.py:135)"
    execute = "Connection.execute (/venv/lib/python3.11/site-packages/sqlalchemy/engine/base.py:1494)"
    _, parts = profile_report.split(
        lines(
            (f"{route};{execute}", 5),  # the insert: called by the route itself
            (f"{route};_row_json (/repo/bench/baseline_app.py:115);{execute}", 7),  # the read's, not the insert's
        ),
        profile_report.HAND_API,
        "machinery",
    )
    assert parts == {"row insert, commit": 5, "read of the row, answer": 7, "machinery": 0}


def test_malformed_lines_are_skipped_and_paths_are_shortened() -> None:
    total, parts = profile_report.split(["", "no-count-here", f"{SERVER} 3"], profile_report.GPUJOBS_API, "m")
    assert (total, parts) == (3, {"m": 3})
    assert profile_report.frame_name(SERVER) == "GeventWorker.handle (gunicorn/workers/ggevent.py:9)"
    assert profile_report.frame_name("<module> (/srv/app/db/wire.py:4)") == "<module> (db/wire.py:4)"


def test_the_report_turns_shares_into_ms_per_job_with_the_runs_figures(tmp_path: Path) -> None:
    (tmp_path / "c-gpujobs-api.txt").write_text("\n".join(lines((f"{SERVER};{PASS}", 25), (SERVER, 75))))
    figures = {"load": {"gpujobs": {"cpu_ms_per_op": {"gpujobs api": 12.0}}}}
    splits = profile_report.read(tmp_path, "c")
    assert [(s.system, s.server, s.samples) for s in splits] == [("gpujobs", "api", 100)]
    text = profile_report.report(splits, figures, "c")
    assert "12.00 ms of CPU per job" in text
    assert "25.0 %    3.00 ms  dispatch pass after the submit" in text
    assert "75.0 %    9.00 ms  HTTP server: gunicorn, gevent, Flask (outside the route)" in text
    (tmp_path / "qo.json").write_text(json.dumps(figures))
    assert profile_report.main([str(tmp_path), "--json", str(tmp_path / "qo.json")]) == 0
    assert profile_report.main([str(tmp_path / "empty")]) == 1
