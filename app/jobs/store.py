"""What every Redis store shares: the connection, the finishing step, and which errors pass."""

from __future__ import annotations

import time
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from app.jobs import scripts
from app.jobs.contract import DEFAULT_MODEL, JOB_SECONDS_BUCKETS, Status
from app.jobs.keys import (
    ENDED,
    GROUP,
    JOB_SECONDS,
    WEBHOOKS,
    WORKERS,
    inflight_key,
    job_key,
    queued_key,
    stream_key,
    worker_key,
)

# A finished job's record outlives its images by this long (by default), so that it can say
# "expired"; SDSERVE_RECORD_GRACE_S sets it.
RECORD_GRACE_S = 86400

BOUNDS = ",".join(str(bound) for bound in JOB_SECONDS_BUCKETS)

# Answers that mean "not now" rather than "never": the same call may pass later. redis-py
# turns some error replies into classes (dropping the code from the message), not all.
_TRANSIENT = (
    redis.ConnectionError,  # BusyLoadingError (LOADING) included
    redis.TimeoutError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.MasterDownError,
    redis.exceptions.TryAgainError,
)
_TRANSIENT_REPLIES = ("OOM", "LOADING", "BUSY ", "READONLY", "MASTERDOWN", "TRYAGAIN", "NOGROUP")


def is_transient(error: redis.RedisError) -> bool:
    """Redis unreachable, slow, loading, full or failing over: worth retrying. Anything else
    (a wrong type, a script error) is a bug that retrying would only hide."""
    if isinstance(error, _TRANSIENT):
        return True
    return isinstance(error, redis.ResponseError) and str(error).startswith(_TRANSIENT_REPLIES)


def is_full(error: redis.RedisError) -> bool:
    """Redis refused a write at `maxmemory` (policy noeviction)."""
    return isinstance(error, redis.exceptions.OutOfMemoryError) or (
        isinstance(error, redis.ResponseError) and str(error).startswith("OOM")
    )


def decode(raw: Any) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw.items()}


class Store:
    """One Redis connection pool and the steps both sides take. Safe to share between
    threads."""

    def __init__(
        self, client: redis.Redis, result_ttl_s: int, record_grace_s: int = RECORD_GRACE_S
    ) -> None:
        self._r = client
        # The deployment's models (the API), or the ones this worker holds: whose queues it
        # reads and reports.
        self.models = [DEFAULT_MODEL]
        self.result_ttl_s = result_ttl_s
        self.record_grace_s = record_grace_s
        self._finish = client.register_script(scripts.FINISH)

    @classmethod
    def connect(
        cls,
        url: str,
        result_ttl_s: int,
        timeout_s: float,
        record_grace_s: int = RECORD_GRACE_S,
        models: list[str] | None = None,
    ) -> Any:
        """No retries inside redis-py: a call fails within `timeout_s`, and callers decide
        (the API answers 503, the worker backs off)."""
        client = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        store = cls(client, result_ttl_s, record_grace_s)
        store.models = models or [DEFAULT_MODEL]
        return store

    @property
    def client(self) -> redis.Redis:
        """The connection pool, for another store of the same process to share."""
        return self._r

    def ping(self) -> bool:
        return bool(self._r.ping())

    def record(self, job_id: str) -> dict[str, str]:
        """The raw job record, bookkeeping included (`runs`: times started; `completions`:
        results written, never more than one); for operators and fault tests."""
        return decode(self._r.hgetall(job_key(job_id)))

    def live_workers(self) -> list[str]:
        members: set[bytes] = self._r.smembers(WORKERS)  # type: ignore[assignment]
        names = sorted(n.decode() for n in members)
        if not names:
            return []
        tx = self._r.pipeline(transaction=False)
        for name in names:
            tx.exists(worker_key(name))
        beats = tx.execute()
        dead = [n for n, beat in zip(names, beats, strict=True) if not beat]
        if dead:
            self._r.srem(WORKERS, *dead)
        return [n for n, beat in zip(names, beats, strict=True) if beat]

    def record_ttl(self) -> int:
        return self.result_ttl_s + self.record_grace_s

    def _complete(
        self,
        job_id: str,
        model: str,
        entry_id: str | None,
        owner: str,
        status: Status,
        images: int,
        code: str,
        message: str,
    ) -> bool:
        """Write the outcome, then ack the entry (if a worker holds one) in the same
        transaction: the ack never comes before the result is stored."""
        keys = [job_key(job_id), queued_key(model), inflight_key(owner), JOB_SECONDS, WEBHOOKS]
        args: list[str | int] = [job_id, status.value, repr(time.time()), self.result_ttl_s,
                                 self.record_ttl(), code, message, BOUNDS, images,
                                 ENDED]  # fmt: skip
        tx = self._r.pipeline(transaction=True)
        self._finish(keys=keys, args=args, client=tx)
        if entry_id is not None:
            tx.xack(stream_key(model), GROUP, entry_id)
        written = tx.execute()[0]
        return bool(written)
