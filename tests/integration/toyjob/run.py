"""``invert``: read the image, run the inverter, store the PNG."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from tests.integration.toyjob.model import invert
from tests.integration.toyjob.spec import INVERTER, Input, Output
from worker.context import JobContext
from worker.models.cache import get_cache


def run(ctx: JobContext, params: Input) -> Output:
    ctx.progress(0, 2, "loading model")
    conv = get_cache().load(INVERTER, params.model)
    image = Image.open(io.BytesIO(ctx.input_file(params.image))).convert("RGB")
    ctx.check()
    ctx.progress(1, 2, "inverting")
    pixels = invert(conv, np.asarray(image), params.strength)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    ctx.progress(2, 2, "storing")
    artifact = ctx.store("inverted.png", buffer.getvalue(), "image/png")
    return Output(width=image.width, height=image.height, image=artifact)
