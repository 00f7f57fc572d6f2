"""What a new shape costs the first time it runs, per kind of kernel the UNet calls outside
inductor's own (convolutions, matrix products, attention by backend): the cost every warm-up
entry pays once per row bucket and prompt length before its CUDA graph is recorded.

Why: py-spy's samples of a cached start (`bench.gpu_check --profile-start`, H100,
2026-12-06) put 8.7 s of the UNet entries' 25 s in aten calls of CUDA graphs' warm-up runs,
against about 7 s of GPU work for all 48 entries.

    python3 -m bench.first_calls [--rows 2,4,8,12,16,20,24,32]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def timed(call: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    began = time.perf_counter()
    call()
    torch.cuda.synchronize()
    return (time.perf_counter() - began) * 1000


BACKENDS = {
    "default": None,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}


def attention(q: torch.Tensor, kv: torch.Tensor, backend: SDPBackend | None) -> torch.Tensor:
    if backend is None:
        return F.scaled_dot_product_attention(q, kv, kv)
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, kv, kv)


def cases(
    rows: int, conv: torch.nn.Module, weight: torch.Tensor
) -> dict[str, Callable[[], object]]:
    """The calls of one row count, each at a shape not run before."""
    dev, dt = weight.device, weight.dtype
    x = torch.randn(rows, 320, 64, 64, device=dev, dtype=dt)
    x = x.to(memory_format=torch.channels_last)
    found: dict[str, Callable[[], object]] = {
        "conv 320 3x3 at 64x64": partial(conv, x),
        "mm (rows x 4096, 320) x (320, 320)": partial(torch.matmul, x.reshape(-1, 320), weight),
    }
    q = torch.randn(rows, 8, 4096, 40, device=dev, dtype=dt)
    for tokens in (77, 154, 4096):
        kv = q if tokens == 4096 else torch.randn(rows, 8, tokens, 40, device=dev, dtype=dt)
        for name, backend in BACKENDS.items():
            found[f"attention {name}, 4096 x {tokens}"] = partial(attention, q, kv, backend)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", default="2,4,8,12,16,20,24,32")
    args = parser.parse_args()
    dev, dt = torch.device("cuda"), torch.float16
    conv = torch.nn.Conv2d(320, 320, 3, padding=1).to(dev, dt)
    conv = conv.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    weight = torch.randn(320, 320, device=dev, dtype=dt)
    print(torch.__version__, torch.cuda.get_device_name(), "cudnn", torch.backends.cudnn.version())  # type: ignore[no-untyped-call]
    print("| kernel | rows | first ms | second ms |")
    print("|---|---|---|---|")
    for rows in [int(r) for r in args.rows.split(",")]:
        for name, call in cases(rows, conv, weight).items():
            try:
                first = timed(call)
                second = timed(call)
                print(f"| {name} | {rows} | {first:.2f} | {second:.2f} |", flush=True)
            except RuntimeError as e:
                print(f"| {name} | {rows} | failed: {str(e).splitlines()[0][:80]} | |")


if __name__ == "__main__":
    main()
