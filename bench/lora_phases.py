"""A prototype of the LoRA rows' kernel in two phases, for `bench.lora_unet --phases` to time
inside a whole UNet call beside the worker's one kernel (worker/lora_kernel.py).

Why (fortieth session, BENCHMARKS.md): at SDXL's (l) mix the worker's kernel takes 44 ms of a
351 ms UNet call, about twice what reading each LoRA row's input and reading and writing its
output once would take at the GPU's memory bandwidth, and smaller token tiles did not help
(42-44 ms). In the one kernel a program carries a row's tile through the down product, then
through every output feature of its span in turn: at SDXL's 32x32 level the rows with LoRAs are
64 programs for 132 SMs, each a long chain, and splitting the outputs further repeats the down
product.

Here the phases are apart: `_down` takes each row's token tile through the down product once
and writes the rank activations (tokens x rank, a sixtieth of the output's size at rank 128
and 1280 features) to a scratch tensor; `_up` adds them through the up product to the output
in spans of `SPAN` features, as many programs as the output has tiles, none repeating work: the
read, add and write of the output, most of the bytes, spread over the whole GPU. Rows without
LoRA leave both at their first load, as in the worker's kernel. The rounding is the worker's
kernel's: the activations scaled and rounded to the layer's dtype, products summed in float32.

Same signature as `worker.lora_kernel.add_rows`; `bench.lora_unet` swaps it in. The CPU test
runs it in Triton's interpreter against the tensor path (tests/test_lora_kernel.py).
"""

from __future__ import annotations

import torch

from worker import lora_kernel
from worker.lora_kernel import LEAST, Tiles, as_tokens, cut

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU images: nothing here runs
    triton = None

SPAN = 256  # output features a program of `_up` adds


def add_rows(
    out: torch.Tensor,
    x: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    units: torch.Tensor,
    scales: torch.Tensor,
    conv: bool,
    tiles: Tiles | None = None,
) -> bool:
    """`worker.lora_kernel.add_rows` in two phases (see the module's text)."""
    tiles = tiles or lora_kernel.TILES
    xs, outs = as_tokens(x, conv), as_tokens(out, conv)
    if xs is None or outs is None:
        return False
    rows, tokens, inputs = xs.shape
    outputs = outs.shape[2]
    row_units = units.shape[1]
    ranks = scales.shape[1]
    rank_width = max(LEAST, triton.next_power_of_2(ranks))
    token_tile = cut(rows, tokens, inputs, outputs, tiles, sms=1).tokens  # the worker's tile rule
    acts = torch.empty(rows, tokens, rank_width, device=out.device, dtype=out.dtype)
    shared = dict(RANKS=ranks, RANKS_P2=rank_width, ROW_UNITS=row_units, TOKENS=token_tile,
                  FEATURES=tiles.features, W32=min(32, rank_width), W64=min(64, rank_width),
                  num_warps=tiles.warps, num_stages=tiles.stages)  # fmt: skip
    tiles_n = triton.cdiv(tokens, token_tile)
    _down[(tiles_n, rows)](
        xs, down, units, scales, acts, tokens, inputs,
        xs.stride(0), xs.stride(1), xs.stride(2),
        down.stride(0), down.stride(1), down.stride(2),
        acts.stride(0), acts.stride(1), **shared,
    )  # fmt: skip
    _up[(tiles_n, rows, triton.cdiv(outputs, SPAN))](
        acts, up, units, scales, outs, tokens, outputs,
        acts.stride(0), acts.stride(1),
        up.stride(0), up.stride(1), up.stride(2),
        outs.stride(0), outs.stride(1), outs.stride(2), SPAN=SPAN, **shared,
    )  # fmt: skip
    return True


