"""The LoRA kernel's machine code for an H100/H200 (sm_90), read on a CPU: registers, spills,
shared memory and whether the output loop waits for its output tiles, for each tiling.

Triton compiles the kernel (worker/lora_kernel.py `_rows`) as its launcher would for one real
call, SDXL's feed-forward input layer at 32x32 (`A_CALL`): integer arguments of 1 become
constants and multiples of 16 are marked so, which is what lets the compiler use 16-byte loads
and stores (a compile without these marks reads and writes 2 bytes at a time and spills
registers: not the code a GPU runs). Registers and spills are ptxas' (`-v`), from the ptxas
Triton ships; the GPU's Triton may allocate differently, so read these as where to look, and
time on the GPU (`bench.lora_unet --tiles`) before choosing. Programs an SM: what 65536
registers and 227 KiB of shared memory leave room for.

    python3 -m bench.lora_code [--tiles "128,64,4,3,1,0,0;128,64,4,3,1,0,2"] [--ranks 128,64]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from worker import lora_kernel
from worker.adapters import UNIT
from worker.settings import lora_tiling

# A call's integer arguments as SDXL's feed-forward input layer at 32x32 gives them (16 rows of
# 1024 tokens, 1280 to 10240 features, the outputs cut in three spans of 3456).
A_CALL = {"rows": 16, "tokens": 1024, "inputs": 1280, "outputs": 10240, "sxb": 1024 * 1280,
          "sxn": 1280, "sxk": 1, "sdu": 8 * 1280, "sdr": 1280, "sdk": 1, "suu": 8 * 10240,
          "sur": 10240, "suo": 1, "sob": 1024 * 10240, "son": 10240, "soo": 1, "span": 3456,
          "fill": 264}  # fmt: skip
POINTERS = {"x": "*fp16", "down": "*fp16", "up": "*fp16", "units": "*i64", "scales": "*fp32",
            "order": "*i32", "out": "*fp16"}  # fmt: skip
REGISTERS, SHARED = 65536, 227 * 1024  # an H100's SM


def compiled(tiles: lora_kernel.Tiles, ranks: int) -> Any:
    """The kernel compiled for sm_90 at `tiles` and a call's rank width of `ranks`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    width = max(lora_kernel.LEAST, triton.next_power_of_2(ranks))
    constants = {"RANKS": ranks, "RANKS_P2": width, "ROW_UNITS": -(-ranks // UNIT),
                 "TOKENS": tiles.tokens, "FEATURES": tiles.features, "NARROW": tiles.narrow,
                 "W32": min(32, width), "W64": min(64, width),
                 "OUT_STAGES": tiles.out_stages}  # fmt: skip
    constants |= {name: 1 for name, value in A_CALL.items() if value == 1}
    names = lora_kernel._rows.arg_names
    signature = {n: POINTERS.get(n, "constexpr" if n in constants else "i32") for n in names}
    aligned = ["x", "down", "up", "out"] + [
        n for n, value in A_CALL.items() if n not in constants and value % 16 == 0
    ]
    source = ASTSource(
        fn=lora_kernel._rows,
        signature=signature,
        constexprs={(names.index(k),): v for k, v in constants.items()},
        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned},
    )
    options = {"num_warps": tiles.warps, "num_stages": tiles.stages}
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def waits_for_outputs(code: Any, tiles: lora_kernel.Tiles) -> bool:
    """Whether the output loop reads an output tile with a load its turn waits for (rather
    than an asynchronous copy issued turns ahead)."""
    tile = f"tensor<{tiles.tokens}x{tiles.features}x!tt.ptr<f16>"
    return any("tt.load" in line and tile in line for line in code.asm["ttgir"].splitlines())


def registers(code: Any) -> tuple[int, int]:
    """Registers a thread and bytes spilled, from ptxas -v on the kernel's PTX."""
    import triton

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    ptxas = next(p for p in (tools / "ptxas-blackwell", tools / "ptxas") if p.exists())
    with tempfile.TemporaryDirectory() as at:
        ptx = Path(at) / "k.ptx"
        ptx.write_text(code.asm["ptx"])
        said = subprocess.run([str(ptxas), "-v", "--gpu-name", "sm_90a", str(ptx), "-o",
                               os.devnull], capture_output=True, text=True)  # fmt: skip
    text = said.stdout + said.stderr
    used = re.search(r"Used (\d+) registers", text)
    spilled = re.search(r"(\d+) bytes spill stores", text)
    if used is None:
        raise RuntimeError(f"ptxas said: {text[-2000:]}")
    return int(used.group(1)), int(spilled.group(1)) if spilled else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiles", default="128,64,4,3,1,0,0;128,64,4,3,1,0,2;"
                        "128,64,4,3,1,0,3;64,64,4,3,1,0,3;64,64,8,3,1,0,3")  # fmt: skip
    parser.add_argument("--ranks", default="128,64")
    args = parser.parse_args()
    print("| tiling | rank width | registers / spilled bytes | shared KiB | programs an SM |"
          " output tiles |\n|---|---|---|---|---|---|")  # fmt: skip
    for text in args.tiles.split(";"):
        tiles = lora_kernel.tiles_of(lora_tiling(text))
        for ranks in (int(r) for r in args.ranks.split(",")):
            code = compiled(tiles, ranks)
            used, spilled = registers(code)
            shared = code.metadata.shared
            fit = min(REGISTERS // (used * 32 * tiles.warps), SHARED // max(shared, 1))
            read = "waited for" if waits_for_outputs(code, tiles) else "read ahead"
            print(f"| {text} | {ranks} | {used} / {spilled} | {shared // 1024} | {fit} | {read} |",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
