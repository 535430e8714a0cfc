"""gpujobs: a self-hosted service that runs computer-vision jobs on GPU workers.

This package holds the command line (``gpujobs``), ``gpujobs up`` and the harness
that starts a stack on one machine (for ``up``, the tests and the benchmarks). The
service itself lives in ``api/`` (HTTP), ``worker/`` (jobs) and ``db/`` (state).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gpujobs")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0+unknown"
