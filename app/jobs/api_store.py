"""The API's side of Redis: submit, look up, cancel, and the queue's state for metrics."""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

import redis

from app.jobs import scripts
from app.jobs.contract import (
    DEFAULT_MODEL,
    ErrorCode,
    JobRequest,
    JobView,
    Status,
    Submission,
    new_job_id,
    parse_request,
)
from app.jobs.eta import Beat, Pace
from app.jobs.keys import (
    DEAD,
    GROUP,
    JOB_SECONDS,
    SWEEP_LOCK,
    WEBHOOK_GROUP,
    WEBHOOKS,
    embeddings_key,
    idempotency_key,
    inflight_key,
    job_key,
    latest_key,
    loras_key,
    loras_skipped_key,
    options_key,
    preview_key,
    queued_key,
    ratelimit_key,
    refresh_key,
    retry_key,
    stream_key,
    tokenizer_key,
    worker_key,
)
from app.jobs.store import RECORD_GRACE_S, Store, decode
from app.jobs.views import QueueState, durations, job_view

# The share of the API's Redis timeout within which a submission must run on Redis. A call
# that Redis runs later than that (it stalled, then resumed) creates nothing: the API has
# answered 503 by then, or is about to.
_SUBMIT_WINDOW = 0.5
# Which workers are live and what they hold changes rarely: read once a second at most, it keeps
# polling clients off Redis. Their paces (written four times a second, for queued jobs' ETAs) are
# read with each view that needs one (`paces_of`).
WORKERS_MAX_AGE_S = 1.0


def with_pace(info: bytes, pace: bytes) -> str:
    """A heartbeat's info with a later pace's fields in place of its own (the info as it is if
    either is not a JSON object)."""
    try:
        fields, fresher = json.loads(info), json.loads(pace)
        if isinstance(fields, dict) and isinstance(fresher, dict):
            return json.dumps(fields | fresher)
    except ValueError:
        pass
    return info.decode()


