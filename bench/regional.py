"""Cold start: what compiling the whole UNet costs against compiling its repeated blocks
(regional compilation, diffusers' `compile_repeated_blocks`), and what each gives per step.

For each variant, on a UNet loaded fresh (fp16, fused QKV, channels-last, as the worker loads
it) and with inductor's caches off (a cold start): the seconds of the first call at 2 rows (the
compilation), of the first calls at 62 rows (a second shape: graph recording, or nothing), and
the UNet step's GPU time at 62 rows (the throughput figure) and at 2 rows (one image alone).

  full              torch.compile of the whole UNet, CUDA graphs (what the worker ships)
  blocks            each transformer block compiled alone, no CUDA graphs
  blocks+graphs     each transformer block compiled alone, with CUDA graphs

    python -m bench.regional --out DIR [--model DIR]
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
from worker.tiny import build_tiny_model

ROWS = (2, 62)


def load_unet(model: str, device: torch.device) -> Any:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=torch.float16)
    unet = unet.to(device).eval().requires_grad_(False)
    unet.fuse_qkv_projections()
    return unet.to(memory_format=torch.channels_last)


def compiled(unet: Any, variant: str, backend: str) -> Callable[..., Any]:
    options: dict[str, Any] = {"backend": backend, "fullgraph": True}
    graphs = {"mode": "reduce-overhead"} if backend == "inductor" else {}
    if variant == "full":
        whole: Callable[..., Any] = torch.compile(unet, **options, **graphs)  # type: ignore[call-overload]
        return whole
    for block in unet.modules():
        if type(block).__name__ in unet._repeated_blocks:
            block.compile(dynamic=True, **options, **(graphs if variant == "blocks+graphs" else {}))
    return unet  # type: ignore[no-any-return]


def measure(model: str, variant: str, backend: str, side: int) -> dict[str, float]:
    torch._dynamo.reset()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    unet = load_unet(model, device)
    fn = compiled(unet, variant, backend)
    config = unet.config
    latent = side // 8

    def inputs(rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sample = torch.randn(rows, config.in_channels, latent, latent, device=device,
                             dtype=torch.float16)  # fmt: skip
        t = torch.full((rows,), 500.0, device=device)
        context = torch.randn(rows, 77, config.cross_attention_dim, device=device,
                              dtype=torch.float16)  # fmt: skip
        if variant == "full":
            for tensor in (sample, t, context):
                torch._dynamo.mark_dynamic(tensor, 0, min=2, max=62)
        return sample, t, context

    result: dict[str, float] = {}
    with torch.inference_mode():
        for rows in ROWS:
            sample, t, context = inputs(rows)

            def call(sample: Any = sample, t: Any = t, context: Any = context) -> Any:
                torch.compiler.cudagraph_mark_step_begin()  # type: ignore[no-untyped-call]
                return fn(sample, t, encoder_hidden_states=context).sample.clone()

            started = time.perf_counter()
            for _ in range(2):  # CUDA graph trees record a shape at its second call
                call()
            if device.type == "cuda":
                torch.cuda.synchronize()
            result[f"first_s_{rows}"] = time.perf_counter() - started
            if device.type == "cuda":
                result[f"step_ms_{rows}"] = statistics.median(event_times_ms(call, 10))
    print(variant, result, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else "")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--model", default="/tmp/sdserve-bench/sd15")
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--backend", default="inductor", help="eager: a smoke run on the CPU")
    parser.add_argument("--variants", default="full,blocks,blocks+graphs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not Path(args.model, "model_index.json").exists():
        build_tiny_model(Path(args.model), "sd15")
    torch._inductor.config.force_disable_caches = True  # a cold start: nothing from a cache
    results = {v: measure(args.model, v, args.backend, args.side)
               for v in args.variants.split(",")}  # fmt: skip
    (args.out / "regional.json").write_text(json.dumps(results, indent=2))
    print("| variant | first call, 2 rows (compile) s | first calls, 62 rows s | step 62 rows ms |"
          " step 2 rows ms |\n|---|---|---|---|---|")  # fmt: skip
    nan = float("nan")
    for variant, r in results.items():
        print(
            f"| {variant} | {r['first_s_2']:.1f} | {r['first_s_62']:.1f} |"
            f" {r.get('step_ms_62', nan):.1f} | {r.get('step_ms_2', nan):.1f} |"
        )


if __name__ == "__main__":
    main()
