"""The LoRA rows' Triton kernel (worker/lora_kernel.py) against the tensor path it stands in
for on CUDA, and in the whole pipeline against diffusers, run in Triton's interpreter on the
CPU (a process of its own: the interpreter is chosen when the kernel is defined). Skipped where
Triton is not installed; `python3 -m bench.lora_kernel` runs the comparison compiled on the
GPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from worker.adapters import UNIT, RowBuffers, RowLora, RowMix, row_order
from worker.lora_kernel import Tiles


def layer_and_rows(
    base: nn.Module, rows: int, row_units: int, pool: int, seed: int = 0
) -> tuple[RowLora, RowBuffers]:
    """A wrapped layer with random pool units and rows of every kind: none, one LoRA of one
    unit, one of three units, two LoRAs end to end, a weight of 0, a negative weight, and a
    row of five units and one of nine (as many as the row holds): rank widths 16 to 128 in one
    call, each through the kernel's branch for its width."""
    g = torch.Generator().manual_seed(seed)
    buffers = RowBuffers(rows, row_units, torch.device("cpu"))
    layer = RowLora(base, pool, buffers)  # type: ignore[arg-type]
    with torch.no_grad():
        layer.down[1:].copy_(torch.randn(layer.down[1:].shape, generator=g) * 0.3)
        layer.up[1:].copy_(torch.randn(layer.up[1:].shape, generator=g) * 0.3)
    mixes: list[list[tuple[list[int], float]]] = [
        [],
        [([1], 0.8)],
        [([2, 3, 4], 1.0)],
        [([5], 0.5), ([2, 3, 4], -0.7)],
        [([1], 0.0)],
        [([6, 7], -1.5)],
        [([1, 2, 3, 4, 5, 6, 7], 0.4), ([3, 2], 0.9)],
        [([7, 6, 5, 4, 3], 0.6)],
    ]
    units = torch.zeros(rows, row_units, dtype=torch.long)
    scales = torch.zeros(rows, row_units * UNIT)
    for r in range(rows):
        at = 0
        for held, weight in mixes[r % len(mixes)]:
            held = held[: row_units - at]  # what a row of few units holds of it
            units[r, at : at + len(held)] = torch.tensor(held, dtype=torch.long)
            scales[r, at * UNIT : (at + len(held)) * UNIT] = weight
            at += len(held)
    buffers.write(RowMix(units, scales))
    return layer, buffers


def compare() -> None:
    """Every case the kernel meets: linear layers (tokens and features not multiples of the
    tiles), 1x1 convolutions in both memory formats, row ranks not a multiple of 16 (one row
    unit: ranks padded up to tl.dot's least side); each row's output equal to the tensor
    path's in shape, layout and values, rows without LoRA exactly the base layer's. Under
    each way of dealing programs to the LoRA rows: on an H100's 132 SMs (where these small
    calls split their outputs down to single tiles: `cut`) one program a row's tile (fill 0,
    the default) and the programs of rows without LoRA dealt out (fill 2), and on a GPU of 4
    SMs (spans of several tiles) three programs a row (fan 3: a LoRA row's span dealt out in
    parts) and fill 2 with the output loop pipelined (out_stages 3)."""
    from worker import lora_kernel

    deals = ((Tiles(fill=0), 132), (Tiles(fill=2), 132), (Tiles(fan=3, fill=2), 4),
             (Tiles(fill=2, out_stages=3), 4))  # fmt: skip
    for deal, sms in deals:
        lora_kernel.TILES = deal
        lora_kernel.multiprocessors = lambda device, sms=sms: sms  # type: ignore[assignment]
        compare_cases()


