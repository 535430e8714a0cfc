"""What a wheelhouse lacks for the interpreter of the image (deploy/docker/build.sh).

pip resolves on the host with the host's environment markers, and the image's Python may differ: the
bookworm base has Python 3.11.2, and ``redis`` needs ``async-timeout`` below 3.11.3 only, so a host on
3.11.7 leaves it out and the offline image build then fails. This walks the requirements of ROOT (wheels
in DIR, with extras) under the image's marker environment and prints each requirement that no wheel of
DIR meets, one a line; build.sh fetches those on the host and asks again until nothing is printed.

    python wheelhouse.py DIR MARKERS_JSON 'gpujobs[worker]' 'torch==2.13.0'

MARKERS_JSON: the image Python's marker environment, printed by ``python3 -c "$(wheelhouse.py --probe)"``
in a container of the base image (standard library only).
"""

from __future__ import annotations

import json
import sys
import zipfile
from email.parser import HeaderParser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

# Run by the image's python3 (no packaging there): PEP 508's environment, as packaging computes it.
PROBE = """
import json, os, platform, sys
info = sys.implementation.version
version = f"{info.major}.{info.minor}.{info.micro}"
if info.releaselevel != "final":
    version += info.releaselevel[0] + str(info.serial)
print(json.dumps({
    "implementation_name": sys.implementation.name, "implementation_version": version,
    "os_name": os.name, "platform_machine": platform.machine(), "platform_release": platform.release(),
    "platform_system": platform.system(), "platform_version": platform.version(),
    "python_full_version": platform.python_version(),
    "platform_python_implementation": platform.python_implementation(),
    "python_version": ".".join(platform.python_version_tuple()[:2]), "sys_platform": sys.platform,
}))
"""


def wheels(folder: Path) -> dict[str, tuple[Version, Path]]:
    found = {}
    for path in folder.glob("*.whl"):
        name, version, _, _ = parse_wheel_filename(path.name)
        found[canonicalize_name(name)] = (version, path)
    return found


def requires(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(name for name in archive.namelist() if name.endswith(".dist-info/METADATA"))
        headers = HeaderParser().parsestr(archive.read(metadata).decode())
    return [Requirement(line) for line in headers.get_all("Requires-Dist") or []]


def missing(folder: Path, environment: dict[str, str], roots: list[str]) -> list[str]:
    """Requirements reachable from ``roots`` under ``environment`` that no wheel of ``folder`` meets."""
    have = wheels(folder)
    lacking: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [Requirement(root) for root in roots]
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        found = have.get(name)
        if found is None or not requirement.specifier.contains(found[0], prereleases=True):
            lacking.setdefault(name, f"{requirement.name}{requirement.specifier}")
            continue
        key = (name, frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        for dependency in requires(found[1]):
            wanted = dependency.marker is None or any(
                dependency.marker.evaluate({**environment, "extra": extra}) for extra in ("", *requirement.extras)
            )
            if wanted:
                todo.append(dependency)
    return sorted(lacking.values())


def main(argv: list[str]) -> int:
    if argv[1:] == ["--probe"]:
        print(PROBE)
        return 0
    folder, environment, roots = Path(argv[1]), json.loads(argv[2]), argv[3:]
    for line in missing(folder, environment, roots):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
