"""What LoRA rows cost in one whole UNet call, on one GPU, without the service: the question
the (l) load leaves (issue 23, 8: SDXL's (l)/(n) is 0.84-0.88 where SD1.5's is 0.90).

The UNet at its real sizes with random weights (`worker/tiny.py`), fp16, laid out as a CUDA
worker lays it out (fused projections, channels-last), its adaptable layers wrapped as the
worker wraps them (`worker.adapters.wrap`, pools of random LoRA units), called at `--rows`
rows (a closed loop's full step: 8 images with CFG is 16) for each mix:

  none   no row with a LoRA (the (n) load's steps)
  half   every other row with one LoRA of rank 16 to 128, one in five of those two (the (l)
         load's rows, bench/loras.py)
  all64  every row with a rank-64 LoRA

and beside them the same UNet without the wrapped layers (`plain`: what the adapted layers'
op costs with no LoRA row). For each: ms a call, eager and (`--compile`) compiled as the
worker compiles (inductor, fullgraph; no CUDA graphs here: the rows' steps are GPU-bound),
and from torch's profiler the GPU time of the LoRA kernel (`_rows`) against every kernel's.

Each mix runs at each of `--deals` ("fan,fill;..."): how the kernel deals its programs among
the LoRA rows (`worker.lora_kernel.Tiles.fan` and `fill`; "1,0" is one program a row's token
tile, as the kernel was before the deal). Each deal reports the largest difference of the
half mix's output to the tensor path's.

`--tiles T;T;...` then times the `half` mix's eager call and LoRA kernel for each of the
kernel's tilings ("tokens,features,warps[,stages[,fan,fill[,out_stages]]]", as
`SDSERVE_LORA_TILES` takes them): a tiling chosen inside a whole UNet call, where the kernels
share the GPU's caches with the base layers, not on one layer shape at a time
(`bench.lora_kernel --tiles`).

    python3 -m bench.lora_unet --out DIR [--arch sdxl|sd15] [--rows 16] [--compile]
        [--deals "1,0;1,2;2,2"] [--tiles "32,128,4;64,64,4"]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bench.lora_kernel import MIXED_UNITS
from worker.adapters import UNIT, RowBuffers, RowMix, wrap
from worker.settings import lora_tiling

ROW_UNITS = 16  # rank 128 a row, as the worker's default SDSERVE_LORA_ROW_RANK
POOL = 1 + 6 * ROW_UNITS
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the CPU: a smoke test


LORA_KERNELS = ("_rows",)  # Triton's kernels by name: the worker's
MIXES = ("none", "half", "all64")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def unet_of(arch: str) -> Any:
    from diffusers import UNet2DConditionModel

    from worker.tiny import ARCHITECTURES, xl_unet

    torch.manual_seed(0)
    if arch == "sd15":
        unet = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4,
                                    **ARCHITECTURES["sd15"]["unet"])  # fmt: skip
    else:
        unet = xl_unet(arch)
    unet = unet.eval().half().to(DEVICE)
    unet.fuse_qkv_projections()
    unet.to(memory_format=torch.channels_last)
    return unet


def write_mix(buffers: RowBuffers, rows: int, mix: str) -> None:
    units = torch.zeros(rows, ROW_UNITS, dtype=torch.long)
    scales = torch.zeros(rows, ROW_UNITS * UNIT)
    for r in range(rows):
        take = {"all64": ROW_UNITS // 2,
                "half": MIXED_UNITS[r // 2 % 4] if r % 2 else 0}.get(mix, 0)  # fmt: skip
        if mix == "half" and take and r % 10 == 1:  # two LoRAs, their ranks within the row's
            take = min(ROW_UNITS, take + 4)
        if take:
            units[r, :take] = torch.arange(1, take + 1) + (r % 5) * ROW_UNITS
            scales[r, : take * UNIT] = 0.8
    buffers.write(RowMix(units.to(DEVICE), scales.to(DEVICE)))


def inputs(unet: Any, arch: str, rows: int, side: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    latent, c = side // 8, unet.config
    sample = torch.randn(rows, unet.config.in_channels, latent, latent, device=DEVICE,
                         dtype=torch.half).to(memory_format=torch.channels_last)  # fmt: skip
    t = torch.full((rows,), 500.0, device=DEVICE)
    context = torch.randn(rows, 77, unet.config.cross_attention_dim, device=DEVICE,
                          dtype=torch.half)  # fmt: skip
    extra: dict[str, Any] = {"encoder_hidden_states": context}
    if arch != "sd15":
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.randn(rows, pooled, device=DEVICE, dtype=torch.half),
            "time_ids": torch.tensor(
                [side, side, 0, 0, side, side], device=DEVICE, dtype=torch.half
            ).repeat(rows, 1),
        }
    return (sample, t), extra


def timed(fn: Any, args: tuple[Any, ...], kw: dict[str, Any], turns: int) -> float:
    with torch.inference_mode():
        for _ in range(2):
            fn(*args, **kw)
        sync()
        each = []
        for _ in range(turns):
            began = time.perf_counter()
            fn(*args, **kw)
            sync()
            each.append((time.perf_counter() - began) * 1000)
    return statistics.median(each)


def kernel_share(fn: Any, args: tuple[Any, ...], kw: dict[str, Any]) -> dict[str, float]:
    """GPU ms of one call: every kernel, the LoRA kernel, and the five largest by name."""
    from torch.profiler import ProfilerActivity, profile

    activity = {"cuda": ProfilerActivity.CUDA, "cpu": ProfilerActivity.CPU}

    with torch.inference_mode(), profile(activities=[activity[DEVICE.type]]) as prof:
        fn(*args, **kw)
        sync()
    sums: dict[str, float] = {}
    for e in prof.key_averages():
        gpu = e.self_device_time_total if DEVICE.type == "cuda" else e.self_cpu_time_total
        if str(e.device_type).endswith(DEVICE.type.upper()) and gpu:
            sums[e.key] = sums.get(e.key, 0.0) + gpu / 1000
    lora = sum(v for k, v in sums.items() if k in LORA_KERNELS)
    top = dict(sorted(sums.items(), key=lambda kv: -kv[1])[:5])
    return {"gpu_ms": sum(sums.values()), "lora_ms": lora, "top": top}  # type: ignore[dict-item]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--arch", default="sdxl")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--side", type=int, default=0, help="default: 1024 for sdxl, 512")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--deals", default="1,0;1,2;2,2;4,2", help='"fan,fill;...", the first'
                        " the baseline")  # fmt: skip
    parser.add_argument(
        "--tiles", default="", help="tilings to time: t,f,w[,s[,fan,fill[,out_stages]]];..."
    )
    args = parser.parse_args()
    side = args.side or (1024 if args.arch == "sdxl" else 512)
    args.out.mkdir(parents=True, exist_ok=True)
    unet = unet_of(args.arch)
    call_args, kw = inputs(unet, args.arch, args.rows, side)
    gpu = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"
    result: dict[str, Any] = {"arch": args.arch, "rows": args.rows, "side": side, "gpu": gpu}
    plain_ms = timed(unet, call_args, kw, args.turns)
    result["plain"] = {"eager_ms": plain_ms, **kernel_share(unet, call_args, kw)}
    buffers = RowBuffers(args.rows, ROW_UNITS, DEVICE)
    layers = wrap("unet", unet, POOL, buffers)
    with torch.no_grad():
        for layer in layers.values():
            layer.down[1:].normal_(0, 0.02)
            layer.up[1:].normal_(0, 0.02)
    result["layers"] = len(layers)
    fast = None
    if args.compile:
        torch._dynamo.config.automatic_dynamic_shapes = False
        fast = torch.compile(unet, fullgraph=True)
        write_mix(buffers, args.rows, "none")
        began = time.perf_counter()
        timed(fast, call_args, kw, 1)
        result["compile_s"] = time.perf_counter() - began
    from worker import lora_kernel

    default = lora_kernel.TILES
    result["deals"] = args.deals.split(";")
    try:
        for deal in result["deals"]:
            fan, fill = (int(n) for n in deal.split(","))
            lora_kernel.TILES = dataclasses.replace(default, fan=fan, fill=fill)
            for mix in MIXES:
                write_mix(buffers, args.rows, mix)
                row: dict[str, Any] = {"eager_ms": timed(unet, call_args, kw, args.turns)}
                row.update(kernel_share(unet, call_args, kw))
                if fast is not None:
                    row["compiled_ms"] = timed(fast, call_args, kw, args.turns)
                    row["compiled"] = kernel_share(fast, call_args, kw)
                result[f"{mix} {deal}"] = row
                print(deal, mix, f"{row['eager_ms']:.1f} ms, LoRA kernel {row['lora_ms']:.1f}",
                      flush=True)  # fmt: skip
                (args.out / "lora_unet.json").write_text(json.dumps(result, indent=1))
            result[f"difference {deal}"] = difference(unet, call_args, kw, buffers, args.rows)
            print(f"largest difference to the tensor path, half mix, {deal}:",
                  result[f"difference {deal}"], flush=True)  # fmt: skip
    finally:
        lora_kernel.TILES = default
    if args.tiles:
        result["tilings"] = tilings(unet, call_args, kw, buffers, args, result)
    print(table(result))
    (args.out / "lora_unet.md").write_text(table(result))


def difference(
    unet: Any, call_args: Any, kw: dict[str, Any], buffers: RowBuffers, rows: int
) -> float:
    """The half mix's UNet output through the kernels against the tensor path's (the largest
    absolute difference): the kernels' sums on this GPU at the real sizes."""
    write_mix(buffers, rows, "half")
    with torch.inference_mode():
        try:
            buffers.kernels = False
            want = unet(*call_args, **kw).sample.float()
        finally:
            buffers.kernels = True
        got = unet(*call_args, **kw).sample.float()
    return float((got - want).abs().max())


