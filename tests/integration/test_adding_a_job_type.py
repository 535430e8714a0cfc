"""A job type added as docs/adding-a-job-type.md says, run end to end: one package and one registry line.

The toy ``invert`` type (``tests/integration/toyjob/``) brings a model kind of its own (``inverter``),
with a loader and a demo builder. With ``GPUJOBS_JOB_REGISTRY`` naming the toy registry, a real API
process validates, documents and lists it, and a real worker loads its model through the model cache
and runs it; nothing outside the toy package changed for it.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image

from gpujobs.harness.processes import Stack
from tests.integration.client import auth
from tests.integration.conftest import ROOT

TOY_REGISTRY = "tests.integration.toyjob.registry:JOB_TYPES"


@pytest.fixture(scope="module")
def toy_stack(cluster: Any, demo_catalog: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """An API process and a gpu worker serving the toy registry, with the demo inverter in their catalog
    (the session's gpu worker, which knows no ``invert`` jobs, is stopped)."""
    from tests.integration.conftest import quiesce
    from tests.integration.toyjob.demo import build

    cluster.stop_gpu_worker()
    folder = tmp_path_factory.mktemp("toy-models")
    entry = build(folder)["demo-inverter"]
    catalog = folder / "catalog.toml"
    toy = f'\n[models.demo-inverter]\nkind = "inverter"\nsource = "{entry["source"]}"\ndefault = true\n'
    catalog.write_text(demo_catalog.read_text() + toy)
    env = {
        **os.environ,
        "GPUJOBS_JOB_REGISTRY": TOY_REGISTRY,
        "GPUJOBS_MODEL_CATALOG": str(catalog),
        # The toy package must be importable by the processes, as a deployer's own package is installed.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    stack = Stack(env, tmp_path_factory.mktemp("toy-logs"), label="toy")
    try:
        stack.start_worker("gpu", concurrency=1)
        _, base_url = stack.start_api()
        yield base_url
    finally:
        quiesce()
        stack.stop_all()


def _upload(base_url: str, key: str, pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    files = {"file": ("toy.png", buffer.getvalue(), "image/png")}
    response = requests.post(f"{base_url}/v1/files", headers=auth(key), files=files, timeout=10)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def test_a_job_type_from_one_package_runs_end_to_end(toy_stack: str, keys: Any) -> None:
    base_url, key = toy_stack, keys.user_a.secret

    # The API knows the type: it is documented, its model kind's models are listed, bad input is a 422.
    spec = requests.get(f"{base_url}/openapi.json", timeout=10).json()
    schemas = spec["components"]["schemas"]
    assert {"invertInput", "invertOutput", "invertJob", "invertJobCreate"} <= set(schemas)
    assert "invertJobCreate" in str(schemas["JobCreate"]) and "JobCreate" in str(spec["paths"]["/v1/jobs"]["post"])
    models = requests.get(f"{base_url}/v1/models?kind=base", headers=auth(key), timeout=10).json()["items"]
    assert {"id": "demo-inverter", "task": "inverter"}.items() <= next(
        m for m in models if m["id"] == "demo-inverter"
    ).items()
    bad = requests.post(
        f"{base_url}/v1/jobs", headers=auth(key), json={"type": "invert", "input": {"strength": 2}}, timeout=10
    )
    assert bad.status_code == 422
    assert {tuple(e["loc"]) for e in bad.json()["errors"]} == {
        ("body", "input", "image"),
        ("body", "input", "strength"),
    }

    # A real worker runs it: the model loads through the cache, the output is exact.
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
    body = {"type": "invert", "input": {"image": _upload(base_url, key, pixels)}}
    response = requests.post(f"{base_url}/v1/jobs", headers={**auth(key), "Prefer": "wait=30"}, json=body, timeout=40)
    assert response.status_code == 202, response.text
    job = response.json()
    deadline = time.monotonic() + 30
    while job["status"] in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.2)
        job = requests.get(f"{base_url}/v1/jobs/{job['id']}", headers=auth(key), timeout=10).json()
    assert job["status"] == "succeeded", job
    assert (job["output"]["width"], job["output"]["height"]) == (32, 24)
    png = requests.get(job["output"]["image"]["url"], timeout=10).content
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), 255 - pixels)
