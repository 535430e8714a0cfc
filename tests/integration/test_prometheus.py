"""A real Prometheus scrapes a real API (``gpujobs api``: gunicorn, two processes, multiprocess metrics)
and a real worker (its own ``/metrics`` port), and PromQL over its HTTP API gives the numbers that known
diagnostic jobs (known sleep times) make: ``rate()`` of the finished-jobs counter, ``histogram_quantile()``
of the run-time and queue-wait histograms within one bucket of the jobs' own recorded times, the API's
request counters summed over its processes. ``promtool check metrics`` passes on every scrape, the
shipped alert rules load and evaluate on these series (and pass ``promtool check rules`` and ``promtool
test rules``), and every metric the dashboard and the rules name is one a scrape declares.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from gpujobs.harness.ports import free_port
from gpujobs.harness.processes import Stack
from tests.integration.prometheus import Prometheus, promtool, start_prometheus

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "gpujobs.json"
SHORT, LONG, EACH = 0.2, 1.5, 4  # diagnostic sleeps: run-time buckets (0.1, 0.5] and (1, 2.5]
FINISHED = ("succeeded", "failed", "canceled")


@dataclass
class Deployment:
    base_url: str
    worker_metrics: str
    prometheus: Prometheus


@pytest.fixture(scope="module")
def deployment(services: Any, cluster: Any) -> Iterator[Deployment]:
    """This module's API (two processes) and gpu worker (the session's is stopped meanwhile), scraped by a
    Prometheus with the shipped alert rules loaded: the API's /metrics, its /metrics/cluster once, the worker."""
    cluster.stop_gpu_worker()
    stack = Stack(dict(os.environ), services.root / "logs", label="prometheus")
    try:
        worker_port = free_port()
        stack.start_worker("gpu", concurrency=2, name="prom-gpu", metrics_port=worker_port)
        _, base_url = stack.start_api(workers=2)
        api = base_url.removeprefix("http://")
        jobs = {
            "gpujobs-api": (api, "/metrics"),
            "gpujobs-cluster": (api, "/metrics/cluster"),
            "gpujobs-worker": (f"127.0.0.1:{worker_port}", "/metrics"),
        }
        prometheus = start_prometheus(stack, services.root / "prometheus", jobs, [str(ALERTS / "alerts.yml")])

        def all_up() -> bool:
            targets = prometheus.get("/api/v1/targets")["activeTargets"]
            return len(targets) == 3 and all(t["health"] == "up" for t in targets)

        prometheus.wait("every target up", all_up)
        yield Deployment(base_url, f"http://127.0.0.1:{worker_port}/metrics", prometheus)
    finally:
        stack.stop_all()


def _submit(base_url: str, key: str, **diagnostic: Any) -> str:
    response = requests.post(
        f"{base_url}/v1/jobs",
        json={"type": "diagnostic", "input": diagnostic},
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    )
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def _finished(base_url: str, key: str, job_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = requests.get(f"{base_url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"}, timeout=10)
        job: dict[str, Any] = response.json()
        if job["status"] in FINISHED:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s")


def _bucket(bounds: tuple[float, ...], seconds: float) -> int:
    """The index of the histogram bucket ``seconds`` falls in (len(bounds): +Inf)."""
    return next((i for i, bound in enumerate(bounds) if seconds <= bound), len(bounds))


def _nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(math.ceil(q * len(ordered)) - 1, 0)]


