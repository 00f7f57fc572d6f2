"""The UNet's attention shapes timed alone, per kernel: where the step's attention time goes and
whether any kernel at hand runs SD1.5's head size of 40 faster than the default. Self- and
cross-attention are summed apart (branch `cross-flash` ran cross-attention on flash attention:
what that costs a step is the `cross` sum's flash less its default; BENCHMARKS.md).

    python -m bench.attention --out DIR [--family sd15|sdxl] [--rows N]
        (one GPU; SD 1.5 at 512x512, 64 rows = 32 images with CFG by default;
         SDXL at 1024x1024, 16 rows = its max batch of 8 with CFG)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import flex_attention

from bench.timing import event_times_ms

TEXT_TOKENS = 77
# Per family: rows by default, heads' width, and (name, tokens, channels, transformer blocks at
# that level) of its UNet: SD1.5's at 512x512 (8 heads), SDXL's at 1024x1024 (heads of 64).
FAMILIES: dict[str, dict[str, Any]] = {
    "sd15": {"rows": 64, "heads": lambda channels: 8,
             "levels": [("64x64", 4096, 320, 5), ("32x32", 1024, 640, 5),
                        ("16x16", 256, 1280, 5), ("8x8", 64, 1280, 1)]},
    "sdxl": {"rows": 16, "heads": lambda channels: channels // 64,
             "levels": [("64x64", 4096, 640, 10), ("32x32", 1024, 1280, 60)]},
}  # fmt: skip


def kernels(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict[str, Callable[[], Any]]:
    head = q.shape[-1]
    padded = 64 * math.ceil(head / 64)

    def pad(x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, padded - head))

    qp, kp, vp = pad(q), pad(k), pad(v)
    compiled_flex = torch.compile(flex_attention)

    def backend(which: SDPBackend) -> Callable[[], Any]:
        def run() -> Any:
            with sdpa_kernel(which):
                return F.scaled_dot_product_attention(q, k, v)

        return run

    def cudnn_padded() -> Any:
        # Zero columns change neither QK^T nor the kept part of the output; scale stays 1/sqrt(d).
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(qp, kp, vp, scale=head**-0.5)[..., :head]

    return {
        "default": lambda: F.scaled_dot_product_attention(q, k, v),
        "cudnn": backend(SDPBackend.CUDNN_ATTENTION),
        "flash": backend(SDPBackend.FLASH_ATTENTION),
        "efficient": backend(SDPBackend.EFFICIENT_ATTENTION),
        f"cudnn_padded_to_{padded}": cudnn_padded,
        "flex_compiled": lambda: compiled_flex(q, k, v),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "attention-out")))
    parser.add_argument("--family", choices=sorted(FAMILIES), default="sd15")
    parser.add_argument("--rows", type=int, help="UNet rows (default: the family's)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    family = FAMILIES[args.family]
    rows = args.rows or family["rows"]
    results: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0), "family": args.family,
                               "rows": rows, "levels": []}  # fmt: skip
    totals: dict[str, dict[str, float]] = {"self": {}, "cross": {}}
    with torch.inference_mode():
        for name, tokens, channels, blocks in family["levels"]:
            heads = family["heads"](channels)
            head = channels // heads
            for kind, keys in (("self", tokens), ("cross", TEXT_TOKENS)):
                q = torch.randn(rows, heads, tokens, head, device="cuda", dtype=torch.float16)
                k = torch.randn(rows, heads, keys, head, device="cuda", dtype=torch.float16)
                v = torch.randn_like(k)
                reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
                flop = 4 * rows * heads * tokens * keys * head
                row: dict[str, Any] = {"level": name, "kind": kind, "head": head,
                                       "blocks": blocks}  # fmt: skip
                for label, fn in kernels(q, k, v).items():
                    try:
                        error = (fn().float() - reference).norm() / reference.norm()
                        ms = statistics.median(event_times_ms(fn, repeats=30))
                    except Exception as e:  # a kernel that refuses the shape, or fails to compile
                        row[label] = f"unavailable: {e}"[:160]
                        continue
                    row[label] = {"ms": round(ms, 3), "tflop_s": round(flop / ms / 1e9),
                                  "rel_error": float(f"{error:.1e}")}  # fmt: skip
                    totals[kind][label] = totals[kind].get(label, 0.0) + ms * blocks
                results["levels"].append(row)
                print(json.dumps(row), flush=True)
    results["per_unet_step_ms"] = {kind: {k: round(v, 2) for k, v in sums.items()}
                                   for kind, sums in totals.items()}  # fmt: skip
    (args.out / f"attention-{args.family}.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results["per_unet_step_ms"], indent=2))


if __name__ == "__main__":
    main()
