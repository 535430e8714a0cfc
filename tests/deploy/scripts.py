"""The Python scripts of deploy/docker, imported by the tests as modules (they are not a package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

DEPLOY_DOCKER = Path(__file__).resolve().parents[2] / "deploy" / "docker"


def load(name: str) -> ModuleType:
    """``deploy/docker/<name>.py`` as the module ``name``."""
    spec = importlib.util.spec_from_file_location(name, DEPLOY_DOCKER / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and the like look their module up there
    spec.loader.exec_module(module)
    return module
