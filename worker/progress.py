"""The jobs on the GPU now: their step, how soon each will be done, their latest preview, and
which of them ended elsewhere (canceled).

Written by the GPU loop and read by the reporter thread, which writes it to Redis a few times a
second. The pace is measured here, from the steps themselves: the time between two steps of a
job grows with the UNet rows in flight (a step of 64 rows takes far longer than one of 2), so it
is fitted as a line over the rows, on recent steps. That line gives each running job's finishing
time at the load it has now, and the worker's heartbeat hands it to the API for queued jobs
(app/jobs/eta.py).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

import numpy as np

from app.jobs.eta import Pace
from app.jobs.tiles import TILE, TILE_OVERLAP
from app.jobs.worker_store import Report

# How much of the fit each step keeps: about the last 1/(1 - FORGET) = 50 steps count, so the
# line follows the GPU as it warms and the mix of sizes changes.
FORGET = 0.98
# How much each job's finish (decode, PNGs, storage) moves its estimate.
SMOOTHING = 0.2
# The rows in flight are also averaged over about this many seconds (exponentially, over time)
# and published with the pace, for the benchmarks' records of each estimate: the estimate
# itself takes the rows now (app/jobs/eta.py, `Pace.beside`, says why). Averaged over 10 s, a
# full load's rows (62) stayed in the mean for tens of seconds after the load fell.
ROWS_MEAN_S = 3.0


class StepFit:
    """Seconds between two steps of a job ~ base + per_row x rows in flight, least squares over
    recent steps (older ones fade)."""

    def __init__(self) -> None:
        self.weight = self.x = self.y = self.xx = self.xy = 0.0

    def add(self, rows: int, seconds: float, weight: float) -> None:
        keep = FORGET**weight
        self.weight = self.weight * keep + weight
        self.x = self.x * keep + weight * rows
        self.y = self.y * keep + weight * seconds
        self.xx = self.xx * keep + weight * rows * rows
        self.xy = self.xy * keep + weight * rows * seconds

    def line(self) -> tuple[float, float]:
        """(base, per_row) seconds; (0, 0) before any step."""
        if not self.weight:
            return 0.0, 0.0
        mean_x, mean_y = self.x / self.weight, self.y / self.weight
        spread = self.xx / self.weight - mean_x**2
        if spread < 0.25:  # the rows hardly varied: a step's time in proportion to its rows
            return 0.0, mean_y / max(mean_x, 1.0)
        per_row = max(0.0, (self.xy / self.weight - mean_x * mean_y) / spread)
        base = mean_y - per_row * mean_x
        if base < 0:  # no negative fixed cost: through the origin instead
            return 0.0, mean_y / max(mean_x, 1.0)
        return base, per_row


@dataclass
class _Job:
    step: int
    steps: int
    rows: int  # UNet rows: two an image when guided (cond and uncond), else one
    at: float  # when it got to `step` (monotonic)


class Tracker:
    def __init__(self, row_cap: int = 0, tiles: tuple[int, int] = (TILE, TILE_OVERLAP)) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, _Job] = {}
        self._gone: set[str] = set()
        self._previews: dict[str, tuple[int, list[np.ndarray]]] = {}
        self._fit = StepFit()
        self.row_cap = row_cap
        self.tiles = tiles  # (tile, overlap): the API counts a queued job's rows with them
        self.finish_s = 0.0  # from the last step to the images stored
        self._denoised: dict[str, float] = {}
        self._rows_mean = 0.0  # the rows in flight, averaged over time (ROWS_MEAN_S)
        self._mean_at = time.monotonic()
        # Jobs taken and not yet joined (their pictures and prompts being read), by their UNet
        # rows: they join within a few steps, so a job queued now runs beside them too.
        self._taken: dict[str, int] = {}
        # Set when jobs take, join or leave rows: the reporter writes the pace at once rather
        # than at its next turn (a job submitted between two turns ran beside rows the pace
        # did not show: 2026-12-06, four jobs within 0.13 s each read the same 2 rows).
        self.changed = threading.Event()

    # -- static batches: the jobs of one batch step together --------------------------------

    def begin(self, jobs: dict[str, tuple[int, int]]) -> None:
        """A batch starts: its jobs, with the steps each runs and its UNet rows."""
        now = time.monotonic()
        with self._lock:
            self._average()
            self._jobs = {k: _Job(0, steps, rows, now) for k, (steps, rows) in jobs.items()}

    def advance(self, step: int) -> bool:
        """Record a finished step; False once every job of the batch has ended elsewhere."""
        with self._lock:
            for job_id in self._jobs:
                self._move(job_id, step)
            return not self._jobs.keys() <= self._gone

    def end(self) -> None:
        with self._lock:
            self._average()
            self._jobs = {}

    # -- rows: each job at its own step -----------------------------------------------------

    def taken(self, jobs: dict[str, int]) -> None:
        """Jobs taken (their UNet rows), to join once their inputs are read."""
        if jobs:
            with self._lock:
                self._taken |= jobs
            self.changed.set()

    def untaken(self, job_id: str) -> None:
        """A job taken left without joining (refused at its join, handed back)."""
        with self._lock:
            if self._taken.pop(job_id, None) is not None:
                self.changed.set()

    def at(self, job_id: str, step: int, steps: int, rows: int) -> None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                self._average()
                self._taken.pop(job_id, None)
                self._jobs[job_id] = _Job(step, steps, rows, time.monotonic())
                self.changed.set()
                return
            self._move(job_id, step)
            if job.rows != rows:  # a second pass (a hires fix's, a refiner's) of other rows
                self._average()
                job.rows = rows
                self.changed.set()

    def remove(self, job_id: str) -> None:
        with self._lock:
            self._average()
            self._jobs.pop(job_id, None)
            self._taken.pop(job_id, None)
            self._previews.pop(job_id, None)
        self.changed.set()

    def _move(self, job_id: str, step: int) -> None:
        job, now = self._jobs[job_id], time.monotonic()
        if step > job.step:
            taken = (now - job.at) / (step - job.step)
            # Every job of a step says about the same: together they count as one step.
            stepping = sum(1 for other in self._jobs.values() if other.rows)
            self._fit.add(self._rows(), taken, 1 / max(stepping, 1))
            job.step, job.at = step, now

    def _rows(self) -> int:
        return sum(job.rows for job in self._jobs.values())

    def _average(self) -> None:
        """The rows' time average brought up to now (called before the rows change: the rows
        until now are the ones held since the last change)."""
        now = time.monotonic()
        fade = math.exp(-(now - self._mean_at) / ROWS_MEAN_S)
        self._rows_mean = fade * self._rows_mean + (1.0 - fade) * self._rows()
        self._mean_at = now

    def denoised(self, job_id: str) -> None:
        """The job's last step is done: what follows (decode, PNGs, storage) is timed, and its
        rows no longer count as in flight. They did until it was stored: a cohort that ended
        together still counted while the jobs that took its place stepped, and their estimates
        and the pace's rows said a step of both."""
        with self._lock:
            self._denoised[job_id] = time.monotonic()
            job = self._jobs.get(job_id)
            if job is not None:
                self._average()
                job.step, job.rows = job.steps, 0
                self.changed.set()

    def stored(self, job_id: str) -> None:
        """The job's outcome is written: how long its finish took feeds the estimate."""
        with self._lock:
            began = self._denoised.pop(job_id, None)
            if began is None:
                return
            seconds = time.monotonic() - began
            self.finish_s = (
                seconds
                if not self.finish_s
                else self.finish_s + SMOOTHING * (seconds - self.finish_s)
            )

    def preview(self, job_id: str, step: int, pictures: list[np.ndarray]) -> None:
        """The latest preview of a job's images (an older one not yet written is replaced)."""
        with self._lock:
            if job_id in self._jobs:
                self._previews[job_id] = (step, pictures)

    # -- the reporter's side ----------------------------------------------------------------

    def pace(self) -> Pace:
        with self._lock:
            return self._pace()

    def _pace(self) -> Pace:
        base, per_row = self._fit.line()
        self._average()
        return Pace(base, per_row, self._rows(), self.row_cap, self.finish_s, *self.tiles,
                    rows_mean=round(self._rows_mean, 2),
                    taken=sum(self._taken.values()))  # fmt: skip

    def running(self) -> dict[str, Report]:
        """Each job's step and seconds left: its steps left at the pace of the rows in flight
        now, less the time since its last step, plus a finish."""
        with self._lock:
            pace = self._pace()
            if not pace.measured:
                return {k: Report(job.step, None) for k, job in self._jobs.items()}
            now, step_s = time.monotonic(), pace.step_s(pace.rows)
            return {
                k: Report(
                    job.step,
                    max(0.0, (job.steps - job.step) * step_s - (now - job.at)) + self.finish_s,
                )
                for k, job in self._jobs.items()
            }

    def take_previews(self) -> dict[str, tuple[int, list[np.ndarray]]]:
        with self._lock:
            previews, self._previews = self._previews, {}
            return previews

    # -- canceled elsewhere -------------------------------------------------------------------

    def mark_gone(self, job_ids: set[str]) -> None:
        with self._lock:
            self._gone |= job_ids

    def is_gone(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._gone

    def forget(self, job_ids: set[str]) -> None:
        with self._lock:
            self._gone -= job_ids