def compare_cases() -> None:
    torch.manual_seed(0)
    cases: list[tuple[nn.Module, torch.Tensor, int]] = [
        (nn.Linear(40, 72), torch.randn(6, 70, 40), 4),
        (nn.Linear(96, 24), torch.randn(7, 5, 96), 5),
        (nn.Conv2d(24, 48, 1), torch.randn(6, 24, 9, 7), 4),
        (nn.Conv2d(24, 48, 1), torch.randn(6, 24, 9, 7).to(memory_format=torch.channels_last), 6),
        (nn.Linear(32, 20), torch.randn(6, 3, 32), 1),
        # Outputs split among programs (`cut`: 4 spans of 64), one token a row (a time
        # embedding's layer): a 16-token tile.
        (nn.Linear(48, 230), torch.randn(5, 48), 4),
        # Rows of 1 to 9 units beside each other (rank widths 16, 32, 64 and 128).
        (nn.Linear(40, 72), torch.randn(14, 33, 40), 16),
    ]
    for base, x, row_units in cases:
        layer, buffers = layer_and_rows(base, x.shape[0], row_units, pool=8)
        with torch.no_grad():
            buffers.kernels = False
            want = layer(x)
            buffers.kernels = True
            got = layer(x)
            plain = base(x)
        assert got.shape == want.shape
        # The layout the base layer gives, which a compiled graph's next layers were traced
        # with.
        assert got.stride() == plain.stride(), (got.stride(), plain.stride())
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        for r in range(x.shape[0]):
            if not buffers.scales[r].any():  # no LoRA, or weight 0
                assert torch.equal(got[r], plain[r]), f"row {r} changed without a LoRA"
            else:
                assert not torch.allclose(got[r], plain[r]), f"row {r} lost its LoRA"
        print(f"{type(base).__name__} {tuple(x.shape)} row_units {row_units}: equal")


