"""``make deploy-lint``: the deployment files under deploy/, checked by the tools that run them.

- the compose stack: ``docker-compose config`` (Debian's docker-compose) with ``deploy/.env.example``;
- every Kubernetes object of the kustomize base and of each overlay, rendered by Debian's kubectl
  (kustomize 2.0, the oldest renderer the files promise to work with) and, when the machine has a
  newer ``kubectl``, by that one too (both must render the same objects): built-in kinds validated
  by ``kubernetes-validate`` (strict), the KEDA ScaledObject and the ServiceMonitor against the CRD
  schemas their projects publish (tests/deploy/data/);
- the alert rules: ``promtool check rules`` and ``promtool test rules`` (Debian's prometheus);
- and with real parts: Debian's ``prometheus`` on loopback scrapes a real ``gpujobs api`` (its own
  database, Redis and S3, a worker for the webhooks and maintenance queues, a job queued on the
  gpu queue that no worker serves), loads the alert rules, and evaluates every expression of the
  dashboard, the rules and the KEDA trigger through its HTTP API.

A missing tool fails its test and says how to get it; ``make deploy-lint`` installs them all
(Debian's kubernetes-client and prometheus are unpacked under var/deploy-tools, not installed, so
that no Prometheus service starts on the machine). Not part of ``make test``'s paths.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import tomllib
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DATA = Path(__file__).resolve().parent / "data"
KUSTOMIZATIONS = ["base", "overlays/production", "overlays/always-on"]
# Kubernetes releases the built-in objects are validated against: the oldest we support, the newest.
KUBERNETES_VERSIONS = ["1.29.0", "1.37.0"]
QUEUES = {"gpu", "train", "webhooks", "maintenance"}
METRICS_TOKEN = "deploy-lint-metrics-token"
CRDS = {
    ("keda.sh", "ScaledObject"): DATA / "keda.sh_scaledobjects.yaml",
    ("monitoring.coreos.com", "ServiceMonitor"): DATA / "monitoring.coreos.com_servicemonitors.yaml",
}


def tool(name: str, package: str) -> str:
    """``name`` from the unpacked Debian tools (GPUJOBS_DEPLOY_TOOLS, set by make), else from PATH."""
    unpacked = Path(os.environ.get("GPUJOBS_DEPLOY_TOOLS", ROOT / "var" / "deploy-tools" / "root" / "usr" / "bin"))
    if (unpacked / name).is_file():
        return str(unpacked / name)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"`{name}` not found: run `make deploy-lint`, which gets it from Debian's {package} package")
    return found


def run(args: list[str], cwd: Path = ROOT, timeout: float = 120) -> str:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def setting_names() -> set[str]:
    from db.settings import Settings

    return {f"GPUJOBS_{name.upper()}" for name in Settings.model_fields}


def env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))
    return {name: value for name, value in pairs}


def queues_of(command: list[str]) -> set[str]:
    """The queues a ``gpujobs worker`` command line serves."""
    assert command[:2] == ["gpujobs", "worker"], command
    if "--queues" not in command:
        pytest.fail(f"{command}: name the queues of each worker pool explicitly")
    return set(command[command.index("--queues") + 1].split(","))


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert match and duration, f"unexpected duration {duration!r}"
    return int(match[1] or 0) * 60 + int(match[2] or 0)


# --- compose ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    docker_compose = tool("docker-compose", "docker-compose")
    args = [docker_compose, "-f", "deploy/compose.yaml", "--env-file", "deploy/.env.example"]
    return yaml.safe_load(run([*args, "--profile", "flower", "--profile", "monitoring", "config"]))


def test_env_example_sets_every_variable_compose_reads() -> None:
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", (DEPLOY / "compose.yaml").read_text()))
    missing = used - set(env_file(DEPLOY / ".env.example"))
    assert not missing, f"deploy/.env.example lacks {sorted(missing)}"


def test_compose_stack(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {
        "postgres", "redis", "s3", "migrate", "api", "worker-gpu", "worker-cpu", "beat", "flower", "prometheus",
    }  # fmt: skip
    for name in ("postgres", "redis", "s3", "api"):
        assert services[name]["healthcheck"]["test"], f"{name} has no healthcheck"
    assert services["migrate"]["command"] == ["gpujobs", "migrate"]
    assert services["migrate"]["restart"] == "no"
    assert services["beat"]["command"] == ["gpujobs", "beat"]
    assert services["beat"].get("deploy", {}).get("replicas", 1) == 1
    assert {services[name]["profiles"][0] for name in ("flower", "prometheus")} == {"flower", "monitoring"}

    workers = {name: s for name, s in services.items() if s.get("command", [])[:2] == ["gpujobs", "worker"]}
    assert set(workers) == {"worker-gpu", "worker-cpu"}
    assert set().union(*(queues_of(s["command"]) for s in workers.values())) == QUEUES, "a queue has no consumer"
    assert queues_of(workers["worker-cpu"]["command"]) == {"webhooks", "maintenance"}
    devices = workers["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]

    for name in ("api", "worker-gpu", "worker-cpu", "beat"):
        after = services[name]["depends_on"]
        assert after["migrate"]["condition"] == "service_completed_successfully", name
    for name, service in services.items():
        if name in ("api", *workers):
            catalog = service["environment"]["GPUJOBS_MODEL_CATALOG"]
            binds = [v for v in service["volumes"] if isinstance(v, dict)]  # the short syntax stays a string
            mounted = [v for v in binds if v["target"] == catalog and v["read_only"]]
            assert mounted and Path(mounted[0]["source"]).is_file(), f"{name}: no catalog file mounted"
        if name in workers:
            drain = float(service["environment"]["GPUJOBS_WORKER_DRAIN_SECONDS"])
            assert seconds(service["stop_grace_period"]) > drain, f"{name}: the grace period must exceed the drain"
        unknown = {v for v in service.get("environment", {}) if v.startswith("GPUJOBS_")} - setting_names()
        assert not unknown, f"{name} sets {sorted(unknown)}, which no setting reads (`gpujobs settings`)"


# --- Kubernetes ------------------------------------------------------------------------------------


def renderers() -> list[str]:
    """Debian's kubectl (kustomize 2.0), and the machine's own kubectl when it is another one."""
    debian = tool("kubectl", "kubernetes-client")
    other = shutil.which("kubectl")
    return [debian] + ([other] if other and Path(other).resolve() != Path(debian).resolve() else [])


def render(kubectl: str, kustomization: str) -> list[dict[str, Any]]:
    return [o for o in yaml.safe_load_all(run([kubectl, "kustomize", str(DEPLOY / "k8s" / kustomization)])) if o]


def comparable(objects: list[dict[str, Any]]) -> list[str]:
    """Objects as text, without what renderers differ in: generated names' hashes, empty metadata maps."""
    text = re.sub(r"(gpujobs-(?:catalog|settings))-[a-z0-9]{10}\b", r"\1", json.dumps(objects, sort_keys=True))
    text = text.replace('"annotations": {}, ', "").replace('"labels": {}, ', "")
    return sorted(json.dumps(o, sort_keys=True) for o in json.loads(text))


