"""The job contract that the API and the workers share, and the only code that knows Redis keys.

FastAPI-free on purpose: the worker imports this module, and its image carries no web stack.

Layout in Redis (all keys under the ``sdserve:`` prefix):

- ``sdserve:queue``            stream of work; each entry is ``{job: <id>}``; group ``workers``
- ``sdserve:queued``           sorted set of queued job ids, scored by creation time (positions)
- ``sdserve:job:<id>``         hash: the job record (request, status, timestamps, progress, error)
- ``sdserve:job:<id>:image:<k>`` PNG bytes of image k, with the result TTL
- ``sdserve:worker:<name>``    heartbeat of a live worker, with a TTL
- ``sdserve:workers``          set of worker names that have sent a heartbeat
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

import redis
from pydantic import BaseModel, ConfigDict, Field

SCHEDULERS = ("ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "lms", "pndm", "unipc")
SchedulerName = Literal[
    "ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "lms", "pndm", "unipc"
]
SEED_MAX = 2**32 - 1

STREAM = "sdserve:queue"
GROUP = "workers"
QUEUED = "sdserve:queued"
WORKERS = "sdserve:workers"

# A finished job's record outlives its images by this long, so that it can say "expired".
RECORD_GRACE_S = 7 * 86400

_JOB_ID = re.compile(r"[A-Za-z0-9_-]{22}")


def job_key(job_id: str) -> str:
    return f"sdserve:job:{job_id}"


def image_key(job_id: str, index: int) -> str:
    return f"sdserve:job:{job_id}:image:{index}"


def worker_key(name: str) -> str:
    return f"sdserve:worker:{name}"


def new_job_id() -> str:
    """128 random bits, URL-safe base64 without padding (22 characters)."""
    return secrets.token_urlsafe(16)


def is_job_id(text: str) -> bool:
    return _JOB_ID.fullmatch(text) is not None


class Status(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    EXPIRED = "expired"


class ErrorCode(StrEnum):
    """Typed reasons a job fails; clients branch on these, never on messages."""

    NUMERICAL = "numerical"  # the model produced NaN/inf pixels
    ENGINE = "engine_error"  # the model raised while generating
    INVALID = "invalid_request"  # a record the worker could not read as a request


class Txt2ImgRequest(BaseModel):
    """What a client asks for. Strict: a wrong JSON type is an error, never a silent coercion."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        allow_inf_nan=False,
        json_schema_extra={
            "examples": [
                {
                    "prompt": "a lighthouse on a cliff at dusk, oil painting",
                    "negative_prompt": "blurry",
                    "width": 512,
                    "height": 512,
                    "steps": 25,
                    "guidance_scale": 7.5,
                    "scheduler": "dpmpp_2m",
                    "seed": 1234,
                    "n": 2,
                }
            ]
        },
    )

    prompt: str = Field(min_length=1, max_length=2000, description="What to draw.")
    negative_prompt: str = Field(default="", max_length=2000, description="What to avoid.")
    # Both sides at most 1024, so width x height never exceeds 1024 x 1024.
    width: int = Field(default=512, ge=64, le=1024, multiple_of=8, description="Pixels.")
    height: int = Field(default=512, ge=64, le=1024, multiple_of=8, description="Pixels.")
    steps: int = Field(default=25, ge=1, le=100, description="Denoising steps.")
    guidance_scale: float = Field(default=7.5, ge=0, le=30, description="Classifier-free guidance.")
    scheduler: SchedulerName = Field(default="dpmpp_2m", description="Sampler.")
    seed: int | None = Field(
        default=None,
        ge=0,
        le=SEED_MAX,
        description="Seed of image 0; image k uses (seed + k) mod 2^32. Chosen when absent.",
    )
    n: int = Field(default=1, ge=1, le=8, description="Number of images.")

    def seeds(self) -> list[int]:
        """One seed per image; each one, sent back alone with n=1, reproduces that image."""
        if self.seed is None:
            raise ValueError("seeds() needs a normalized request (seed set)")
        return [(self.seed + k) % (SEED_MAX + 1) for k in range(self.n)]

    def batch_shape(self) -> tuple[int, int, int, str]:
        """Requests that share this key can run in one batch; everything else is per image."""
        return (self.width, self.height, self.steps, self.scheduler)


class Progress(BaseModel):
    step: int
    steps: int


class JobError(BaseModel):
    code: str
    message: str


class JobView(BaseModel):
    """What `GET /jobs/{id}` answers."""

    id: str
    status: Status
    position: int | None = Field(description="0-based place in the queue while queued.")
    progress: Progress | None = Field(description="Denoising step while running.")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    request: Txt2ImgRequest
    seeds: list[int]
    images: list[str]
    error: JobError | None


