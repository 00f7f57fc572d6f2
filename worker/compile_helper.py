"""A compile helper's process (worker/helpers.py):
`python -m worker.compile_helper MODEL PART WORKER` builds MODEL's engine from the worker's
settings (its environment) and compiles PART of its warm-up into the compile cache: `rest` (the
VAE's decoder and encoder, the ControlNets) or `all` (the UNet too). WORKER is the worker's
process id: the helper leaves when that process has gone. Exit 0 once PART is in the cache;
anything else means the warm-up compiles it itself."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

from torch._dynamo.utils import counters

from app.jobs import logs
from worker.compiled import compiler_phases
from worker.engine import resolve_device
from worker.engines import build_engine, tuning_of
from worker.settings import WorkerSettings

log = logging.getLogger("sdserve.worker")


def leave_with(parent: int) -> None:
    """Exit when the worker that started this helper (process `parent`) has gone, killed
    before it could stop its helpers, even while this one was still importing: a compile
    nobody will read holds a GPU's memory for nothing."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(3)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def main(args: list[str]) -> int:
    name, part, parent = args
    leave_with(int(parent))
    settings = WorkerSettings()
    logs.configure(settings.log_json)
    device = resolve_device(settings.device)
    started = time.perf_counter()
    engine = build_engine(settings.held_models()[name], device, tuning_of(settings, device))
    built = time.perf_counter()
    engine.precompile(unet=part == "all")
    # Whether the cache had them already (a start after an earlier one): graphs found there
    # against graphs compiled.
    found = counters["inductor"]["fxgraph_cache_hit"]
    compiled = counters["inductor"]["fxgraph_cache_miss"]
    log.info("compile helper: model %s (%s) loaded in %.1fs, compiled in %.1fs (compile cache:"
             " %d graphs found, %d compiled)", name, part, built - started,
             time.perf_counter() - built, found, compiled)  # fmt: skip
    phases = compiler_phases()
    if phases:
        log.info("compile helper: the compiler's seconds by phase: %s", phases)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