@pytest.fixture(scope="module", params=KUSTOMIZATIONS)
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    first, *others = [render(kubectl, request.param) for kubectl in renderers()]
    for other in others:
        assert comparable(other) == comparable(first), f"{request.param}: renderers disagree"
    return first


def crd_schema(path: Path) -> dict[str, Any]:
    """The served version's openAPIV3Schema, closed: an unknown field is an error, as under
    ``kubectl apply --validate=strict``, not silently pruned."""
    crd = yaml.safe_load(path.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["served"] and v["storage"])

    def close(schema: Any) -> Any:
        if isinstance(schema, dict):
            schema = {k: close(v) for k, v in schema.items()}
            open_ = "additionalProperties" in schema or schema.get("x-kubernetes-preserve-unknown-fields")
            if "properties" in schema and not open_:
                schema["additionalProperties"] = False
        elif isinstance(schema, list):
            schema = [close(v) for v in schema]
        return schema

    schema: dict[str, Any] = close(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}
    return schema


def test_every_object_validates(rendered: list[dict[str, Any]]) -> None:
    import jsonschema
    import kubernetes_validate

    for obj in rendered:
        group = obj["apiVersion"].rpartition("/")[0]
        name = f"{obj['kind']} {obj['metadata']['name']}"
        if (group, obj["kind"]) in CRDS:
            errors = list(jsonschema.Draft7Validator(crd_schema(CRDS[group, obj["kind"]])).iter_errors(obj))
            assert not errors, f"{name}: " + "; ".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{name} is not a valid object of Kubernetes {version}: {exc.message} at {exc.path}")
            except kubernetes_validate.SchemaNotFoundError:
                pytest.fail(f"{name}: no schema for {obj['apiVersion']} in Kubernetes {version}, and no CRD here")


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def test_kubernetes_deployment_shape(rendered: list[dict[str, Any]]) -> None:
    deployments = by_kind(rendered, "Deployment")
    assert set(deployments) == {"gpujobs-api", "gpujobs-worker-gpu", "gpujobs-worker-cpu", "gpujobs-beat"}
    api, gpu, cpu, beat = (deployments[f"gpujobs-{n}"] for n in ("api", "worker-gpu", "worker-cpu", "beat"))

    probes = container(api)
    assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert beat["spec"]["replicas"] == 1 and beat["spec"]["strategy"]["type"] == "Recreate"
    assert container(gpu)["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert "replicas" not in gpu["spec"], "KEDA owns the GPU workers' replicas"
    assert set(by_kind(rendered, "PodDisruptionBudget")) == {"gpujobs-api", "gpujobs-worker-gpu", "gpujobs-worker-cpu"}
    (job,) = by_kind(rendered, "Job").values()
    assert container(job)["command"] == ["gpujobs", "migrate"]

    workers = [gpu, cpu]
    assert set().union(*(queues_of(container(w)["command"]) for w in workers)) == QUEUES, "a queue has no consumer"
    for worker in workers:
        env = {e["name"]: e["value"] for e in container(worker).get("env", [])}
        grace = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > float(env["GPUJOBS_WORKER_DRAIN_SECONDS"]), "the grace period must exceed the drain window"

    (secret,) = by_kind(rendered, "Secret").values()
    for name in ("GPUJOBS_SESSION_SECRET", "GPUJOBS_S3_ACCESS_KEY", "GPUJOBS_S3_SECRET_KEY", "GPUJOBS_ADMIN_KEY"):
        assert name in secret["stringData"], f"the Secret lacks {name}"
    configmaps = {name.rsplit("-", 1)[0]: cm for name, cm in by_kind(rendered, "ConfigMap").items()}
    settings = configmaps["gpujobs-settings"]["data"]
    variables = set(settings) | set(secret["stringData"])
    for deployment in deployments.values():
        variables |= {e["name"] for e in container(deployment).get("env", [])}
    unknown = {v for v in variables if v.startswith("GPUJOBS_")} - setting_names()
    assert not unknown, f"{sorted(unknown)}: no setting reads these (`gpujobs settings`)"

    # The catalog ConfigMap is mounted where GPUJOBS_MODEL_CATALOG points, in the API and every worker.
    catalog_dir, catalog_file = settings["GPUJOBS_MODEL_CATALOG"].rsplit("/", 1)
    for deployment in (api, gpu, cpu):
        mounts = {m["name"]: m["mountPath"] for m in container(deployment)["volumeMounts"]}
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        assert volumes["catalog"]["configMap"]["name"] in by_kind(rendered, "ConfigMap")
        assert mounts["catalog"] == catalog_dir
    from worker.models.catalog import builtin_entries, parse

    # The shipped catalog is the built-in one, written out for operators to edit: same names, same pins.
    catalog = parse(tomllib.loads(configmaps["gpujobs-catalog"]["data"][catalog_file]))
    assert catalog.entries == parse({"models": builtin_entries()}).entries

    (scaled,) = by_kind(rendered, "ScaledObject").values()
    assert scaled["spec"]["scaleTargetRef"]["name"] == "gpujobs-worker-gpu"
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metadata"]["ignoreNullValues"] == "false"


def test_documented_commands_name_what_the_files_define() -> None:
    """docs/deployment.md's commands cannot run here (no Docker engine, no cluster): each must at
    least name a file that exists and renders (checked above) and objects the overlay defines."""
    text = (ROOT / "docs" / "deployment.md").read_text()
    commands = [line for block in re.findall(r"```sh\n(.*?)```", text, re.DOTALL) for line in block.splitlines()]
    commands = [line for line in commands if line and not line.startswith("#")]
    assert any(line.startswith("docker compose -f deploy/compose.yaml up") for line in commands), commands
    (apply,) = [line for line in commands if line.startswith("kubectl apply -k ")]
    overlay = apply.removeprefix("kubectl apply -k deploy/k8s/")
    assert overlay in KUSTOMIZATIONS, apply
    objects = render(renderers()[0], overlay)
    for line in commands:
        for namespace, kind, name in re.findall(r"kubectl -n (\S+) .*?\b(job|deployment)/(\S+)", line):
            found = [o for o in objects if o["kind"].lower() == kind and o["metadata"]["name"] == name]
            assert found and found[0]["metadata"].get("namespace") == namespace, f"{line}: no {kind} {name}"
    for path in re.findall(r"\]\(\.\./(deploy/[^)#]+)\)", text):
        assert (ROOT / path).exists(), f"docs/deployment.md links to {path}, which does not exist"
    # The README's Deploy section repeats some of them: the same lines, so the checks above cover them.
    readme = (ROOT / "README.md").read_text()
    deploy = readme[readme.index("## Deploy\n") : readme.index("\n## ", readme.index("## Deploy\n"))]
    repeated = [line for block in re.findall(r"```sh\n(.*?)```", deploy, re.DOTALL) for line in block.splitlines()]
    assert repeated and all(line in commands for line in repeated if line and not line.startswith("#")), repeated


# --- Prometheus rules, dashboard, and a real Prometheus -------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_promtool_checks_and_unit_tests() -> None:
    promtool = tool("promtool", "prometheus")
    run([promtool, "check", "rules", "alerts.yml"], cwd=DEPLOY / "prometheus")
    run([promtool, "check", "config", "prometheus.yml"], cwd=DEPLOY / "prometheus")
    run([promtool, "test", "rules", "alerts-test.yml"], cwd=DEPLOY / "prometheus")
    tests = yaml.safe_load((DEPLOY / "prometheus" / "alerts-test.yml").read_text())["tests"]
    tested = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case["exp_alerts"]}
    untested = {rule["alert"] for rule in alert_rules()} - tested
    assert not untested, f"no promtool test sees these alerts fire: {sorted(untested)}"


