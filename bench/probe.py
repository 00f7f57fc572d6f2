"""Probes behind the choices in BENCHMARKS.md: which attention kernel, cuDNN autotuning,
GEMM autotuning, and where batch-dependence of a seed's pixels comes from.

    python -m bench.probe --out DIR     (SD1.5-sized random weights, one GPU, 512x512)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.bench import DEVICE, HEIGHT, WIDTH, specs, unet_step_ms
from worker.engine import BatchShape, Engine, ImageSpec, Tuning
from worker.tiny import build_tiny_model

BATCH = 32  # images: 64 UNet rows with CFG


def dependence(engine: Engine) -> dict[str, int]:
    """Max pixel difference of one image: same batch twice; other company in the same bucket."""
    me = ImageSpec("probe", "", 7.5, 7)
    shape = BatchShape(WIDTH, HEIGHT, 10, "dpmpp_2m")

    def image(company: list[ImageSpec]) -> np.ndarray:
        out = engine.generate([me, *company], shape)
        assert out is not None and out[0] is not None
        return out[0].astype(int)

    first, again, other = image(specs(7, 50)), image(specs(7, 50)), image(specs(7, 80))
    return {
        "same_batch_twice": int(np.abs(first - again).max()),
        "other_company_same_bucket": int(np.abs(first - other).max()),
    }


def autotuned(model: str, timeout_s: int) -> dict[str, Any]:
    """max-autotune (no CUDA graphs) at one static batch, in a process of its own: compile time
    and step time."""
    code = (
        "import json, time, torch\n"
        "from bench.bench import unet_step_ms\n"
        "from worker.engine import Engine, Tuning\n"
        f"tuning = Tuning(max_batch={BATCH}, fuse=True, compile=True,"
        " compile_mode='max-autotune-no-cudagraphs')\n"
        f"engine = Engine({model!r}, torch.device('cuda'), tuning)\n"
        "started = time.perf_counter()\n"
        f"ms = unet_step_ms(engine, {BATCH})\n"
        "print(json.dumps({'compile_and_first_s': time.perf_counter() - started, 'step_ms': ms}))\n"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        return json.loads(lines[-1]) if lines else {"error": done.stderr[-2000:]}
    except subprocess.TimeoutExpired:
        return {"error": f"compile did not finish in {timeout_s}s"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "probe-out")))
    parser.add_argument("--model", default="/tmp/sdserve-bench/sd15")
    parser.add_argument("--autotune-timeout", type=int, default=240)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not Path(args.model, "model_index.json").exists():
        build_tiny_model(Path(args.model), "sd15")
    results: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0), "batch": BATCH}

    def save() -> None:
        (args.out / "probe.json").write_text(json.dumps(results, indent=2))
        print(json.dumps(results, indent=2), flush=True)

    eager = Engine(args.model, DEVICE, Tuning(max_batch=8, fuse=True))

    results["eager_default_ms"] = unet_step_ms(eager, BATCH, False)
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.CUDNN_ATTENTION):  # fmt: skip
        try:
            with sdpa_kernel(backend):
                results[f"eager_{backend.name.lower()}_ms"] = unet_step_ms(eager, BATCH, False)
        except RuntimeError as e:
            results[f"eager_{backend.name.lower()}_ms"] = f"unavailable: {e}"[:200]
    torch.backends.cudnn.benchmark = True
    results["eager_cudnn_benchmark_ms"] = unet_step_ms(eager, BATCH, False)
    torch.backends.cudnn.benchmark = False
    results["eager_dependence"] = dependence(eager)
    save()
    del eager
    torch.cuda.empty_cache()

    started = time.perf_counter()
    tuning = Tuning(max_batch=BATCH, fuse=True, compile=True)
    compiled = Engine(args.model, DEVICE, tuning)
    compiled.warm_up()
    results["compiled_startup_s"] = time.perf_counter() - started
    results["compiled_ms"] = unet_step_ms(compiled, BATCH)
    results["compiled_dependence"] = dependence(compiled)
    save()
    del compiled
    torch.cuda.empty_cache()
    results["max_autotune"] = autotuned(args.model, args.autotune_timeout)
    save()


if __name__ == "__main__":
    main()
