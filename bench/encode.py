"""What encoding a generated image costs per ``output_format``: the work a generation job does after it
gives the model's lock back (``worker.jobs.diffusion.run.encode_image``, with its parameters' metadata).

Run from the repository root::

    . .venv/bin/activate && python -m bench.encode                 # 512×512, 15 samples
    . .venv/bin/activate && python -m bench.encode --size 1024

Two pictures of ``--size``: **noise-like** (what the random-weight benchmark models decode to: the
worst case for every codec) and **photo-like** (smooth gradients, shapes and a little grain, blurred:
closer to what a trained model makes). For each format (PNG at zlib level 1, WebP and JPEG at
``--quality``): the median time of one encode, the bytes, and a batch of 4 encoded side by side in
threads as a job of ``num_outputs`` 4 does (the codecs let go of the GIL, so the threads use the
free cores; on a loaded machine they only queue).

This measures the encode only, on the CPU. What overlapping it with the next job's denoising saves
is the encode time itself, on a GPU worker whose CPU is idle while the device denoises; on a
CPU-only worker the denoising and the encode compete for the same cores, so the overlap saves
nothing measurable there (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.lib.report import log, machine, write_json
from bench.lib.stats import median

FORMATS = ("png", "webp", "jpeg")
BATCH = 4


def pictures(size: int) -> dict[str, Any]:
    """Float pixels in [0, 1], (size, size, 3): noise-like and photo-like."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(0)
    noise = rng.random((size, size, 3), dtype=np.float32)
    x = np.linspace(0, 1, size, dtype=np.float32)
    base = np.stack([np.outer(x, 1 - x), np.outer(1 - x, x), np.outer(x, x) ** 0.5], axis=-1)
    image = Image.fromarray((base * 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = (int(v) for v in rng.integers(0, size, 2))
        r = int(rng.integers(size // 16, size // 4))
        draw.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    smooth = np.asarray(image.filter(ImageFilter.GaussianBlur(size / 128)), dtype=np.float32) / 255
    photo = np.clip(smooth + rng.normal(0, 0.015, smooth.shape).astype(np.float32), 0, 1)
    return {"noise-like": noise, "photo-like": photo}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=512, help="image side (default 512)")
    parser.add_argument("--samples", type=int, default=15, help="encodes timed per picture and format (default 15)")
    parser.add_argument("--quality", type=int, default=90, help="WebP and JPEG quality (default 90, the job's)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)

    import PIL

    from worker.jobs.diffusion.run import encode_image

    parameters = {"type": "text_to_image", "prompt": "a lighthouse on a cliff at dusk, oil painting", "seed": 1}
    load_before = os.getloadavg()[0]
    rows = []
    for picture, pixels in pictures(args.size).items():
        for output_format in FORMATS:

            def encode(_: Any = None, pixels: Any = pixels, output_format: str = output_format) -> bytes:
                return encode_image(pixels, parameters, output_format, args.quality)

            data = encode()  # warm-up
            single = []
            for _ in range(args.samples):
                started = time.perf_counter()
                encode()
                single.append(time.perf_counter() - started)
            batch = []
            with ThreadPoolExecutor(max_workers=BATCH) as pool:
                for _ in range(max(3, args.samples // 3)):
                    started = time.perf_counter()
                    list(pool.map(encode, range(BATCH)))
                    batch.append(time.perf_counter() - started)
            row = {
                "picture": picture,
                "format": output_format,
                "encode_ms": round(median(single) * 1000, 1),
                "batch_of_4_ms": round(median(batch) * 1000, 1),
                "bytes": len(data),
            }
            log(json.dumps(row))
            rows.append(row)
    results = {
        "size": args.size,
        "quality": args.quality,
        "samples": args.samples,
        "machine": f"{machine()}, Pillow {PIL.__version__}",
        "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "rows": rows,
    }
    print(f"\n{args.size}×{args.size}, WebP/JPEG quality {args.quality}, PNG zlib level 1; {results['machine']}")
    print(f"load average (1 min) {results['load_average_1m'][0]} → {results['load_average_1m'][1]}\n")
    print("| picture | format | one encode | 4 in threads | bytes |")
    print("|---|---|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['picture']} | {row['format']} | {row['encode_ms']} ms | {row['batch_of_4_ms']} ms "
            f"| {row['bytes']:,} |"
        )
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
