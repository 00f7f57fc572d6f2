"""The UNet's cross-attention runs on the kernels worker/attention.py chooses, its
self-attention on the default one: chosen per call site when the compiled graph is traced,
and the images the same as before."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch._functorch.aot_autograd import aot_module_simplified
from torch.nn.attention import SDPBackend

from worker import attention
from worker.attention import CrossKernels, cross_attention_kernels
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
    cross_attention_kernels(parts.unet)  # again: still one wrapper each
    assert not any(isinstance(p.inner, CrossKernels) for p in parts.unet.attn_processors.values())


def test_the_trace_takes_each_call_sites_kernel(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the math kernel chosen for cross-attention (it decomposes into a softmax, where
    the CPU's flash kernel is one op), the traced graph has one flash call per self-attention
    module and one softmax per cross-attention module."""
    monkeypatch.setattr(attention, "CROSS_KERNELS", [SDPBackend.MATH])
    unet = load_components(str(tiny_model), torch.device("cpu"), fuse=False).unet
    ops: list[str] = []

    def backend(gm: torch.fx.GraphModule, example: list[torch.Tensor]) -> Any:
        def forward(graph: torch.fx.GraphModule, _example: Any) -> Any:
            ops.extend(str(n.target) for n in graph.graph.nodes if n.op == "call_function")
            return graph

        return aot_module_simplified(gm, example, fw_compiler=forward)

    compiled = torch.compile(unet, backend=backend, fullgraph=True)
    with torch.inference_mode():
        compiled(*unet_inputs(unet))
    selves, crosses = attention_modules(unet)
    assert selves and crosses
    assert sum("_scaled_dot_product_flash_attention_for_cpu" in op for op in ops) == selves
    assert sum("_safe_softmax" in op for op in ops) == crosses


def test_the_unet_makes_the_same_output_as_diffusers_processors(tiny_model: Path) -> None:
    parts = load_components(str(tiny_model), torch.device("cpu"), fuse=False)
    unet = parts.unet
    inputs = unet_inputs(unet, tokens=154)
    with torch.inference_mode():
        wrapped = unet(*inputs).sample
        unet.set_attn_processor({name: p.inner for name, p in unet.attn_processors.items()})
        plain = unet(*inputs).sample
    torch.testing.assert_close(wrapped, plain, rtol=0, atol=0)
