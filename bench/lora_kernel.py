"""The LoRA rows' kernels on the GPU (worker/lora_kernel.py): equal to the tensor path, nothing
compiled again when the mix changes, and what they cost beside the base layers.

SD1.5's largest LoRA layers (32 rows, 64x64 latents: 4096 tokens of 320 features; linear and
1x1 convolution, channels-last), fp16, a stack of 8 layers, compiled as the worker compiles
(reduce-overhead: CUDA graphs; fullgraph). For each mix (no row with a LoRA, half the rows with
a LoRA of rank 16 to 128 as in the (l) load, half the rows with a rank-64 LoRA, every row at
rank 128): ms per stack call for the base layers alone, the tensor
path and the kernel, and the largest difference between the two paths. `--sweep` first times
the kernel alone (eager launches, the same layers and mixes) for each way of cutting its work
(`worker.lora_kernel.Tiles`), to choose the defaults. `--shapes` first times the kernel on the
UNets' other layer shapes (deep levels, feed-forward, cross-attention, time embedding) at 2
rows (one request alone) and 32, every row with a rank-64 LoRA, with its outputs spread over
the GPU (`worker.lora_kernel.cut`) and without, beside the base linear layer: 8 launches
replayed from a CUDA graph, so Python's launch costs are not counted; and each way's error
against the rows' deltas summed in float32 (a wrong grid would miss or double outputs).
`--widths` first times the kernel alone with each LoRA row at its own rank width (the default,
`Tiles.narrow`) against every LoRA row at the call's width (the kernel before it).

    python3 -m bench.lora_kernel --out DIR [--sweep] [--shapes] [--widths]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from worker.adapters import UNIT, RowBuffers, RowLora, RowMix, row_order

ROWS, SIDE, FEATURES, ROW_UNITS, POOL, DEPTH = 32, 64, 320, 16, 1 + 4 * 16, 8


def stack(conv: bool, buffers: RowBuffers) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(DEPTH):
        base = nn.Conv2d(FEATURES, FEATURES, 1) if conv else nn.Linear(FEATURES, FEATURES)
        layer = RowLora(base.cuda().half(), POOL, buffers)
        with torch.no_grad():
            layer.down[1:].normal_(0, 0.02)
            layer.up[1:].normal_(0, 0.02)
        layers.append(layer)
    return nn.Sequential(*layers)


# The (l) load's rows (bench/loras.py): half without LoRA, half with one of ranks 16 to 128.
MIXED_UNITS = (2, 4, 8, 16)


def write_mix(buffers: RowBuffers, mix: str) -> None:
    units = torch.zeros(ROWS, ROW_UNITS, dtype=torch.long)
    scales = torch.zeros(ROWS, ROW_UNITS * UNIT)
    for r in range(ROWS):
        take = {"all128": ROW_UNITS, "half64": ROW_UNITS // 2 if r % 2 else 0,
                "mixed": MIXED_UNITS[r // 2 % 4] if r % 2 else 0}.get(mix, 0)  # fmt: skip
        if take:
            units[r, :take] = torch.arange(1, take + 1) + (r % 3) * 16
            scales[r, : take * UNIT] = 0.8
    buffers.write(RowMix(units.to(buffers.units.device), scales.to(buffers.scales.device)))


def timed(fn: Any, x: Any, turns: int = 30) -> float:
    for _ in range(3):
        fn(x)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(turns):
        fn(x)
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / turns * 1000


def layer_inputs(conv: bool) -> torch.Tensor:
    if conv:
        x = torch.randn(ROWS, FEATURES, SIDE, SIDE, device="cuda", dtype=torch.half)
        return x.to(memory_format=torch.channels_last)
    return torch.randn(ROWS, SIDE * SIDE, FEATURES, device="cuda", dtype=torch.half)


def kernel_alone(
    layers: list[RowLora], out: torch.Tensor, buffers: RowBuffers, conv: bool, tiles: Any
) -> Any:
    """The 8 layers' kernel launches alone, on one output (what `timed` calls)."""
    from worker import lora_kernel

    def call(x: torch.Tensor) -> None:
        for layer in layers:
            lora_kernel.add_rows(out, x, layer.down, layer.up, buffers.units, buffers.scales,
                                 buffers.order, conv, tiles)  # fmt: skip

    return call