class ApiStore(Store):
    def __init__(
        self, client: redis.Redis, result_ttl_s: int, record_grace_s: int = RECORD_GRACE_S
    ) -> None:
        super().__init__(client, result_ttl_s, record_grace_s)
        self._submit = client.register_script(scripts.SUBMIT)
        self._clock_offset: float | None = None  # Redis's clock minus ours, seconds
        # (when read, what each live worker's heartbeat says)
        self._heartbeats: tuple[float, dict[str, Beat]] | None = None
        self._timeout_s = float(client.connection_pool.connection_kwargs.get("socket_timeout")
                                or 0)  # fmt: skip

    def submit(
        self,
        request: JobRequest,
        max_queued: int,
        owner: str = "",
        max_in_flight: int = 0,
        idempotency: tuple[str, str] | None = None,
        rate: tuple[float, int] | None = None,
        retry: tuple[str, bool] | None = None,
        job_id: str | None = None,
    ) -> tuple[Submission, str]:
        """Record the job and queue it in one atomic step; answers the outcome and the job id
        (or, refused by the rate limit, the seconds to wait).

        `request` is normalized (seed and timeout set; no model: the default); `owner` is
        the API key id ("" with auth off), and `max_in_flight` its cap on queued and running
        jobs (0: none).
        `idempotency` is (the client's key, a hash of what it sent): the same pair again
        answers the first job. `rate` is the owner's (tokens a second, burst): a token is
        spent only by a job that is queued, never by a replay or a refusal. `retry` is (a hash
        of what was sent, whether this is a client's automatic retry): a retry answers the job
        the first try of the same call made. `job_id`: the id to give a new job (its inputs
        were stored under it first); a fresh one when absent.
        """
        if request.seed is None or request.timeout_s is None:
            raise ValueError("submit() needs a normalized request (seed and timeout set)")
        timeout_s = request.timeout_s
        model = request.model or self.models[0]  # none named: the default's queue
        if request.model is None:
            request = request.model_copy(update={"model": model})
        record = request.model_dump_json()
        # What the workers and every later GET read: a request that would not read back would
        # be queued, failed as unreadable and never shown (a 500 for each GET). Refused here
        # instead, before anything is written.
        parse_request(record)
        job_id, now = job_id or new_job_id(), time.time()
        client_key, sent = idempotency or ("", "")
        rate_per_s, burst = rate or (0.0, 0)
        retry_hash, retrying = retry or ("", False)
        retry_mode = 0 if retry is None else (2 if retrying else 1)
        not_after = 0.0
        if self._timeout_s:
            not_after = now + self._offset() + self._timeout_s * _SUBMIT_WINDOW
        outcome, value, clock = self._submit(
            keys=[job_key(job_id), queued_key(model), stream_key(model), inflight_key(owner),
                  idempotency_key(owner, client_key), ratelimit_key(owner),
                  retry_key(owner, retry_hash)],
            args=[job_id, repr(now), record, repr(now + timeout_s),
                  max_queued, sent or retry_hash, self.record_ttl(), owner, max_in_flight,
                  int(idempotency is not None), request.webhook_url or "",
                  f",{','.join(request.webhook_events)},", rate_per_s, burst, repr(not_after),
                  retry_mode],
        )  # fmt: skip
        self._clock_offset = float(clock) - time.time()
        if outcome == b"queued":
            return Submission.QUEUED, job_id
        if outcome in (b"full", b"busy", b"late"):
            return Submission(outcome.decode()), ""
        if outcome == b"rate":
            return Submission.RATE_LIMITED, value.decode()
        first_job, first_sent = value.decode().split(" ")
        expected = sent if idempotency is not None else retry_hash
        return (Submission.REPLAYED if first_sent == expected else Submission.CONFLICT), first_job

    def admission(
        self, owner: str, max_in_flight: int, rate: tuple[float, int] | None
    ) -> tuple[Submission | None, float]:
        """What `submit` would say of this key's rate and jobs in flight now, read without
        changing anything (the expensive work of a request, decoding its pictures, waits for
        a yes): a refusal and the seconds to wait, or (None, 0)."""
        tx = self._r.pipeline(transaction=False)
        tx.time()
        tx.hmget(ratelimit_key(owner), ["tokens", "at"])
        tx.scard(inflight_key(owner))
        (seconds, micros), (tokens, at), in_flight = tx.execute()
        if rate is not None:
            per_s, burst = rate
            now = seconds + micros / 1e6
            left = float(burst) if tokens is None else float(tokens)
            left = min(burst, left + max(0.0, now - float(at or now)) * per_s)
            if left < 1:
                return Submission.RATE_LIMITED, (1 - left) / per_s
        if max_in_flight > 0 and int(in_flight) >= max_in_flight:
            return Submission.BUSY, 0.0
        return None, 0.0

    def _offset(self) -> float:
        if self._clock_offset is None:
            seconds, micros = self._r.time()
            self._clock_offset = seconds + micros / 1e6 - time.time()
        return self._clock_offset

    def queue_state(self) -> QueueState:
        tx = self._r.pipeline(transaction=False)
        for model in self.models:
            tx.zcard(queued_key(model))
            tx.exists(stream_key(model))
            tx.xlen(stream_key(model))
        tx.xlen(DEAD)
        tx.hgetall(JOB_SECONDS)
        tx.exists(WEBHOOKS)
        *per_model, dead, seconds, webhooks = tx.execute()
        queued, lag, lengths = {}, {}, {}
        for k, model in enumerate(self.models):
            depth, stream, length = per_model[3 * k : 3 * k + 3]
            groups: Any = self._r.xinfo_groups(stream_key(model)) if stream else []
            lag[model] = int(next((g.get("lag") or 0 for g in groups
                                   if g["name"] == GROUP.encode()), 0))  # fmt: skip
            queued[model], lengths[model] = int(depth), int(length)
        senders: Any = self._r.xinfo_groups(WEBHOOKS) if webhooks else []
        backlog = sum(
            (g.get("lag") or 0) + g["pending"]
            for g in senders
            if g["name"] == WEBHOOK_GROUP.encode()
        )
        return QueueState(
            queued=queued,
            lag=lag,
            workers=len(self.live_workers()),
            dead_letters=int(dead),
            stream_length=lengths,
            webhook_backlog=int(backlog),
            durations=durations(seconds),
        )

    def view(self, job_id: str, owner: str = "", now: float | None = None) -> JobView | None:
        """The job as `owner` may see it: None for an unknown job or another key's, and for a
        record that is not whole (Redis lost its data and something wrote a field since)."""
        tx = self._r.pipeline(transaction=True)
        tx.hgetall(job_key(job_id))
        for model in self.models:  # a few: reading each is one round trip, not one more
            tx.zrank(queued_key(model), job_id)
        raw, *ranks = tx.execute()
        position = next((rank for rank in ranks if rank is not None), None)
        record = decode(raw)
        if "request" not in record or "status" not in record or record.get("owner", "") != owner:
            return None
        # A queued job's ETA comes from the workers' pace; so does a running one's until its
        # worker has written its own.
        status = record["status"]
        starting = status == "running" and "finish_at" not in record
        paces: list[Pace] = []
        workers = None
        if status == "queued" or starting:
            model = parse_request(record["request"]).model or self.models[0]
            paces, workers = self.paces_of(model)
        now = time.time() if now is None else now
        return job_view(job_id, record, position, now, paces, workers)

    def remember_latest(self, owner: str, job_id: str) -> None:
        """A1111's progress and interrupt are about the caller's latest job."""
        self._r.set(latest_key(owner), job_id, ex=self.record_ttl())

    def set_options(self, owner: str, settings: dict[str, Any]) -> None:
        """Keep the caller's A1111 settings (checked by the route), each as its JSON; no TTL:
        they are a caller's choice, as A1111's are its server's, one small hash a key."""
        if settings:
            kept = {key: json.dumps(value) for key, value in settings.items()}
            self._r.hset(options_key(owner), mapping=dict[Any, Any](kept))

    def options(self, owner: str) -> dict[str, Any]:
        """The caller's A1111 settings, as `set_options` kept them."""
        kept: dict[bytes, bytes] = self._r.hgetall(options_key(owner))  # type: ignore[assignment]
        return {key.decode(): json.loads(value) for key, value in kept.items()}

    def latest(self, owner: str) -> str | None:
        value = self._r.get(latest_key(owner))
        return value.decode() if isinstance(value, bytes) else None

    def holders(self) -> dict[str, list[str]]:
        """Each model's live workers (by name), as their heartbeats say."""
        held: dict[str, list[str]] = {model: [] for model in self.models}
        for name, info in self.worker_infos().items():
            for model in Beat.parse(info).models:
                held.setdefault(model, []).append(name)
        return held

    def workers_of(self, model: str) -> list[Beat]:
        """What the live workers that hold `model` say in their heartbeats."""
        return [beat for beat in self._beats().values() if model in beat.models]

    def paces_of(self, model: str) -> tuple[list[Pace], int]:
        """The paces of the live workers that hold `model`, as they last wrote them (read now),
        and how many workers those are. Read with the heartbeats (up to a second old), a
        queued job's ETA missed by 50% in the median on an H200's Poisson load (2026-12-05),
        where the same estimate from paces a tenth of a second old missed by 38%: its jobs run
        for under a second, beside rows in flight that turn over within it."""
        held = {name: beat for name, beat in self._beats().items() if model in beat.models}
        tx = self._r.pipeline(transaction=False)
        for name in held:
            tx.hget(worker_key(name), "pace")
        paces = []
        for beat, raw in zip(held.values(), tx.execute() if held else [], strict=True):
            pace = Pace.parse(raw.decode()) if isinstance(raw, bytes) else None
            if pace is None:  # none written since the worker started: its heartbeat's
                pace = beat.pace
            if pace is not None:
                paces.append(pace)
        return paces, len(held)

    def _beats(self) -> dict[str, Beat]:
        """Each live worker's heartbeat (by name), read at most once a second."""
        now = time.monotonic()
        if self._heartbeats is None or now - self._heartbeats[0] > WORKERS_MAX_AGE_S:
            beats = {name: Beat.parse(info) for name, info in self.worker_infos().items()}
            self._heartbeats = (now, beats)
        return self._heartbeats[1]

    def fail_overdue(self) -> int:
        """Queued jobs past their deadline whose model no live worker holds fail
        `deadline_exceeded` here (a worker fails them when it takes them, but none may come);
        returns how many. The stream entry stays: a worker that reads it later finds it ended
        and acks it."""
        alone = [model for model in self.models if not self.workers_of(model)]
        now = time.time()  # deadlines are on the hosts' clocks, as workers read them
        failed = 0
        for model in alone:
            queued: Any = self._r.zrange(queued_key(model), 0, -1)
            ids = [raw.decode() for raw in queued]
            if not ids:
                continue
            tx = self._r.pipeline(transaction=False)
            for job_id in ids:
                tx.hmget(job_key(job_id), ["deadline", "owner"])
            for job_id, (deadline, owner) in zip(ids, tx.execute(), strict=True):
                if deadline is None or float(deadline) >= now:
                    continue
                said = f"its timeout_s passed while no live worker held model {model}"
                code = ErrorCode.DEADLINE.value
                failed += self._complete(job_id, model, None, (owner or b"").decode(),
                                         Status.FAILED, 0, code, said)  # fmt: skip
        return failed

    def worker_infos(self) -> dict[str, str]:
        """What each live worker says (JSON, by name): its heartbeat's info, with the pace it
        wrote since (fresher) in place of the heartbeat's."""
        names = self.live_workers()
        tx = self._r.pipeline(transaction=False)
        for name in names:
            tx.hmget(worker_key(name), ["info", "pace"])
        infos = {}
        for name, (info, pace) in zip(names, tx.execute(), strict=True):
            if isinstance(info, bytes):
                infos[name] = info.decode() if pace is None else with_pace(info, pace)
        return infos

    def preview(self, job_id: str) -> bytes | None:
        """The job's latest preview JPEG, if it has one."""
        value = self._r.get(preview_key(job_id))
        return value if isinstance(value, bytes) else None

    def tokenizer_digest(self, model: str) -> str | None:
        value = self._r.hget(tokenizer_key(model), "digest")
        return value.decode() if isinstance(value, bytes) else None

    def tokenizer(self, model: str) -> str | None:
        """The tokenizer record workers published for a model (app/jobs/vocabulary.py), if any."""
        value = self._r.hget(tokenizer_key(model), "record")
        return value.decode() if isinstance(value, bytes) else None

    def loras(self, model: str) -> list[str] | None:
        """The LoRAs the model's workers take (None: no worker has said: none runs with a LoRA
        folder, or none has started)."""
        value = self._r.get(loras_key(model))
        if not isinstance(value, bytes):
            return None
        names: list[str] = json.loads(value)
        return names

    def loras_skipped(self, model: str) -> dict[str, str]:
        """The files of the LoRA folder the model's workers skip, with why (unreadable, too
        high a rank, another model's layers)."""
        value = self._r.get(loras_skipped_key(model))
        if not isinstance(value, bytes):
            return {}
        skipped: dict[str, str] = json.loads(value)
        return skipped

    def lora_models(self) -> dict[str, list[str]]:
        """Each LoRA the workers take, by name, with the models that take it."""
        out: dict[str, list[str]] = {}
        for model in self.models:
            for name in self.loras(model) or []:
                out.setdefault(name, []).append(model)
        return dict(sorted(out.items()))

    def embeddings(self, model: str) -> dict[str, Any]:
        """The embeddings the model's workers loaded and skipped, as A1111 lists them."""
        value = self._r.get(embeddings_key(model))
        if not isinstance(value, bytes):
            return {"loaded": {}, "skipped": {}}
        record: dict[str, Any] = json.loads(value)
        return record

    def refresh(self, what: str) -> None:
        """Ask every worker to read its folder of `what` (loras, embeddings) again, at its
        next heartbeat."""
        self._r.incr(refresh_key(what))

    def cancel(self, job_id: str, owner: str = "") -> bool:
        """Cancel a queued or running job; False when it had already ended (or never was)."""
        raw: Any = self._r.hget(job_key(job_id), "request")
        model = DEFAULT_MODEL
        with contextlib.suppress(ValueError):
            model = parse_request(raw).model or DEFAULT_MODEL if raw else DEFAULT_MODEL
        return self._complete(job_id, model, None, owner, Status.CANCELED, 0, "", "")

    def sweep_turn(self, interval_s: int) -> bool:
        """Whether this process sweeps expired files now: one process per interval does."""
        return bool(self._r.set(SWEEP_LOCK, "1", nx=True, ex=interval_s))