def tilings(
    unet: Any, call_args: Any, kw: dict[str, Any], buffers: RowBuffers, args: Any, result: Any
) -> dict[str, Any]:
    """The half mix at each of the kernel's tilings (the module's tiling, as the worker sets
    it from `SDSERVE_LORA_TILES`)."""
    from worker import lora_kernel

    write_mix(buffers, args.rows, "half")
    found: dict[str, Any] = {}
    default = lora_kernel.TILES
    try:
        for text in ["", *args.tiles.split(";")]:
            lora_kernel.TILES = lora_kernel.tiles_of(lora_tiling(text))
            name = text or "default"
            began = time.perf_counter()
            ms = timed(unet, call_args, kw, args.turns)
            found[name] = {"eager_ms": ms, **kernel_share(unet, call_args, kw),
                           "s": time.perf_counter() - began}  # fmt: skip
            print("tiles", name, found[name]["lora_ms"], flush=True)
            result["tilings"] = found
            (args.out / "lora_unet.json").write_text(json.dumps(result, indent=1))
    finally:
        lora_kernel.TILES = default
    return found


def table(r: dict[str, Any]) -> str:
    base = r["deals"][0]
    lines = [f"\n{r['arch']} UNet, {r['rows']} rows at {r['side']}x{r['side']}, {r['gpu']}, "
             f"{r['layers']} adapted layers; deals (fan,fill) against {base}; the half mix's "
             "output against the tensor path: largest difference "
             + ", ".join(f"{d} {r['difference ' + d]:.2g}" for d in r["deals"]) + "\n",
             "| mix | deal | eager ms | / none | GPU ms | LoRA kernel ms | / the first deal's "
             "| compiled ms | / none | compiled LoRA kernel ms |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    m = r["plain"]
    lines.append(f"| plain | | {m['eager_ms']:.1f} | | {m['gpu_ms']:.1f} | | | | | |")
    for mix in MIXES:
        for deal in r["deals"]:
            m, none = r[f"{mix} {deal}"], r[f"none {deal}"]
            first = r[f"{mix} {base}"]["lora_ms"] or float("nan")
            comp = m.get("compiled_ms")
            lines.append(
                f"| {mix} | {deal} | {m['eager_ms']:.1f} | {m['eager_ms'] / none['eager_ms']:.3f} "
                f"| {m['gpu_ms']:.1f} | {m['lora_ms']:.1f} | {m['lora_ms'] / first:.3f} "
                + (
                    f"| {comp:.1f} | {comp / none['compiled_ms']:.3f} "
                    f"| {m['compiled']['lora_ms']:.1f} |"
                    if comp
                    else "| | | |"
                )
            )
    if r.get("tilings"):
        lines += ["", "half mix at each tiling (tokens,features,warps[,stages]):", "",
                  "| tiling | eager ms | LoRA kernel ms | / default |",
                  "|---|---|---|---|"]  # fmt: skip
        first = r["tilings"]["default"]["lora_ms"] or float("nan")  # the CPU: no kernel
        for name, m in r["tilings"].items():
            lines.append(f"| {name} | {m['eager_ms']:.1f} | {m['lora_ms']:.1f} "
                         f"| {m['lora_ms'] / first:.3f} |")  # fmt: skip
    for mix in ("none", "half"):
        biggest = ", ".join(f"{k[:60]} {v:.1f}" for k, v in r[f"{mix} {base}"]["top"].items())
        lines.append(f"\n{mix} {base}: largest kernels (GPU ms): {biggest}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
