"""Print the Debian mirror that this machine's apt sources use for a suite (deploy/docker/base.sh).

    python3 deploy/docker/apt_mirror.py bookworm

Read at run time, so that the repository names no mirror: deb822 ``*.sources`` files first, then
one-line ``sources.list`` / ``*.list`` files. A source of the suite itself is preferred; a security
or updates archive is not a full mirror and is never chosen. Standard library only: it runs with the
machine's python3, before any venv exists.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from pathlib import Path

APT = Path("/etc/apt")


def default_paths(apt: Path = APT) -> list[Path]:
    return [
        *sorted((apt / "sources.list.d").glob("*.sources")),
        apt / "sources.list",
        *sorted((apt / "sources.list.d").glob("*.list")),
    ]


def sources(paths: Iterable[Path]) -> list[tuple[str, list[str]]]:
    """Every enabled ``deb`` source in ``paths``, in order: (URI, suites)."""
    found: list[tuple[str, list[str]]] = []
    for path in paths:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, list[str]] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or line[:1].isspace() or ":" not in line:
                        continue
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.split()
                if fields.get("enabled", ["yes"])[0].lower() == "no" or "deb" not in fields.get("types", []):
                    continue
                found += [(uri, fields.get("suites", [])) for uri in fields.get("uris", [])]
        else:
            for line in text.splitlines():
                words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb":
                    found.append((words[1], [words[2]]))
    return found


def mirror(suite: str, paths: Iterable[Path]) -> str | None:
    """The first HTTP(S) source serving ``suite`` itself, else the first that is not a security archive."""
    usable = [(uri.rstrip("/"), suites) for uri, suites in sources(paths) if uri.startswith(("http://", "https://"))]
    usable = [(uri, suites) for uri, suites in usable if "security" not in uri]
    for uri, suites in usable:
        if suite in suites:
            return uri
    return usable[0][0] if usable else None


def main(argv: list[str]) -> int:
    suite = argv[1] if len(argv) > 1 else "bookworm"
    found = mirror(suite, default_paths())
    if found is None:
        print(f"apt_mirror.py: no Debian mirror in this machine's apt sources ({APT})", file=sys.stderr)
        return 1
    print(found)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
