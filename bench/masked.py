"""Rows of different prompt lengths: one UNet call per length (what the worker ships) against one
call of padded, masked contexts (`SDSERVE_MASKED_CONTEXTS`), through the compiled-call boundary
itself (worker/compiled.py `run_unet`: its row buckets, padding and layout).

A masked call moves the cross-attention onto a kernel that takes a mask, on every call (one
compiled graph), so it may cost the uniform load what it gains the mixed ones. Per variant, on
a UNet loaded as the worker loads it (fp16, fused projections, channels-last) and compiled as
it compiles it, the UNet's GPU time at the GPU check's step of 62 rows:

  uniform     62 rows, one chunk each (load (a))
  1+2 chunks  31 rows of one chunk, 31 of two (prompts over 75 tokens among short ones)
  2+3 chunks  31 rows of two chunks, 31 of three (load (e))

and the seconds of each variant's first call (its compilation). The outputs of the two
variants are compared row for row (their largest difference is printed: padding and masking
must not change a row).

    python -m bench.masked --out DIR [--model DIR]
    python -m bench.masked --out DIR --device cpu --backend eager --model TINY --side 64 --rows 6
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.timing import event_times_ms
from worker.compiled import CHUNK_TOKENS, CompiledCalls, Tuning
from worker.tiny import build_tiny_model

LOADS = {"uniform": (1, 1), "1+2 chunks": (1, 2), "2+3 chunks": (2, 3)}


def load_parts(model: str, device: torch.device) -> tuple[Any, Any]:
    """The UNet and VAE as the worker loads them on a GPU (worker/components.py)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=dtype)
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=dtype)
    unet = unet.to(device).eval().requires_grad_(False)
    unet.fuse_qkv_projections()
    return unet.to(memory_format=torch.channels_last), vae.to(device).eval()


def inputs(
    unet: Any, rows: int, chunks: tuple[int, int], side: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """A call's sample, timesteps and prompt blocks: half the rows at each chunk count (a
    block a row, as rows of different jobs come)."""
    generator = torch.Generator(device).manual_seed(0)
    dtype, config = unet.dtype, unet.config
    sample = torch.randn(rows, config.in_channels, side // 8, side // 8, generator=generator,
                         device=device, dtype=dtype)  # fmt: skip
    t = torch.linspace(900, 100, rows, device=device)
    width = config.cross_attention_dim
    tokens = [CHUNK_TOKENS * chunks[row * 2 // rows] for row in range(rows)]
    blocks = [torch.randn(1, n, width, generator=generator, device=device, dtype=dtype)
              for n in tokens]  # fmt: skip
    return sample, t, blocks


def measure(
    unet: Any, vae: Any, masked: bool, args: Any, device: torch.device
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Each load's step ms (GPU; host ms on a CPU) and first-call seconds through one
    variant's boundary; and its outputs."""
    tuning = Tuning(max_batch=args.rows // 2, fuse=True, compile=True,
                    compile_backend=args.backend, compiled_sizes=((args.side, args.side),),
                    rows=True, prompt_chunks=3, masked_contexts=masked)  # fmt: skip
    calls = CompiledCalls(unet, vae, tuning, device)
    result: dict[str, float] = {}
    outputs: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for load, chunks in LOADS.items():
            sample, t, blocks = inputs(unet, args.rows, chunks, args.side, device)

            def call(sample: Any = sample, t: Any = t, blocks: Any = blocks) -> torch.Tensor:
                out: torch.Tensor = calls.run_unet(sample, t, blocks, (args.side, args.side))[0]
                return out

            started = time.perf_counter()
            for _ in range(2):  # CUDA graph trees record a shape at its second call
                outputs[load] = call()
            if device.type == "cuda":
                torch.cuda.synchronize()
            result[f"first_s {load}"] = time.perf_counter() - started
            result[f"step_ms {load}"] = statistics.median(timed(call, device, args.repeats))
    name = "masked" if masked else "per length"
    print(name, {k: round(v, 2) for k, v in result.items()}, flush=True)
    return result, outputs


def timed(call: Callable[[], Any], device: torch.device, repeats: int) -> list[float]:
    if device.type == "cuda":
        return event_times_ms(call, repeats)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(1000 * (time.perf_counter() - started))
    return times


def table(results: dict[str, dict[str, float]], differences: dict[str, float]) -> str:
    plain, masked = results["per length"], results["masked"]
    lines = [
        "| load | per length, ms | masked, ms | masked / per length | largest difference |",
        "|---|---|---|---|---|",
    ]
    for load in LOADS:
        a, b = plain[f"step_ms {load}"], masked[f"step_ms {load}"]
        lines.append(f"| {load} | {a:.1f} | {b:.1f} | {b / a:.3f} | {differences[load]:.2g} |")
    first = sum(v for k, v in plain.items() if k.startswith("first_s"))
    again = sum(v for k, v in masked.items() if k.startswith("first_s"))
    lines.append(f"\nfirst calls (compile, graph recordings): per length {first:.1f} s, masked"
                 f" {again:.1f} s")  # fmt: skip
    return "\n".join(lines)


def run(args: Any) -> dict[str, Any]:
    device = torch.device(args.device)
    if not Path(args.model, "model_index.json").exists():
        build_tiny_model(Path(args.model), "sd15")
    unet, vae = load_parts(args.model, device)
    results: dict[str, dict[str, float]] = {}
    outputs = {}
    for masked in (False, True):
        torch._dynamo.reset()  # each variant compiles from nothing, as a worker starts
        name = "masked" if masked else "per length"
        results[name], outputs[name] = measure(unet, vae, masked, args, device)
    differences = {
        load: float((outputs["masked"][load] - outputs["per length"][load]).abs().max())
        for load in LOADS
    }
    return {"results": results, "largest_difference": differences}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else "")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--model", default="/tmp/sdserve-bench/sd15")
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--rows", type=int, default=62, help="UNet rows a call (even)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backend", default="inductor", help="eager: a smoke run on the CPU")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    found = run(args)
    (args.out / "masked.json").write_text(json.dumps(found, indent=2))
    print(table(found["results"], found["largest_difference"]))


if __name__ == "__main__":
    main()
