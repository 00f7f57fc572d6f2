"""The UNet's cross-attention runs on the kernel worker/attention.py chooses, its
self-attention on the default one: chosen per call site in the traced graph (one AOTAutograd
can cache), and the UNet's output the same as diffusers' processors make it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch._functorch.aot_autograd import aot_module_simplified

from worker.attention import CrossKernels, cross_attention_kernels, cross_kernel, default_kernel
from worker.components import load_components


def unet_inputs(unet: Any, rows: int = 2, tokens: int = 77) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    size = unet.config.sample_size
    sample = torch.randn(rows, unet.config.in_channels, size, size, generator=generator)
    context = torch.randn(rows, tokens, unet.config.cross_attention_dim, generator=generator)
    return sample, torch.tensor([500.0] * rows), context


def attention_modules(unet: Any) -> tuple[int, int]:
    """(self-attention, cross-attention) modules of the UNet."""
    found = [m.is_cross_attention for m in unet.modules() if hasattr(m, "is_cross_attention")]
    return found.count(False), found.count(True)


@pytest.mark.parametrize("fuse", [False, True])
def test_every_attention_processor_is_wrapped_once(tiny_model: Path, fuse: bool) -> None:
    parts = load_components(str(tiny_model), torch.device("cpu"), fuse=fuse)
    processors = parts.unet.attn_processors
    assert processors and all(isinstance(p, CrossKernels) for p in processors.values())
    assert not any(isinstance(p.inner, CrossKernels) for p in processors.values())
    cross_attention_kernels(parts.unet, torch.device("cpu"))  # again: still one wrapper each
    assert not any(isinstance(p.inner, CrossKernels) for p in parts.unet.attn_processors.values())


def math_kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = torch.ops.aten._scaled_dot_product_attention_math(query, key, value)[0]
    return out


def test_the_trace_takes_each_call_sites_kernel(tiny_model: Path) -> None:
    """With the math kernel for cross-attention (it decomposes into a softmax, where the CPU's
    flash kernel is one op), the traced graph has one flash call per self-attention module,
    one softmax per cross-attention module, and no call AOTAutograd's cache refuses (the
    `sdpa_kernel` context manager's)."""
    unet = load_components(str(tiny_model), torch.device("cpu"), fuse=False).unet
    unet.set_attn_processor({name: CrossKernels(p.inner, math_kernel)
                             for name, p in unet.attn_processors.items()})  # fmt: skip
    ops: list[str] = []
    dynamo_calls: list[str] = []

    def backend(gm: torch.fx.GraphModule, example: list[torch.Tensor]) -> Any:
        dynamo_calls.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")

        def forward(graph: torch.fx.GraphModule, _example: Any) -> Any:
            ops.extend(str(n.target) for n in graph.graph.nodes if n.op == "call_function")
            return graph

        return aot_module_simplified(gm, example, fw_compiler=forward)  # type: ignore[arg-type]

    compiled = torch.compile(unet, backend=backend, fullgraph=True)
    with torch.inference_mode():
        compiled(*unet_inputs(unet))  # type: ignore[no-untyped-call]
    selves, crosses = attention_modules(unet)
    assert selves and crosses
    assert sum("_scaled_dot_product_flash_attention_for_cpu" in op for op in ops) == selves
    assert sum("_safe_softmax" in op for op in ops) == crosses
    assert not any("sdpa_kernel" in call for call in dynamo_calls)


def test_a_cpu_keeps_the_default_kernel() -> None:
    assert cross_kernel(torch.device("cpu")) is default_kernel


@pytest.mark.parametrize("fuse", [False, True])
def test_the_unet_makes_the_same_output_as_diffusers_processors(
    tiny_model: Path, fuse: bool
) -> None:
    """The cross-attention computed here (separate and fused projections) equals diffusers'
    processors' to the bit, on the same kernel."""
    parts = load_components(str(tiny_model), torch.device("cpu"), fuse=fuse)
    unet = parts.unet
    inputs = unet_inputs(unet, tokens=154)
    with torch.inference_mode():
        wrapped = unet(*inputs).sample
        unet.set_attn_processor({name: p.inner for name, p in unet.attn_processors.items()})
        plain = unet(*inputs).sample
    torch.testing.assert_close(wrapped, plain, rtol=0, atol=0)
