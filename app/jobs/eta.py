"""When a job will be done: `eta_s` in its view.

A running job's estimate comes from its worker, which knows its pace (seconds per step at the
load it has now), the job's steps left and how long decodes take; it writes the finishing time
with each progress report. A queued job's comes from here, from the pace every live worker
publishes with its heartbeat: the job runs as soon as it has room (continuous batching takes
it between two steps), and room comes free as fast as the workers finish images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from app.jobs.contract import JobRequest


@dataclass(frozen=True)
class Pace:
    """How a worker is going, as its heartbeat says."""

    step_s: float  # seconds between two steps of a row, at its load now; 0 before it measured
    decode_s: float  # seconds from the last step to the images on the host
    images: int  # images in flight
    capacity: int  # images it runs at once

    @classmethod
    def parse(cls, info: str) -> Pace | None:
        """From a heartbeat's info; None for one without a pace (an older worker)."""
        try:
            fields = json.loads(info)
            return cls(float(fields["step_s"]), float(fields["decode_s"]),
                       int(fields["images"]), int(fields["capacity"]))  # fmt: skip
        except (ValueError, TypeError, KeyError):
            return None


def denoising_steps(request: JobRequest) -> int:
    """Steps a job runs: from a source picture, only the last `strength` of the schedule."""
    if request.kind == "txt2img":
        return request.steps
    return max(1, min(int(request.steps * request.strength), request.steps))


def queued_eta(position: int, request: JobRequest, paces: list[Pace]) -> float | None:
    """Seconds until a queued job at `position` is done; None before any worker has measured
    its pace. The jobs ahead are taken to be like this one (their sizes are not read)."""
    measured = [p for p in paces if p.step_s > 0]
    if not measured:
        return None
    step_s = sum(p.step_s for p in measured) / len(measured)
    decode_s = sum(p.decode_s for p in measured) / len(measured)
    run_s = denoising_steps(request) * step_s + decode_s
    free = sum(max(0, p.capacity - p.images) for p in paces)
    waiting = (position + 1) * request.n - free  # images that must finish before it starts
    if waiting <= 0:
        return run_s
    # Full: every run_s, each worker finishes about as many images as it holds.
    per_second = sum(p.capacity for p in measured) / run_s
    return waiting / per_second + run_s
