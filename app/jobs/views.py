"""Records read back as what clients and metrics see: job views and the queue's state."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from app.jobs.contract import JobError, JobView, Progress, Status, parse_request
from app.jobs.store import BOUNDS


@dataclass(frozen=True)
class QueueState:
    """What the whole queue looks like now: for metrics."""

    queued: int
    lag: int
    workers: int
    dead_letters: int
    stream_length: int
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


def job_view(job_id: str, record: dict[str, str], position: int | None, now: float) -> JobView:
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
        progress=Progress(step=int(record.get("step", 0)), steps=request.steps)
        if status is Status.RUNNING
        else None,
        created_at=datetime.fromtimestamp(float(record["created_at"]), UTC),
        started_at=_timestamp(record, "started_at"),
        finished_at=_timestamp(record, "finished_at"),
        request=request,
        seeds=request.seeds(),
        images=images,
        error=JobError(code=code, message=record.get("error_message", "")) if code else None,
    )
