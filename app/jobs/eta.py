"""When a job will be done: `eta_s` in its view.

A worker measures its pace: the time between two steps of a job, which grows with the UNet rows
in flight, fitted as a line over the rows (worker/progress.py). A running job's estimate comes
from its worker: its steps left at the pace of the rows in flight now, plus a finish (decode,
PNGs, storage); the worker writes the finishing time with each progress report. A queued job's
comes from here, from the pace every live worker publishes (with its progress reports, a few
times a second, and in its heartbeat): the job runs as soon as there are rows free for it
(continuous batching takes it between two steps), beside the rows in flight now, the rows its
worker has taken to join next and the jobs queued ahead of it (`Pace.beside`), and rows come
free as fast as the workers finish their jobs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from app.jobs.contract import JobRequest
from app.jobs.tasks import denoising_steps, unet_rows
from app.jobs.tiles import TILE, TILE_OVERLAP


@dataclass(frozen=True)
class Pace:
    """How a worker is going, as it last said (its pace, or its heartbeat's)."""

    base_s: float  # a step takes base_s + row_s x UNet rows in flight
    row_s: float
    rows: int  # UNet rows in flight now
    row_cap: int  # the most it runs at once
    finish_s: float  # from a job's last step to its images stored
    tile: int = TILE  # pictures of more than `tile` x `tile` pixels run in tiles
    tile_overlap: int = TILE_OVERLAP
    # The rows in flight averaged over recent seconds: published for the benchmarks' records
    # of each estimate (bench/paces.py), not used by it (see `beside`).
    rows_mean: float | None = None
    # UNet rows of jobs taken and not yet joined (their inputs and prompts being read): they
    # join within a few steps. 0 from an older worker.
    taken: int = 0

    def beside(self, ahead: int = 0) -> float:
        """The rows a job that joins now will run beside: those in flight now, those taken to
        join, and `ahead` rows of jobs queued before it. Half the rows now and half their
        recent mean (the estimate until 2026-12-05) was further off: read job by job on two GPU
        checks' Poisson loads (171 jobs, an H100), the rows now alone gave 29% in the median
        where the blend gave 36% and the mean alone 44%; jobs there run for under a second, and
        a mean over seconds lags the bursts they run in. The rows taken and queued ahead are
        rows the job will run beside that the rows now miss (2026-12-06, an H100: of 60 jobs,
        19 were submitted within a report of jobs just before them, and read none of them)."""
        return float(self.rows + self.taken + ahead)

    @property
    def free(self) -> int:
        """Rows this worker has room for: its cap less the rows in flight and taken."""
        return max(0, self.row_cap - self.rows - self.taken)

    @property
    def measured(self) -> bool:
        return self.base_s + self.row_s > 0

    def step_s(self, rows: float) -> float:
        return self.base_s + self.row_s * rows

    def fields(self) -> dict[str, float | int]:
        return asdict(self)

    @classmethod
    def parse(cls, info: str) -> Pace | None:
        """From a heartbeat's info; None for one without a pace (an older worker)."""
        try:
            fields = json.loads(info)
            mean = fields.get("rows_mean")
            return cls(float(fields["base_s"]), float(fields["row_s"]), int(fields["rows"]),
                       int(fields["row_cap"]), float(fields["finish_s"]),
                       int(fields.get("tile", TILE)),
                       int(fields.get("tile_overlap", TILE_OVERLAP)),
                       None if mean is None else float(mean),
                       int(fields.get("taken", 0)))  # fmt: skip
        except (ValueError, TypeError, KeyError):
            return None


@dataclass(frozen=True)
class Beat:
    """What a live worker's heartbeat says: the models it holds, whether it has the x4
    upscaler, each model's ControlNets and whether each model takes LoRAs (None from an older
    worker, which did not say), and its pace (None before it has measured one, or from an
    older worker)."""

    models: tuple[str, ...]
    upscaler: bool
    pace: Pace | None
    controlnets: dict[str, tuple[str, ...]] | None = None
    loras: dict[str, bool] | None = None

    @classmethod
    def parse(cls, info: str) -> Beat:
        controlnets = loras = None
        try:
            fields = json.loads(info)
            models = tuple(str(m) for m in fields.get("models", ()))
            upscaler = bool(fields.get("upscaler", False))
            if isinstance(fields.get("controlnets"), dict):
                controlnets = {str(model): tuple(str(name) for name in names)
                               for model, names in fields["controlnets"].items()}  # fmt: skip
            if isinstance(fields.get("loras"), dict):
                loras = {str(model): bool(takes) for model, takes in fields["loras"].items()}
        except (ValueError, TypeError, AttributeError):
            models, upscaler = (), False
        return cls(models, upscaler, Pace.parse(info), controlnets, loras)


def queued_eta(
    position: int, request: JobRequest, paces: list[Pace], started: bool = False
) -> float | None:
    """Seconds until a queued job at `position` is done (or one `started`: taken by a worker
    that has not reported it yet, so maybe among the rows it has taken); None before any
    worker has measured its pace. The jobs ahead are taken to be like this one (their sizes
    are not read)."""
    measured = [p for p in paces if p.measured]
    if not measured:
        return None
    steps = denoising_steps(request)
    rows = unet_rows(request, measured[0].tile, measured[0].tile_overlap)
    roomiest = max(measured, key=lambda p: p.free)
    waiting = (position + 1) * rows - sum(p.free for p in measured)
    if waiting <= 0:  # it joins the rows in flight now, and runs beside those that follow
        beside = roomiest.beside(position * rows)
        if started:  # its own rows may be among those taken
            beside -= min(rows, roomiest.taken)
        return steps * roomiest.step_s(beside + rows) + roomiest.finish_s
    # Full: each worker finishes a full load of rows every run of a job at full load.
    runs = [steps * p.step_s(p.row_cap) + p.finish_s for p in measured]
    per_second = sum(p.row_cap / run for p, run in zip(measured, runs, strict=True))
    return waiting / per_second + sum(runs) / len(runs)
