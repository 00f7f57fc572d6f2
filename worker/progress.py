"""The jobs on the GPU now: their step, how soon each will be done, their latest preview, and
which of them ended elsewhere (canceled).

Written by the GPU loop and read by the reporter thread, which writes it to Redis a few times a
second. The pace (seconds between two steps of a job, at the load the GPU has now) is measured
here, from the steps themselves: it gives each running job's finishing time, and the worker's
heartbeat hands it to the API for the queued ones (app/eta.py).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from app.jobs.worker_store import Report

# How much each new measurement moves the pace: a few steps' worth of memory, so the estimate
# follows the load as jobs join and leave.
SMOOTHING = 0.2


@dataclass
class _Job:
    step: int
    steps: int
    images: int
    at: float  # when it got to `step` (monotonic)


class Tracker:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, _Job] = {}
        self._gone: set[str] = set()
        self._previews: dict[str, tuple[int, list[np.ndarray]]] = {}
        self.step_s = 0.0  # 0: not measured yet
        self.decode_s = 0.0

    # -- static batches: the jobs of one batch step together --------------------------------

    def begin(self, jobs: dict[str, tuple[int, int]]) -> None:
        """A batch starts: its jobs, with the steps each runs and its images."""
        now = time.monotonic()
        with self._lock:
            self._jobs = {k: _Job(0, steps, images, now) for k, (steps, images) in jobs.items()}

    def advance(self, step: int) -> bool:
        """Record a finished step; False once every job of the batch has ended elsewhere."""
        with self._lock:
            for job_id in self._jobs:
                self._move(job_id, step)
            return not self._jobs.keys() <= self._gone

    def end(self) -> None:
        with self._lock:
            self._jobs = {}

    # -- rows: each job at its own step -----------------------------------------------------

    def at(self, job_id: str, step: int, steps: int, images: int) -> None:
        with self._lock:
            if job_id in self._jobs:
                self._move(job_id, step)
            else:
                self._jobs[job_id] = _Job(step, steps, images, time.monotonic())

    def remove(self, job_id: str) -> None:
        with self._lock:
            self._jobs.pop(job_id, None)
            self._previews.pop(job_id, None)

    def _move(self, job_id: str, step: int) -> None:
        job, now = self._jobs[job_id], time.monotonic()
        if step > job.step:
            taken = (now - job.at) / (step - job.step)
            self.step_s = (
                taken if not self.step_s else self.step_s + SMOOTHING * (taken - self.step_s)
            )
            job.step, job.at = step, now

    def decoded(self, seconds: float) -> None:
        with self._lock:
            self.decode_s = (
                seconds
                if not self.decode_s
                else self.decode_s + SMOOTHING * (seconds - self.decode_s)
            )

    def preview(self, job_id: str, step: int, pictures: list[np.ndarray]) -> None:
        """The latest preview of a job's images (an older one not yet written is replaced)."""
        with self._lock:
            if job_id in self._jobs:
                self._previews[job_id] = (step, pictures)

    # -- the reporter's side ----------------------------------------------------------------

    def running(self) -> dict[str, Report]:
        with self._lock:
            if not self.step_s:
                return {k: Report(job.step, None) for k, job in self._jobs.items()}
            now = time.monotonic()
            return {
                k: Report(
                    job.step,
                    max(0.0, (job.steps - job.step) * self.step_s - (now - job.at)) + self.decode_s,
                )
                for k, job in self._jobs.items()
            }

    def take_previews(self) -> dict[str, tuple[int, list[np.ndarray]]]:
        with self._lock:
            previews, self._previews = self._previews, {}
            return previews

    def images_in_flight(self) -> int:
        with self._lock:
            return sum(job.images for job in self._jobs.values())

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
