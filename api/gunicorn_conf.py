"""gunicorn settings that ``gpujobs api`` loads (``-c python:api.gunicorn_conf``): server hooks only.

A worker process that exits leaves its metric files in ``PROMETHEUS_MULTIPROC_DIR``: its counters stay
in the sum (they counted real requests), and its live gauges are dropped here, as prometheus_client's
multiprocess mode asks (``api.instruments``).
"""

from __future__ import annotations

import os
from typing import Any


def child_exit(server: Any, worker: Any) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]
