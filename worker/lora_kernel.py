"""LoRA rows on CUDA: one Triton kernel that adds each row's LoRA units to a layer's output
and skips what a row does not use (worker/adapters.py, `RowLora`).

Why: the plain tensor path (`RowLora.forward`'s gather and two batched products) computes
`row_rank` ranks on every row of every call, LoRA or not: about a seventh of the UNet's time at
rank 128 on a LoRA-serving worker, paid by rows that carry no LoRA. Here the programs work
from the call's list of LoRA rows (`add_rows`, `worker.adapters.row_order`): a row without
LoRA costs nothing, and ranks past its LoRAs' own are never read. The grid depends only on
the call's shapes, never on the mix, so CUDA graphs replay it as it is and nothing compiles
again when the mix changes.
In a compiled graph a whole adapted layer, its base product and the kernel, is one opaque op
(`sdserve::lora_layer`, see `layer`).

One program takes one row's tile of tokens through both products, so the layer's input is
read once and its output read and written once, the least a LoRA added after the base layer
can move (the twenty-third session measured the earlier two kernels, which wrote the rank
activations out and read each row's input once per 16 ranks); a call too small to fill the
GPU that way also splits its outputs among programs (`cut`):

    h[n, r]    = scale[b, r] * sum_k x[b, n, k] * down[unit[b, r // 8], r % 8, k]   (registers)
    out[b, n, o] += sum_r h[n, r] * up[unit[b, r // 8], r % 8, o]

Each row's products run at its own rank width, its LoRAs' ranks rounded up to a power of two
(16 to the call's width), not at the call's: a rank-16 LoRA beside a row of rank 128 no longer
multiplies 112 columns of zeros (`_rows` picks one of four bodies, the same code at constant
widths; `Tiles.narrow=False` is the kernel before, which `bench.lora_kernel --widths` times
against it).

x and out are seen as (rows, tokens, features) through their strides (a 1x1 convolution's
channels are its features, in either memory format). CPU tests run the kernel in Triton's
interpreter (TRITON_INTERPRET=1, tests/test_lora_kernel.py) against the tensor path, eager and
inside a graph inductor compiled.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU images: the tensor path serves
    triton = None


@dataclass(frozen=True)
class Tiles:
    """How one program's work is cut: `tokens` a program takes (at most), features per loop
    turn of either product, and the warps that run it. The defaults were chosen on an H100 by
    `python3 -m bench.lora_kernel --sweep` (BENCHMARKS.md). `spread`: a call too small to
    fill the GPU with one program per row's token tile also splits the layer's outputs among
    programs (see `cut`). `narrow`: each row at its own rank width (see the module's text).
    `stages`: Triton's software pipelining depth of the loops; `splits`, when not 0, how many
    ways the outputs are split whatever `cut` would choose (for `bench.lora_kernel --tiles`).
    `fan`: programs a call's grid has for each row (see `add_rows`: the programs of rows
    without LoRA take the LoRA rows' work); `fill`, programs an SM the LoRA rows' work is
    split towards; `out_stages`, how far ahead the output loop reads its tiles (0: as Triton
    pipelines a plain loop)."""

    tokens: int = 128
    features: int = 64
    warps: int = 4
    spread: bool = True
    narrow: bool = True
    stages: int = 3
    splits: int = 0
    fan: int = 1
    # 0: one program a LoRA row's tile, the work each program did before the deal. 2 deals the
    # programs of rows without LoRA out to the LoRA rows (SDSERVE_LORA_TILES=128,64,4,3,1,2):
    # on an H100, SDXL's half mix 44.5 -> 40.1 ms, 0.99 of the call (BENCHMARKS.md,
    # forty-third session); 0 until a GPU check with it on shows no compile while serving.
    fill: int = 0
    # 0: the output loop as Triton pipelines a plain loop, which prefetches the up weights but
    # reads each output tile when it adds to it: a wait on memory every turn, with one or two
    # programs an SM to hide it (read from its sm_90 code on a CPU: `python3 -m bench.lora_code`).
    # N: `tl.range(num_stages=N)`, the output tiles read N - 1 turns ahead as well. Not yet
    # timed on a GPU: 0 until `bench.lora_unet --tiles` shows it faster.
    out_stages: int = 0


LEAST = 16  # tl.dot's least side: a call's rank width is padded up to it


def tiles_of(tiling: tuple[int, ...]) -> Tiles:
    """The tiling SDSERVE_LORA_TILES gives (`worker.settings.lora_tiling`): () the defaults."""
    if not tiling:
        return Tiles()
    stages = tiling[3] if len(tiling) >= 4 else Tiles.stages
    fan, fill = tiling[4:6] if len(tiling) >= 6 else (Tiles.fan, Tiles.fill)
    out_stages = tiling[6] if len(tiling) == 7 else Tiles.out_stages
    return Tiles(tokens=tiling[0], features=tiling[1], warps=tiling[2], stages=stages, fan=fan,
                 fill=fill, out_stages=out_stages)  # fmt: skip


# The process's tiling: the worker sets it at start from SDSERVE_LORA_TILES (engine.py), a
# benchmark between its timings; read at every call.
TILES = Tiles()


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


def layer(
    base: nn.Linear | nn.Conv2d,
    x: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    units: torch.Tensor,
    scales: torch.Tensor,
    order: torch.Tensor,
) -> torch.Tensor | None:
    """base(x) with each row's LoRA units added, or None where the shapes suit only the
    tensor path (the caller takes it).

    In a compiled graph the whole layer, its base product and the kernel, is one opaque op
    (`sdserve::lora_layer`) that returns a new tensor. Traced through instead, the layer's
    views and the kernel's in-place write cost dynamo and AOT autograd most of what the whole
    UNet without LoRA layers costs (on a CPU: 13.7 s without LoRA layers, 21.8 s with them
    traced, 16.0 s as one op each for SD1.5's 224 adapted layers; 32.8, 61.8 and 38.0 s for
    SDXL's 862: BENCHMARKS.md, twenty-fourth session), and inductor kept a write through a
    view functional, copying the output out and back."""
    if isinstance(base, nn.Linear):
        if x.dim() not in (2, 3):
            return None
    elif not pointwise(base) or x.dim() != 4 or as_tokens(x, conv=True) is None:
        return None
    op = torch.ops.sdserve.lora_layer if torch.compiler.is_compiling() else layer_rows
    return op(x, base.weight, base.bias, down, up, units, scales, order)


def layer_rows(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    down: torch.Tensor,
    up: torch.Tensor,
    units: torch.Tensor,
    scales: torch.Tensor,
    order: torch.Tensor,
) -> torch.Tensor:
    """`layer`'s body: the base product (`base_product`), then the kernel adds the rows' units
    to it in place: the op's own new output."""
    conv = weight.dim() == 4
    out = base_product(x, weight, bias)
    if not add_rows(out, x, down, up, units, scales, order, conv):
        raise ValueError(f"no kernel view of the layer's output {tuple(out.stride())}")
    return out


def base_product(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *rest: torch.Tensor
) -> torch.Tensor:
    """The layer without its LoRAs, and what the op returns as tracing sees it (its fake).

    A 1x1 convolution on channels-last input runs as the linear layer it is, on x viewed as
    (rows, h, w, channels), and its product is viewed back as the convolution's own
    channels-last NCHW: cuDNN's convolution on that layout took 1.59 ms against 0.92 for 8 of
    SD1.5's largest layers with no LoRA row (bench.lora_kernel, BENCHMARKS.md, twenty-fifth
    session)."""
    if weight.dim() == 4 and x.permute(0, 2, 3, 1).is_contiguous():
        return F.linear(x.permute(0, 2, 3, 1), weight.flatten(1), bias).permute(0, 3, 1, 2)
    return F.conv2d(x, weight, bias) if weight.dim() == 4 else F.linear(x, weight, bias)


lora_layer = torch.library.custom_op("sdserve::lora_layer", mutates_args=())(layer_rows)
lora_layer.register_fake(base_product)


@dataclass(frozen=True)
class Cut:
    """One call's grid: `tokens` per program (a power of two, at least tl.dot's 16), and
    `span` output features per program (a multiple of the tiles' features), so that the grid
    is (token tiles, rows, output spans)."""

    tokens: int
    span: int


def cut(rows: int, tokens: int, inputs: int, outputs: int, tiles: Tiles, sms: int) -> Cut:
    """How a call's work is shared among programs; a function of the call's shapes only, so a
    CUDA graph replays it whatever the mix of LoRA rows.

    Why split the outputs: one program per row's token tile runs the down product over every
    input feature and then the up product over every output feature, in order. Where a call
    has few programs (one request alone: 2 rows; the UNet's deep levels: 64 to 1024 tokens)
    the GPU's SMs stand idle while a few programs walk chains of up to 160 turns (SDXL's
    feed-forward layers, 1280 to 10240 features): a cached LoRA made one SDXL image alone
    take 2.34 s against 1.07 s without (bench.loras, BENCHMARKS.md, twenty-sixth session).
    Split, each program recomputes its tile's low-rank activations (the down product) and
    adds them to its own outputs only, so the sums and their rounding are the same as unsplit,
    and the grid is at most about two programs an SM. The recomputing is free only while the
    GPU is mostly idle (fewer programs than a quarter of its SMs); past that a layer splits
    only as far as its outputs outnumber its inputs (each program's up product at least as
    long as its down product): on an H100, 32 rows of SD1.5's 16x16 feed-forward output
    layer (5120 to 1280 features) split five ways took 1.64 times as long as unsplit, SDXL's
    32x32 attention layers at 32 rows split two ways 1.25 times (bench.lora_kernel --shapes,
    BENCHMARKS.md, twenty-sixth session)."""
    token_tile = min(tiles.tokens, max(LEAST, 1 << (tokens - 1).bit_length()))
    whole = -(-outputs // tiles.features)  # output tiles in all
    splits = 1
    if tiles.splits:
        splits = min(whole, tiles.splits)
    elif tiles.spread:
        programs = rows * -(-tokens // token_tile)
        splits = max(1, min(whole, -(-2 * sms // programs)))
        if 4 * programs > sms:
            splits = min(splits, max(1, outputs // inputs))
    span = -(-whole // splits) * tiles.features
    return Cut(token_tile, span)


@functools.cache
def multiprocessors(device: torch.device) -> int:
    """The SMs the grid should fill (Triton's interpreter: an H100's 132)."""
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def pointwise(conv: nn.Conv2d) -> bool:
    return (
        conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.padding == (0, 0)
        and conv.groups == 1
    )


def add_rows(
    out: torch.Tensor,
    x: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    units: torch.Tensor,
    scales: torch.Tensor,
    order: torch.Tensor,
    conv: bool,
    tiles: Tiles | None = None,
) -> bool:
    """out += each row's LoRA units applied to x, in place. `down`: (pool, 8, in), `up`:
    (pool, 8, out), `units`: (≥ rows, row_units) long, `scales`: (≥ rows, row_units * 8)
    float32, `order`: the call's LoRA rows (`worker.adapters.RowBuffers.sort`). False (and out
    untouched) when the shapes suit only the tensor path.

    Why `order`: the grid is fixed by the call's shapes (a CUDA graph replays it), yet only
    the rows with LoRAs have work. Were each program bound to one row, half LoRA rows would
    leave half the programs idle, and SDXL's deep layers (16 rows of 1024 tokens: 128 programs)
    would run one busy program on every other SM. Instead the programs of axis 1 (`fan` a
    row) are dealt out among the LoRA rows: each LoRA row's token tile has several programs,
    each of them a part of its outputs (recomputing the tile's down product, as `cut`'s
    splits do), as many as take the work towards `fill` programs an SM; with every row a
    LoRA row and `fan` 1, or `fill` 0 (the default: see `Tiles.fill`), the grid
    works as one program a row's tile, each program's work what it was before the deal."""
    tiles = tiles or TILES  # read at the call: a benchmark may set the module's tiling
    xs, outs = as_tokens(x, conv), as_tokens(out, conv)
    if xs is None or outs is None:
        return False
    rows, tokens, inputs = xs.shape
    outputs = outs.shape[2]
    row_units = units.shape[1]
    ranks = scales.shape[1]
    grid = cut(rows, tokens, inputs, outputs, tiles, multiprocessors(out.device))
    rank_width = max(LEAST, triton.next_power_of_2(ranks))
    # Token tiles vary fastest: the programs of one row run side by side and share its units'
    # weights in the L2 cache.
    spans = triton.cdiv(outputs, grid.span)
    _rows[(triton.cdiv(tokens, grid.tokens), rows * tiles.fan, spans)](
        xs, down, up, units, scales, order, outs, rows, tokens, inputs, outputs,
        xs.stride(0), xs.stride(1), xs.stride(2),
        down.stride(0), down.stride(1), down.stride(2),
        up.stride(0), up.stride(1), up.stride(2),
        outs.stride(0), outs.stride(1), outs.stride(2),
        grid.span, tiles.fill * multiprocessors(out.device),
        RANKS=ranks, RANKS_P2=rank_width, ROW_UNITS=row_units, TOKENS=grid.tokens,
        FEATURES=tiles.features, NARROW=tiles.narrow, OUT_STAGES=tiles.out_stages,
        W32=min(32, rank_width), W64=min(64, rank_width),
        num_warps=tiles.warps, num_stages=tiles.stages,
    )  # fmt: skip
    return True


if triton is not None:

    @triton.jit
    def _rows(
        x, down, up, units, scales, order, out, rows, tokens, inputs, outputs,
        sxb, sxn, sxk, sdu, sdr, sdk, suu, sur, suo, sob, son, soo,
        span, fill,
        RANKS: tl.constexpr, RANKS_P2: tl.constexpr, ROW_UNITS: tl.constexpr,
        TOKENS: tl.constexpr, FEATURES: tl.constexpr, NARROW: tl.constexpr,
        W32: tl.constexpr, W64: tl.constexpr, OUT_STAGES: tl.constexpr,
    ):  # fmt: skip
        count = tl.load(order)  # the call's LoRA rows (0: nothing to add anywhere)
        # Programs a LoRA row's tile gets: what the grid's axis 1 holds for each, at most
        # what fills the GPU, and at most one an output tile of the span.
        tiles_in_span = span // FEATURES
        active = tl.maximum(count, 1) * tl.num_programs(0) * tl.num_programs(2)
        parts = tl.num_programs(1) // tl.maximum(count, 1)
        parts = tl.minimum(parts, fill // active)  # down: a near-full grid is not split
        parts = tl.maximum(tl.minimum(parts, tiles_in_span), 1)
        slot = tl.program_id(1) // parts
        part = tl.program_id(1) - slot * parts
        if slot < count:
            b = tl.load(order + 1 + slot)
            per = tl.cdiv(tiles_in_span, parts) * FEATURES
            first = tl.program_id(2) * span + part * per
            last = tl.minimum(first + per, tl.program_id(2) * span + span)
            r = tl.arange(0, RANKS_P2)
            s = tl.load(scales + b * RANKS + r, mask=r < RANKS, other=0.0)
            # The row's rank width: its LoRAs' units lie end to end from the first, so past
            # the last rank with a scale there is nothing to add.
            width = tl.max(tl.where(s != 0.0, r + 1, 0), axis=0)
            if not NARROW:  # every LoRA row at the call's rank width (the kernel before)
                width = tl.where(width > 0, RANKS_P2, 0)
            # Nothing for an order not this call's (never met) or a part past the span's end.
            width = tl.where((b < rows) & (first < last), width, 0)
            # Each branch is the same body at its own constant rank width (tl.dot's sides
            # are constants): a row pays for the ranks it has, rounded up to a power of
            # two, not for the widest row's.
            if width > W64:
                _add(x, down, up, units, scales, out, b, tokens, inputs, outputs,
                     sxb, sxn, sxk, sdu, sdr, sdk, suu, sur, suo, sob, son, soo,
                     first, last, RANKS, ROW_UNITS, RANKS_P2, TOKENS, FEATURES,
                     OUT_STAGES)  # fmt: skip
            elif width > W32:
                _add(x, down, up, units, scales, out, b, tokens, inputs, outputs,
                     sxb, sxn, sxk, sdu, sdr, sdk, suu, sur, suo, sob, son, soo,
                     first, last, RANKS, ROW_UNITS, W64, TOKENS, FEATURES,
                     OUT_STAGES)  # fmt: skip
            elif width > 16:
                _add(x, down, up, units, scales, out, b, tokens, inputs, outputs,
                     sxb, sxn, sxk, sdu, sdr, sdk, suu, sur, suo, sob, son, soo,
                     first, last, RANKS, ROW_UNITS, W32, TOKENS, FEATURES,
                     OUT_STAGES)  # fmt: skip
            elif width > 0:
                _add(x, down, up, units, scales, out, b, tokens, inputs, outputs,
                     sxb, sxn, sxk, sdu, sdr, sdk, suu, sur, suo, sob, son, soo,
                     first, last, RANKS, ROW_UNITS, 16, TOKENS, FEATURES,
                     OUT_STAGES)  # fmt: skip

    @triton.jit
    def _add(
        x,
        down,
        up,
        units,
        scales,
        out,
        b,
        tokens,
        inputs,
        outputs,
        sxb,
        sxn,
        sxk,
        sdu,
        sdr,
        sdk,
        suu,
        sur,
        suo,
        sob,
        son,
        soo,
        first,
        last,
        RANKS: tl.constexpr,
        ROW_UNITS: tl.constexpr,
        WIDTH: tl.constexpr,
        TOKENS: tl.constexpr,
        FEATURES: tl.constexpr,
        OUT_STAGES: tl.constexpr,
    ):
        """Row b's units over its first WIDTH ranks, added to its tile of out's features
        first to last."""
        n = tl.program_id(0) * TOKENS + tl.arange(0, TOKENS)
        r = tl.arange(0, WIDTH)
        s = tl.load(scales + b * RANKS + r, mask=r < RANKS, other=0.0)
        used = s != 0.0  # ranks past the row's LoRAs (or at weight 0): never read
        unit = tl.load(units + b * ROW_UNITS + r // 8, mask=used, other=0)
        in_tokens = n < tokens
        h = tl.zeros((TOKENS, WIDTH), dtype=tl.float32)
        for k0 in range(0, inputs, FEATURES):
            k = k0 + tl.arange(0, FEATURES)
            xt = tl.load(
                x + b * sxb + n[:, None] * sxn + k[None, :] * sxk,
                mask=in_tokens[:, None] & (k[None, :] < inputs),
                other=0.0,
            )
            dt = tl.load(
                down + unit[None, :] * sdu + (r % 8)[None, :] * sdr + k[:, None] * sdk,
                mask=(k[:, None] < inputs) & used[None, :],
                other=0.0,
            )
            h += tl.dot(xt, dt)
        # Rounded to the layer's dtype as the tensor path's product is.
        ht = (h * s[None, :]).to(out.dtype.element_ty)
        if OUT_STAGES == 0:  # the loop as Triton pipelines a plain one (see Tiles.out_stages)
            for o0 in range(first, last, FEATURES):
                _add_tile(up, out, unit, r, used, ht, n, in_tokens, o0, b, outputs,
                          suu, sur, suo, sob, son, soo, FEATURES)  # fmt: skip
        else:
            for o0 in tl.range(first, last, FEATURES, num_stages=OUT_STAGES):
                _add_tile(up, out, unit, r, used, ht, n, in_tokens, o0, b, outputs,
                          suu, sur, suo, sob, son, soo, FEATURES)  # fmt: skip

    @triton.jit
    def _add_tile(
        up, out, unit, r, used, ht, n, in_tokens, o0, b, outputs,
        suu, sur, suo, sob, son, soo, FEATURES: tl.constexpr,
    ):  # fmt: skip
        """ht's product with the up weights added to row b's output tile of features o0 on."""
        o = o0 + tl.arange(0, FEATURES)
        ut = tl.load(
            up + unit[:, None] * suu + (r % 8)[:, None] * sur + o[None, :] * suo,
            mask=used[:, None] & (o[None, :] < outputs),
            other=0.0,
        )
        at = out + b * sob + n[:, None] * son + o[None, :] * soo
        keep = in_tokens[:, None] & (o[None, :] < outputs)
        base = tl.load(at, mask=keep, other=0.0)
        total = base.to(tl.float32) + tl.dot(ht, ut)
        tl.store(at, total.to(out.dtype.element_ty), mask=keep)
