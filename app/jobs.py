"""The job contract that the API and the workers share, and the only code that knows Redis keys.

FastAPI-free on purpose: the worker imports this module, and its image carries no web stack.

Layout in Redis (all keys under the ``sdserve:`` prefix):

- ``sdserve:queue``            stream of work; each entry is ``{job: <id>}``; group ``workers``
- ``sdserve:queued``           sorted set of queued job ids, scored by creation time (positions)
- ``sdserve:job:<id>``         hash: the job record (request, status, timestamps, progress, error)
- ``sdserve:job:<id>:image:<k>`` PNG bytes of image k, with the result TTL
- ``sdserve:worker:<name>``    heartbeat of a live worker, with a TTL
- ``sdserve:workers``          set of worker names that have sent a heartbeat
- ``sdserve:dead``             stream of dead-lettered (poison) entries
- ``sdserve:idempotency:<sha256 of caller and key>``  "<job id> <sha256 of the request>"
- ``sdserve:inflight:<key id>``  set of an API key's queued and running jobs
- ``sdserve:ratelimit:<key id>`` token bucket of an API key's submissions
- ``sdserve:stats:job_seconds``   histogram of accepted-to-finished times, by final status
- ``sdserve:webhooks``            stream of webhook events to send; group ``senders``
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, get_args

import redis
from pydantic import BaseModel, ConfigDict, Field
from redis.backoff import NoBackoff
from redis.retry import Retry

SchedulerName = Literal[
    "ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "lms", "pndm", "unipc"
]
SCHEDULERS: tuple[str, ...] = get_args(SchedulerName)
SEED_MAX = 2**32 - 1

STREAM = "sdserve:queue"
GROUP = "workers"
QUEUED = "sdserve:queued"
WORKERS = "sdserve:workers"
DEAD = "sdserve:dead"
WEBHOOKS = "sdserve:webhooks"
WEBHOOK_GROUP = "senders"
JOB_SECONDS = "sdserve:stats:job_seconds"

# Seconds from accepted to finished: explicit, up to five minutes (the defaults stop at 10 s).
JOB_SECONDS_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)

# A finished job's record outlives its images by this long, so that it can say "expired".
RECORD_GRACE_S = 7 * 86400

_JOB_ID = re.compile(r"[A-Za-z0-9_-]{22}")


def job_key(job_id: str) -> str:
    return f"sdserve:job:{job_id}"


def image_key(job_id: str, index: int) -> str:
    return f"sdserve:job:{job_id}:image:{index}"


def worker_key(name: str) -> str:
    return f"sdserve:worker:{name}"


def idempotency_key(owner: str, key: str) -> str:
    # Per caller: one API key cannot find another's jobs by guessing its Idempotency-Keys.
    # Hashed: a client's key is arbitrary text and never lands in Redis as given.
    digest = hashlib.sha256(f"{owner}\n{key}".encode()).hexdigest()
    return f"sdserve:idempotency:{digest}"


def inflight_key(owner: str) -> str:
    return f"sdserve:inflight:{owner}"


def ratelimit_key(owner: str) -> str:
    return f"sdserve:ratelimit:{owner}"


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


# States a job never leaves (StrEnum: plain status strings match too).
TERMINAL = frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELED, Status.EXPIRED})


class ErrorCode(StrEnum):
    """Typed reasons a job fails; clients branch on these, never on messages."""

    NUMERICAL = "numerical"  # the model produced NaN/inf pixels, even decoded in fp32
    ENGINE = "engine_error"  # the model raised while generating
    OUT_OF_MEMORY = "out_of_memory"  # one image alone does not fit on the GPU
    DEADLINE = "deadline_exceeded"  # its timeout_s passed before a worker took it
    POISON = "poison"  # its workers died every time it ran: dead-lettered
    INVALID = "invalid_request"  # a record the worker could not read as a request


# Limits shared by every way in (the native API, the OpenAI-compatible one).
Prompt = Annotated[str, Field(min_length=1, max_length=2000, description="What to draw.")]
NegativePrompt = Annotated[str, Field(max_length=2000, description="What to avoid.")]
# Both sides at most 1024, so width x height never exceeds 1024 x 1024.
SIDE_MIN, SIDE_MAX, SIDE_STEP = 64, 1024, 8
Side = Annotated[int, Field(ge=SIDE_MIN, le=SIDE_MAX, multiple_of=SIDE_STEP, description="Pixels.")]


def is_side(pixels: int) -> bool:
    """Whether an image side is one `Side` allows (for sizes written as text, like "512x512")."""
    return SIDE_MIN <= pixels <= SIDE_MAX and pixels % SIDE_STEP == 0


Steps = Annotated[int, Field(ge=1, le=100, description="Denoising steps.")]
Guidance = Annotated[float, Field(ge=0, le=30, description="Classifier-free guidance.")]
Seed = Annotated[
    int,
    Field(
        ge=0,
        le=SEED_MAX,
        description="Seed of image 0; image k uses (seed + k) mod 2^32. Chosen when absent.",
    ),
]
Count = Annotated[int, Field(ge=1, le=8, description="Number of images.")]
Timeout = Annotated[
    int,
    Field(
        ge=1,
        le=86400,
        description="Seconds after submission when the job, if not yet taken by a worker, fails"
        " `deadline_exceeded` without using the GPU. The server's default when absent.",
    ),
]
WebhookEvent = Literal["running", "succeeded", "failed", "canceled"]


# What every request model shares: a wrong JSON type is an error, never a silent coercion;
# unknown fields are refused; NaN and infinities (which Python's JSON reader accepts) too.
STRICT_INPUT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class Txt2ImgRequest(BaseModel):
    """What a client asks for. Strict: a wrong JSON type is an error, never a silent coercion."""

    model_config = ConfigDict(
        **STRICT_INPUT,
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

    prompt: Prompt
    negative_prompt: NegativePrompt = ""
    width: Side = 512
    height: Side = 512
    steps: Steps = 25
    guidance_scale: Guidance = 7.5
    scheduler: SchedulerName = Field(default="dpmpp_2m", description="Sampler.")
    seed: Seed | None = None
    n: Count = 1
    timeout_s: Timeout | None = None
    webhook_url: str | None = Field(
        default=None,
        max_length=2000,
        pattern=r"^https?://[^\s/@]+(/\S*)?$",
        description="Where to POST the job (signed) when it reaches a state in webhook_events.",
    )
    webhook_events: list[WebhookEvent] = Field(
        default=["succeeded", "failed", "canceled"],
        min_length=1,
        max_length=4,
        description="Which changes to send: running, succeeded, failed, canceled.",
    )

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
    """One stream entry handed to a worker, for the `deliveries`-th time."""

    entry_id: str
    job_id: str
    deliveries: int = 1

    @property
    def suspect(self) -> bool:
        """Its workers died twice with it: it runs alone, so it takes no stranger down."""
        return self.deliveries > 2


class Submission(StrEnum):
    QUEUED = "queued"
    REPLAYED = "replayed"  # the same Idempotency-Key and request: the job made the first time
    CONFLICT = "conflict"  # the same Idempotency-Key with another request
    FULL = "full"  # the queue holds its maximum of jobs
    BUSY = "busy"  # the caller has its maximum of jobs queued or running


@dataclass(frozen=True)
class Notification:
    """A job reached a state its webhook asked for; `entry_id` acks it once sent."""

    entry_id: str
    job_id: str
    event: str


@dataclass(frozen=True)
class Job:
    """A job a worker has taken: its delivery, its request, and the API key id that owns it."""

    delivery: Delivery
    request: Txt2ImgRequest
    owner: str = ""
    created_at: float = 0.0

    @property
    def id(self) -> str:
        return self.delivery.job_id


# KEYS: job, queued, stream, owner's in-flight set, idempotency. ARGV: job id, now, request,
# deadline, max queued, request hash, idempotency ttl, owner, owner's max in flight (0: no
# cap), idempotency used (1/0), webhook url ('' for none), webhook events (",a,b,"). One atomic
# step: a replay, a refusal, or the job recorded and queued. Answers {outcome, job id and
# request hash of a replay}.
_SUBMIT = """
if ARGV[10] == '1' then
  local seen = redis.call('GET', KEYS[5])
  if seen then return {'seen', seen} end
