"""CPU seconds (user + system) of the processes a benchmark involves, by role, so that a phase's cost is
split between the client, the servers and the services they share."""

from __future__ import annotations

import contextlib

import psutil


class CpuMeter:
    """This process (``client``), the process trees given a role (an API server's master and its workers,
    a worker, an embedded server), and the machine's PostgreSQL and Redis server processes."""

    def __init__(self, database_name: str | None = None) -> None:
        self.roles: dict[int, str] = {}  # the pid at the root of a tree -> its role
        self.database_name = database_name  # PostgreSQL backends of other databases are not ours

    def add(self, pid: int, role: str) -> None:
        self.roles[pid] = role

    def snapshot(self) -> dict[str, float]:
        totals: dict[str, float] = {}

        def count(role: str, process: psutil.Process) -> None:
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                totals[role] = totals.get(role, 0.0) + times.user + times.system

        me = psutil.Process()
        count("client", me)
        counted = {me.pid}
        for pid, role in self.roles.items():
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(pid)
                for process in [root, *root.children(recursive=True)]:
                    counted.add(process.pid)
                    count(role, process)
        for process in psutil.process_iter(["name", "cmdline"]):
            if process.pid in counted:
                continue
            if process.info["name"] == "postgres" and self._ours(" ".join(process.info["cmdline"] or [])):
                count("postgres", process)
            elif process.info["name"] == "redis-server":
                count("redis", process)
        return totals

    def _ours(self, cmdline: str) -> bool:
        """Backends of our database, and the shared background processes (WAL writer, ...)."""
        if self.database_name is None or self.database_name in cmdline:
            return True
        # Background processes carry no database name; client backends carry "user db host(port)".
        return "(" not in cmdline and "postgres:" in cmdline

    @staticmethod
    def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        roles = sorted(set(before) | set(after))
        return {r: max(0.0, after.get(r, 0.0) - before.get(r, 0.0)) for r in roles}
