"""Where a ControlNet step's time goes on the GPU (issue 24, 5): one SD1.5-sized ControlNet
forward (random weights, the real control embedding's widths), fp16, 512x512, at 2 and 62 rows
(one job alone with guidance, and a full call of the GPU check's (a)), in the ways it could run:

  eager              as the worker runs it today (NCHW, as loaded)
  eager cl+fused     channels-last, attention projections fused (the UNet's layout)
  eager, embedded    the control image's embedding computed once (it depends on the picture
                     only), each step's forward starting from it
  compiled           torch.compile, reduce-overhead (CUDA graphs), as the UNet is compiled
  compiled, embedded both
  residual plumbing  the worker's per-step zeros for every row and the per-row index_add

Prints ms per call, and the compile seconds, as a table; writes OUT/controlnet_step.json.

    python3 -m bench.controlnet_step --out DIR
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
from worker.tiny import build_tiny_model
from worker.tiny_addons import build_tiny_controlnet

MODEL = Path("/tmp/sdserve-bench/sd15")
ROWS = (2, 62)


def timed(fn: Any, turns: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(turns):
        fn()
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - started) / turns


def measure(rows: int, nets: dict[str, Any], embed: Any, results: dict[str, Any]) -> None:
    """Every way at `rows` rows, into results."""
    base, laid, bare = nets["base"], nets["laid"], nets["bare"]
    sample = torch.randn(rows, 4, 64, 64, device="cuda", dtype=torch.float16)
    sample_cl = sample.to(memory_format=torch.channels_last)
    t = torch.full((rows,), 500.0, device="cuda")
    context = torch.randn(rows, 77, 768, device="cuda", dtype=torch.float16)
    image = torch.rand(rows, 3, 512, 512, device="cuda", dtype=torch.float16)
    embedded = embed(image)

    def run(net: Any, x: torch.Tensor, cond: torch.Tensor) -> Any:
        return net(x, t, context, cond, return_dict=False)

    ways: dict[str, Any] = {
        "eager": lambda: run(base, sample_cl, image),
        "eager cl+fused": lambda: run(laid, sample_cl, image),
        "eager, embedded": lambda: run(bare, sample_cl, embedded),
        "control embedding alone": lambda: embed(image),
    }
    down, mid = run(base, sample, image)
    shapes = [r.shape[1:] for r in (*down, mid)]
    index = torch.arange(0, rows, 2, device="cuda")

    def plumbing() -> None:
        for shape in shapes:
            out = torch.zeros(rows, *shape, device="cuda", dtype=torch.float16)
            out.index_add_(0, index, torch.ones(len(index), *shape, device="cuda",
                                                dtype=torch.float16))  # fmt: skip

    ways["residual plumbing (half the rows)"] = plumbing
    for name, fn in ways.items():
        results["ms"][f"{name} @ {rows}"] = timed(fn)
        print(f"{name} @ {rows}: {results['ms'][f'{name} @ {rows}']:.2f} ms", flush=True)
    for name, net, cond in (("compiled", base, image), ("compiled, embedded", bare,
                                                         embedded)):  # fmt: skip
        compiled = torch.compile(copy.deepcopy(net), mode="reduce-overhead",
                                 fullgraph=True)  # fmt: skip

        def call(c: Any = compiled, k: torch.Tensor = cond) -> Any:
            torch.compiler.cudagraph_mark_step_begin()  # type: ignore[no-untyped-call]
            return run(c, sample_cl, k)

        started = time.monotonic()
        call()
        call()
        results["compile_s"][f"{name} @ {rows}"] = time.monotonic() - started
        results["ms"][f"{name} @ {rows}"] = timed(call)
        print(
            f"{name} @ {rows}: {results['ms'][f'{name} @ {rows}']:.2f} ms (compiled"
            f" in {results['compile_s'][f'{name} @ {rows}']:.0f}s)",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from diffusers import ControlNetModel

    if not (MODEL / "model_index.json").exists():
        build_tiny_model(MODEL, "sd15")
    folder = MODEL.parent / "controlnet-sd15"
    if not (folder / "config.json").exists():
        build_tiny_controlnet(MODEL, folder, seed=1, embedding=(16, 32, 96, 256))
    base = ControlNetModel.from_pretrained(str(folder), torch_dtype=torch.float16)
    base = base.cuda().eval().requires_grad_(False)
    laid = copy.deepcopy(base)
    laid.fuse_qkv_projections()
    laid.to(memory_format=torch.channels_last)
    embed = base.controlnet_cond_embedding
    bare = copy.deepcopy(base)
    bare.controlnet_cond_embedding = torch.nn.Identity()  # takes the embedding itself
    results: dict[str, Any] = provenance("cuda") | {"ms": {}, "compile_s": {}}
    torch.backends.cudnn.benchmark = True
    with torch.inference_mode():
        for rows in ROWS:
            measure(rows, {"base": base, "laid": laid, "bare": bare}, embed, results)
            (args.out / "controlnet_step.json").write_text(json.dumps(results, indent=2))
    lines = [f"ControlNet step, {results['gpu']}, {results['date']}, commit {results['commit']},"
             f" `{results['command']}`", "", "| way | ms @ 2 rows | ms @ 62 rows |",
             "|---|---|---|"]  # fmt: skip
    for name in dict.fromkeys(k.rsplit(" @ ", 1)[0] for k in results["ms"]):
        cells = [f"{results['ms'].get(f'{name} @ {r}', float('nan')):.2f}" for r in ROWS]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    text = "\n".join(lines) + "\n"
    (args.out / "controlnet_step.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
