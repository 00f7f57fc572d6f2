"""Which attention kernels the UNet's (and a ControlNet's) cross-attention runs on.

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
short work on any kernel (0.21 ms cuDNN, 0.26 flash at 32 rows), so it runs on flash
attention (memory-efficient where a call has a mask: the masked contexts; the math kernel
where neither runs, as on a CPU without them): its shapes, 4x the self-attention's, build
nothing. The choice is made when the compiled graph is traced (dynamo reads `sdpa_kernel`), so
each call of the compiled UNet runs the chosen kernel; eager calls choose it at each call.
"""

from __future__ import annotations

from typing import Any

from torch.nn.attention import SDPBackend, sdpa_kernel

# In order of preference (the first that takes the call runs it).
CROSS_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class CrossKernels:
    """An attention processor run as it was, its cross-attention on `CROSS_KERNELS`."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(
        self,
        attn: Any,
        hidden_states: Any,
        encoder_hidden_states: Any = None,
        attention_mask: Any = None,
        temb: Any = None,
    ) -> Any:
        if encoder_hidden_states is None:  # self-attention: the default kernel (cuDNN's)
            return self.inner(attn, hidden_states, attention_mask=attention_mask, temb=temb)
        with sdpa_kernel(CROSS_KERNELS):
            return self.inner(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                              attention_mask=attention_mask, temb=temb)  # fmt: skip


def cross_attention_kernels(model: Any) -> None:
    """Every attention processor of `model` (a diffusers UNet or ControlNet) wrapped in
    `CrossKernels`; after `fuse_qkv_projections`, which sets processors of its own."""
    processors = model.attn_processors
    model.set_attn_processor({name: p if isinstance(p, CrossKernels) else CrossKernels(p)
                              for name, p in processors.items()})  # fmt: skip