def sweep(lines: list[str], result: dict[str, Any]) -> None:
    """ms for the kernel alone over the stack's 8 layers, for each tiling, mix and layer kind."""
    from worker import lora_kernel

    lines += [
        "| layers | mix | tokens | features | warps | kernel ms |",
        "|---|---|---|---|---|---|",
    ]
    for conv in (False, True):
        buffers = RowBuffers(ROWS, ROW_UNITS, torch.device("cuda"))
        x = layer_inputs(conv)
        layers: list[RowLora] = list(stack(conv, buffers))  # type: ignore[arg-type]
        out = layers[0].base(x)  # one output the launches add to, made once per layer kind
        kind = "1x1 conv" if conv else "linear"
        for mix in ("half64", "all128"):
            write_mix(buffers, mix)
            for tokens, features, warps in itertools.product((32, 64, 128), (32, 64), (4, 8)):
                tiles = lora_kernel.Tiles(tokens, features, warps)
                ms = timed(kernel_alone(layers, out, buffers, conv, tiles), x)
                result["sweep"].append({"layers": kind, "mix": mix, "tiles": tiles.__dict__,
                                        "ms": ms})  # fmt: skip
                lines.append(f"| {kind} | {mix} | {tokens} | {features} | {warps} | {ms:.3f} |")
                print(lines[-1], flush=True)
    lines.append("")


# (what, tokens, input features, output features): the layers `stack` leaves out.
SHAPES = [
    ("SD1.5 16x16 feed-forward in", 256, 1280, 10240),
    ("SD1.5 16x16 feed-forward out", 256, 5120, 1280),
    ("SD1.5 cross-attention key", 77, 768, 1280),
    ("SD1.5 64x64 attention", 4096, 320, 320),
    ("SDXL 32x32 attention", 1024, 1280, 1280),
    ("SDXL 32x32 feed-forward in", 1024, 1280, 10240),
    ("SDXL 32x32 feed-forward out", 1024, 5120, 1280),
    ("time embedding", 1, 1280, 1280),
]


def widths(lines: list[str], result: dict[str, Any]) -> None:
    """The kernel alone over the stack's 8 layers, each LoRA row at the call's rank width (the
    kernel before `Tiles.narrow`) against each at its own, for each mix; and the largest
    difference between their outputs (the same sums: none but rounding)."""
    from worker import lora_kernel

    lines += [
        "| layers | mix | kernel, one rank width ms | kernel, each row's width ms | ratio |"
        " max diff |",
        "|---|---|---|---|---|---|",
    ]
    result["widths"] = []
    for conv in (False, True):
        buffers = RowBuffers(ROWS, ROW_UNITS, torch.device("cuda"))
        x = layer_inputs(conv)
        layers: list[RowLora] = list(stack(conv, buffers))  # type: ignore[arg-type]
        out = layers[0].base(x)
        kind = "1x1 conv" if conv else "linear"
        for mix in ("mixed", "half64", "all128"):
            write_mix(buffers, mix)
            ms, outs = {}, {}
            for narrow in (False, True):
                tiles = lora_kernel.Tiles(narrow=narrow)
                ms[narrow] = timed(kernel_alone(layers, out, buffers, conv, tiles), x)
                once = layers[0].base(x)
                lora_kernel.add_rows(once, x, layers[0].down, layers[0].up, buffers.units,
                                     buffers.scales, buffers.order, conv, tiles)  # fmt: skip
                outs[narrow] = once.float()
            diff = (outs[True] - outs[False]).abs().max().item()
            result["widths"].append({"layers": kind, "mix": mix, "one_ms": ms[False],
                                     "own_ms": ms[True], "max_diff": diff})  # fmt: skip
            lines.append(f"| {kind} | {mix} | {ms[False]:.3f} | {ms[True]:.3f} |"
                         f" {ms[True] / ms[False]:.2f} | {diff:.5f} |")  # fmt: skip
            print(lines[-1], flush=True)
            assert diff < 0.01, lines[-1]
    lines.append("")