class Blocks(nn.Module):
    """A linear layer, then two 1x1 convolutions on its output as channels-last pictures: the
    two ways a UNet's transformer block meets the kernel."""

    def __init__(self, buffers: RowBuffers) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        for base in (nn.Linear(16, 16), nn.Conv2d(16, 24, 1), nn.Conv2d(24, 16, 1)):
            layer = RowLora(base, 8, buffers)
            with torch.no_grad():
                layer.down[1:].normal_(0, 0.3)
                layer.up[1:].normal_(0, 0.3)
            self.layers.append(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (rows, 20 tokens, 16)
        y = self.layers[0](x).transpose(1, 2).reshape(x.shape[0], 16, 4, 5)
        y = y.contiguous(memory_format=torch.channels_last)
        return self.layers[2](self.layers[1](y))  # type: ignore[no-any-return]


def write_rows(buffers: RowBuffers, scales: dict[int, float]) -> None:
    """Rows r (every other one) with units 1 and 2 at scales[r % 2]; others without LoRA."""
    rows, row_units = buffers.units.shape
    units = torch.zeros(rows, row_units, dtype=torch.long)
    units[:, :2] = torch.tensor([1, 2])
    weights = torch.zeros(rows, row_units * UNIT)
    for r in range(rows):
        weights[r, : 2 * UNIT] = scales.get(r % 2, 0.0)
    buffers.write(RowMix(units, weights))


def compiled() -> None:
    """The kernel inside a graph compiled by inductor, as the worker compiles the UNet: equal
    to the tensor path; a new mix of LoRA rows replays without compiling again; each adapted
    layer is one call of the `sdserve::lora_layer` op (its base product and the kernel), with
    no copy of any input or output around it."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    buffers = RowBuffers(6, 4, torch.device("cpu"))
    model = Blocks(buffers)
    x = torch.randn(6, 20, 16)
    with torch.no_grad():
        fast = torch.compile(model, fullgraph=True)
        for turn, mix in enumerate(({0: 0.7}, {1: -1.0}, {})):
            write_rows(buffers, mix)
            buffers.kernels = False
            want = model(x)
            buffers.kernels = True
            if turn == 0:
                got, codes = run_and_get_code(fast, x)
                torch._dynamo.config.error_on_recompile = True
            else:
                got = fast(x)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            assert got.is_contiguous(memory_format=torch.channels_last)
    code = "\n".join(codes)
    assert code.count("torch.ops.sdserve.lora_layer.default(") == 3, code
    for copy in ("cpp_fused", "clone", "copy_"):
        assert copy not in code, f"{copy} in the compiled graph:\n{code}"
    print("compiled: equal, no copies")


@pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("triton") is None, reason="no Triton here"
)
@pytest.mark.parametrize("check", ["compare", "compiled"])
def test_kernel_equals_the_tensor_path_in_the_interpreter(check: str) -> None:
    env = os.environ | {"TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", f"from tests.test_lora_kernel import {check}; {check}()"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("equal") == (1 if check == "compiled" else 4 * 7), done.stdout


def test_a_small_call_spreads_over_the_gpu_and_a_large_one_does_not() -> None:
    """`cut`: one request alone (2 rows) on SDXL's deep feed-forward layer splits its 10240
    outputs until about two programs an SM run; calls that already keep a quarter of the SMs
    busy split only as far as outputs outnumber inputs (62 rows at SD1.5's 64x64 level, 32
    rows of a feed-forward output layer: not at all); tiles shrink to what few tokens need,
    never below tl.dot's 16; every split but the last is whole tiles, and the spans cover
    the outputs once."""
    from worker.lora_kernel import Cut, Tiles, cut

    tiles = Tiles()
    alone = cut(rows=2, tokens=1024, inputs=1280, outputs=10240, tiles=tiles, sms=132)
    programs = 2 * (1024 // alone.tokens) * -(-10240 // alone.span)
    assert alone.tokens == 128 and 132 < programs <= 2 * 132 + 2 * 8, alone
    assert cut(62, 4096, 320, 320, tiles, sms=132) == Cut(128, 320)
    assert cut(32, 256, 5120, 1280, tiles, sms=132) == Cut(128, 1280)
    assert cut(32, 256, 1280, 10240, tiles, sms=132) == Cut(128, 2048)  # 5 of 160 tiles
    assert cut(32, 1024, 1280, 10240, tiles, sms=132) == Cut(128, 5120)  # 2: occupancy
    assert cut(2, 1, 1280, 1280, tiles, sms=132).tokens == 16
    assert cut(2, 77, 768, 1280, tiles, sms=132).tokens == 128
    assert cut(2, 40, 768, 1280, tiles, sms=132).tokens == 64
    one = Tiles(spread=False)
    assert cut(2, 1024, 1280, 10240, one, sms=132) == Cut(128, 10240)
    for outputs in (1, 63, 64, 65, 230, 1280, 10240):
        for rows in (1, 2, 7, 64):
            got = cut(rows, 256, 320, outputs, tiles, sms=132)
            spans = -(-outputs // got.span)
            assert got.span % tiles.features == 0
            assert (spans - 1) * got.span < outputs <= spans * got.span


def test_the_tensor_path_serves_where_no_kernel_does() -> None:
    """On the CPU without the interpreter the kernels stand aside: the layer is the tensor
    path, rows without LoRA exactly the base layer's."""
    from worker import lora_kernel

    x = torch.randn(6, 10, 40)
    assert not lora_kernel.usable(x) or os.environ.get("TRITON_INTERPRET") == "1"
    layer, _ = layer_and_rows(nn.Linear(40, 16), 6, 4, pool=8)
    with torch.no_grad():
        got, plain = layer(x), layer.base(x)
    assert torch.equal(got[0], plain[0]) and not torch.allclose(got[1], plain[1])


@pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("triton") is None, reason="no Triton here"
)
def test_rows_through_the_kernel_make_diffusers_images() -> None:
    """The whole pipeline with the kernel in the LoRA layers (Triton's interpreter standing in
    for CUDA): each row with its LoRAs, and rows without, equal to diffusers' pipeline with
    the same files loaded, for both families (tests/test_loras.py's comparison, which on the
    CPU otherwise runs the tensor path). The kernel is counted, so a run that fell back to the
    tensor path fails."""
    script = (
        "import sys, pytest\n"
        "from worker import lora_kernel\n"
        "calls = []\n"
        "real = lora_kernel.add_rows\n"
        "def counted(*args, **kwargs):\n"
        "    calls.append(1)\n"
        "    return real(*args, **kwargs)\n"
        "lora_kernel.add_rows = counted\n"
        # A GPU of one SM: no call spreads its outputs (`cut`), so no program repeats a down
        # product, the interpreter's dearest part (`compare` covers the spread; 155 -> 134 s).
        "lora_kernel.multiprocessors = lambda device: 1\n"
        # Two steps, not four: every LoRA layer of every step goes through the interpreter
        # (about 0.1 s a call); a second step already takes each row's own LoRA mix again.
        "import tests.test_loras as compared\n"
        "compared.STEPS = 2\n"
        "code = pytest.main(['-q', '-p', 'no:cacheprovider', '-p', 'no:xdist',"
        " 'tests/test_loras.py::test_each_row_takes_its_loras_as_diffusers_does'])\n"
        "print('kernel calls', len(calls))\n"
        "print('steps patched', sys.modules['tests.test_loras'] is compared)\n"
        "sys.exit(int(code))\n"
    )
    env = os.environ | {"TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "2 passed" in done.stdout, done.stdout[-4000:]
    calls = int(done.stdout.rsplit("kernel calls", 1)[1].split()[0])
    assert calls > 0, done.stdout[-4000:]
    assert "steps patched True" in done.stdout, done.stdout[-4000:]


def test_a_tiling_is_read_from_its_setting_and_a_bad_one_is_refused() -> None:
    """`SDSERVE_LORA_TILES`: empty is the defaults; three, four, six or seven numbers are
    tokens, features, warps, stages, fan, fill and out_stages (fill and out_stages may be 0);
    anything else is refused at start
    with the setting's name, not a kernel launched with a grid that cannot be."""
    from pydantic import ValidationError

    from worker.lora_kernel import Tiles, tiles_of
    from worker.settings import WorkerSettings

    def tiles(text: str) -> Tiles:
        return tiles_of(WorkerSettings(lora_tiles=text).lora_tiles)

    assert tiles("") == Tiles() and tiles("  ") == Tiles()
    assert tiles("32,128,4") == Tiles(tokens=32, features=128, warps=4)
    assert tiles("64, 64, 8, 2") == Tiles(tokens=64, features=64, warps=8, stages=2)
    assert tiles("128,64,4,3,2,4") == Tiles(stages=3, fan=2, fill=4)
    assert tiles("128,64,4,3,1,0") == Tiles(fill=0)
    assert tiles("128,64,4,3,1,2,3") == Tiles(fill=2, out_stages=3)
    for bad in (
        "32,128",
        "32,128,4,3,1",
        "32,0,4",
        "a,b,c",
        "48,128,4",
        "8,128,4",
        "32,128,3",
        "128,64,4,3,0,2",
        "128,64,4,3,1,-1",
        "128,64,4,0,1,2",
        "128,64,4,3,1,2,-1",
        "128,64,4,3,1,2,3,1",
    ):
        with pytest.raises(ValidationError, match="lora_tiles"):
            tiles(bad)
    assert WorkerSettings(lora_tiles=(64, 64, 8)).lora_tiles == (64, 64, 8)
    with pytest.raises(ValidationError, match="lora_tiles"):
        WorkerSettings(lora_tiles=(48, 128, 4))


def test_the_work_list_puts_lora_rows_first_and_counts_them() -> None:
    """`row_order`: the count of rows with any scale (a LoRA at weight 0 is none), those rows
    in their order, then the others; `RowBuffers` keeps it with every write, for the call's
    rows only, and clears it with the scales; a padded mix's padding rows are not LoRA rows."""
    scales = torch.zeros(6, 16)
    scales[1, :8] = 0.5
    scales[3, 8:] = -1.0  # a second LoRA at weight -1 after one at 0
    scales[4, :8] = 0.0
    scales[5, :3] = 2.0
    assert row_order(scales).tolist() == [3, 1, 3, 5, 0, 2, 4]
    assert row_order(scales).dtype == torch.int32
    buffers = RowBuffers(8, 2, torch.device("cpu"))
    units = torch.ones(3, 2, dtype=torch.long)
    buffers.write(RowMix(units, scales[3:]).padded(2))
    assert buffers.order[:6].tolist() == [2, 0, 2, 1, 3, 4]
    buffers.clear()
    assert buffers.order.tolist() == [0] * 9 and not buffers.scales.any()


@pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("triton") is None, reason="no Triton here"
)
@pytest.mark.parametrize(("ranks", "out_stages"), [(128, 0), (8, 0), (128, 3)])
def test_the_kernel_compiles_for_an_h100(ranks: int, out_stages: int) -> None:
    """Triton's own compiler, down to the machine code of an H100/H200 (sm_90), on this CPU:
    what the interpreter tests above cannot see (Triton's typing of the kernel's branches and
    loops, its layouts), checked without a GPU, specialized as its launcher specializes a real
    call (bench/lora_code.py). The default tiling, the call's rank width at the worker's
    default row rank (128) and at one unit (8, padded up to 16); and what `Tiles.out_stages`
    changes: by default the output loop reads each output tile when it adds to it (a load the
    turn waits for), pipelined it reads them by asynchronous copies turns ahead instead."""
    from bench import lora_code

    tiles = Tiles(out_stages=out_stages)
    code = lora_code.compiled(tiles, ranks)
    assert ".target sm_90" in code.asm["ptx"] and code.asm["cubin"]
    assert lora_code.waits_for_outputs(code, tiles) == (out_stages == 0)
