"""A LoRA layer as one product: each row's LoRA units added inside the base layer's matrix
product, not after it, measured against the worker's kernel (worker/lora_kernel.py). A
prototype for the GPU to judge before anything of it serves.

Why: the worker's kernel adds a LoRA row's units to the base layer's output after cuBLAS wrote
it, so a LoRA row's adapted layer reads its input once more and reads and writes its output
once more. At SDXL's size that pass costs about half to two thirds of the base product for the
row (`bench.lora_kernel --shapes`: 32x32 attention at 32 rank-64 rows 0.886 ms against the base's
1.256), and half the requests with LoRAs made 0.85-0.88 of none (BENCHMARKS.md, thirty-eighth
session). Here two launches make the layer:

    h[b, n, r]   = scale[b, r] * sum_k x[b, n, k] * down[unit[b, r // 8], r % 8, k]   (`_low`)
    out[b, n, o] = bias[o] + sum_k x[b, n, k] * weight[o, k]
                 + sum_r h[b, n, r] * up[unit[b, r // 8], r % 8, o]                   (`_product`)

The second is a matrix product tiled by row, token and output, whose reduction runs on over
the row's own ranks after the input features: the output is written once, and a row without
LoRA is the base product alone. What it costs: every row's base product runs in Triton, not
cuBLAS, so the question for the GPU is whether Triton's product keeps up with cuBLAS on the
UNets' shapes (rows without LoRA must not lose) while LoRA rows gain.

The twenty-fourth session built this design once (branch `lora-gemm`, one tiling) and the
twenty-fifth timed it on SD1.5's 64x64 layers only (4096 tokens, 320 features: a product bound
by memory): 0.12-0.17 ms slower over 8 layers at every mix, its base product 13% behind cuBLAS
(BENCHMARKS.md). What was never measured is the rest: SDXL's layers, where the base product is
bound by arithmetic and where the LoRA pass costs most, and other tilings. This bench times
every shape of `bench.lora_kernel.SHAPES` at each of `TILINGS`, so that one run settles it.

    python3 -m bench.lora_fused --out DIR [--rows 32]
    TRITON_INTERPRET=1 python3 -m bench.lora_fused --out DIR --device cpu   (a smoke run)

prints, for each layer shape of `bench.lora_kernel.SHAPES` at 32 rows and each mix (no LoRA
row, half the rows rank 64, every row rank 64), ms over 8 launches replayed from a CUDA graph:
cuBLAS alone, cuBLAS and the worker's kernel, and this product at each of `TILINGS`, with each
way's largest error against the rows' layers summed in float32. On a CPU, Triton's interpreter
runs `check()` (tests/test_lora_fused.py).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from worker.adapters import UNIT, row_order
from worker.lora_kernel import LEAST, as_tokens

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU images: nothing here runs
    triton = None


@dataclass(frozen=True)
class Tiling:
    """One program's output tile (`tokens` x `outputs`), the input features per turn of its
    reduction, its warps and its software pipeline's stages."""

    tokens: int = 128
    outputs: int = 128
    inputs: int = 64
    warps: int = 8
    stages: int = 3


TILINGS = [
    Tiling(),
    Tiling(128, 256, 64, 8, 3),
    Tiling(64, 128, 64, 4, 4),
    Tiling(128, 64, 64, 4, 4),
]


def fused_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    down: torch.Tensor,
    up: torch.Tensor,
    units: torch.Tensor,
    scales: torch.Tensor,
    tiling: Tiling = Tiling(),
) -> torch.Tensor:
    """A linear layer of (rows, tokens, in) input with each row's LoRA units, as a new
    (rows, tokens, out) tensor. `down`: (pool, 8, in), `up`: (pool, 8, out), `units`:
    (rows, row_units) long, `scales`: (rows, row_units * 8) float32, as the worker's buffers
    hold them (worker/adapters.py)."""
    xs = as_tokens(x, conv=False)
    assert xs is not None and weight.dim() == 2
    rows, tokens, inputs = xs.shape
    outputs = weight.shape[0]
    ranks = scales.shape[1]
    width = max(LEAST, triton.next_power_of_2(ranks))
    h = torch.empty(rows, tokens, width, device=x.device, dtype=x.dtype)
    token_tile = min(tiling.tokens, max(LEAST, triton.next_power_of_2(tokens)))
    token_tiles = triton.cdiv(tokens, token_tile)
    _low[(token_tiles, rows)](
        xs, down, units, scales, h, tokens, inputs,
        *xs.stride(), *down.stride(), *h.stride(),
        RANKS=ranks, RANKS_P2=width, ROW_UNITS=units.shape[1], TOKENS=token_tile,
        FEATURES=tiling.inputs, num_warps=4,
    )  # fmt: skip
    out = torch.empty(rows, tokens, outputs, device=x.device, dtype=x.dtype)
    # Output tiles vary fastest: the programs of one token tile run side by side and share
    # its input (and its low-rank activations) in the L2 cache.
    _product[(triton.cdiv(outputs, tiling.outputs), token_tiles, rows)](
        xs, weight, bias if bias is not None else weight, h, up, units, scales, out,
        tokens, inputs, outputs,
        *xs.stride(), *weight.stride(), *h.stride(), *up.stride(), *out.stride(),
        HAS_BIAS=bias is not None, RANKS=ranks, RANKS_P2=width, ROW_UNITS=units.shape[1],
        TOKENS=token_tile, OUTPUTS=tiling.outputs, FEATURES=tiling.inputs,
        num_warps=tiling.warps, num_stages=tiling.stages,
    )  # fmt: skip
    return out if x.dim() == 3 else out[:, 0]