def graphed_ms(call: Any) -> float:
    """ms per call of `call` (8 launches), captured once in a CUDA graph and replayed."""
    call()  # compiled (Triton) before the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return timed(lambda _: graph.replay(), None, turns=20)


@dataclass
class Case:
    """One linear layer's shape at some rows: its input, base weight and output, a pool of
    units, and each row's units and scales (a rank-64 LoRA on every row or every other one)."""

    x: torch.Tensor
    weight: torch.Tensor
    out: torch.Tensor
    down: torch.Tensor
    up: torch.Tensor
    units: torch.Tensor
    scales: torch.Tensor
    order: torch.Tensor  # the kernel's work list, made once (not inside the timed calls)

    @classmethod
    def make(cls, tokens: int, inputs: int, outputs: int, rows: int, every: bool) -> Case:
        import torch.nn.functional as F

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, device="cuda", dtype=torch.half) * 0.02

        x, weight = randn(rows, tokens, inputs), randn(outputs, inputs)
        units = torch.arange(1, 9, device="cuda").repeat(rows, 2)  # rank 64 of 128
        scales = torch.zeros(rows, ROW_UNITS * UNIT, device="cuda")
        scales[:: 1 if every else 2][:, : 8 * UNIT] = 0.8  # every other row: the even ones
        down, up = randn(POOL, UNIT, inputs), randn(POOL, UNIT, outputs)
        return cls(x, weight, F.linear(x, weight), down, up, units, scales, row_order(scales))

    def add(self, out: torch.Tensor, tiles: Any = None) -> None:
        """The rows' units added to `out` in place (at the kernel's default tiles if None)."""
        from worker import lora_kernel

        lora_kernel.add_rows(out, self.x, self.down, self.up, self.units, self.scales,
                             self.order, False,
                             tiles if tiles is not None else lora_kernel.TILES)  # fmt: skip

    def kernel(self, tiles: Any) -> Any:
        """8 launches of the kernel adding to the layer's output (what `graphed_ms` times)."""

        def call() -> None:
            for _ in range(DEPTH):
                self.add(self.out, tiles)

        return call

    def base(self) -> None:
        """8 of the base layer's products."""
        import torch.nn.functional as F

        for _ in range(DEPTH):
            F.linear(self.x, self.weight)


def row_deltas(
    x: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    units: torch.Tensor,
    scales: torch.Tensor,
) -> torch.Tensor:
    """Each row's LoRA delta in float32 from the weights as the kernels read them: what their
    sums are checked against."""
    low = torch.einsum("rti,rki->rtk", x.float(), down[units].flatten(1, 2).float())
    return torch.einsum("rtk,rko->rto", low * scales[:, None, :], up[units].flatten(1, 2).float())


def shape_ms(tokens: int, inputs: int, outputs: int, rows: int) -> dict[str, float]:
    """ms over 8 launches of one layer shape: the base linear layer, the kernel with one
    program a token tile, and with its outputs spread (every row a rank-64 LoRA)."""
    from worker import lora_kernel

    case = Case.make(tokens, inputs, outputs, rows, every=True)
    delta = row_deltas(case.x, case.down, case.up, case.units, case.scales)

    def error(tiles: Any) -> float:
        """The largest error of one launch against `delta`, relative to its largest value."""
        summed = torch.zeros_like(case.out)  # the delta alone: fp16 rounds it, not a larger sum
        case.add(summed, tiles)
        return ((summed.float() - delta).abs().max() / delta.abs().max()).item()

    return {
        "base": graphed_ms(case.base),
        "one": graphed_ms(case.kernel(lora_kernel.Tiles(spread=False))),
        "spread": graphed_ms(case.kernel(lora_kernel.Tiles())),
        "one_error": error(lora_kernel.Tiles(spread=False)),
        "spread_error": error(lora_kernel.Tiles()),
    }


