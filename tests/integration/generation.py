"""Calls the generation and fine-tuning tests share: test pictures, uploads, jobs run to an end, their PNGs.

The jobs go through the API (Flask's test client) to a real worker; ``worker_models`` reads what a
worker's heartbeat says it holds.
"""

from __future__ import annotations

import io
import json
import time
from typing import Any

import numpy as np
import requests

from tests.integration.client import submit, upload, wait_for

JOB_TIMEOUT = 120.0


def picture(width: int, height: int, base: tuple[int, int, int] = (120, 120, 120), seed: int = 0) -> bytes:
    """A PNG of ``base`` colour with coloured noise and a few shapes."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(base) + rng.normal(0, 25, (height, width, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
        draw.rectangle((x0, y0, x0 + width // 4, y0 + height // 4), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return png(image)


def png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def mask_png(width: int, height: int, box: tuple[int, int, int, int]) -> bytes:
    from PIL import Image

    pixels = np.zeros((height, width), np.uint8)
    x0, y0, x1, y1 = box
    pixels[y0:y1, x0:x1] = 255
    return png(Image.fromarray(pixels))


def uploaded(client: Any, key: str, data: bytes, **form: str) -> str:
    response = upload(client, key, data, **form)
    assert response.status_code == 201, response.get_data(as_text=True)
    return response.get_json()["id"]


def run_job(client: Any, key: str, job_type: str, status: str = "succeeded", **params: Any) -> dict[str, Any]:
    response = submit(client, key, {"type": job_type, "input": params})
    assert response.status_code == 202, response.get_data(as_text=True)
    job = wait_for(client, key, response.get_json()["id"], timeout=JOB_TIMEOUT)
    assert job["status"] == status, job
    return job


def fetch(artifact: dict[str, Any]) -> bytes:
    """An output's bytes, through its presigned URL (checked against the artifact's size and sha256)."""
    import hashlib

    response = requests.get(artifact["url"], timeout=10)
    assert response.status_code == 200
    assert hashlib.sha256(response.content).hexdigest() == artifact["sha256"]
    assert len(response.content) == artifact["size"]
    assert response.headers["Content-Type"] == artifact["content_type"]
    return response.content


def download(artifact: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """An output PNG's pixels and its `parameters` text chunk."""
    from PIL import Image

    with Image.open(io.BytesIO(fetch(artifact))) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        return np.asarray(image), json.loads(image.text["parameters"])


def pixels_of(job: dict[str, Any]) -> list[np.ndarray]:
    return [download(artifact)[0] for artifact in job["output"]["images"]]


def worker_models(node: str) -> dict[str, Any]:
    from sqlalchemy import select

    from db.models import WorkerProcess
    from db.session import session_scope

    with session_scope() as session:
        rows = session.scalars(select(WorkerProcess).where(WorkerProcess.id.like(f"{node}@%"))).all()
        return rows[-1].models if rows else {}


def wait_models(node: str, until: Any, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    models = worker_models(node)
    while not until(models):
        if time.monotonic() > deadline:
            raise AssertionError(f"the heartbeat of {node} never showed what was expected: {models}")
        time.sleep(0.2)
        models = worker_models(node)
    return models