@dataclass(frozen=True)
class Delivery:
    """One stream entry handed to a worker."""

    entry_id: str
    job_id: str


@dataclass(frozen=True)
class Job:
    """A job a worker has taken: its delivery and its request."""

    delivery: Delivery
    request: Txt2ImgRequest

    @property
    def id(self) -> str:
        return self.delivery.job_id


# KEYS: job, queued. ARGV: job id, now, worker. A running job comes back after its worker died.
_START = """
local s = redis.call('HGET', KEYS[1], 'status')
if s == 'queued' then
  redis.call('HSET', KEYS[1], 'started_at', ARGV[2])
elseif s ~= 'running' then
  return 0
end
redis.call('HSET', KEYS[1], 'status', 'running', 'step', 0, 'worker', ARGV[3])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""

# KEYS: job, queued, image 0..n-1. ARGV: job id, status, now, result ttl, record ttl,
# error code, error message, png 0..n-1. A terminal state never changes: a late or repeated
# completion writes nothing.
_FINISH = """
local s = redis.call('HGET', KEYS[1], 'status')
if s ~= 'queued' and s ~= 'running' then return 0 end
for i = 3, #KEYS do
  redis.call('SET', KEYS[i], ARGV[i + 5], 'EX', ARGV[4])
end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'finished_at', ARGV[3], 'images', #KEYS - 2,
  'expires_at', ARGV[3] + ARGV[4], 'error_code', ARGV[6], 'error_message', ARGV[7])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""