if triton is not None:

    @triton.jit
    def _width(scales, b, RANKS: tl.constexpr, RANKS_P2: tl.constexpr):
        """Row b's ranks in use, rounded up to tl.dot's least side (0: no LoRA). Its units
        lie end to end from the first, as the worker writes them."""
        r = tl.arange(0, RANKS_P2)
        s = tl.load(scales + b * RANKS + r, mask=r < RANKS, other=0.0)
        last = tl.max(tl.where(s != 0.0, r + 1, 0), axis=0)
        return (last + 15) // 16 * 16

    @triton.jit
    def _inputs(x, b, n, k, tokens, inputs, sxb, sxn, sxk):
        """Row b's input at tokens n and features k (0 past either end)."""
        return tl.load(
            x + b * sxb + n[:, None] * sxn + k[None, :] * sxk,
            mask=(n[:, None] < tokens) & (k[None, :] < inputs),
            other=0.0,
        )

    @triton.jit
    def _low(
        x, down, units, scales, h, tokens, inputs,
        sxb, sxn, sxk, sdu, sdr, sdk, shb, shn, shr,
        RANKS: tl.constexpr, RANKS_P2: tl.constexpr, ROW_UNITS: tl.constexpr,
        TOKENS: tl.constexpr, FEATURES: tl.constexpr,
    ):  # fmt: skip
        """Row b's low-rank activations for one token tile, scaled, in the layer's dtype."""
        b = tl.program_id(1)
        if _width(scales, b, RANKS, RANKS_P2) > 0:
            n = tl.program_id(0) * TOKENS + tl.arange(0, TOKENS)
            r = tl.arange(0, RANKS_P2)
            s = tl.load(scales + b * RANKS + r, mask=r < RANKS, other=0.0)
            used = s != 0.0
            unit = tl.load(units + b * ROW_UNITS + r // 8, mask=used, other=0)
            acc = tl.zeros((TOKENS, RANKS_P2), dtype=tl.float32)
            for k0 in range(0, inputs, FEATURES):
                k = k0 + tl.arange(0, FEATURES)
                xt = _inputs(x, b, n, k, tokens, inputs, sxb, sxn, sxk)
                dt = tl.load(
                    down + unit[None, :] * sdu + (r % 8)[None, :] * sdr + k[:, None] * sdk,
                    mask=(k[:, None] < inputs) & used[None, :],
                    other=0.0,
                )
                acc += tl.dot(xt, dt)
            low = (acc * s[None, :]).to(h.dtype.element_ty)
            tl.store(
                h + b * shb + n[:, None] * shn + r[None, :] * shr, low, mask=n[:, None] < tokens
            )

    @triton.jit
    def _product(
        x, weight, bias, h, up, units, scales, out, tokens, inputs, outputs,
        sxb, sxn, sxk, swo, swk, shb, shn, shr, suu, sur, suo, sob, son, soo,
        HAS_BIAS: tl.constexpr, RANKS: tl.constexpr, RANKS_P2: tl.constexpr,
        ROW_UNITS: tl.constexpr, TOKENS: tl.constexpr, OUTPUTS: tl.constexpr,
        FEATURES: tl.constexpr,
    ):  # fmt: skip
        """One output tile of row b: the base product over the input features, then on over
        the row's ranks (none for a row without LoRA), the bias, one store."""
        b = tl.program_id(2)
        n = tl.program_id(1) * TOKENS + tl.arange(0, TOKENS)
        o = tl.program_id(0) * OUTPUTS + tl.arange(0, OUTPUTS)
        acc = tl.zeros((TOKENS, OUTPUTS), dtype=tl.float32)
        for k0 in range(0, inputs, FEATURES):
            k = k0 + tl.arange(0, FEATURES)
            xt = _inputs(x, b, n, k, tokens, inputs, sxb, sxn, sxk)
            wt = tl.load(
                weight + o[None, :] * swo + k[:, None] * swk,
                mask=(o[None, :] < outputs) & (k[:, None] < inputs),
                other=0.0,
            )
            acc += tl.dot(xt, wt)
        width = _width(scales, b, RANKS, RANKS_P2)
        for r0 in range(0, width, 16):
            r = r0 + tl.arange(0, 16)
            used = tl.load(scales + b * RANKS + r, mask=r < RANKS, other=0.0) != 0.0
            unit = tl.load(units + b * ROW_UNITS + r // 8, mask=used, other=0)
            ht = tl.load(
                h + b * shb + n[:, None] * shn + r[None, :] * shr,
                mask=(n[:, None] < tokens) & used[None, :],
                other=0.0,
            )
            ut = tl.load(
                up + unit[:, None] * suu + (r % 8)[:, None] * sur + o[None, :] * suo,
                mask=used[:, None] & (o[None, :] < outputs),
                other=0.0,
            )
            acc += tl.dot(ht, ut)
        if HAS_BIAS:
            acc += tl.load(bias + o, mask=o < outputs, other=0.0).to(tl.float32)[None, :]
        tl.store(
            out + b * sob + n[:, None] * son + o[None, :] * soo,
            acc.to(out.dtype.element_ty),
            mask=(n[:, None] < tokens) & (o[None, :] < outputs),
        )


def reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    down: torch.Tensor,
    up: torch.Tensor,
    units: torch.Tensor,
    scales: torch.Tensor,
) -> torch.Tensor:
    """The layer with each row's units, in float32 from the same weights."""
    from bench.lora_kernel import row_deltas

    base = x.float() @ weight.float().T + (0 if bias is None else bias.float())
    return base + row_deltas(x, down, up, units, scales)


def mixed(rows: int, row_units: int, pool: int, mix: str, device: str) -> tuple[torch.Tensor, ...]:
    """units and scales for `mix`: `none`, `half64` (every other row rank 64), `all64`, or
    `every` (rows of 1 to row_units units, one of weight 0, one without: each rank width)."""
    units = torch.zeros(rows, row_units, dtype=torch.long)
    scales = torch.zeros(rows, row_units * UNIT)
    for r in range(rows):
        take = {"half64": 8 if r % 2 else 0, "all64": 8,
                "every": r % (row_units + 1)}.get(mix, 0)  # fmt: skip
        take = min(take, row_units)
        if take:
            units[r, :take] = (torch.arange(take) + r) % (pool - 1) + 1
            scales[r, : take * UNIT] = 0.0 if (mix == "every" and r == 3) else 0.8 - 0.1 * (r % 5)
    return units.to(device), scales.to(device)


def check() -> None:
    """The product against `reference` on small shapes (Triton's interpreter on a CPU):
    tokens and features not multiples of the tiles, with and without bias, every rank width;
    a row without LoRA (or at weight 0) equal to the base layer alone."""
    torch.manual_seed(0)
    for (rows, tokens, inputs, outputs, row_units), has_bias in itertools.product(
        [(6, 40, 48, 72, 4), (5, 1, 32, 20, 2), (18, 33, 24, 40, 16)], (True, False)
    ):
        x = torch.randn(rows, tokens, inputs)
        weight, bias = (
            torch.randn(outputs, inputs) * 0.2,
            torch.randn(outputs) if has_bias else None,
        )
        pool = 9
        down, up = torch.randn(pool, UNIT, inputs) * 0.3, torch.randn(pool, UNIT, outputs) * 0.3
        down[0], up[0] = 0, 0
        units, scales = mixed(rows, row_units, pool, "every", "cpu")
        got = fused_linear(x, weight, bias, down, up, units, scales, Tiling(16, 32, 16, 4, 1))
        want = reference(x, weight, bias, down, up, units, scales)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        for r in range(rows):
            if not scales[r].any():
                plain = torch.nn.functional.linear(x[r], weight, bias)
                torch.testing.assert_close(got[r], plain, rtol=1e-5, atol=1e-5)
        print(f"{(rows, tokens, inputs, outputs)} bias {has_bias}: equal")


def tiling_name(t: Tiling) -> str:
    return f"{t.tokens}x{t.outputs}x{t.inputs} w{t.warps} s{t.stages}"


def timings(
    tokens: int, inputs: int, outputs: int, rows: int, mix: str, tilings: list[Tiling], device: str
) -> dict[str, Any]:
    """ms over 8 launches of one layer shape and mix (see the module's text), and errors. On a
    CPU (Triton's interpreter, float32) the launches are timed as they run: a smoke run of
    this bench, not a figure."""
    import torch.nn.functional as F

    from bench.lora_kernel import DEPTH, POOL, ROW_UNITS, graphed_ms
    from worker import lora_kernel

    dtype = torch.half if device == "cuda" else torch.float32

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype) * 0.02

    def measured(call: Any) -> float:
        if device == "cuda":
            return graphed_ms(call)
        return _wall_ms(call)

    x, weight, bias = randn(rows, tokens, inputs), randn(outputs, inputs), randn(outputs)
    down, up = randn(POOL, UNIT, inputs), randn(POOL, UNIT, outputs)
    units, scales = mixed(rows, ROW_UNITS, POOL, mix, device)
    order = row_order(scales)
    want = reference(x, weight, bias, down, up, units, scales)

    def error(got: torch.Tensor) -> float:
        return ((got.float() - want).abs().max() / want.abs().max()).item()

    def worker_layer() -> torch.Tensor:
        return lora_kernel.layer_rows(x, weight, bias, down, up, units, scales, order)

    def repeated(call: Any) -> Any:
        return lambda: [call() for _ in range(DEPTH)]

    result: dict[str, Any] = {
        "cublas": measured(repeated(lambda: F.linear(x, weight, bias))),
        "worker": measured(repeated(worker_layer)),
        "worker_error": error(worker_layer()),
        "fused": {},
    }
    for tiling in tilings:

        def fused(tiling: Tiling = tiling) -> torch.Tensor:
            return fused_linear(x, weight, bias, down, up, units, scales, tiling)

        result["fused"][tiling_name(tiling)] = {
            "ms": measured(repeated(fused)),
            "error": error(fused()),
        }
    return result


