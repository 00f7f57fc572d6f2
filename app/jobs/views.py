"""Records read back as what clients and metrics see: job views and the queue's state."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from app.jobs.contract import JobError, JobRequest, JobView, Progress, Status, parse_request
from app.jobs.eta import Pace, queued_eta
from app.jobs.store import BOUNDS
from app.jobs.tasks import denoising_steps


@dataclass(frozen=True)
class QueueState:
    """What the whole queue looks like now: for metrics."""

    queued: dict[str, int]  # by model
    lag: dict[str, int]  # by model
    workers: int
    dead_letters: int
    stream_length: dict[str, int]  # by model
    webhook_backlog: int
    # status -> (cumulative buckets [(le, count)...] ending with "+Inf", sum of seconds)
    durations: dict[str, tuple[list[tuple[str, float]], float]]


def durations(raw: dict[bytes, bytes]) -> dict[str, tuple[list[tuple[str, float]], float]]:
    counts: dict[str, dict[str, float]] = {}
    for field, value in raw.items():
        status, bucket = field.decode().split("|")
        counts.setdefault(status, {})[bucket] = float(value)
    out = {}
    for status, by_bucket in counts.items():
        cumulative, running = [], 0.0
        for le in [*BOUNDS.split(","), "+Inf"]:
            running += by_bucket.get(le, 0.0)
            cumulative.append((le, running))
        out[status] = (cumulative, by_bucket.get("sum", 0.0))
    return out


def _timestamp(record: dict[str, str], field: str) -> datetime | None:
    value = record.get(field)
    return datetime.fromtimestamp(float(value), UTC) if value else None


def job_view(
    job_id: str,
    record: dict[str, str],
    position: int | None,
    now: float,
    paces: list[Pace] | None = None,
    workers: int | None = None,
) -> JobView:
    """The record as clients see it; `paces` (the live workers' that hold its model) give a
    queued job's ETA, `workers` says how many of them there are."""
    request = parse_request(record["request"])
    status = Status(record["status"])
    expires_at = record.get("expires_at")
    if status is Status.SUCCEEDED and expires_at and now >= float(expires_at):
        status = Status.EXPIRED
    images = (
        [f"/jobs/{job_id}/images/{k}.png" for k in range(int(record.get("images", 0)))]
        if status is Status.SUCCEEDED
        else []
    )
    code = record.get("error_code")
    return JobView(
        id=job_id,
        status=status,
        position=position if status is Status.QUEUED else None,
        # The steps the job runs (a pass from a picture runs part of its schedule, a hires fix
        # two passes), as the worker counts its step: the bar ends at 100%.
        progress=Progress(step=int(record.get("step", 0)), steps=denoising_steps(request))
        if status is Status.RUNNING
        else None,
        created_at=datetime.fromtimestamp(float(record["created_at"]), UTC),
        started_at=_timestamp(record, "started_at"),
        finished_at=_timestamp(record, "finished_at"),
        request=request,
        seeds=request.seeds(),
        images=images,
        error=JobError(code=code, message=record.get("error_message", "")) if code else None,
        eta_s=_eta(record, status, position, request, now, paces or []),
        preview_url=f"/jobs/{job_id}/preview.jpg?step={record['preview']}"
        if status is Status.RUNNING and "preview" in record
        else None,
        workers=workers if status is Status.QUEUED else None,
    )


def _eta(
    record: dict[str, str],
    status: Status,
    position: int | None,
    request: JobRequest,
    now: float,
    paces: list[Pace],
) -> float | None:
    if status is Status.RUNNING and "finish_at" in record:
        return round(max(0.0, float(record["finish_at"]) - now), 2)
    # Queued; or just started, before its worker's first report: as the first in the queue.
    if (status is Status.QUEUED and position is not None) or status is Status.RUNNING:
        eta = queued_eta(position or 0, request, paces, started=status is Status.RUNNING)
        return None if eta is None else round(eta, 2)
    return None
