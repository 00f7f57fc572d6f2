"""The VAE encoder and the ControlNets as the worker's compiled-call boundary runs them
(`worker/compiled.py`), on one GPU, without the service: about 3 minutes on an H200.

  encode   one 512x512 picture's VAE encode (SD's VAE, channels-last as the worker lays it out):
           eager, and compiled (`CompiledCalls.encode`), ms a call and the compile's seconds
  control  two SD1.5-sized ControlNets compiled as the worker compiles them (one graph; CUDA
           graphs per weights), warmed at every warm-up entry of one prompt length, then one
           forward at 2 to 62 rows, the two by turns: ms a call, and torch's count of calls that
           CUDA graphs skipped (a skipped call runs kernel by kernel, launch-bound)

  decode   one picture's VAE decode (`--side 1024`: SDXL's, whose VAE has SD's sizes) in each of
           `--vae-dtypes` (SDSERVE_VAE_UPCAST's float32 and bfloat16, float16 beside them):
           eager and compiled ms a call, and the pixels' largest and mean difference to
           float32's in levels of 255 (issue 22: SDXL's VAE runs in float32, as diffusers'
           `force_upcast` asks)

Random weights made on the device from `worker/tiny.py`'s sd15 sizes (nothing written to disk).
A ControlNet's step cost a + b x rows: issue 24's half-controlled load pays `a` once more a step
than the prediction from uniform loads, so `a` is what (h) needs small.

    python3 -m bench.compiled_parts --out DIR [--parts encode,control,decode] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import torch

from bench.batching import provenance
from worker.compiled import CompiledCalls, Tuning, cudagraph_skips
from worker.controls import ControlNets
from worker.tiny import ARCHITECTURES

ROWS = (2, 8, 16, 24, 32, 48, 62)


def timed(fn: Any, device: str, turns: int = 20) -> float:
    """Milliseconds a call, after three untimed ones."""
    for _ in range(3):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(turns):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - started) / turns


def parts(arch: str, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any, Any]:
    """A UNet, a VAE and the ControlNet class, at `arch`'s sizes, laid out as the worker lays
    them out on a GPU (the UNet and VAE channels-last, the UNet's projections fused)."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

    sizes = ARCHITECTURES[arch]
    levels = len(sizes["vae"]["block_out_channels"])
    with device:
        unet = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4,
                                    **sizes["unet"]).to(dtype)  # fmt: skip
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * levels,
                            up_block_types=("UpDecoderBlock2D",) * levels,
                            **sizes["vae"]).to(dtype)  # fmt: skip
    for module in (unet, vae):
        module.eval().requires_grad_(False)
        if device.type == "cuda":
            module.fuse_qkv_projections()
            module.to(memory_format=torch.channels_last)
    return unet, vae, ControlNetModel


def encode_part(calls: CompiledCalls, side: int, device: torch.device, out: dict[str, Any]) -> None:
    picture = torch.rand(1, 3, side, side, device=device) * 2 - 1
    out["encode eager ms"] = timed(lambda: calls.encode(picture, compiled=False), device.type)
    started = time.monotonic()
    calls.encode(picture, compiled=True)
    out["encode compile s"] = time.monotonic() - started
    out["encode compiled ms"] = timed(lambda: calls.encode(picture, compiled=True), device.type)
    print({k: round(v, 2) for k, v in out.items() if k.startswith("encode")}, flush=True)


