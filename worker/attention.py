"""Which attention kernel the UNet's (and a ControlNet's) cross-attention runs on.

Why: on an H100 with torch 2.11, PyTorch's default attention kernel is cuDNN's, and cuDNN
builds a graph for every new shape of an attention call the first time it meets it: about
60 ms each (`python3 -m bench.first_calls`: 58-69 ms at a new row count or context length,
0.1-0.3 ms for flash or memory-efficient attention at a new shape). Every warm-up entry (a row
bucket at a prompt length) meets new shapes: the four self-attention shapes of the UNet's
levels once per row bucket, and the four cross-attention shapes once per bucket and prompt
length, 4x as many. A cached start spent 8.7 s of its 25 s of UNet entries in those builds
(py-spy, `bench.gpu_check --profile-start`), a cold start as much.

Self-attention (4096 tokens against 4096 at 512x512) is where cuDNN's kernel pays: 2.4 ms
against flash's 4.3 at 32 rows. Cross-attention (4096 tokens against a prompt's 77-308) is
short work on any kernel (0.21 ms cuDNN, 0.26 flash at 32 rows), so on a GPU that has it, it
runs on flash attention: its shapes, 4x the self-attention's, build nothing.

How: the flash kernel is called by its op, in a processor of this module for the plain
cross-attention of SD's and SDXL's transformer blocks (diffusers' `AttnProcessor2_0` and
`FusedAttnProcessor2_0` computations, with the kernel named). Not with `sdpa_kernel` around
diffusers' processor: dynamo puts that context manager's calls into the traced graph, and
AOTAutograd's cache refuses such a graph, so every start traced the UNet again (a cached start
on an H100: 25 s for the first entry instead of 15, 2026-12-06). A call this module does not
know (a mask: `SDSERVE_MASKED_CONTEXTS`; norms, residuals, other processors) runs diffusers'
processor as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0, FusedAttnProcessor2_0

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# The flash kernel's limits: half precision, head widths of 8k up to 256.
FLASH_DTYPES = (torch.float16, torch.bfloat16)
FLASH_HEAD_MAX = 256


def default_kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(query, key, value)


def flash_kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Flash attention where its limits allow (as the default kernel computes it: no dropout,
    not causal, scale 1/sqrt(width)); the default kernel elsewhere."""
    width = query.shape[-1]
    if query.dtype in FLASH_DTYPES and width % 8 == 0 and width <= FLASH_HEAD_MAX:
        out: torch.Tensor = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value)[0]
        return out
    return default_kernel(query, key, value)


def cross_kernel(device: torch.device) -> Kernel:
    """The cross-attention kernel on this device: flash on CUDA GPUs that have it (compute
    capability 8.0 on: Ampere, Hopper), the default kernel elsewhere."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        return flash_kernel
    return default_kernel


def plain(attn: Any, hidden_states: torch.Tensor) -> bool:
    """A cross-attention call as SD's and SDXL's transformer blocks make it: tokens in rows,
    no norm, residual or rescaling inside the attention module."""
    return (
        hidden_states.ndim == 3
        and attn.spatial_norm is None
        and attn.group_norm is None
        and attn.norm_cross is None
        and attn.norm_q is None
        and attn.norm_k is None
        and not attn.residual_connection
        and attn.rescale_output_factor == 1.0
    )


class CrossKernels:
    """An attention processor run as it was, except plain cross-attention without a mask,
    which runs the same computation on `kernel`."""

    def __init__(self, inner: Any, kernel: Kernel) -> None:
        self.inner = inner
        self.kernel = kernel
        self.fused = isinstance(inner, FusedAttnProcessor2_0)
        self.known = self.fused or isinstance(inner, AttnProcessor2_0)

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if (encoder_hidden_states is None or attention_mask is not None or not self.known
                or not plain(attn, hidden_states)):  # fmt: skip
            out: torch.Tensor = self.inner(attn, hidden_states,
                                           encoder_hidden_states=encoder_hidden_states,
                                           attention_mask=attention_mask, temb=temb)  # fmt: skip
            return out
        rows = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        if self.fused:
            kv = attn.to_kv(encoder_hidden_states)
            key, value = torch.split(kv, kv.shape[-1] // 2, dim=-1)
        else:
            key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        width = key.shape[-1] // attn.heads

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(rows, -1, attn.heads, width).transpose(1, 2)

        attended = self.kernel(heads(query), heads(key), heads(value))
        attended = attended.transpose(1, 2).reshape(rows, -1, attn.heads * width)
        attended = attn.to_out[0](attended.to(query.dtype))
        result: torch.Tensor = attn.to_out[1](attended)
        return result


def cross_attention_kernels(model: Any, device: torch.device) -> None:
    """Every attention processor of `model` (a diffusers UNet or ControlNet) wrapped in
    `CrossKernels` with this device's kernel; after `fuse_qkv_projections`, which sets
    processors of its own."""
    kernel = cross_kernel(device)
    processors = {name: CrossKernels(getattr(p, "inner", p), kernel)
                  for name, p in model.attn_processors.items()}  # fmt: skip
    model.set_attn_processor(processors)