def test_promql_rates_and_quantiles_match_known_jobs(deployment: Deployment, keys: Any) -> None:
    from worker.metrics import QUEUE_WAIT_BUCKETS, RUN_BUCKETS

    prom, base, admin = deployment.prometheus, deployment.base_url, keys.admin.secret
    succeeded = 'gpujobs_jobs_finished_total{job="gpujobs-worker",type="diagnostic",status="succeeded"}'
    # The worker's job series exist at 0 from its start, so rate() sees the first job too.
    prom.wait("a few zero samples", lambda: prom.scalar(f"count_over_time({succeeded}[1m])") >= 2)
    assert prom.scalar(f"sum({succeeded})") == 0

    ids = [_submit(base, admin, sleep_seconds=SHORT) for _ in range(EACH)]
    ids += [_submit(base, admin, sleep_seconds=LONG) for _ in range(EACH)]
    ids.append(_submit(base, admin, fail=True))
    jobs = [_finished(base, admin, job_id) for job_id in ids]
    assert [job["status"] for job in jobs] == ["succeeded"] * 2 * EACH + ["failed"], jobs

    # Evaluated at the worker's last scrape, the window's end needs no extrapolation: the numbers are exact.
    total = 'sum(gpujobs_jobs_finished_total{job="gpujobs-worker",type="diagnostic"})'
    prom.wait("the worker scraped after the last job", lambda: prom.scalar(total) == len(jobs))
    at = prom.scalar(f"max(timestamp({succeeded}))")
    assert prom.scalar(f"sum(rate({succeeded}[1m]))", at) == pytest.approx(2 * EACH / 60, rel=1e-6)
    assert prom.scalar(f"sum(increase({succeeded}[1m]))", at) == pytest.approx(2 * EACH, rel=1e-6)
    failed = 'gpujobs_jobs_finished_total{status="failed",error_code="diagnostic_failure",queue="gpu"}'
    assert prom.scalar(failed, at) == 1

    for name, bounds, recorded in (
        ("gpujobs_job_run_seconds", RUN_BUCKETS, [job["metrics"]["run_seconds"] for job in jobs]),
        ("gpujobs_job_queue_wait_seconds", QUEUE_WAIT_BUCKETS, [job["metrics"]["queue_seconds"] for job in jobs]),
    ):
        rate = f'sum by (le) (rate({name}_bucket{{type="diagnostic"}}[1m]))'
        for q in (0.25, 0.5, 0.75, 0.95):
            promql = prom.scalar(f"histogram_quantile({q}, {rate})", at)
            truth = _nearest_rank(recorded, q)
            assert abs(_bucket(bounds, promql) - _bucket(bounds, truth)) <= 1, (name, q, promql, truth, recorded)
        assert prom.scalar(f'sum(increase({name}_count{{type="diagnostic"}}[1m]))', at) == pytest.approx(len(jobs))
        observed = prom.scalar(f'sum(increase({name}_sum{{type="diagnostic"}}[1m]))', at)
        assert observed == pytest.approx(sum(recorded), abs=0.1 * len(jobs)), (name, observed, recorded)

    # The API: two gunicorn processes, one sum; routes are URL rules, never raw paths.
    def api_counted() -> bool:
        submitted = prom.scalar('sum(gpujobs_jobs_submitted_total{type="diagnostic",queue="gpu"})')
        posts = prom.scalar('sum(gpujobs_http_requests_total{route="/v1/jobs",method="POST",status="202"})')
        return submitted == posts == len(jobs)

    prom.wait("the API's counters summed over its processes", api_counted)
    assert prom.scalar('gpujobs_api_processes{job="gpujobs-api"}') == 2
    assert prom.scalar('sum(gpujobs_http_requests_total{route="/v1/jobs/<job:job_id>",method="GET"})') >= len(jobs)
    raw = prom.query('gpujobs_http_requests_total{route=~".*job_[A-Za-z0-9_-]{6,}.*"}')
    assert raw == [], [sample["metric"] for sample in raw]  # no job id in a label
    latency = 'sum by (le) (gpujobs_http_request_duration_seconds_bucket{route="/v1/jobs",method="POST"})'
    assert 0 < prom.scalar(f"histogram_quantile(0.5, {latency})") <= 10
    for family in ("process_cpu_seconds_total", "process_resident_memory_bytes", "gpujobs_build_info"):
        jobs_with = {s["metric"]["job"] for s in prom.query(f"count by (job) ({family})")}
        assert jobs_with == {"gpujobs-api", "gpujobs-worker"}, family

    # The cluster gauges: this worker is the gpu queue's only consumer, under its stable name.
    assert prom.scalar('gpujobs_queue_consumers{queue="gpu"}') == 1
    [current] = prom.query('gpujobs_worker_current_jobs{worker="prom-gpu"}')  # from its last heartbeat
    assert current["metric"]["host"] and 0 <= float(current["value"][1]) <= 2, current


def _scrapes(deployment: Deployment) -> dict[str, str]:
    texts = {}
    for where, url in (
        ("api", f"{deployment.base_url}/metrics"),
        ("cluster", f"{deployment.base_url}/metrics/cluster"),
        ("worker", deployment.worker_metrics),
    ):
        response = requests.get(url, timeout=10)
        assert response.status_code == 200, (where, response.text)
        texts[where] = response.text
    return texts


def test_promtool_check_metrics_passes_on_every_scrape(deployment: Deployment) -> None:
    for where, text in _scrapes(deployment).items():
        checked = promtool("check", "metrics", stdin=text)
        assert checked.returncode == 0 and not checked.stdout.strip(), (where, checked.stdout, checked.stderr)


def shipped_expressions() -> dict[str, str]:
    """The dashboard's queries and the alert rules' expressions."""
    found = {}
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            found[f"dashboard {panel['title']!r} {target['refId']}"] = target["expr"]
    for group in yaml.safe_load((ALERTS / "alerts.yml").read_text())["groups"]:
        for rule in group["rules"]:
            found[f"alert {rule['alert']}"] = rule["expr"]
    return found


def test_dashboard_and_alerts_name_only_metrics_a_scrape_declares(deployment: Deployment) -> None:
    """A misspelt metric evaluates fine to nothing. Each name used must be declared by a real scrape (its
    ``# TYPE`` line: a labelled family with no sample yet still has one), or be an NVML gauge, which only
    a worker with a GPU has (``worker.nvml``; its names are checked by the unit tests)."""
    from worker import nvml

    exported = set(nvml.FAMILIES)
    for text in _scrapes(deployment).values():
        for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE):
            exported.add(name)
            if kind == "histogram":
                exported |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
    expressions = shipped_expressions()
    assert len(expressions) >= 10
    for where, expr in expressions.items():
        names = set(re.findall(r"\b(?:gpujobs|process)_[a-z_]+", expr))
        assert names, f"{where} names no metric: {expr}"
        assert names <= exported, f"{where} names {sorted(names - exported)}, which no scrape declares"


def test_alert_rules_pass_promtool_and_evaluate_on_real_series(deployment: Deployment) -> None:
    checked = promtool("check", "rules", "alerts.yml", cwd=ALERTS)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", "alerts-test.yml", cwd=ALERTS)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    prom = deployment.prometheus

    def evaluated() -> list[dict[str, Any]]:
        rules = [r for g in prom.get("/api/v1/rules")["groups"] for r in g["rules"]]
        assert rules and all(not r["lastEvaluation"].startswith("0001") for r in rules)
        return rules

    rules = prom.wait("every rule evaluated", evaluated)
    broken = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
    assert not broken, f"rules that do not evaluate: {broken}"
    shipped = [
        rule for group in yaml.safe_load((ALERTS / "alerts.yml").read_text())["groups"] for rule in group["rules"]
    ]
    assert {r["name"] for r in rules} == {rule["alert"] for rule in shipped}
