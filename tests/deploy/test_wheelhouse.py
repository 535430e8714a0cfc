"""deploy/docker/wheelhouse.py: what a wheelhouse resolved on the host lacks for the image's Python."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.deploy.scripts import load

wheelhouse = load("wheelhouse")


def wheel(folder: Path, name: str, version: str, *requires: str) -> None:
    """A minimal wheel: only what the walk reads (its file name and its METADATA's Requires-Dist)."""
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as archive:
        lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
        lines += [f"Requires-Dist: {requirement}" for requirement in requires]
        archive.writestr(f"{name}-{version}.dist-info/METADATA", "\n".join(lines) + "\n")


def environment(python: str) -> dict[str, str]:
    probed: dict[str, str] = json.loads(subprocess.check_output([sys.executable, "-c", wheelhouse.PROBE], text=True))
    return {**probed, "python_full_version": python, "python_version": python.rsplit(".", 1)[0]}


def test_a_marker_of_the_images_python_adds_what_the_host_left_out(tmp_path: Path) -> None:
    wheel(tmp_path, "app", "1.0", "client>=5", "gunicorn; extra == 'api'", "torch; extra == 'worker'")
    wheel(tmp_path, "client", "8.1", 'async_timeout>=4.0.3; python_full_version < "3.11.3"')
    wheel(tmp_path, "gunicorn", "27.0")
    assert wheelhouse.missing(tmp_path, environment("3.11.7"), ["app[api]"]) == []
    assert wheelhouse.missing(tmp_path, environment("3.11.2"), ["app[api]"]) == ["async_timeout>=4.0.3"]
    assert wheelhouse.missing(tmp_path, environment("3.11.7"), ["app[worker]"]) == ["torch"]
    wheel(tmp_path, "async_timeout", "5.0.1")
    assert wheelhouse.missing(tmp_path, environment("3.11.2"), ["app[api]"]) == []


def test_a_wheel_of_another_version_does_not_count(tmp_path: Path) -> None:
    wheel(tmp_path, "app", "1.0", "client>=9")
    wheel(tmp_path, "client", "8.1")
    assert wheelhouse.missing(tmp_path, environment("3.11.7"), ["app"]) == ["client>=9"]
    wheel(tmp_path, "torch", "2.13.0+cpu")
    assert wheelhouse.missing(tmp_path, environment("3.11.7"), ["torch==2.13.0"]) == []  # a local build meets it


def test_the_probe_prints_the_marker_environment_with_the_standard_library_only() -> None:
    probed = json.loads(subprocess.check_output([sys.executable, "-I", "-S", "-c", wheelhouse.PROBE], text=True))
    assert probed["python_full_version"] == ".".join(map(str, sys.version_info[:3]))
    assert probed["sys_platform"] == sys.platform and probed["implementation_name"] == "cpython"
