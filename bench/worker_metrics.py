"""The worker's own metrics, read by the benchmarks while a load runs.

`bench.batching.service` starts the worker with its metrics on port 9470. A load reads the
sums it needs at the start and at the end of its measured window (after its ramp-up, before
its drain): the difference is what the worker did in the window, whatever the client saw
finish in it.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Sequence
from typing import Any

import httpx

from worker.metrics import JOIN_PARTS, LOOP_PHASES

METRICS = "http://127.0.0.1:9470/metrics"  # the worker's, as bench.batching starts it
REAL_ROWS = 'sdserve_worker_unet_rows_total{kind="real"}'  # UNet rows computed, padding apart
# The worker's log lines a benchmark keeps: its start's parts (the compiler's phases among
# them), its weights, compiles while serving, calls without CUDA graphs, and (with
# SDSERVE_SYNC_DEBUG=1) each place the host waited for the GPU.
LOGGED = (r"warmed up|warm-up:|loaded in|compiled while|weights|CUDA graphs|compile helper"
          r"|synchroniz|compiler's seconds|left the GPU|bytecode")  # fmt: skip


def metric(name: str, text: str | None = None) -> float:
    """A sample of the worker's metrics, summed over its labels but those named
    (`name{kind="real"}`); NaN when the worker has none."""
    text = text if text is not None else httpx.get(METRICS, timeout=5).text
    base, _, wanted = name.partition("{")
    pairs = wanted.rstrip("}").split(",")
    values = [float(value) for series, labels, value
              in re.findall(r"^(\w+)(\{[^}]*\})? ([0-9.e+-]+)$", text, re.M)
              if series == base and all(pair in labels for pair in pairs)]  # fmt: skip
    return sum(values) if values else float("nan")


def fully_warm(startup: float, ready_at: float, limit_s: float = 180) -> float:
    """Seconds from the start until the worker had recorded the warm-up entries its start left
    for idle time (`sdserve_worker_warm_entries_left` at 0); NaN when not within `limit_s`
    (or the worker has no such gauge). The loads after it then measure a fully warm worker:
    while entries are left, each idle moment records one (about 0.4 s a job arriving then
    waits), which the first minute after a start pays and a steady load does not."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        left = metric("sdserve_worker_warm_entries_left")
        if left == 0:
            return startup + time.monotonic() - ready_at
        if left != left:  # NaN: a worker without the gauge
            break
        time.sleep(0.2)
    return float("nan")


def sums(names: Sequence[str], url: str = METRICS) -> dict[str, float] | None:
    """The named sums now, with the moment read (`wall`); None when the worker does not
    answer."""
    try:
        text = httpx.get(url, timeout=5).text
    except httpx.HTTPError:
        return None
    return {name: metric(name, text) for name in names} | {"wall": time.monotonic()}


class Window:
    """The sums at the start and the end of a load's measured window, `warm` and
    `warm + seconds` from its making, read by timers while the load runs."""

    def __init__(
        self, warm: float, seconds: float, names: Sequence[str], url: str = METRICS
    ) -> None:
        self.names, self.url = tuple(names), url
        self.read: list[dict[str, float]] = []
        self._timers = [threading.Timer(at, self._take) for at in (warm, warm + seconds)]
        for timer in self._timers:
            timer.daemon = True
            timer.start()

    def _take(self) -> None:
        now = sums(self.names, self.url)
        if now is not None:
            self.read.append(now)

    def ends(self) -> tuple[dict[str, float], dict[str, float]] | None:
        """The sums at its start and its end (waiting for the end's reading if it is due);
        None when the worker did not answer both times."""
        for timer in self._timers:
            timer.join()
        return (self.read[0], self.read[1]) if len(self.read) == 2 else None


# What a load's window reads to say where its time went (`gpu_share`).
JOIN_WAIT = ("sdserve_worker_join_wait_seconds_sum", "sdserve_worker_join_wait_seconds_count")
JOIN_PART_SUMS = tuple(f'sdserve_worker_join_wait_parts_seconds_total{{part="{p}"}}'
                       for p in JOIN_PARTS)  # fmt: skip
LOOP_SUMS = tuple(f'sdserve_worker_loop_seconds_total{{phase="{p}"}}' for p in LOOP_PHASES)
TAKE_AHEAD = "sdserve_worker_take_ahead_calls"  # a gauge: read at the window's end
LEAD_WAIT = "sdserve_worker_gpu_lead_wait_seconds_total"
GPU_SUMS = ("sdserve_worker_row_step_seconds_sum", "sdserve_worker_row_step_seconds_count",
            "sdserve_worker_vae_decode_seconds_sum", "sdserve_worker_vae_encode_seconds_sum",
            REAL_ROWS,
            'sdserve_worker_unet_rows_total{kind="padding"}',
            *LOOP_SUMS, *JOIN_WAIT, *JOIN_PART_SUMS, TAKE_AHEAD, LEAD_WAIT)  # fmt: skip


def gpu_share(before: dict[str, float], after: dict[str, float]) -> dict[str, Any] | None:
    """Where a load's time went, from the worker's own timers (CUDA events): the share of the
    wall time the GPU spent in UNet steps, decodes and encodes, the mean step and its rows. A share
    near 1 says the GPU's work, not the host, bounds the load."""
    d = {name: after[name] - before[name] for name in after}
    steps = d["sdserve_worker_row_step_seconds_count"] or float("nan")
    real = d[REAL_ROWS]
    joins = d[JOIN_WAIT[1]] or float("nan")
    return {
        "step_share": d["sdserve_worker_row_step_seconds_sum"] / d["wall"],
        "decode_share": d["sdserve_worker_vae_decode_seconds_sum"] / d["wall"],
        "encode_share": d["sdserve_worker_vae_encode_seconds_sum"] / d["wall"],
        "step_ms": 1000 * d["sdserve_worker_row_step_seconds_sum"] / steps,
        "rows_per_step": real / steps,
        "padding_share": d['sdserve_worker_unet_rows_total{kind="padding"}'] / (real or 1),
        # The loop thread's host time by phase, as shares of the wall time (a worker without
        # the counter, before 2026-12-05: NaN).
        "loop": {p: d[name] / d["wall"] for p, name in zip(LOOP_PHASES, LOOP_SUMS, strict=True)},
        # Of its step phase, the share it waited for the GPU to catch up (worker/timing.py
        # Lead; a worker before the eighteenth session: NaN): the rest is its own work.
        "lead_wait": d[LEAD_WAIT] / d["wall"],
        # From taken (started, its images counted in flight) to joined: a job still being read
        # (its picture, its LoRAs, its prompts) holds room that no other job can take.
        "join_wait_ms": 1000 * d[JOIN_WAIT[0]] / joins,
        # Its parts: the job's inputs read (picture, LoRAs), then its prompts, then room.
        "join_parts_ms": {
            p: 1000 * d[name] / joins for p, name in zip(JOIN_PARTS, JOIN_PART_SUMS, strict=True)
        },
        # How many UNet calls ahead of their room jobs were taken at the window's end (a
        # worker before 2026-12-05's eighteenth session: NaN).
        "take_ahead": after[TAKE_AHEAD],
    }