def _wall_ms(call: Any) -> float:
    started = time.perf_counter()
    call()
    return (time.perf_counter() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument(
        "--device",
        default="cuda",
        help="cpu: a smoke run in Triton's interpreter (TRITON_INTERPRET=1)",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from bench.lora_kernel import SHAPES

    if args.device == "cuda":
        shapes, tilings, rows, gpu = SHAPES, TILINGS, args.rows, torch.cuda.get_device_name()
    else:
        shapes, tilings, rows, gpu = [("tiny", 40, 48, 72)], [Tiling(16, 32, 16, 4, 1)], 4, "cpu"
    names = [tiling_name(t) for t in tilings]
    lines = [
        f"LoRA units inside the product, {gpu}, {rows} rows,"
        " ms over 8 launches (a CUDA graph's replay)",
        "",
        "| layer (tokens, in, out) | mix | cuBLAS | cuBLAS + worker's kernel | "
        + " | ".join(f"fused {n}" for n in names) + " | best fused / worker's | errors |",
        "|---|---|---|---|" + "---|" * len(names) + "---|---|",
    ]  # fmt: skip
    result: dict[str, Any] = {"gpu": gpu, "rows": rows,
                              "tilings": [asdict(t) for t in tilings], "shapes": []}  # fmt: skip
    with torch.no_grad():
        for (what, tokens, inputs, outputs), mix in itertools.product(
            shapes, ("none", "half64", "all64")
        ):
            ms = timings(tokens, inputs, outputs, rows, mix, tilings, args.device)
            result["shapes"].append({"layer": what, "mix": mix, **ms})
            best = min(v["ms"] for v in ms["fused"].values())
            errors = [ms["worker_error"], *(v["error"] for v in ms["fused"].values())]
            lines.append(
                f"| {what} ({tokens}, {inputs}, {outputs}) | {mix} | {ms['cublas']:.3f} |"
                f" {ms['worker']:.3f} | "
                + " | ".join(f"{v['ms']:.3f}" for v in ms["fused"].values())
                + f" | {best / ms['worker']:.2f} | {max(errors):.4f} |"
            )
            print(lines[-1], flush=True)
            assert max(errors) < 0.05, lines[-1]  # a missed or doubled tile is the whole value
    text = "\n".join(lines) + "\n"
    (args.out / "lora_fused.md").write_text(text)
    (args.out / "lora_fused.json").write_text(json.dumps(result, indent=1))
    print(text)


if __name__ == "__main__":
    main()
