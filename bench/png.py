"""A job's PNG, the way the worker writes it (worker/png.py) against Pillow at its fastest level
(what it wrote until 2026-12-05), side by side on this machine's CPU: milliseconds (median)
and the file's size, at SD 1.5's and SDXL's sides, for a smooth picture (gradients and grain,
compressing as photographs do) and for noise (what random-weight benchmark models draw).

    python3 -m bench.png [--repeats 15]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import time
from collections.abc import Callable
from functools import partial

import numpy as np
from PIL import Image

from worker import png

TEXT = {"parameters": "a fox in the snow\nSteps: 25, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 1"}


def pictures(side: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(side)
    y, x = np.mgrid[0:side, 0:side]
    base = np.stack([x * 255 // (side - 1), y * 255 // (side - 1), (x + y) * 127 // (2 * side)], -1)
    smooth = np.clip(base + rng.integers(-6, 7, base.shape), 0, 255).astype(np.uint8)
    return {"smooth": smooth, "noise": rng.integers(0, 256, (side, side, 3), dtype=np.uint8)}


def pillow(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", compress_level=1)  # the worker's until now
    return out.getvalue()


def timed(encode: Callable[[], bytes], repeats: int) -> tuple[float, int]:
    times, size = [], 0
    for _ in range(repeats):
        started = time.perf_counter()
        size = len(encode())
        times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times), size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else "")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs\n")
    print("| picture | Pillow, level 1: ms / KiB | worker/png.py: ms / KiB | time, ours / Pillow |")
    print("|---|---|---|---|")
    for side in (512, 1024):
        for name, pixels in pictures(side).items():
            theirs = timed(partial(pillow, pixels), args.repeats)
            ours = timed(partial(png.encode, pixels, TEXT), args.repeats)
            print(f"| {side}x{side} {name} | {theirs[0]:.1f} / {theirs[1] // 1024} |"
                  f" {ours[0]:.1f} / {ours[1] // 1024} | {ours[0] / theirs[0]:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
