"""Host work per continuous-batching step: what the CPU spends launching one `Engine.step` for
N lanes of mixed samplers, with the UNet replaced by a constant (on a GPU the host must stay
ahead of the UNet; every launch here is time it does not). CPU, the tiny model, small latents
so that launching, not arithmetic, is what is timed. Beside it, the same step when every lane
also makes its live preview (worker/previews.py), which a worker does every
SDSERVE_PREVIEW_EVERY steps. Prints a table.

    python -m bench.host_overhead [MODEL]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from worker.engine import BatchShape, Engine, ImageSpec
from worker.tiny import build_tiny_model

SAMPLERS = ("dpmpp_2m", "euler_a", "ddim")


def measure(engine: Engine, lanes_count: int, preview: bool = False) -> tuple[float, int]:
    lanes = [
        engine.prepare(f"j{i}", [ImageSpec(f"prompt {i}", "", 7.5, i)],
                       BatchShape(64, 64, 40, SAMPLERS[i % len(SAMPLERS)]))
        for i in range(lanes_count)
    ]  # fmt: skip
    keys = {lane.key for lane in lanes} if preview else set()
    for _ in range(3):
        engine.step(lanes, keys)
    times = []
    for _ in range(20):
        started = time.perf_counter()
        engine.step(lanes, keys)
        times.append(time.perf_counter() - started)
    with torch.profiler.profile() as profile:
        engine.step(lanes, keys)
    # Operators the host dispatched (one kernel launch each on a GPU), not counting those called
    # from inside another operator.
    launched = sum(
        1
        for e in profile.events()
        if e.name.startswith("aten::")
        and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    )
    return statistics.median(times), launched


def main() -> None:
    torch.set_num_threads(1)
    model = sys.argv[1] if len(sys.argv) > 1 else build_tiny_model(Path(tempfile.mkdtemp()))
    engine = Engine(str(model), torch.device("cpu"))

    def constant(sample: torch.Tensor, *_: Any) -> torch.Tensor:
        return torch.full_like(sample, 0.1)

    engine.calls._unet_call = constant  # type: ignore[method-assign,assignment]
    print("| lanes | host time per step | operators launched per step "
          "| the same, every lane previewing | added per step, previews 1 step in 5 |")  # fmt: skip
    print("|---|---|---|---|---|")
    for count in (1, 8, 31):
        seconds, launched = measure(engine, count)
        with_preview, launched_preview = measure(engine, count, preview=True)
        added = (with_preview - seconds) / 5
        print(
            f"| {count} | {seconds * 1000:.2f} ms | {launched} | {with_preview * 1000:.2f} ms,"
            f" {launched_preview} operators | {added * 1000:.2f} ms |"
        )


if __name__ == "__main__":
    main()