def shapes(lines: list[str], result: dict[str, Any]) -> None:
    """The kernel's ms over 8 launches for each of `SHAPES`, spread and not, beside the base."""
    lines += [
        "| layer (tokens, in, out) | rows | base ms | kernel, one program a token tile ms |"
        " kernel, outputs spread ms | spread / one | error one / spread |",
        "|---|---|---|---|---|---|---|",
    ]
    result["shapes"] = []
    for (what, tokens, inputs, outputs), rows in itertools.product(SHAPES, (2, 32)):
        ms = shape_ms(tokens, inputs, outputs, rows)
        result["shapes"].append({"layer": what, "tokens": tokens, "inputs": inputs,
                                 "outputs": outputs, "rows": rows, "ms": ms})  # fmt: skip
        lines.append(
            f"| {what} ({tokens}, {inputs}, {outputs}) | {rows} | {ms['base']:.3f} |"
            f" {ms['one']:.3f} | {ms['spread']:.3f} | {ms['spread'] / ms['one']:.2f} |"
            f" {ms['one_error']:.4f} / {ms['spread_error']:.4f} |"
        )
        print(lines[-1], flush=True)
        # fp16 activations and outputs: parts in a thousand of the delta; a missed or doubled
        # output span would be the whole delta.
        assert max(ms["one_error"], ms["spread_error"]) < 0.05, lines[-1]
    lines.append("")


# The tilings `--tiles` times at each of `SHAPES`: (tokens, features, warps, stages, splits).
# Each (tokens, features, warps, stages) is one Triton build (about 3 s); splits are free.
TILINGS = [
    (tokens, features, warps, stages, splits)
    for tokens, features, warps, stages in itertools.product(
        (32, 64, 128), (64, 128), (4, 8), (2, 3)
    )
    if tokens * features < 128 * 128 or warps == 8
    for splits in (0, 2)
]


def tiling_ms(tokens: int, inputs: int, outputs: int, rows: int) -> dict[str, Any]:
    """One layer shape at `rows` rows, half of them with a rank-64 LoRA (the (l) load's
    share): ms over 8 launches of the base product, of the kernel at its default tiles, and
    at each of `TILINGS` that builds (each checked against the default's output)."""
    import torch.nn.functional as F

    from worker import lora_kernel

    case = Case.make(tokens, inputs, outputs, rows, every=False)
    expected = case.out.clone()
    case.add(expected)

    timings = {}
    for tiling in TILINGS:
        tiles = lora_kernel.Tiles(*tiling[:3], stages=tiling[3], splits=tiling[4])
        once = F.linear(case.x, case.weight)
        try:
            case.add(once, tiles)
        except Exception as error:  # past the SM's shared memory: not a candidate
            print(f"({tokens}, {inputs}, {outputs}) {rows} {tiling}: {error!r}"[:200], flush=True)
            continue
        err = (once.float() - expected.float()).abs().max().item()
        assert err < 0.01, f"({tokens}, {inputs}, {outputs}) {rows} {tiling}: off by {err}"
        timings[tiling] = graphed_ms(case.kernel(tiles))
    return {"base": graphed_ms(case.base), "default": graphed_ms(case.kernel(lora_kernel.TILES)),
            "timings": timings}  # fmt: skip


