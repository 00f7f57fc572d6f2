"""LoRA rows on CUDA: two Triton kernels that add each row's LoRA units to a layer's output
and skip what a row does not use (worker/adapters.py, `RowLora`).

Why: the plain tensor path (`RowLora.forward`'s gather and two batched products) computes
`row_rank` ranks on every row of every call, LoRA or not: about a seventh of the UNet's time at
rank 128 on a LoRA-serving worker, paid by rows that carry no LoRA. Here every program looks
at its row's scales first: a 16-rank block whose scales are all 0 (a row without LoRA, or
ranks past its LoRAs' own) costs two loads and nothing else. The grids depend only on the
call's shapes, never on the mix, so CUDA graphs replay them as they are and nothing compiles
again when the mix changes (dynamo traces user Triton kernels into the compiled graph).

    shrink  h[b, n, r] = scale[b, r] * sum_k x[b, n, k] * down[unit[b, r // 8], r % 8, k]
    expand  out[b, n, o] += sum_r h[b, n, r] * up[unit[b, r // 8], r % 8, o]

x and out are seen as (rows, tokens, features) through their strides (a 1x1 convolution's
channels are its features, in either memory format). CPU tests run the kernels in Triton's
interpreter (TRITON_INTERPRET=1, tests/test_lora_kernel.py) against the tensor path.
"""

from __future__ import annotations

import os
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU images: the tensor path serves
    triton = None

BLOCK = 16  # ranks a program takes at once (tl.dot's least side); two units
TOKENS = 64  # tokens a program takes
FEATURES = 64  # input features per loop turn (shrink), output features a program takes


def usable(x: torch.Tensor) -> bool:
    """Whether the kernels serve this call: Triton is there, and the tensors are on a CUDA
    device (or Triton's interpreter runs them on the CPU, for the tests)."""
    return usable_on(x.device)


def usable_on(device: torch.device) -> bool:
    if triton is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def as_tokens(t: torch.Tensor, conv: bool) -> torch.Tensor | None:
    """t as (rows, tokens, features), a view of t (None when no view is: the caller takes
    the tensor path)."""
    if conv:  # (rows, channels, h, w)
        if t.stride(2) != t.shape[3] * t.stride(3):
            return None
        return t.flatten(2).transpose(1, 2)
    if t.dim() == 3:
        return t
    if t.dim() == 2:
        return t[:, None, :]
    return None


def add_rows(
    out: torch.Tensor,
    x: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    units: torch.Tensor,
    scales: torch.Tensor,
    conv: bool,
) -> bool:
    """out += each row's LoRA units applied to x, in place. `down`: (pool, 8, in), `up`:
    (pool, 8, out), `units`: (≥ rows, row_units) long, `scales`: (≥ rows, row_units * 8)
    float32. False (and out untouched) when the shapes suit only the tensor path."""
    xs, outs = as_tokens(x, conv), as_tokens(out, conv)
    if xs is None or outs is None:
        return False
    rows, tokens, inputs = xs.shape
    outputs = outs.shape[2]
    row_units = units.shape[1]
    ranks = scales.shape[1]
    blocks = triton.cdiv(ranks, BLOCK)
    h = torch.empty(rows, tokens, blocks * BLOCK, device=x.device, dtype=x.dtype)
    token_tiles = triton.cdiv(tokens, TOKENS)
    common: dict[str, Any] = {
        "RANKS": ranks,
        "ROW_UNITS": row_units,
        "BLOCK": BLOCK,
        "TOKENS": TOKENS,
        "FEATURES": FEATURES,
    }
    _shrink[(rows, token_tiles, blocks)](
        xs,
        down,
        units,
        scales,
        h,
        tokens,
        inputs,
        xs.stride(0),
        xs.stride(1),
        xs.stride(2),
        down.stride(0),
        down.stride(1),
        down.stride(2),
        h.stride(0),
        h.stride(1),
        **common,
    )
    _expand[(rows, token_tiles, triton.cdiv(outputs, FEATURES))](
        h,
        up,
        units,
        scales,
        outs,
        tokens,
        outputs,
        h.stride(0),
        h.stride(1),
        up.stride(0),
        up.stride(1),
        up.stride(2),
        outs.stride(0),
        outs.stride(1),
        outs.stride(2),
        BLOCKS=blocks,
        RANKS_P2=triton.next_power_of_2(ranks),
        **common,
    )
    return True


