"""Where a queued job's `eta_s` goes wrong: the pace it was computed from, beside what happened.

The API estimates a queued job from the pace its worker publishes (app/jobs/eta.py; with each
progress report, and in its heartbeat): a step's seconds as a line over the UNet rows in flight,
the rows now and their recent mean, and a finish (decode, PNGs, storage). `PaceLog` reads that
pace from Redis while a load runs; `eta_parts` puts, for each job read at submission, what the
estimate assumed (the wait, the step time at the rows it predicted, the finish) beside what the
job's record says happened (its wait and its run), so that a miss names its part: the rows, the
step line or the finish.
"""

from __future__ import annotations

import asyncio
import bisect
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from app.jobs.api_store import ApiStore
from app.jobs.eta import Pace
from bench.bench import Done


@dataclass(frozen=True)
class Sample:
    at: float  # monotonic, when read
    pace: Pace
    beat_at: float  # monotonic, the first read that saw this pace (heartbeat or written since)


class PaceLog:
    """The live workers' paces, read every `every_s` (the first worker's: the
    benchmarks run one)."""

    def __init__(self, redis_url: str, every_s: float = 0.1) -> None:
        self._store = ApiStore.connect(redis_url, 3600, 5)
        self.every_s = every_s
        self.samples: list[Sample] = []

    def read(self) -> None:
        """What the API reads (the heartbeat's info, with the pace written since)."""
        for _name, info in sorted(self._store.worker_infos().items()):
            pace = Pace.parse(info)
            if pace is None:
                continue
            now = time.monotonic()
            last = self.samples[-1] if self.samples else None
            beat_at = last.beat_at if last is not None and last.pace == pace else now
            self.samples.append(Sample(now, pace, beat_at))
            return

    async def run(self) -> None:
        """Read until canceled."""
        while True:
            await asyncio.to_thread(self.read)
            await asyncio.sleep(self.every_s)

    def at(self, moment: float) -> Sample | None:
        """The last sample read at or before `moment`."""
        k = bisect.bisect_right([s.at for s in self.samples], moment)
        return self.samples[k - 1] if k else None


def eta_parts(jobs: Sequence[tuple[Done, int, int]], log: PaceLog) -> dict[str, Any]:
    """Medians over the succeeded jobs whose `eta_s` was read at submission, each given as
    (its Done, the steps it ran, its UNet rows): what the estimate took and what happened."""
    parts: dict[str, list[float]] = {k: [] for k in (
        "eta_s", "actual_s", "wait_s", "ran_s", "predicted_ran_s", "predicted_step_ms",
        "run_step_ms", "finish_s", "rows", "taken", "rows_mean", "beat_age_s", "steps", "job_rows",
        "base_ms", "row_ms", "read_at", "read_running")}  # fmt: skip
    for done, steps, rows in jobs:
        read = done.eta_at_submission
        if read is None or done.status != "succeeded" or done.ran_s is None:
            continue
        eta, when = read
        sample = log.at(when)
        if sample is None or not sample.pace.measured:
            continue
        pace = sample.pace
        step_s = pace.step_s(pace.beside() + rows)
        values = {
            "eta_s": eta,
            "actual_s": done.ended - when,
            "wait_s": done.queue_wait_s,
            "ran_s": done.ran_s,
            "predicted_ran_s": steps * step_s + pace.finish_s,
            "predicted_step_ms": step_s * 1000,
            # The run less the finish the pace said, per step: near the step time the job
            # saw, if the finish is right.
            "run_step_ms": max(0.0, done.ran_s - pace.finish_s) / steps * 1000,
            "finish_s": pace.finish_s,
            "rows": pace.rows,
            "taken": pace.taken,  # rows taken to join (0 from a worker before the field)
            "rows_mean": pace.rows if pace.rows_mean is None else pace.rows_mean,
            "beat_age_s": when - sample.beat_at,
            "steps": steps,
            "job_rows": rows,
            "base_ms": pace.base_s * 1000,
            "row_ms": pace.row_s * 1000,
            "read_at": when,
            "read_running": float(done.status_at_submission == "running"),
        }
        for key, value in values.items():
            parts[key].append(value)
    medians: dict[str, Any] = {
        f"{k}_p50": statistics.median(v) if v else None
        for k, v in parts.items()
        if k != "read_at"  # a monotonic clock's reading: no median to it
    }
    # Job by job too, for reading a spread that medians hide.
    each = [dict(zip(parts, values, strict=True)) for values in zip(*parts.values(), strict=True)]
    return {"jobs": len(parts["eta_s"])} | medians | {"each": each}


def parts_lines(parts: dict[str, Any]) -> list[str]:
    """The parts as a markdown table (medians), estimate beside outcome."""

    def f(key: str, scale: float = 1.0, digits: int = 2) -> str:
        value = parts.get(f"{key}_p50")
        return "-" if value is None else f"{value * scale:.{digits}f}"

    return [
        f"`eta_s` at submission in parts, medians over {parts['jobs']} jobs:",
        "",
        "| part | the estimate took | what happened |",
        "|---|---|---|",
        f"| whole, s | {f('eta_s')} | {f('actual_s')} |",
        f"| queue wait, s | 0 when it joins at once | {f('wait_s')} |",
        f"| run (steps and finish), s | {f('predicted_ran_s')} | {f('ran_s')} |",
        f"| a step, ms | {f('predicted_step_ms', digits=1)} | {f('run_step_ms', digits=1)}"
        " (the run less the finish, a step) |",
        f"| finish, s | {f('finish_s')} | |",
        f"| rows now / taken to join / recent mean (the pace) | {f('rows', digits=1)} /"
        f" {f('taken', digits=1)} / {f('rows_mean', digits=1)} | |",
        f"| the pace's age, s | {f('beat_age_s')} | |",
    ]