def tiles_by_shape(lines: list[str], result: dict[str, Any], rows_list: tuple[int, ...]) -> None:
    """`tiling_ms` for each of `SHAPES` with many tokens at each of `rows_list`: the default's
    ms, the best tiling and its ms. The defaults were chosen on SD1.5's 64x64 layers only
    (`--sweep`); SDXL's are where LoRA rows cost most (BENCHMARKS.md, thirty-eighth session).
    A short prompt's or the time embedding's shapes are left out: each is a Triton build of
    its own (token counts not a multiple of 16) for little of a step."""
    lines += [
        "| layer (tokens, in, out) | rows | base ms | default tiles ms | best tiles"
        " (tokens, features, warps, stages, splits) | best ms | best / default |",
        "|---|---|---|---|---|---|---|",
    ]
    result["tiles"] = []
    shapes = [shape for shape in SHAPES if shape[1] >= 256]
    for (what, tokens, inputs, outputs), rows in itertools.product(shapes, rows_list):
        ms = tiling_ms(tokens, inputs, outputs, rows)
        timings = ms["timings"]
        best = min(timings, key=timings.__getitem__)
        result["tiles"].append({"layer": what, "tokens": tokens, "inputs": inputs,
                                "outputs": outputs, "rows": rows, "base": ms["base"],
                                "default": ms["default"], "best": list(best),
                                "timings": [[*k, v] for k, v in timings.items()]})  # fmt: skip
        lines.append(f"| {what} ({tokens}, {inputs}, {outputs}) | {rows} | {ms['base']:.3f} |"
                     f" {ms['default']:.3f} | {best} | {timings[best]:.3f} |"
                     f" {timings[best] / ms['default']:.2f} |")  # fmt: skip
        print(lines[-1], flush=True)
    lines.append("")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sweep", action="store_true", help="time each tiling first")
    parser.add_argument("--shapes", action="store_true", help="time the other layer shapes")
    parser.add_argument("--widths", action="store_true",
                        help="time each row at its own rank width against one width")  # fmt: skip
    parser.add_argument("--tiles", action="store_true",
                        help="time each tiling at each shape, half the rows with LoRA")  # fmt: skip
    parser.add_argument("--tiles-only", action="store_true", help="--tiles, then stop")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "rows": [], "sweep": []}
    lines: list[str] = []
    with torch.no_grad():
        if args.tiles or args.tiles_only:
            tiles_by_shape(lines, result, (16, 32))
            if args.tiles_only:
                (args.out / "lora_kernel.md").write_text("\n".join(lines) + "\n")
                (args.out / "lora_kernel.json").write_text(json.dumps(result, indent=2))
                return
        if args.shapes:
            shapes(lines, result)
        if args.sweep:
            sweep(lines, result)
        if args.widths:
            widths(lines, result)
    lines += ["| layers | mix | base ms | tensor path ms | kernels ms | max diff |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for conv in (False, True):
        torch._dynamo.reset()
        torch._dynamo.config.error_on_recompile = False
        buffers = RowBuffers(ROWS, ROW_UNITS, torch.device("cuda"))
        model = stack(conv, buffers)
        bases = nn.Sequential(*[layer.base for layer in model])  # type: ignore[arg-type]
        x = layer_inputs(conv)
        # Two stacks of the same weights and pools: one takes the tensor path, one the kernels.
        buffers_k = RowBuffers(ROWS, ROW_UNITS, torch.device("cuda"), kernels=True)
        twin = copy.deepcopy(model)
        for layer in twin:
            object.__setattr__(layer, "buffers_", buffers_k)
        buffers.kernels = False
        stacks = {"tensor": (model, buffers), "kernels": (twin, buffers_k)}
        fast: dict[str, Any] = {"mode": "reduce-overhead", "fullgraph": True}
        compiled = {path: torch.compile(m, **fast) for path, (m, _) in stacks.items()}
        compiled["base"] = torch.compile(bases, **fast)
        with torch.no_grad():
            for path, fn in compiled.items():
                write_mix(stacks.get(path, stacks["tensor"])[1], "half64")
                fn(x)  # compiled here, once: the mixes below only replay
            torch._dynamo.config.error_on_recompile = True  # a mix that compiles again fails
            base_ms = timed(compiled["base"], x)
            for mix in ("none", "mixed", "half64", "all128"):
                ms, outs = {}, {}
                for path in ("tensor", "kernels"):
                    write_mix(stacks[path][1], mix)
                    ms[path] = timed(compiled[path], x)
                    outs[path] = compiled[path](x).float().clone()
                eager = model(x).float()
                diff = max((outs["kernels"] - eager).abs().max().item(),
                           (outs["tensor"] - eager).abs().max().item())  # fmt: skip
                kind = "1x1 conv, channels-last" if conv else "linear"
                row = {"layers": kind, "mix": mix, "base_ms": base_ms, "tensor_ms": ms["tensor"],
                       "kernels_ms": ms["kernels"], "max_diff": diff}  # fmt: skip
                result["rows"].append(row)
                lines.append(f"| {DEPTH} x {kind} | {mix} | {base_ms:.2f} | {ms['tensor']:.2f} |"
                             f" {ms['kernels']:.2f} | {diff:.4f} |")  # fmt: skip
                print(lines[-1], flush=True)
                assert diff < 0.05, f"{kind} {mix}: the paths differ by {diff}"
    text = "\n".join(lines) + "\n"
    (args.out / "lora_kernel.md").write_text(text)
    (args.out / "lora_kernel.json").write_text(json.dumps(result, indent=2))
    print(text)


if __name__ == "__main__":
    main()
