"""Warm at start (worker/warm.py): the sizes an operator may list, and where torch.compile's caches go."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from db.settings import Settings
from worker.warm import CACHE_VARIABLES, configure_compile_cache


@pytest.mark.parametrize("sizes", [["512x512", "768x512"], [], ["64x4096"]])
def test_warm_sizes_are_width_x_height_multiples_of_8(sizes: list[str]) -> None:
    assert Settings(warm_sizes=sizes).warm_sizes == sizes


@pytest.mark.parametrize("size", ["512", "512X512", "500x512", "32x32", "8192x512", "512x512x2", " 512x512", "-8x64"])
def test_a_malformed_warm_size_is_refused_with_its_spelling(size: str) -> None:
    with pytest.raises(ValidationError, match="WIDTHxHEIGHT"):
        Settings(warm_sizes=[size])


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The Inductor variables unset here, and put back as they were afterwards (the function writes them)."""
    for name in ("TORCHINDUCTOR_CACHE_DIR", *CACHE_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_the_compile_cache_defaults_to_the_model_cache_volume(clean_environment, tmp_path: Path) -> None:
    folder = configure_compile_cache(Settings(model_dir=tmp_path / "models"))
    assert folder == tmp_path / "models" / "torch-compile" and folder.is_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder)
    assert all(os.environ[name] == value for name, value in CACHE_VARIABLES.items())
    assert configure_compile_cache(Settings(var_dir=tmp_path)) == tmp_path / "models" / "torch-compile"


def test_the_operators_choice_wins_the_setting_first(clean_environment, tmp_path: Path) -> None:
    clean_environment.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "theirs"))
    clean_environment.setenv("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
    assert configure_compile_cache(Settings(model_dir=tmp_path / "models")) == tmp_path / "theirs"
    assert os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "0", "an operator's switch is left alone"
    chosen = configure_compile_cache(Settings(compile_cache_dir=tmp_path / "setting"))
    assert chosen == tmp_path / "setting" and os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(chosen)
