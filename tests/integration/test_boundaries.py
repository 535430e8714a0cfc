"""`import api` (and building the app) never imports torch, transformers or diffusers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from tests.integration.conftest import ROOT

HEAVY = ("torch", "transformers", "diffusers")

# Records every attempt to import a heavy package, even one that fails (they may not be installed
# here) or that a `try: import torch except ImportError` would hide.
PROBE = textwrap.dedent(
    """
    import json, sys

    HEAVY = {heavy!r}
    attempts = []

    class Recorder:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in HEAVY:
                attempts.append(name)
            return None

    sys.meta_path.insert(0, Recorder())
    {statements}
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
    print(json.dumps({{"attempts": attempts, "loaded": loaded}}))
    """
)


def _probe(statements: str) -> dict:
    code = PROBE.format(heavy=HEAVY, statements=statements)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=dict(os.environ), timeout=120
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_probe_sees_a_heavy_import():
    # The recorder works: an attempted import is seen even when the package is missing.
    found = _probe("try:\n    import torch\nexcept ImportError:\n    pass")
    assert found["attempts"][:1] == ["torch"]


def test_import_api_and_create_app_import_no_model_library(services):
    found = _probe("import api\napi.create_app()\nimport api.wsgi\nimport worker.jobs")
    assert found == {"attempts": [], "loaded": []}