def decode_part(
    unet: Any, vae: Any, tuning: Tuning, side: int, dtypes: list[str], out: dict[str, Any]
) -> None:
    """The VAE's decode of one picture in each dtype, eager and compiled (the worker's
    `CompiledCalls.decode`), its pixels against float32's."""
    device = unet.device
    latents = torch.randn(1, 4, side // 8, side // 8, device=device)
    reference: torch.Tensor | None = None
    for name in dtypes:
        module = copy.deepcopy(vae).to(getattr(torch, name))
        calls = CompiledCalls(unet, module, tuning, device)
        out[f"decode {name} eager ms"] = timed(lambda c=calls: c.decode(latents, False),
                                               device.type)  # fmt: skip
        started = time.monotonic()
        pixels = calls.decode(latents, True)
        out[f"decode {name} compile s"] = time.monotonic() - started
        out[f"decode {name} compiled ms"] = timed(lambda c=calls: c.decode(latents, True),
                                                  device.type)  # fmt: skip
        levels = ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round()
        if reference is None:
            reference = levels
        apart = (levels - reference).abs()
        out[f"decode {name} largest / mean levels from {dtypes[0]}"] = (
            f"{apart.max().item():.0f} / {apart.mean().item():.2f}"
        )
        print({k: v for k, v in out.items() if k.startswith(f"decode {name}")}, flush=True)
        del calls, module


def control_part(
    calls: CompiledCalls, unet: Any, kind: Any, side: int, out: dict[str, Any]
) -> None:
    """Two ControlNets from the UNet (as diffusers' `from_unet`), compiled and warmed as the
    worker does, then timed by rows, by turns."""
    device, dtype = unet.device, unet.dtype
    nets = {}
    for k, name in enumerate(("edges", "depth")):
        torch.manual_seed(k)
        net = kind.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 96, 256))
        nets[name] = net.to(device, dtype).eval().requires_grad_(False)
    controls = ControlNets(nets, unet)
    calls.serve_controls(controls)
    entries = [w for w in calls.warm_list() if w.tokens == 77]
    latent = (side // 8, side // 8)
    began = time.monotonic()
    for name in nets:
        calls._warm_control(name, entries, 8)
        out[f"warm {name} s"] = time.monotonic() - began
        began = time.monotonic()
    calls.serving = True
    out["cudagraph skips after warm-up"] = cudagraph_skips()
    for rows in ROWS:
        sample = torch.randn(rows, 4, *latent, device=device, dtype=dtype)
        t = torch.full((rows,), 500.0, device=device)
        context = torch.randn(rows, 77, unet.config.cross_attention_dim, device=device,
                              dtype=dtype)  # fmt: skip
        cond = torch.randn(rows, *controls.cond_shape("edges", *latent), device=device,
                           dtype=dtype)  # fmt: skip
        inputs = (sample, t, context, cond)

        def call(turn: list[int] = [0], given: tuple[torch.Tensor, ...] = inputs) -> Any:  # noqa: B006
            turn[0] += 1  # the two by turns, as the benchmarks' controlled requests take them
            name = ("edges", "depth")[turn[0] % 2]
            x, steps, text, image = given
            return calls.run_control(name, x, steps, text, image, None, (side, side))

        out[f"control ms @ {rows}"] = timed(call, device.type)
        print(f"control @ {rows} rows: {out[f'control ms @ {rows}']:.2f} ms", flush=True)
    out["cudagraph skips after serving"] = cudagraph_skips()
    out["recompiles"] = calls.recompiles


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--parts", default="encode,control")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--arch", default="sd15", help="worker/tiny.py's sizes (tiny: a smoke run)")
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--vae-dtypes", default="float32,bfloat16,float16",
                        help="the decode part's dtypes, the first the reference")  # fmt: skip
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    unet, vae, kind = parts(args.arch, device, dtype)
    tuning = Tuning(max_batch=32, rows=True, compile=True, compiled_sizes=((args.side,) * 2,),
                    compile_backend="inductor" if device.type == "cuda" else "eager")  # fmt: skip
    calls = CompiledCalls(unet, vae, tuning, device)
    results: dict[str, Any] = provenance(args.device)
    with torch.inference_mode():
        for part in args.parts.split(","):
            if part == "encode":
                encode_part(calls, args.side, device, results)
            elif part == "control":
                control_part(calls, unet, kind, args.side, results)
            elif part == "decode":
                decode_part(unet, vae, tuning, args.side, args.vae_dtypes.split(","), results)
            (args.out / "compiled_parts.json").write_text(json.dumps(results, indent=2))
    lines = [f"Compiled parts, {results['gpu']}, {results['date']}, commit {results['commit']},"
             f" `{results['command']}`", "", "| figure | value |", "|---|---|"]  # fmt: skip
    lines += [f"| {k} | {v:.2f} |" for k, v in results.items() if isinstance(v, int | float)]
    lines += [f"| {k} | {v} |" for k, v in results.items() if k.startswith("decode") and
              isinstance(v, str)]  # fmt: skip
    text = "\n".join(lines) + "\n"
    (args.out / "compiled_parts.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
