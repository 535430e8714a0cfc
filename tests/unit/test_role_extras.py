"""Each command names the extra it needs when this install lacks it (pyproject.toml's role extras)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import click
import pytest

from gpujobs import cli

ROOT = Path(__file__).resolve().parents[2]


def test_a_missing_module_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(cli.ROLE_EXTRAS, "worker", ("worker", ("torch", "gpujobs-no-such-distribution")))
    with pytest.raises(click.ClickException) as raised:
        cli._require_role("worker")
    assert raised.value.message == (
        "`gpujobs worker` needs gpujobs-no-such-distribution, which this install lacks: pip install 'gpujobs[worker]'"
    )


def test_this_install_has_every_role() -> None:
    for command in cli.ROLE_EXTRAS:
        cli._require_role(command)  # `make install` installs gpujobs[all]: raises if a role is missing


def test_the_base_install_and_the_api_extra_pull_no_ml_stack() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    heavy = {"torch", "transformers", "diffusers", "accelerate", "peft", "numpy", "scipy"}

    def names(requirements: list[str]) -> set[str]:
        return {r.split(">")[0].split("=")[0].split("[")[0].strip().lower() for r in requirements}

    assert not names(project["dependencies"]) & heavy
    assert not names(project["optional-dependencies"]["api"]) & heavy
    assert heavy - {"numpy", "scipy"} <= names(project["optional-dependencies"]["worker"])
    assert project["optional-dependencies"]["all"] == ["gpujobs[api,worker,embedded,otel]"]
    # Every distribution a role checks for comes from its extra (or the base install).
    extras = project["optional-dependencies"]
    for command, (extra, _) in cli.ROLE_EXTRAS.items():
        assert extra in extras, command
