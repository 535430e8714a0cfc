"""deploy/docker/apt_mirror.py: the mirror base.sh hands to debootstrap, read from apt's own sources.

The host names below are placeholders of the reserved ``.example`` domain, not mirrors.
"""

from __future__ import annotations

from pathlib import Path

from tests.deploy.scripts import load

apt_mirror = load("apt_mirror")

DEB822 = """\
Types: deb
# a comment line
URIs: http://archive.example/debian-security
Suites: bookworm-security
Components: main

Types: deb-src
URIs: http://source.example/debian
Suites: bookworm

Enabled: no
Types: deb
URIs: http://disabled.example/debian
Suites: bookworm

Types: deb
URIs: http://mirror.example/debian/
Suites: bookworm bookworm-updates
Components: main
"""


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


def test_deb822_sources_skip_security_source_and_disabled_stanzas(tmp_path: Path) -> None:
    paths = [write(tmp_path, "debian.sources", DEB822)]
    assert apt_mirror.mirror("bookworm", paths) == "http://mirror.example/debian"


def test_one_line_sources_with_options_and_comments(tmp_path: Path) -> None:
    text = (
        "# deb http://commented.example/debian bookworm main\n"
        "deb [signed-by=/k.gpg arch=amd64] http://security.example/debian-security bookworm-security main\n"
        "deb-src http://source.example/debian bookworm main\n"
        "deb [arch=amd64] https://line.example/debian bookworm main contrib\n"
    )
    assert apt_mirror.mirror("bookworm", [write(tmp_path, "sources.list", text)]) == "https://line.example/debian"


def test_a_source_of_the_suite_wins_over_an_earlier_one_of_another(tmp_path: Path) -> None:
    other = write(tmp_path, "a.list", "deb http://trixie.example/debian trixie main\n")
    ours = write(tmp_path, "b.list", "deb http://bookworm.example/debian bookworm main\n")
    assert apt_mirror.mirror("bookworm", [other, ours]) == "http://bookworm.example/debian"
    assert apt_mirror.mirror("bullseye", [other, ours]) == "http://trixie.example/debian"  # no exact match


def test_no_usable_source_is_none(tmp_path: Path) -> None:
    only = write(tmp_path, "x.list", "deb file:/srv/repo bookworm main\ndeb http://security.example/x bookworm main\n")
    assert apt_mirror.mirror("bookworm", [only, tmp_path / "missing.sources"]) is None


def test_default_paths_read_the_machines_apt_folder(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    write(tmp_path / "sources.list.d", "debian.sources", DEB822)
    write(tmp_path / "sources.list.d", "extra.list", "deb http://extra.example/debian bookworm main\n")
    paths = apt_mirror.default_paths(tmp_path)
    assert [path.name for path in paths] == ["debian.sources", "sources.list", "extra.list"]
    assert apt_mirror.mirror("bookworm", paths) == "http://mirror.example/debian"
