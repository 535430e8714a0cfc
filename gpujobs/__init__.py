"""gpujobs: a self-hosted service that runs computer-vision jobs on GPU workers.

This package holds the command line (``gpujobs``), the supervisor behind
``gpujobs up`` and the embedded Redis and S3 servers it starts. The service
itself lives in ``api/`` (HTTP), ``worker/`` (jobs) and ``db/`` (state).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gpujobs")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0+unknown"
