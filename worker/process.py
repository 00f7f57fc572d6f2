"""The worker process (`sdserve worker`): check the settings, load and warm up the models, then
run until SIGTERM or SIGINT.

Exit codes: 0 after a clean stop; 2 on a setting that cannot work (checked before the models
load where it can be: storage, the metrics port, the worker name), and on models that do not
fit in the GPU's memory; 1 when a thread died of an error it could not handle (its jobs go to
other workers, or to this name's next start).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
from pathlib import Path
from types import FrameType

import torch

from app.jobs import logs
from app.jobs.settings import refuse
from app.jobs.storage import open_storage
from app.jobs.worker_store import WorkerStore
from worker.bytecode import keep as keep_bytecode
from worker.compiled import Tuning
from worker.engine import Engine, resolve_device
from worker.engines import load_engines, tuning_of
from worker.helpers import HELPED_MODELS, Helpers, WarmMarks, helped_parts
from worker.lease import READ_BLOCK_MS, NameTaken
from worker.metrics import WorkerMetrics
from worker.runner import Runner
from worker.settings import WorkerSettings

log = logging.getLogger("sdserve.worker")

# Compile helpers by default on GPUs of this much memory or more (a helper holds a second copy
# of its model and its largest call's activations while it compiles): two models' helpers there,
# and one more model's for each further HELPER_MEMORY (SDXL's weights are 8 GiB; its largest
# call's activations taken as about as much again, a guess not yet measured). Without a helper
# a model compiles in the warm-up: SD 1.5 as a third model beside SDXL's base and refiner took
# 97 s there against 22 s with one (H100, thirtieth and thirty-first sessions). A guess too
# high costs the start once: a warm-up out of GPU memory beside the helpers stops them and goes
# on alone (worker/engines.py).
HELPED_MEMORY = 40 * 2**30
HELPER_MEMORY = 20 * 2**30


def process_age_s() -> float | None:
    """Seconds since this process began (Linux's /proc; None elsewhere): a start's imports and
    the interpreter's own start, which no timer inside the program sees."""
    try:
        stat = Path("/proc/self/stat").read_text()
        began = int(stat.rsplit(")", 1)[1].split()[19])  # field 22: clock ticks after boot
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - began / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def helped(settings: WorkerSettings, device: torch.device, tuning: Tuning) -> int:
    """How many of the models get a compile helper (worker/helpers.py), 0 for none: as set,
    or (auto) where inductor compiles on a GPU with room for a helper's copy of a model; as
    many as the GPU's memory has room for (`HELPER_MEMORY`), at least `HELPED_MODELS`."""
    if settings.compile_helpers == "off" or not tuning.compile:
        return 0
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
    room = HELPED_MODELS + (total - HELPED_MEMORY) // HELPER_MEMORY if total >= HELPED_MEMORY else 0
    if settings.compile_helpers == "on":  # a CPU's (the tests') or a small GPU's: the first two
        return max(room, HELPED_MODELS)
    return room if tuning.compile_backend == "inductor" else 0


def warm_marks(models: dict[str, str], device: torch.device, tuning: Tuning) -> WarmMarks:
    """Where the compile cache says which models warmed up with it before (worker/helpers.py):
    each model's mark is keyed by what its compiled code depends on; none where nothing
    compiles."""
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR") if tuning.compile else None
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return WarmMarks(Path(cache) if cache else None,
                     {name: f"{torch.__version__} {gpu} {name}={source} {tuning!r}"
                      for name, source in models.items()})  # fmt: skip


def started_helpers(
    settings: WorkerSettings, device: torch.device, tuning: Tuning, marks: WarmMarks
) -> Helpers | None:
    """The compile helpers for this start (`helped`), but none for a model that warmed up with
    this compile cache before: its parts are read there in seconds."""
    count = helped(settings, device, tuning)
    if not count:
        return None
    models, warmed = list(settings.held_models()), marks.warmed()
    if warmed:
        log.info("no compile helper for %s: warmed up with this compile cache before",
                 ", ".join(warmed))  # fmt: skip
    return Helpers(models, warmed, count) if helped_parts(models, warmed, count) else None


def serve(settings: WorkerSettings) -> None:
    logs.configure(settings.log_json)
    imported = process_age_s()  # the interpreter, torch, diffusers: before any line here
    try:
        device = resolve_device(settings.device)
    except RuntimeError as e:
        raise SystemExit(f"sdserve: {e}") from None
    storage = open_storage(settings.storage)
    try:
        storage.check()
    except Exception as e:
        refuse(f"SDSERVE_STORAGE={settings.storage}: cannot write there: {e}")
    tuning = tuning_of(settings, device)
    metrics = WorkerMetrics(tuning.row_buckets())
    if settings.metrics_port:
        try:
            metrics.serve(settings.metrics_port)
        except OSError as e:
            refuse(f"SDSERVE_METRICS_PORT={settings.metrics_port}: {e.strerror}")
    # Compiled kernels are reused from here by the next start: seconds instead of minutes.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(settings.cache_in_use())
    models = settings.held_models()
    marks = warm_marks(models, device, tuning)
    helpers = started_helpers(settings, device, tuning, marks)
    try:
        engines, load_s, warm_s = load_engines(models, device, tuning, helpers)
    finally:
        if helpers is not None:
            helpers.stop()
    marks.mark()
    upscaler = None
    if settings.upscaler:
        # Uncompiled: its shapes differ from the models' and vary with each picture.
        upscaler = Engine(settings.upscaler, device, dataclasses.replace(tuning, compile=False))
        log.info("x4 upscaler %s: %.0f MiB of weights", settings.upscaler,
                 upscaler.weight_bytes() / 2**20)  # fmt: skip
    # A read blocks up to READ_BLOCK_MS: the socket must wait longer than that.
    store = WorkerStore.connect(settings.redis_url, settings.result_ttl_s, READ_BLOCK_MS / 1000 + 5,
                                settings.record_grace_s)  # fmt: skip
    runner = Runner(settings, store, engines, storage, metrics, upscaler)
    if settings.sync_debug and device.type == "cuda":
        torch.cuda.set_sync_debug_mode("warn")  # each place once, in the log
    metrics.model_load.set(load_s)
    metrics.warm_up.set(warm_s)
    if device.type == "cuda":
        metrics.gpu_memory.set_function(lambda: torch.cuda.memory_allocated(device))
        metrics.gpu_memory_peak.set_function(lambda: torch.cuda.max_memory_allocated(device))

    def stop(signum: int, _frame: FrameType | None) -> None:
        log.info("%s: finishing the work in hand, then exiting", signal.Signals(signum).name)
        runner.stop()  # starts the stop grace's clock too

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    age = process_age_s()
    keep_bytecode(settings.cache_in_use())  # where the install has none: for the next start
    if age is not None and imported is not None:
        # Where a start's seconds go (a cold start's target is 90 s, a cached one's 30).
        log.info("started in %.1fs: imports %.1fs, models loaded %.1fs, warmed up %.1fs,"
                 " the rest %.1fs", age, imported, load_s, warm_s,
                 age - imported - load_s - warm_s)  # fmt: skip
    try:
        runner.run()
    except NameTaken as e:
        refuse(str(e))
    if runner.fatal is not None:
        # Half a worker is worse than none: its entries go to others (or to this name's next
        # start). Other threads may be stuck on what killed this one: no waiting for them.
        with contextlib.suppress(Exception):
            store.retire(runner.name, runner.lease.token)
        logging.shutdown()
        os._exit(1)