if triton is not None:

    @triton.jit
    def _width(scales, b, RANKS: tl.constexpr, RANKS_P2: tl.constexpr):
        """Row b's rank width: past its last rank with a scale nothing is added."""
        r = tl.arange(0, RANKS_P2)
        s = tl.load(scales + b * RANKS + r, mask=r < RANKS, other=0.0)
        return tl.max(tl.where(s != 0.0, r + 1, 0), axis=0)

    @triton.jit
    def _down(
        x,
        down,
        units,
        scales,
        acts,
        tokens,
        inputs,
        sxb,
        sxn,
        sxk,
        sdu,
        sdr,
        sdk,
        sab,
        san,
        RANKS: tl.constexpr,
        RANKS_P2: tl.constexpr,
        ROW_UNITS: tl.constexpr,
        TOKENS: tl.constexpr,
        FEATURES: tl.constexpr,
        W32: tl.constexpr,
        W64: tl.constexpr,
    ):
        b = tl.program_id(1)
        width = _width(scales, b, RANKS, RANKS_P2)
        # One body at each constant width (tl.dot's sides are constants), as the worker's.
        if width > W64:
            _down_at(x, down, units, scales, acts, b, tokens, inputs, sxb, sxn, sxk,
                     sdu, sdr, sdk, sab, san, RANKS, ROW_UNITS, RANKS_P2, TOKENS,
                     FEATURES)  # fmt: skip
        elif width > W32:
            _down_at(x, down, units, scales, acts, b, tokens, inputs, sxb, sxn, sxk,
                     sdu, sdr, sdk, sab, san, RANKS, ROW_UNITS, W64, TOKENS,
                     FEATURES)  # fmt: skip
        elif width > 16:
            _down_at(x, down, units, scales, acts, b, tokens, inputs, sxb, sxn, sxk,
                     sdu, sdr, sdk, sab, san, RANKS, ROW_UNITS, W32, TOKENS,
                     FEATURES)  # fmt: skip
        elif width > 0:
            _down_at(x, down, units, scales, acts, b, tokens, inputs, sxb, sxn, sxk,
                     sdu, sdr, sdk, sab, san, RANKS, ROW_UNITS, 16, TOKENS, FEATURES)  # fmt: skip

    @triton.jit
    def _down_at(
        x,
        down,
        units,
        scales,
        acts,
        b,
        tokens,
        inputs,
        sxb,
        sxn,
        sxk,
        sdu,
        sdr,
        sdk,
        sab,
        san,
        RANKS: tl.constexpr,
        ROW_UNITS: tl.constexpr,
        WIDTH: tl.constexpr,
        TOKENS: tl.constexpr,
        FEATURES: tl.constexpr,
    ):
        n = tl.program_id(0) * TOKENS + tl.arange(0, TOKENS)
        r = tl.arange(0, WIDTH)
        s = tl.load(scales + b * RANKS + r, mask=r < RANKS, other=0.0)
        used = s != 0.0
        unit = tl.load(units + b * ROW_UNITS + r // 8, mask=used, other=0)
        in_tokens = n < tokens
        h = tl.zeros((TOKENS, WIDTH), dtype=tl.float32)
        for k0 in range(0, inputs, FEATURES):
            k = k0 + tl.arange(0, FEATURES)
            xt = tl.load(x + b * sxb + n[:, None] * sxn + k[None, :] * sxk,
                         mask=in_tokens[:, None] & (k[None, :] < inputs), other=0.0)  # fmt: skip
            dt = tl.load(down + unit[None, :] * sdu + (r % 8)[None, :] * sdr + k[:, None] * sdk,
                         mask=(k[:, None] < inputs) & used[None, :], other=0.0)  # fmt: skip
            h += tl.dot(xt, dt)
        ht = (h * s[None, :]).to(acts.dtype.element_ty)
        tl.store(acts + b * sab + n[:, None] * san + r[None, :], ht, mask=in_tokens[:, None])

    @triton.jit
    def _up(
        acts,
        up,
        units,
        scales,
        out,
        tokens,
        outputs,
        sab,
        san,
        suu,
        sur,
        suo,
        sob,
        son,
        soo,
        RANKS: tl.constexpr,
        RANKS_P2: tl.constexpr,
        ROW_UNITS: tl.constexpr,
        TOKENS: tl.constexpr,
        FEATURES: tl.constexpr,
        SPAN: tl.constexpr,
        W32: tl.constexpr,
        W64: tl.constexpr,
    ):
        b = tl.program_id(1)
        width = _width(scales, b, RANKS, RANKS_P2)
        if width > W64:
            _up_at(acts, up, units, scales, out, b, tokens, outputs, sab, san, suu, sur, suo,
                   sob, son, soo, RANKS, ROW_UNITS, RANKS_P2, TOKENS, FEATURES, SPAN)  # fmt: skip
        elif width > W32:
            _up_at(acts, up, units, scales, out, b, tokens, outputs, sab, san, suu, sur, suo,
                   sob, son, soo, RANKS, ROW_UNITS, W64, TOKENS, FEATURES, SPAN)  # fmt: skip
        elif width > 16:
            _up_at(acts, up, units, scales, out, b, tokens, outputs, sab, san, suu, sur, suo,
                   sob, son, soo, RANKS, ROW_UNITS, W32, TOKENS, FEATURES, SPAN)  # fmt: skip
        elif width > 0:
            _up_at(acts, up, units, scales, out, b, tokens, outputs, sab, san, suu, sur, suo,
                   sob, son, soo, RANKS, ROW_UNITS, 16, TOKENS, FEATURES, SPAN)  # fmt: skip

    @triton.jit
    def _up_at(
        acts,
        up,
        units,
        scales,
        out,
        b,
        tokens,
        outputs,
        sab,
        san,
        suu,
        sur,
        suo,
        sob,
        son,
        soo,
        RANKS: tl.constexpr,
        ROW_UNITS: tl.constexpr,
        WIDTH: tl.constexpr,
        TOKENS: tl.constexpr,
        FEATURES: tl.constexpr,
        SPAN: tl.constexpr,
    ):
        n = tl.program_id(0) * TOKENS + tl.arange(0, TOKENS)
        r = tl.arange(0, WIDTH)
        s = tl.load(scales + b * RANKS + r, mask=r < RANKS, other=0.0)
        used = s != 0.0
        unit = tl.load(units + b * ROW_UNITS + r // 8, mask=used, other=0)
        in_tokens = n < tokens
        ht = tl.load(acts + b * sab + n[:, None] * san + r[None, :], mask=in_tokens[:, None],
                     other=0.0)  # fmt: skip
        first = tl.program_id(2) * SPAN
        for o0 in range(first, first + SPAN, FEATURES):
            o = o0 + tl.arange(0, FEATURES)
            ut = tl.load(up + unit[:, None] * suu + (r % 8)[:, None] * sur + o[None, :] * suo,
                         mask=used[:, None] & (o[None, :] < outputs), other=0.0)  # fmt: skip
            at = out + b * sob + n[:, None] * son + o[None, :] * soo
            keep = in_tokens[:, None] & (o[None, :] < outputs)
            base = tl.load(at, mask=keep, other=0.0)
            total = base.to(tl.float32) + tl.dot(ht, ut)
            tl.store(at, total.to(out.dtype.element_ty), mask=keep)