if triton is not None:

    @triton.jit
    def _shrink(
        x,
        down,
        units,
        scales,
        h,
        tokens,
        inputs,
        sxb,
        sxn,
        sxk,
        sdu,
        sdr,
        sdk,
        shb,
        shn,
        RANKS: tl.constexpr,
        ROW_UNITS: tl.constexpr,
        BLOCK: tl.constexpr,
        TOKENS: tl.constexpr,
        FEATURES: tl.constexpr,
    ):
        b = tl.program_id(0)
        n = tl.program_id(1) * TOKENS + tl.arange(0, TOKENS)
        r = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
        in_rank = r < RANKS
        s = tl.load(scales + b * RANKS + r, mask=in_rank, other=0.0)
        if tl.max(tl.abs(s), axis=0) != 0.0:
            unit = tl.load(units + b * ROW_UNITS + r // 8, mask=in_rank, other=0)
            acc = tl.zeros((TOKENS, BLOCK), dtype=tl.float32)
            for k0 in range(0, inputs, FEATURES):
                k = k0 + tl.arange(0, FEATURES)
                xt = tl.load(
                    x + b * sxb + n[:, None] * sxn + k[None, :] * sxk,
                    mask=(n[:, None] < tokens) & (k[None, :] < inputs),
                    other=0.0,
                )
                wt = tl.load(
                    down + unit[None, :] * sdu + (r % 8)[None, :] * sdr + k[:, None] * sdk,
                    mask=(k[:, None] < inputs) & in_rank[None, :],
                    other=0.0,
                )
                acc += tl.dot(xt, wt)
            acc = acc * s[None, :]
            tl.store(
                h + b * shb + n[:, None] * shn + r[None, :],
                acc.to(h.dtype.element_ty),
                mask=n[:, None] < tokens,
            )

    @triton.jit
    def _expand(
        h,
        up,
        units,
        scales,
        out,
        tokens,
        outputs,
        shb,
        shn,
        suu,
        sur,
        suo,
        sob,
        son,
        soo,
        BLOCKS: tl.constexpr,
        RANKS_P2: tl.constexpr,
        RANKS: tl.constexpr,
        ROW_UNITS: tl.constexpr,
        BLOCK: tl.constexpr,
        TOKENS: tl.constexpr,
        FEATURES: tl.constexpr,
    ):
        b = tl.program_id(0)
        n = tl.program_id(1) * TOKENS + tl.arange(0, TOKENS)
        o = tl.program_id(2) * FEATURES + tl.arange(0, FEATURES)
        row = tl.arange(0, RANKS_P2)
        row_scales = tl.load(scales + b * RANKS + row, mask=row < RANKS, other=0.0)
        if tl.max(tl.abs(row_scales), axis=0) != 0.0:  # a row without LoRA: out as it is
            acc = tl.zeros((TOKENS, FEATURES), dtype=tl.float32)
            for block in range(BLOCKS):
                r = block * BLOCK + tl.arange(0, BLOCK)
                in_rank = r < RANKS
                s = tl.load(scales + b * RANKS + r, mask=in_rank, other=0.0)
                if tl.max(tl.abs(s), axis=0) != 0.0:
                    unit = tl.load(units + b * ROW_UNITS + r // 8, mask=in_rank, other=0)
                    ht = tl.load(
                        h + b * shb + n[:, None] * shn + r[None, :],
                        mask=n[:, None] < tokens,
                        other=0.0,
                    )
                    wt = tl.load(
                        up + unit[:, None] * suu + (r % 8)[:, None] * sur + o[None, :] * suo,
                        mask=in_rank[:, None] & (o[None, :] < outputs),
                        other=0.0,
                    )
                    acc += tl.dot(ht, wt)
            at = out + b * sob + n[:, None] * son + o[None, :] * soo
            keep = (n[:, None] < tokens) & (o[None, :] < outputs)
            base = tl.load(at, mask=keep, other=0.0)
            tl.store(at, (base.to(tl.float32) + acc).to(out.dtype.element_ty), mask=keep)