end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[5]) then return {'full', ''} end
local cap = tonumber(ARGV[9])
if cap > 0 and redis.call('SCARD', KEYS[4]) >= cap then return {'busy', ''} end
redis.call('HSET', KEYS[1], 'request', ARGV[3], 'status', 'queued', 'created_at', ARGV[2],
  'deadline', ARGV[4], 'runs', 0, 'owner', ARGV[8], 'webhook', ARGV[11],
  'webhook_events', ARGV[12])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('XADD', KEYS[3], '*', 'job', ARGV[1])
if cap > 0 then redis.call('SADD', KEYS[4], ARGV[1]) end
if ARGV[10] == '1' then redis.call('SET', KEYS[5], ARGV[1] .. ' ' .. ARGV[6], 'EX', ARGV[7]) end
return {'queued', ARGV[1]}
"""

# KEYS: a token bucket. ARGV: tokens per second, burst. Answers the seconds to wait before a
# token is there ('0': one was taken). Redis's clock: the same for every API replica.
_TAKE_TOKEN = """
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1e6
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(bucket[1]) or burst
local at = tonumber(bucket[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
if tokens < 1 then return tostring((1 - tokens) / rate) end
redis.call('HSET', KEYS[1], 'tokens', tokens - 1, 'at', now)
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return '0'
"""

# Lua, shared: queue a webhook event if the job has a webhook that wants this one.
_WEBHOOK_EVENT = """
local function webhook_event(job_key, events_key, job_id, event)
  local hook = redis.call('HMGET', job_key, 'webhook', 'webhook_events')
  if hook[1] and hook[1] ~= '' and string.find(hook[2] or '', ',' .. event .. ',', 1, true) then
    redis.call('XADD', events_key, '*', 'job', job_id, 'event', event)
  end
end
"""

# KEYS: job, queued, webhook events. ARGV: job id, now, worker. A running job comes back after
# its worker died. Answers 1 to run it, 0 if it ended meanwhile, 2 if its deadline passed.
_START = (
    _WEBHOOK_EVENT
    + """
local s = redis.call('HGET', KEYS[1], 'status')
if s ~= 'queued' and s ~= 'running' then return 0 end
local deadline = tonumber(redis.call('HGET', KEYS[1], 'deadline'))
if deadline and tonumber(ARGV[2]) > deadline then return 2 end
if s == 'queued' then
  redis.call('HSET', KEYS[1], 'started_at', ARGV[2])
  webhook_event(KEYS[1], KEYS[3], ARGV[1], 'running')
end
redis.call('HSET', KEYS[1], 'status', 'running', 'step', 0, 'worker', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'runs', 1)
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""
)

# KEYS: job, queued, owner's in-flight set, duration histogram, webhook events, image
# 0..n-1. ARGV: job id, status, now, result ttl, record ttl, error code, error message,
# histogram bounds ("0.5,1.0,..."), png 0..n-1. A terminal state never changes: a late or
# repeated completion writes nothing, counts nothing and sends nothing.
_FINISH = (
    _WEBHOOK_EVENT
    + """
local s = redis.call('HGET', KEYS[1], 'status')
if s ~= 'queued' and s ~= 'running' then return 0 end
for i = 6, #KEYS do
  redis.call('SET', KEYS[i], ARGV[i + 3], 'EX', ARGV[4])
end
local created = tonumber(redis.call('HGET', KEYS[1], 'created_at'))
if created then
  local seconds = tonumber(ARGV[3]) - created
  local bucket = '+Inf'
  for bound in string.gmatch(ARGV[8], '[^,]+') do
    if seconds <= tonumber(bound) then bucket = bound break end
  end
  redis.call('HINCRBY', KEYS[4], ARGV[2] .. '|' .. bucket, 1)
  redis.call('HINCRBYFLOAT', KEYS[4], ARGV[2] .. '|sum', seconds)
end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'finished_at', ARGV[3], 'images', #KEYS - 5,
  'expires_at', ARGV[3] + ARGV[4], 'error_code', ARGV[6], 'error_message', ARGV[7])
redis.call('HINCRBY', KEYS[1], 'completions', 1)
webhook_event(KEYS[1], KEYS[5], ARGV[1], ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""
)


class JobStore:
    """Every Redis operation of both sides. Safe to share between threads."""

    def __init__(self, client: redis.Redis, result_ttl_s: int) -> None:
        self._r = client
        self.result_ttl_s = result_ttl_s
        self._submit = client.register_script(_SUBMIT)
        self._take_token = client.register_script(_TAKE_TOKEN)
        self._start = client.register_script(_START)
        self._finish = client.register_script(_FINISH)

    @classmethod
    def connect(cls, url: str, result_ttl_s: int, timeout_s: float) -> JobStore:
        """No retries inside redis-py: a call fails within `timeout_s`, and callers decide
        (the API answers 503, the worker backs off)."""
        client = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        return cls(client, result_ttl_s)

    def ping(self) -> bool:
        return bool(self._r.ping())

    # -- API side -------------------------------------------------------------------------

    def submit(
        self,
        request: Txt2ImgRequest,
        max_queued: int,
        owner: str = "",
        max_in_flight: int = 0,
        idempotency: tuple[str, str] | None = None,
    ) -> tuple[Submission, str]:
        """Record the job and queue it in one atomic step; answers the outcome and job id.

        `request` is normalized (seed and timeout set); `owner` is the API key id ("" with
        auth off), and `max_in_flight` its cap on queued and running jobs (0: none).
        `idempotency` is (the client's key, a hash of what it sent): the same pair again
        answers the first job.
        """
        if request.seed is None or request.timeout_s is None:
            raise ValueError("submit() needs a normalized request (seed and timeout set)")
        job_id, now = new_job_id(), time.time()
        client_key, sent = idempotency or ("", "")
        outcome, value = self._submit(
            keys=[job_key(job_id), QUEUED, STREAM, inflight_key(owner),
                  idempotency_key(owner, client_key)],
            args=[job_id, repr(now), request.model_dump_json(), repr(now + request.timeout_s),
                  max_queued, sent, self._record_ttl(), owner, max_in_flight,
                  int(idempotency is not None), request.webhook_url or "",
                  f",{','.join(request.webhook_events)},"],
        )  # fmt: skip
        if outcome == b"queued":
            return Submission.QUEUED, job_id
        if outcome in (b"full", b"busy"):
            return Submission(outcome.decode()), ""
        first_job, first_sent = value.decode().split(" ")
        return (Submission.REPLAYED if first_sent == sent else Submission.CONFLICT), first_job

    def take_token(self, owner: str, rate_per_s: float, burst: int) -> float:
        """Take one submission token from the owner's bucket; answers 0, or the seconds until
        one is there."""
        return float(self._take_token(keys=[ratelimit_key(owner)], args=[rate_per_s, burst]))

    def queue_state(self) -> QueueState:
        tx = self._r.pipeline(transaction=False)
        tx.zcard(QUEUED)
        tx.xlen(DEAD)
        tx.hgetall(JOB_SECONDS)
        tx.exists(STREAM)
        queued, dead, durations, stream = tx.execute()
        groups: Any = self._r.xinfo_groups(STREAM) if stream else []
        lag = next((g.get("lag") or 0 for g in groups if g["name"] == GROUP.encode()), 0)
        return QueueState(
            queued=int(queued),
            lag=int(lag),
            workers=len(self.live_workers()),
            dead_letters=int(dead),
            durations=_durations(durations),
        )

    def view(self, job_id: str, owner: str = "", now: float | None = None) -> JobView | None:
        """The job as `owner` may see it: None for an unknown job or another key's."""
        tx = self._r.pipeline(transaction=True)
        tx.hgetall(job_key(job_id))
        tx.zrank(QUEUED, job_id)
        raw, position = tx.execute()
        record = {k.decode(): v.decode() for k, v in raw.items()}
        if not record or record.get("owner", "") != owner:
            return None
        return _view(job_id, record, position, time.time() if now is None else now)

    def record(self, job_id: str) -> dict[str, str]:
        """The raw job record, bookkeeping included (`runs`: times started; `completions`:
        results written, never more than one); for operators and fault tests."""
        raw: Any = self._r.hgetall(job_key(job_id))
        return {k.decode(): v.decode() for k, v in raw.items()}

    def image(self, job_id: str, index: int) -> bytes | None:
        """Image bytes; callers check the job's owner first (with `view`)."""
        data = self._r.get(image_key(job_id, index))
        return data if isinstance(data, bytes) else None

    def cancel(self, job_id: str, owner: str = "") -> bool:
        """Cancel a queued or running job; False when it had already ended (or never was)."""
        return self._complete(job_id, None, owner, Status.CANCELED, [], "", "")

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

    def notifications(
        self, consumer: str, count: int, block_ms: int, reclaim_idle_ms: int, own: bool = False
    ) -> list[Notification]:
        """Webhook events to send: with `own`, those this sender took before a restart;
        otherwise those a sender that died left idle for `reclaim_idle_ms`, then new ones."""
        try:
            if own:
                entries = self._read_notifications(consumer, "0", 1000, None)
            else:
                claimed: Any = self._r.xautoclaim(
                    WEBHOOKS, WEBHOOK_GROUP, consumer, reclaim_idle_ms, count=count
                )
                entries = claimed[1] or self._read_notifications(consumer, ">", count, block_ms)
        except redis.ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            self._r.xgroup_create(WEBHOOKS, WEBHOOK_GROUP, id="0", mkstream=True)
            return []
        return [
            Notification(e.decode(), fields[b"job"].decode(), fields[b"event"].decode())
            for e, fields in entries
            if fields
        ]

    def _read_notifications(
        self, consumer: str, start: str, count: int, block_ms: int | None
    ) -> Any:
        reply: Any = self._r.xreadgroup(
            WEBHOOK_GROUP, consumer, {WEBHOOKS: start}, count=count, block=block_ms
        )
        return reply[0][1] if reply else []

    def webhook_target(self, job_id: str) -> tuple[str, str] | None:
        """The job's webhook URL and owner; None when the record is gone."""
        hook: Any = self._r.hmget(job_key(job_id), ["webhook", "owner"])
        url, owner = hook
        return (url.decode(), (owner or b"").decode()) if url else None

    def notified(self, notification: Notification) -> None:
        """Done with an event (sent, or given up on): acked and deleted, nothing piles up."""
        tx = self._r.pipeline(transaction=True)
        tx.xack(WEBHOOKS, WEBHOOK_GROUP, notification.entry_id)
        tx.xdel(WEBHOOKS, notification.entry_id)
        tx.execute()

    # -- worker side ----------------------------------------------------------------------

    def ensure_group(self) -> None:
        """Create the stream and its group; from id 0, so nothing queued before is skipped."""
        try:
            self._r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def read(self, consumer: str, count: int, block_ms: int) -> list[Delivery]:
        """New entries for this consumer: up to `count`, waiting up to `block_ms` for one."""
        streams: dict[Any, Any] = {STREAM: ">"}
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
                job_id = self._job_of(entry_id, fields)
                if job_id is not None:
                    out.append(Delivery(entry_id.decode(), job_id))
        return out

    def _job_of(self, entry_id: bytes, fields: dict[bytes, bytes] | None) -> str | None:
        """The job id of a stream entry; None, and acked, for an entry deleted from the stream
        (nothing to run)."""
        job = fields.get(b"job") if fields else None
        if job is None:
            self._r.xack(STREAM, GROUP, entry_id)
            return None
        return job.decode()

    def reclaim(
        self,
        consumer: str,
        min_idle_ms: int,
        cap: int,
        count: int,
        owner: str | None = None,
        suspect: bool = True,
    ) -> list[Delivery]:
        """Take over entries no live worker has touched for `min_idle_ms` (or, with `owner`,
        that worker's own), to run them again; bury those delivered `cap` times already.

        Live workers touch their entries with every heartbeat, so only a dead (or hung)
        worker's entries go idle. Suspects (delivered twice) are taken one at a time, and
        only with `suspect`: a worker holds one at most, runs it alone, and so a poison job
        takes no stranger down with it.
        """
        # redis-py's reply types are unions of every shape a reply can take: read as Any.
        pending: Any = self._r.xpending_range(
            STREAM, GROUP, "-", "+", count, consumername=owner, idle=min_idle_ms
        )
        chosen: list[tuple[bytes, int]] = []
        suspects = 0
        for entry in pending:
            times = int(entry["times_delivered"])
            if 1 < times < cap:
                if suspects or not suspect:
                    continue
                suspects += 1
            chosen.append((entry["message_id"], times))
        if not chosen:
            return []
        # XCLAIM honours min_idle_ms again: of two workers reclaiming at once, one gets each.
        claimed: Any = self._r.xclaim(STREAM, GROUP, consumer, min_idle_ms, [e for e, _ in chosen])
        times_by_id = dict(chosen)
        out = []
        for entry_id, fields in claimed:
            job_id = self._job_of(entry_id, fields)
            if job_id is None:
                continue
            delivery = Delivery(entry_id.decode(), job_id, times_by_id[entry_id] + 1)
            if delivery.deliveries > cap:
                self.bury(delivery)
            else:
                out.append(delivery)
        return out

    def touch(self, consumer: str) -> None:
        """Reset the idle time of this consumer's entries: they are in hand, not abandoned."""
        pending: Any = self._r.xpending_range(
            STREAM, GROUP, "-", "+", 10_000, consumername=consumer
        )
        ids = [entry["message_id"] for entry in pending]
        if ids:
            self._r.xclaim(STREAM, GROUP, consumer, 0, ids, justid=True)

    def bury(self, delivery: Delivery) -> None:
        """Dead-letter an entry whose workers kept dying with it; its job fails `poison`."""
        self._r.xadd(
            DEAD,
            {"job": delivery.job_id, "entry": delivery.entry_id,
             "deliveries": delivery.deliveries - 1, "at": repr(time.time())},
        )  # fmt: skip
        message = f"its worker died each of the {delivery.deliveries - 1} times it ran"
        owner: Any = self._r.hget(job_key(delivery.job_id), "owner")
        self._complete(delivery.job_id, delivery.entry_id, owner.decode() if owner else "",
                       Status.FAILED, [], ErrorCode.POISON.value, message)  # fmt: skip

    def dead_letters(self) -> list[dict[str, str]]:
        entries: Any = self._r.xrange(DEAD)
        return [{k.decode(): v.decode() for k, v in fields.items()} for _id, fields in entries]

    def forget_consumers(self, min_idle_ms: int) -> None:
        """Drop group members long silent and holding nothing (workers gone for good)."""
        consumers: Any = self._r.xinfo_consumers(STREAM, GROUP)
        for consumer in consumers:
            if consumer["pending"] == 0 and consumer["idle"] > min_idle_ms:
                self._r.xgroup_delconsumer(STREAM, GROUP, consumer["name"])

    def start(
        self,
        deliveries: list[Delivery],
        worker: str,
        failed: Callable[[ErrorCode], None] | None = None,
    ) -> list[Job]:
        """Mark the jobs running. Those that ended meanwhile (canceled) are acked and left out;
        those past their deadline (or unreadable) fail without GPU time, told to `failed`."""
        now = repr(time.time())
        tx = self._r.pipeline(transaction=False)
        for d in deliveries:
            keys = [job_key(d.job_id), QUEUED, WEBHOOKS]
            self._start(keys=keys, args=[d.job_id, now, worker], client=tx)
            tx.hmget(job_key(d.job_id), ["request", "owner", "created_at"])
        replies = tx.execute()
        jobs, skipped = [], []
        for i, d in enumerate(deliveries):
            started, (raw_request, raw_owner, created) = replies[2 * i], replies[2 * i + 1]
            owner = raw_owner.decode() if raw_owner else ""
            if started == 0:
                skipped.append(d.entry_id)
                continue
            code, message = ErrorCode.DEADLINE, "its timeout_s passed before a worker took it"
            if started == 1:
                try:
                    request = Txt2ImgRequest.model_validate_json(raw_request)
                    jobs.append(Job(d, request, owner, float(created or 0)))
                    continue
                except ValueError as e:
                    code, message = ErrorCode.INVALID, f"unreadable request: {e}"
            self._complete(d.job_id, d.entry_id, owner, Status.FAILED, [], code.value, message)
            if failed is not None:
                failed(code)
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

    def succeed(self, job: Job, pngs: list[bytes]) -> bool:
        return self._complete(job.id, job.delivery.entry_id, job.owner, Status.SUCCEEDED, pngs,
                              "", "")  # fmt: skip

    def fail(self, job: Job, code: ErrorCode, message: str) -> bool:
        return self._complete(job.id, job.delivery.entry_id, job.owner, Status.FAILED, [],
                              code.value, message)  # fmt: skip

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
        self,
        job_id: str,
        entry_id: str | None,
        owner: str,
        status: Status,
        pngs: list[bytes],
        code: str,
        message: str,
    ) -> bool:
        """Write the outcome, then ack the entry (if a worker holds one) in the same
        transaction: the ack never comes before the result is stored."""
        keys = [job_key(job_id), QUEUED, inflight_key(owner), JOB_SECONDS, WEBHOOKS]
        keys += [image_key(job_id, k) for k in range(len(pngs))]
        args: list[str | int | bytes] = [job_id, status.value, repr(time.time()),
                                         self.result_ttl_s, self._record_ttl(), code, message,
                                         _BOUNDS, *pngs]  # fmt: skip
        tx = self._r.pipeline(transaction=True)
        self._finish(keys=keys, args=args, client=tx)
        if entry_id is not None:
            tx.xack(STREAM, GROUP, entry_id)
        written = tx.execute()[0]
        return bool(written)


_BOUNDS = ",".join(str(bound) for bound in JOB_SECONDS_BUCKETS)


@dataclass(frozen=True)
class QueueState:
    """What the whole queue looks like now: for metrics."""

    queued: int
    lag: int
    workers: int
    dead_letters: int
    # status -> (cumulative buckets [(le, count)...] ending with "+Inf", sum of seconds)
    durations: dict[str, tuple[list[tuple[str, float]], float]]


def _durations(raw: dict[bytes, bytes]) -> dict[str, tuple[list[tuple[str, float]], float]]:
    counts: dict[str, dict[str, float]] = {}
    for field, value in raw.items():
        status, bucket = field.decode().split("|")
        counts.setdefault(status, {})[bucket] = float(value)
    out = {}
    for status, by_bucket in counts.items():
        cumulative, running = [], 0.0
        for le in [*_BOUNDS.split(","), "+Inf"]:
            running += by_bucket.get(le, 0.0)
            cumulative.append((le, running))
        out[status] = (cumulative, by_bucket.get("sum", 0.0))
    return out


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