def expressions() -> dict[str, str]:
    """Every PromQL expression shipped: the dashboard's panels, the alert rules, the KEDA trigger."""
    found = {}
    dashboard = json.loads((DEPLOY / "grafana" / "gpujobs.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found[f"dashboard {panel['title']!r} {target['refId']}"] = target["expr"]
    for rule in alert_rules():
        found[f"alert {rule['alert']}"] = rule["expr"]
    scaled = yaml.safe_load((DEPLOY / "k8s" / "base" / "scaledobject.yaml").read_text())
    found["KEDA trigger"] = scaled["spec"]["triggers"][0]["metadata"]["query"]
    return found


def test_dashboard_panels_are_complete() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "gpujobs.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"]), "panel ids repeat"
    (stalled,) = [p for p in panels if "gpujobs_queue_stalled" in p["targets"][0]["expr"]]
    steps = stalled["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert {"color": "red", "value": 1} in steps, "a stalled queue must show red"


class Prometheus:
    def __init__(self, url: str, api_metrics: str) -> None:
        self.url = url
        self.api_metrics = api_metrics  # the API's /metrics URL, which Prometheus scrapes

    def get(self, path: str, **params: str) -> Any:
        response = requests.get(f"{self.url}{path}", params=params, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", f"{path} {params}: {body}"
        return body["data"]

    def wait(self, what: str, check: Any, timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                found = check()
            except (requests.RequestException, AssertionError, ValueError):
                found = None
            if found:
                return found
            time.sleep(0.5)
        pytest.fail(f"Prometheus at {self.url}: {what} within {timeout:.0f} s")


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """Debian's prometheus on loopback, scraping a real API every second, with the alert rules loaded.

    The API has its own database and Redis, an S3 server, a worker for webhooks and maintenance
    only, and one diagnostic job queued on the gpu queue, which no worker serves (a stalled queue).
    """
    from gpujobs.harness.ports import free_port
    from gpujobs.harness.processes import start_process, stop_process
    from gpujobs.harness.servers import start_s3
    from tests.integration.private_api import private_api

    binary = tool("prometheus", "prometheus")
    root = tmp_path_factory.mktemp("prometheus")
    with start_s3(root / "s3") as s3:
        settings = {
            "GPUJOBS_S3_ENDPOINT_URL": s3.endpoint_url,
            "GPUJOBS_S3_ACCESS_KEY": s3.access_key,
            "GPUJOBS_S3_SECRET_KEY": s3.secret_key,
            "GPUJOBS_S3_BUCKET": "deploy-lint",
            "GPUJOBS_METRICS_TOKEN": METRICS_TOKEN,
            "GPUJOBS_MODEL_CATALOG": str(DEPLOY / "k8s" / "base" / "catalog.toml"),
        }
        with private_api(root / "api", settings) as api:
            api.stack.start_worker(queues="webhooks,maintenance", concurrency=1)
            admin = api.key("deploy-lint", "admin")
            submitted = requests.post(
                f"{api.base_url}/v1/jobs",
                json={"type": "diagnostic", "input": {}},
                headers={"Authorization": f"Bearer {admin.secret}"},
                timeout=10,
            )
            assert submitted.status_code == 202, submitted.text

            # The shipped configuration, pointed at this API, with its token, scraping every second.
            config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
            config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
            config["rule_files"] = [str(DEPLOY / "prometheus" / "alerts.yml")]
            # The API's own and cluster endpoints; the workers' job is left out (this worker serves no port).
            config["scrape_configs"] = [j for j in config["scrape_configs"] if j["job_name"] != "gpujobs-workers"]
            assert {j["metrics_path"] for j in config["scrape_configs"]} == {"/metrics", "/metrics/cluster"}
            for job in config["scrape_configs"]:
                job["static_configs"] = [{"targets": [api.base_url.removeprefix("http://")]}]
                job["authorization"] = {"credentials": METRICS_TOKEN}
            (root / "prometheus.yml").write_text(yaml.safe_dump(config))
            port = free_port()
            args = [
                binary,
                f"--config.file={root / 'prometheus.yml'}",
                f"--storage.tsdb.path={root / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ]
            process = start_process(args, root / "prometheus.log", cwd=root)
            try:
                server = Prometheus(f"http://127.0.0.1:{port}", f"{api.base_url}/metrics")
                server.wait("ready", lambda: requests.get(f"{server.url}/-/ready", timeout=2).ok)
                yield server
            finally:
                stop_process(process)


def test_real_prometheus_scrapes_the_api_and_evaluates_everything(prometheus: Prometheus) -> None:
    def scraped() -> bool:
        targets = prometheus.get("/api/v1/targets")["activeTargets"]
        assert targets and all(t["health"] == "up" for t in targets), targets
        return bool(prometheus.get("/api/v1/query", query="gpujobs_broker_up")["result"])

    prometheus.wait("the API scraped (with the metrics token)", scraped)
    for where, expr in expressions().items():
        response = requests.get(f"{prometheus.url}/api/v1/query", params={"query": expr}, timeout=10)
        assert response.status_code == 200, f"{where}: {expr}\n{response.text}"

    # One job queued on gpu, none running: the KEDA trigger asks for one step of work.
    keda = prometheus.get("/api/v1/query", query=expressions()["KEDA trigger"])["result"]
    assert [float(sample["value"][1]) for sample in keda] == [1.0]

    def evaluated() -> list[dict[str, Any]]:
        rules = [r for g in prometheus.get("/api/v1/rules")["groups"] for r in g["rules"]]
        assert rules and all(not r["lastEvaluation"].startswith("0001") for r in rules)
        return rules

    rules = prometheus.wait("every rule evaluated", evaluated)
    assert {r["name"] for r in rules} == {r["alert"] for r in alert_rules()}
    broken = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
    assert not broken, f"rules that do not evaluate: {broken}"


def test_every_metric_named_is_one_the_api_exports(prometheus: Prometheus) -> None:
    """A misspelt metric evaluates fine to nothing: each name used must be one the API or a worker declares
    (a labelled family's series exist only once used, so its ``# TYPE`` line is what counts)."""
    from prometheus_client import REGISTRY, generate_latest

    from worker import metrics, nvml  # noqa: F401  (declares the workers' families in this process)

    headers = {"Authorization": f"Bearer {METRICS_TOKEN}"}
    text = "".join(
        requests.get(f"{prometheus.api_metrics}{path}", headers=headers, timeout=10).text for path in ("", "/cluster")
    )
    text += generate_latest(REGISTRY).decode()  # what a worker's own /metrics declares
    families = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))
    families |= dict.fromkeys(nvml.FAMILIES, "gauge")  # a GPU worker's only
    exported = set(families)
    for name, kind in families.items():
        if kind == "histogram":
            exported |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
    for where, expr in expressions().items():
        names = set(re.findall(r"\bgpujobs_[a-z_]+", expr))
        assert names <= exported, f"{where} names {sorted(names - exported)}, which the API does not export"


def test_stalled_gpu_queue_raises_its_alert(prometheus: Prometheus) -> None:
    """The gpu queue has a job and no consumer: its alert is pending (firing after 2 minutes);
    the webhooks and maintenance queues have their worker and raise none."""

    def stalled() -> list[dict[str, str]]:
        alerts = prometheus.get("/api/v1/alerts")["alerts"]
        return [a["labels"] for a in alerts if a["labels"]["alertname"] == "GpujobsQueueStalled"]

    labels = prometheus.wait("GpujobsQueueStalled for the gpu queue", stalled)
    assert [label["queue"] for label in labels] == ["gpu"], labels
    query = urllib.parse.quote('max by (queue) (gpujobs_queue_consumers{queue=~"webhooks|maintenance"})')
    consumers = requests.get(f"{prometheus.url}/api/v1/query?query={query}", timeout=10).json()["data"]["result"]
    assert {s["metric"]["queue"]: float(s["value"][1]) for s in consumers} == {"webhooks": 1.0, "maintenance": 1.0}
