"""SQL statements per job: what one ``POST /v1/jobs`` and ``worker.runner.execute`` send for one diagnostic job.

Run from the repository root::

    . .venv/bin/activate && python -m bench.statements [--jobs 50]

A fresh PostgreSQL database (else SQLite), an embedded S3 server (``bench.deployment``) and the
in-memory broker, with one live worker row (two slots on ``gpu``) so that dispatch passes find a free
slot, as on a running service. Each job is submitted through the real API app in this process (Flask's
test client: authentication, quotas at submit, the insert, the dispatch pass; Redis is not configured,
so the per-key rate limit's counter is not sent), then run in this process by
``worker.runner.execute``: the claim, the control thread's lease renewals, the run with its artifact
stored in S3, the success and the dispatch pass after it. Every statement is counted by SQLAlchemy's
``before_cursor_execute`` event, grouped by its verb and table, and every pool checkout (on PostgreSQL
each costs a ping round trip, unless its connection came back to the pool in the last half second:
``db/session.py``); ``read`` is a ``GET`` of the finished job (a
poll's last read). Counts, not times: they do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import re
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from bench.deployment import Deployment, run

TABLE = re.compile(r"\b(?:FROM|INTO|UPDATE)\s+\"?(\w+)", re.IGNORECASE)


def _kind(statement: str) -> str:
    words = statement.split(None, 1)
    verb = words[0].upper() if words else "?"
    table = TABLE.search(statement)
    return f"{verb} {table.group(1) if table else ''}".strip()


def measure(deployment: Deployment, jobs: int) -> dict[str, Any]:
    deployment.start_services(broker_url="memory://")
    key = deployment.prepare("gpujobs-bench-statements", {"GPUJOBS_WEBHOOK_ALLOW_PRIVATE": "false"}, "statements")

    from sqlalchemy import event

    from api import create_app
    from db.models import WorkerProcess, utcnow
    from db.session import get_engine, session_scope
    from worker import runner

    engine = get_engine()
    counting: dict[str, Counter[str]] = {"submit": Counter(), "run": Counter(), "read": Counter()}
    checkouts: Counter[str] = Counter()
    phase = threading.local()

    last: list[str] = []  # the statements of the last job, in order

    def phase_name() -> str:
        return getattr(phase, "name", None) or "run"  # the runner's control thread counts as "run"

    @event.listens_for(engine, "before_cursor_execute")
    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        counting[phase_name()][_kind(statement)] += 1
        last.append(f"{phase_name():6} " + " ".join(statement.split())[:150])

    @event.listens_for(engine, "checkout")
    def checkout(*_: Any) -> None:
        checkouts[phase_name()] += 1

    with session_scope() as session:  # a live worker serving gpu with two slots: the dispatcher's capacity
        now = utcnow()
        session.add(
            WorkerProcess(
                id="bench-statements",
                hostname="bench",
                pid=0,
                queues=["gpu"],
                slots=2,
                device={},
                models={},
                current_jobs=[],
                started_at=now,
                last_seen_at=now,
            )
        )
    client = create_app().test_client()
    headers = {"Authorization": f"Bearer {key}"}
    outcomes: Counter[str] = Counter()
    for n in range(jobs + 1):  # the first one warms up (not counted)
        if n == 1:
            for counter in [*counting.values(), checkouts]:
                counter.clear()
        last.clear()
        phase.name = "submit"
        answer = client.post("/v1/jobs", json={"type": "diagnostic", "input": {"steps": 1}}, headers=headers)
        assert answer.status_code == 202, answer.get_data(as_text=True)
        job_id = answer.get_json()["id"]
        phase.name = None
        outcome = runner.execute(job_id)
        phase.name = "read"  # what a client's GET of the finished job costs (a poll's last read)
        assert client.get(f"/v1/jobs/{job_id}", headers=headers).status_code == 200
        phase.name = None
        if n:
            outcomes[outcome] += 1
    return {
        "jobs": jobs,
        "outcomes": dict(outcomes),
        "per_job": {name: round(sum(c.values()) / jobs, 2) for name, c in counting.items()},
        "checkouts_per_job": {name: round(checkouts[name] / jobs, 2) for name in counting},
        "by_kind": {name: {k: round(v / jobs, 2) for k, v in sorted(c.items())} for name, c in counting.items()},
        "database": deployment.database_label,
        "last_job": list(last),
    }


def report(results: dict[str, Any]) -> None:
    print(f"\n{results['jobs']} diagnostic jobs (steps=1) on {results['database']}: {results['outcomes']}")
    for name, per_job in results["per_job"].items():
        pings = results.get("checkouts_per_job", {}).get(name)
        print(f"{name}: {per_job:g} statements per job" + (f", {pings:g} pool checkouts (pings)" if pings else ""))
        for kind, count in results["by_kind"][name].items():
            print(f"  {count:6.2f}  {kind}")
    print("the last job's statements, in order:")
    for statement in results["last_job"]:
        print(f"  {statement}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=50, help="jobs counted (after one warm-up job)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args(argv)
    return run("statements", lambda d: measure(d, args.jobs), report, args.json, args.keep_logs)


if __name__ == "__main__":
    sys.exit(main())
