"""What LoRA layers add to a UNet's compile, on the CPU: dynamo and AOT autograd (backend
`aot_eager`, the device-independent part of a worker's compile), for an SD1.5- or SDXL-sized
UNet laid out as a CUDA worker lays it out (fused projections, channels-last), rows and prompt
length dynamic as `worker/compiled.py` marks them, without and with `worker.adapters`' LoRA
layers. The layers' op (`sdserve::lora_layer`) runs its CPU stand-in here (the tensor path's
arithmetic); what is timed is the tracing, which sees only the op.

    python3 -m bench.lora_compile [--arch sd15|sdxl] [--backend aot_eager|inductor]

Each variant runs in a process of its own (dynamo's caches are per process); about 1 minute
for SD1.5, 3 for SDXL, and 10 GiB of memory for SDXL's weights in float32.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import Any

ROWS, TOKENS, LATENT = 16, 154, 8  # traced at 16 rows: the CPU's kernels branch below it


def variant(arch: str, lora: bool, backend: str) -> None:
    """One compile, printed as `seconds <compile_inner> <layers>`."""
    os.environ["TRITON_INTERPRET"] = "1"  # the LoRA layers take the kernel's side on the CPU
    import torch
    from diffusers import UNet2DConditionModel
    from torch._dynamo.utils import compile_times

    from worker import lora_kernel
    from worker.adapters import RowBuffers, wrap
    from worker.tiny import ARCHITECTURES, xl_unet

    @lora_kernel.lora_layer.register_kernel("cpu")
    def _tensor_path(x, weight, bias, down, up, units, scales):  # type: ignore[no-untyped-def]
        conv = weight.dim() == 4
        out = lora_kernel.base_product(x, weight, bias)
        rows = x.shape[0]
        xs, outs = lora_kernel.as_tokens(x, conv), lora_kernel.as_tokens(out, conv)
        assert xs is not None and outs is not None  # `layer` looked
        h = torch.bmm(xs, down[units[:rows]].flatten(1, 2).transpose(1, 2))
        outs.add_(torch.bmm(h * scales[:rows, None, :].to(x.dtype), up[units[:rows]].flatten(1, 2)))
        return out

    torch.manual_seed(0)
    if arch == "sd15":
        unet = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4,
                                    **ARCHITECTURES["sd15"]["unet"])  # fmt: skip
    else:
        unet = xl_unet(arch)
    unet = unet.eval()
    unet.fuse_qkv_projections()
    unet.to(memory_format=torch.channels_last)
    layers = wrap("unet", unet, 40, RowBuffers(ROWS, 16, torch.device("cpu"))) if lora else {}
    torch._dynamo.config.automatic_dynamic_shapes = False
    fast = torch.compile(unet, backend=backend, fullgraph=True)
    sample = torch.zeros(ROWS, 4, LATENT, LATENT)
    t = torch.full((ROWS,), 500.0)
    context = torch.zeros(ROWS, TOKENS, unet.config.cross_attention_dim)
    extra: dict[str, Any] = {}
    if arch != "sd15":
        extra["added_cond_kwargs"] = {"text_embeds": torch.zeros(ROWS, 1280),
                                      "time_ids": torch.zeros(ROWS, 6)}  # fmt: skip
    for x in (sample, t, context, *extra.get("added_cond_kwargs", {}).values()):
        torch._dynamo.mark_dynamic(x, 0, min=ROWS, max=62)
    torch._dynamo.mark_dynamic(context, 1, min=77, max=308)
    with torch.inference_mode():
        fast(sample, t, encoder_hidden_states=context, **extra)  # type: ignore[no-untyped-call]
    names, values = compile_times(repr="csv", aggregate=True)
    print("seconds", dict(zip(names, values, strict=True))["_compile.compile_inner"], len(layers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="sd15", help="sd15 or sdxl (worker/tiny.py's sizes)")
    parser.add_argument("--backend", default="aot_eager")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # one variant, in its own process
    args = parser.parse_args()
    if args.variant:
        variant(args.arch, args.variant == "lora", args.backend)
        return
    env = os.environ | {"TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}
    rows: list[tuple[str, int, float, float]] = []
    for name in ("base", "lora"):
        began = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "bench.lora_compile", "--arch", args.arch, "--backend",
             args.backend, "--variant", name],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        took, count = done.stdout.rsplit("seconds", 1)[1].split()[:2]
        rows.append((name, int(count), float(took), time.perf_counter() - began))
    print(f"\n{args.arch}, backend {args.backend}\n")
    print("| UNet | adapted layers | compile s | process s |\n|---|---|---|---|")
    for name, layers, seconds, wall in rows:
        what = "without LoRA layers" if name == "base" else "with LoRA layers"
        print(f"| {what} | {layers} | {seconds:.1f} | {wall:.0f} |")


if __name__ == "__main__":
    main()