class JobStore:
    """Every Redis operation of both sides. Safe to share between threads."""

    def __init__(self, client: redis.Redis, result_ttl_s: int) -> None:
        self._r = client
        self.result_ttl_s = result_ttl_s
        self._start = client.register_script(_START)
        self._finish = client.register_script(_FINISH)

    @classmethod
    def connect(cls, url: str, result_ttl_s: int, timeout_s: float) -> JobStore:
        client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        return cls(client, result_ttl_s)

    def ping(self) -> bool:
        return bool(self._r.ping())

    # -- API side -------------------------------------------------------------------------

    def submit(self, request: Txt2ImgRequest) -> str:
        """Record the job and queue it atomically; returns its id once both are stored."""
        if request.seed is None:
            raise ValueError("submit() needs a normalized request (seed set)")
        job_id = new_job_id()
        now = time.time()
        tx = self._r.pipeline(transaction=True)
        tx.hset(
            job_key(job_id),
            mapping={
                "request": request.model_dump_json(),
                "status": Status.QUEUED.value,
                "created_at": repr(now),
                "steps": request.steps,
            },
        )
        tx.zadd(QUEUED, {job_id: now})
        tx.xadd(STREAM, {"job": job_id})
        tx.execute()
        return job_id

    def view(self, job_id: str, now: float | None = None) -> JobView | None:
        tx = self._r.pipeline(transaction=True)
        tx.hgetall(job_key(job_id))
        tx.zrank(QUEUED, job_id)
        raw, position = tx.execute()
        if not raw:
            return None
        record = {k.decode(): v.decode() for k, v in raw.items()}
        return _view(job_id, record, position, time.time() if now is None else now)

    def image(self, job_id: str, index: int) -> bytes | None:
        data = self._r.get(image_key(job_id, index))
        return data if isinstance(data, bytes) else None

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job; False when it had already ended (or never was)."""
        now = time.time()
        return bool(
            self._finish(
                keys=[job_key(job_id), QUEUED],
                args=[
                    job_id,
                    Status.CANCELED.value,
                    repr(now),
                    self.result_ttl_s,
                    self._record_ttl(),
                    "",
                    "",
                ],
            )
        )

    def live_workers(self) -> list[str]:
        members: set[bytes] = self._r.smembers(WORKERS)  # type: ignore[assignment]
        names = sorted(n.decode() for n in members)
        if not names:
            return []
        beats = self._r.mget([worker_key(n) for n in names])
        dead = [n for n, beat in zip(names, beats, strict=True) if beat is None]
        if dead:
            self._r.srem(WORKERS, *dead)
        return [n for n, beat in zip(names, beats, strict=True) if beat is not None]

    # -- worker side ----------------------------------------------------------------------

    def ensure_group(self) -> None:
        """Create the stream and its group; from id 0, so nothing queued before is skipped."""
        try:
            self._r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def read(
        self, consumer: str, count: int | None, block_ms: int | None, pending: bool = False
    ) -> list[Delivery]:
        """New entries for this consumer, or (pending=True) those it took and has not acked."""
        streams: dict[Any, Any] = {STREAM: "0" if pending else ">"}
        reply: Any
        try:
            reply = self._r.xreadgroup(GROUP, consumer, streams, count=count, block=block_ms)
        except redis.ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            # Redis came back without its data (no persistence): the group must be made again.
            self.ensure_group()
            reply = self._r.xreadgroup(GROUP, consumer, streams, count=count, block=block_ms)
        out = []
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                job = fields.get(b"job") if fields else None
                if job is None:  # an entry deleted from the stream: nothing to run
                    self._r.xack(STREAM, GROUP, entry_id)
                    continue
                out.append(Delivery(entry_id.decode(), job.decode()))
        return out

    def start(self, deliveries: list[Delivery], worker: str) -> list[Job]:
        """Mark the jobs running; those canceled meanwhile are acked and left out."""
        now = repr(time.time())
        tx = self._r.pipeline(transaction=False)
        for d in deliveries:
            self._start(keys=[job_key(d.job_id), QUEUED], args=[d.job_id, now, worker], client=tx)
            tx.hget(job_key(d.job_id), "request")
        replies = tx.execute()
        jobs, skipped = [], []
        for i, d in enumerate(deliveries):
            started, request = replies[2 * i], replies[2 * i + 1]
            if not started:
                skipped.append(d.entry_id)
                continue
            try:
                jobs.append(Job(d, Txt2ImgRequest.model_validate_json(request)))
            except ValueError as e:
                self.fail(d, ErrorCode.INVALID, f"unreadable request: {e}")
        if skipped:
            self._r.xack(STREAM, GROUP, *skipped)
        return jobs

    def report(self, steps: dict[str, int]) -> set[str]:
        """Write each running job's step; returns the ids that are no longer running."""
        tx = self._r.pipeline(transaction=False)
        for job_id, step in steps.items():
            tx.hset(job_key(job_id), "step", step)
            tx.hget(job_key(job_id), "status")
        replies = tx.execute()
        statuses = replies[1::2]
        return {
            job_id
            for job_id, status in zip(steps, statuses, strict=True)
            if status != Status.RUNNING.value.encode()
        }

    def succeed(self, delivery: Delivery, pngs: list[bytes]) -> bool:
        return self._complete(delivery, Status.SUCCEEDED, pngs, "", "")

    def fail(self, delivery: Delivery, code: ErrorCode, message: str) -> bool:
        return self._complete(delivery, Status.FAILED, [], code.value, message)

    def requeue(self, deliveries: list[Delivery]) -> None:
        """Give entries a worker read but never started back to the stream, for any worker.

        The jobs stay queued in place: their position comes from their creation time.
        """
        tx = self._r.pipeline(transaction=True)
        for d in deliveries:
            tx.xadd(STREAM, {"job": d.job_id})
            tx.xack(STREAM, GROUP, d.entry_id)
        tx.execute()

    def ack(self, delivery: Delivery) -> None:
        """Release an entry whose job had already ended (canceled) without writing anything."""
        self._r.xack(STREAM, GROUP, delivery.entry_id)

    def heartbeat(self, worker: str, ttl_s: int, info: str) -> None:
        tx = self._r.pipeline(transaction=True)
        tx.set(worker_key(worker), info, ex=ttl_s)
        tx.sadd(WORKERS, worker)
        tx.execute()

    def retire(self, worker: str) -> None:
        tx = self._r.pipeline(transaction=True)
        tx.delete(worker_key(worker))
        tx.srem(WORKERS, worker)
        tx.execute()

    # -- shared ---------------------------------------------------------------------------

    def _record_ttl(self) -> int:
        return self.result_ttl_s + RECORD_GRACE_S

    def _complete(
        self, delivery: Delivery, status: Status, pngs: list[bytes], code: str, message: str
    ) -> bool:
        """Write the outcome, then ack; the ack comes only after the result is stored."""
        job_id = delivery.job_id
        keys = [job_key(job_id), QUEUED] + [image_key(job_id, k) for k in range(len(pngs))]
        args: list[str | int | bytes] = [
            job_id,
            status.value,
            repr(time.time()),
            self.result_ttl_s,
            self._record_ttl(),
            code,
            message,
            *pngs,
        ]
        tx = self._r.pipeline(transaction=True)
        self._finish(keys=keys, args=args, client=tx)
        tx.xack(STREAM, GROUP, delivery.entry_id)
        written, _acked = tx.execute()
        return bool(written)


def _timestamp(record: dict[str, str], field: str) -> datetime | None:
    value = record.get(field)
    return datetime.fromtimestamp(float(value), UTC) if value else None


def _view(job_id: str, record: dict[str, str], position: int | None, now: float) -> JobView:
    request = Txt2ImgRequest.model_validate_json(record["request"])
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
