"""Inductor settings for the UNet compared at one batch size, and where the UNet's time goes.

Each variant compiles in a process of its own (its own compile cache, so every compile is cold)
and all compile at once; once all are compiled (or past --deadline), they time one after the
other, so no variant is timed while another uses the GPU.

    python -m bench.variants --out DIR     (SD1.5-sized random weights, one GPU, 512x512)
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from bench.timing import event_times_ms

BATCH = 32  # images: 64 UNet rows with CFG
HEIGHT = WIDTH = 512

# inductor config flags from PyTorch's "diffusion, fast" write-up
TUNED = {
    "conv_1x1_as_mm": True,
    "coordinate_descent_tuning": True,
    "coordinate_descent_check_all_directions": True,
    "epilogue_fusion": False,
}
VARIANTS: dict[str, dict[str, Any]] = {
    "shipped": {},
    "static_batch": {"static": True},
    "cudnn_benchmark": {"cudnn_benchmark": True},
    "conv_1x1_as_mm": {"inductor": {"conv_1x1_as_mm": True}},
    "epilogue_fusion_off": {"inductor": {"epilogue_fusion": False}},
    "freezing": {"inductor": {"freezing": True}},
    "conv_1x1_as_mm_freezing": {"inductor": {"conv_1x1_as_mm": True, "freezing": True}},
    "coordinate_descent": {"inductor": {"coordinate_descent_tuning": True}},
    "tuned_flags": {"inductor": TUNED},
    "gemm_autotune": {"inductor": {"max_autotune_gemm": True}},
    "tuned_flags_gemm_autotune": {"inductor": {**TUNED, "max_autotune_gemm": True}},
    "max_autotune": {"inductor": TUNED, "mode": "max-autotune"},
    "profile": {"mode": "default"},
}


def kernel_kind(name: str) -> str:
    low = name.lower()
    if low.startswith("triton"):  # inductor's fused kernels, named after the ops they fuse
        return "fused pointwise/norm (triton)"
    if any(k in low for k in ("sdpa", "fmha", "flash", "attention", "attn")):
        return "attention"
    if any(k in low for k in ("conv", "fprop", "dgrad", "implicit", "winograd")):
        return "convolution"
    if any(k in low for k in ("gemm", "xmma", "cutlass", "sm90", "matmul", "mm_", "ampere")):
        return "matrix product"
    return "other"


def child(name: str, model: str, work: Path) -> None:
    """Compile one variant, wait for the go-ahead, time it under the GPU lock, print JSON."""
    spec = VARIANTS[name]
    for key, value in spec.get("inductor", {}).items():
        setattr(torch._inductor.config, key, value)
    torch.backends.cudnn.benchmark = spec.get("cudnn_benchmark", False)
    from worker.compiled import Tuning
    from worker.engine import Engine

    mode = spec.get("mode", "reduce-overhead")
    tuning = Tuning(max_batch=BATCH, fuse=True, compile=True, compile_mode=mode)
    engine = Engine(model, torch.device("cuda"), tuning)
    sample = torch.randn(2 * BATCH, 4, HEIGHT // 8, WIDTH // 8, device="cuda", dtype=engine.dtype)
    context = engine.encode([""] * BATCH + [f"prompt {i}" for i in range(BATCH)])
    t = torch.tensor(500, device="cuda")

    def call() -> torch.Tensor:
        if spec.get("static"):
            torch.compiler.cudagraph_mark_step_begin()  # type: ignore[no-untyped-call]
            assert engine.calls._fast_unet is not None
            return engine.calls._fast_unet(sample, t.float(), encoder_hidden_states=context).sample  # type: ignore[no-any-return]
        return engine.calls.run_unet(sample, t, [context], (WIDTH, HEIGHT))[0]

    started = time.perf_counter()
    with torch.inference_mode():
        for _ in range(3):
            call()
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - started
        (work / f"{name}.ready").touch()
        while not (work / "go").exists():
            time.sleep(0.5)
        with open(work / "gpu.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            result: dict[str, Any] = {"compile_s": round(compile_s, 1)}
            if name == "profile":
                result["share"] = profile(call)
            else:
                times = event_times_ms(call, repeats=17)
                result["step_ms"] = round(statistics.median(times), 2)
                result["spread_ms"] = round(max(times) - min(times), 2)
    print(json.dumps(result), flush=True)


def profile(call: Any) -> dict[str, float]:
    """Share of GPU kernel time per kind of kernel over 5 UNet calls (no CUDA graphs)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            call()
        torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.self_device_time_total > 0:
            totals[kernel_kind(event.key)] += event.self_device_time_total
    whole = sum(totals.values())
    shares = {kind: round(100 * us / whole, 1) for kind, us in totals.items()}
    shares["unet_ms_kernels_only"] = round(whole / 5 / 1000, 2)
    return shares


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "variants-out")))
    parser.add_argument("--model", default="/tmp/sdserve-bench/sd15")
    parser.add_argument("--deadline", type=int, default=420, help="seconds for all to compile")
    parser.add_argument("--only", default=",".join(VARIANTS), help="comma-separated variants")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=Path("/tmp/sdserve-variants"))
    args = parser.parse_args()
    if args.child:
        child(args.child, args.model, args.work)
        return
    from worker.tiny import build_tiny_model

    if not Path(args.model, "model_index.json").exists():
        build_tiny_model(Path(args.model), "sd15")
    args.work.mkdir(parents=True, exist_ok=True)
    for stale in args.work.glob("*"):
        stale.unlink()
    args.out.mkdir(parents=True, exist_ok=True)
    names = args.only.split(",")
    children = {}
    for name in names:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": f"/tmp/sdserve-variants-cache/{name}"}
        command = [sys.executable, "-m", "bench.variants", "--child", name,
                   "--model", args.model, "--work", str(args.work)]  # fmt: skip
        children[name] = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    started = time.monotonic()
    while time.monotonic() - started < args.deadline:
        pending = [n for n, p in children.items()
                   if p.poll() is None and not (args.work / f"{n}.ready").exists()]  # fmt: skip
        if not pending:
            break
        time.sleep(1)
    results: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0), "batch": BATCH,
                               "torch": torch.__version__}  # fmt: skip
    for name, process in children.items():
        if process.poll() is None and not (args.work / f"{name}.ready").exists():
            process.kill()
            results[name] = {"error": f"not compiled within {args.deadline} s (all at once)"}
    (args.work / "go").touch()
    for name, process in children.items():
        if name in results:
            continue
        out, err = process.communicate()
        lines = [line for line in out.splitlines() if line.startswith("{")]
        results[name] = json.loads(lines[-1]) if lines else {"error": err[-1500:]}
    (args.out / "variants.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
