"""The worker's side of Redis: read and reclaim entries, start and finish jobs, heartbeats.

A worker renews (touches) only the entries its own process holds, and names are held by a
process token: a worker restarted under its old name (compose, Kubernetes) neither renews its
dead predecessor's entries nor shares its name with a live process.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import redis

from app.jobs import scripts
from app.jobs.contract import Delivery, ErrorCode, Job, Status, parse_request
from app.jobs.keys import (
    DEAD,
    GROUP,
    WEBHOOKS,
    WORKERS,
    embeddings_key,
    job_key,
    loras_key,
    loras_skipped_key,
    preview_key,
    queued_key,
    refresh_key,
    stream_key,
    tokenizer_key,
    worker_key,
)
from app.jobs.store import RECORD_GRACE_S, Store, decode

# A preview stays this long after its last write (at most the results' TTL): only running jobs
# have one worth seeing, and a job's last lingers a little for a slow poller.
PREVIEW_TTL_S = 300


@dataclass(frozen=True)
class Report:
    """A running job's progress, as the worker writes it a few times a second."""

    step: int
    finish_in_s: float | None  # None before the worker has measured its pace


class WorkerStore(Store):
    def __init__(
        self, client: redis.Redis, result_ttl_s: int, record_grace_s: int = RECORD_GRACE_S
    ) -> None:
        super().__init__(client, result_ttl_s, record_grace_s)
        self._start = client.register_script(scripts.START)
        self._report = client.register_script(scripts.REPORT)
        self._hand_back = client.register_script(scripts.HAND_BACK)
        self._heartbeat = client.register_script(scripts.HEARTBEAT)
        self._pace = client.register_script(scripts.PACE)
        self._retire = client.register_script(scripts.RETIRE)

    def ensure_group(self) -> None:
        """Create each model's stream and its group; from id 0, so nothing queued before is
        skipped."""
        for model in self.models:
            try:
                self._r.xgroup_create(stream_key(model), GROUP, id="0", mkstream=True)
            except redis.ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    def read(self, consumer: str, count: int, block_ms: int) -> list[Delivery]:
        """New entries for this consumer from its models' queues: up to `count`, waiting up
        to `block_ms` for one."""
        streams: dict[Any, Any] = {stream_key(model): ">" for model in self.models}
        by_stream = {stream_key(model).encode(): model for model in self.models}
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
        for stream, entries in reply or []:
            model = by_stream[stream if isinstance(stream, bytes) else stream.encode()]
            for entry_id, fields in entries:
                job_id = self._job_of(model, entry_id, fields)
                if job_id is not None:
                    out.append(Delivery(entry_id.decode(), job_id, model=model))
        return out

    def _job_of(self, model: str, entry_id: bytes, fields: dict[bytes, bytes] | None) -> str | None:
        """The job id of a stream entry; None, and acked, for an entry deleted from the stream
        (nothing to run)."""
        job = fields.get(b"job") if fields else None
        if job is None:
            self._r.xack(stream_key(model), GROUP, entry_id)
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
        that consumer's own), to run them again; bury those delivered `cap` times already.

        Live workers touch the entries they hold with every heartbeat, so only a dead (or
        hung) process's entries go idle. Suspects (delivered twice) are taken one at a time,
        and only with `suspect`: a worker holds one at most, runs it alone, and so a poison job
        takes no stranger down with it. Suspects left behind are touched by no one, so they go
        idle and any worker takes them later, one at a time.
        """
        out: list[Delivery] = []
        for model in self.models:
            # One suspect at most in all: a worker runs one alone at a time.
            taking = suspect and not any(d.suspect for d in out)
            out += self._reclaim(model, consumer, min_idle_ms, cap, count, owner, taking)
        return out

    def _reclaim(
        self,
        model: str,
        consumer: str,
        min_idle_ms: int,
        cap: int,
        count: int,
        owner: str | None,
        suspect: bool,
    ) -> list[Delivery]:
        stream = stream_key(model)
        # redis-py's reply types are unions of every shape a reply can take: read as Any.
        pending: Any = self._r.xpending_range(
            stream, GROUP, "-", "+", count, consumername=owner, idle=min_idle_ms
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
        claimed: Any = self._r.xclaim(stream, GROUP, consumer, min_idle_ms, [e for e, _ in chosen])
        times_by_id = dict(chosen)
        found = [(entry_id, job_id) for entry_id, fields in claimed
                 if (job_id := self._job_of(model, entry_id, fields)) is not None]  # fmt: skip
        tx = self._r.pipeline(transaction=False)
        for _entry_id, job_id in found:
            tx.hmget(job_key(job_id), ["runs", "delivery"])
        records = tx.execute()
        out = []
        restore = self._r.pipeline(transaction=False)
        for (entry_id, job_id), (runs, started) in zip(found, records, strict=True):
            times = times_by_id[entry_id]
            # Started by the worker that held it: under this delivery (a record from before
            # 2026-12-05 keeps no delivery: started at all, then).
            this = Delivery(entry_id.decode(), job_id, times, model).started_as
            ran = bool(int(runs or 0)) and (started is None or started.decode() == this)
            if not ran:
                # The dead worker held the entry (read ahead into its inbox) but never started
                # it: no death to count. The claim's count goes back to what it was.
                restore.xclaim(stream, GROUP, consumer, 0, [entry_id], retrycount=times,
                               justid=True)  # fmt: skip
            delivery = Delivery(entry_id.decode(), job_id, times + 1 if ran else times, model)
            if delivery.deliveries > cap:
                self.bury(delivery)
            else:
                out.append(delivery)
        restore.execute()  # one round trip for all (a restart takes back its whole inbox)
        return out

    def touch(self, consumer: str, deliveries: list[Delivery]) -> None:
        """Reset the idle time of the entries this process holds: in hand, not abandoned.
        Acked entries are left alone by XCLAIM, so a stale id is harmless."""
        for model in {d.model for d in deliveries}:
            ids = [d.entry_id for d in deliveries if d.model == model]
            self._r.xclaim(stream_key(model), GROUP, consumer, 0, list[Any](ids), justid=True)

    def bury(self, delivery: Delivery) -> None:
        """Dead-letter an entry whose workers kept dying with it; its job fails `poison`."""
        self._r.xadd(
            DEAD,
            {"job": delivery.job_id, "entry": delivery.entry_id,
             "deliveries": delivery.deliveries - 1, "at": repr(time.time())},
        )  # fmt: skip
        message = f"its worker died each of the {delivery.deliveries - 1} times it ran"
        owner: Any = self._r.hget(job_key(delivery.job_id), "owner")
        self._complete(delivery.job_id, delivery.model, delivery.entry_id,
                       owner.decode() if owner else "", Status.FAILED, 0, ErrorCode.POISON.value,
                       message)  # fmt: skip

    def dead_letters(self) -> list[dict[str, str]]:
        entries: Any = self._r.xrange(DEAD)
        return [decode(fields) for _id, fields in entries]

    def forget_consumers(self, min_idle_ms: int) -> None:
        """Drop group members long silent and holding nothing (workers gone for good)."""
        for model in self.models:
            consumers: Any = self._r.xinfo_consumers(stream_key(model), GROUP)
            for consumer in consumers:
                if consumer["pending"] == 0 and consumer["idle"] > min_idle_ms:
                    self._r.xgroup_delconsumer(stream_key(model), GROUP, consumer["name"])

    def trim(self) -> int:
        """Drop acknowledged entries from the head of each model's stream; never a pending or
        unread one. Answers how many went."""
        return sum(self._trim(stream_key(model)) for model in self.models)

    def _trim(self, stream: str) -> int:
        """One stream's trim.

        Everything older than both the oldest pending entry and the group's last-delivered
        entry has been acked. Racing readers only add pending entries newer than those.
        """
        groups: Any = self._r.xinfo_groups(stream)
        group = next((g for g in groups if g["name"] == GROUP.encode()), None)
        if group is None:
            return 0
        keep_from: bytes = group["last-delivered-id"]
        oldest: Any = self._r.xpending_range(stream, GROUP, "-", "+", 1)
        if oldest:
            keep_from = min(keep_from, oldest[0]["message_id"], key=_entry_order)
        trimmed: Any = self._r.xtrim(stream, minid=keep_from.decode(), approximate=False)
        return int(trimmed)

    def start(
        self,
        deliveries: list[Delivery],
        worker: str,
        failed: Callable[[ErrorCode], None] | None = None,
    ) -> list[Job]:
        """Mark the jobs running. Those that ended meanwhile (canceled, or their record is
        gone) are acked and left out; those past their deadline (or unreadable) fail without
        GPU time, told to `failed`."""
        now = repr(time.time())
        tx = self._r.pipeline(transaction=False)
        for d in deliveries:
            keys = [job_key(d.job_id), queued_key(d.model), WEBHOOKS]
            self._start(keys=keys, args=[d.job_id, now, worker, d.started_as], client=tx)
            tx.hmget(job_key(d.job_id), ["request", "owner", "created_at", "runs"])
        replies = tx.execute()
        jobs, skipped = [], []
        for i, d in enumerate(deliveries):
            started, (raw_request, raw_owner, created, runs) = replies[2 * i], replies[2 * i + 1]
            owner = raw_owner.decode() if raw_owner else ""
            if started == 0:
                skipped.append(d)
                continue
            code, message = ErrorCode.DEADLINE, "its timeout_s passed before a worker took it"
            if started == 2 and int(runs or 0) > 0:
                message = "its timeout_s passed while it waited to run again (handed back)"
            if started == 1:
                try:
                    request = parse_request(raw_request)
                    jobs.append(Job(d, request, owner, float(created or 0)))
                    continue
                except ValueError as e:
                    code, message = ErrorCode.INVALID, f"unreadable request: {e}"
            self._complete(d.job_id, d.model, d.entry_id, owner, Status.FAILED, 0, code.value,
                           message)  # fmt: skip
            if failed is not None:
                failed(code)
        for d in skipped:
            self.ack(d)
        return jobs

    def report(
        self, running: dict[str, Report], previews: dict[str, tuple[int, bytes]]
    ) -> set[str]:
        """Write each running job's step, finishing time and new preview; returns the ids that
        are no longer running."""
        now = time.time()
        preview_ttl = min(PREVIEW_TTL_S, self.result_ttl_s)
        tx = self._r.pipeline(transaction=False)
        for job_id, report in running.items():
            finish = "" if report.finish_in_s is None else repr(now + report.finish_in_s)
            step, picture = previews.get(job_id, ("", b""))
            keys = [job_key(job_id), preview_key(job_id)]
            self._report(keys=keys, args=[report.step, finish, step, picture, preview_ttl],
                         client=tx)  # fmt: skip
        on = tx.execute()
        return {job_id for job_id, running in zip(running, on, strict=True) if not running}

    def succeed(self, job: Job, images: int) -> bool:
        """The job's `images` are in storage already: now its status, then the ack."""
        d = job.delivery
        return self._complete(job.id, d.model, d.entry_id, job.owner, Status.SUCCEEDED, images,
                              "", "")  # fmt: skip

    def fail(self, job: Job, code: ErrorCode, message: str) -> bool:
        d = job.delivery
        return self._complete(job.id, d.model, d.entry_id, job.owner, Status.FAILED, 0,
                              code.value, message)  # fmt: skip

    def hand_back(self, deliveries: list[Delivery]) -> None:
        """Give entries this worker will not finish back to the stream, for any worker. Their
        jobs are `queued` again, in their old place (the position comes from creation time)."""
        tx = self._r.pipeline(transaction=False)
        for d in deliveries:
            keys = [job_key(d.job_id), queued_key(d.model), stream_key(d.model)]
            self._hand_back(keys=keys, args=[d.job_id, d.entry_id, GROUP], client=tx)
        tx.execute()

    def ack(self, delivery: Delivery) -> None:
        """Release an entry whose job had already ended (canceled) without writing anything."""
        self._r.xack(stream_key(delivery.model), GROUP, delivery.entry_id)

    def heartbeat(self, worker: str, token: str, ttl_s: int, info: str) -> bool:
        """Renew this process's hold on its name; False when another process holds it."""
        keys = [worker_key(worker), WORKERS]
        return bool(self._heartbeat(keys=keys, args=[worker, token, info, ttl_s]))

    def publish_pace(self, worker: str, token: str, pace: str) -> bool:
        """The worker's pace (JSON), fresher than its last heartbeat's; False when this
        process does not hold the name (nothing written)."""
        return bool(self._pace(keys=[worker_key(worker)], args=[token, pace]))

    def publish_tokenizer(self, model: str, fields: dict[str, str]) -> None:
        """Publish a model's tokenizer for the API, unless it is there already (a check of
        its digest: the record is a few MB)."""
        key = tokenizer_key(model)
        if self._r.hget(key, "digest") != fields["digest"].encode():
            self._r.hset(key, mapping=dict[Any, Any](fields))

    def publish_loras(
        self, model: str, names: list[str], ttl_s: int, skipped: Mapping[str, str] | None = None
    ) -> None:
        """The LoRAs the model's workers take, for the API to check requests against, and
        why they skip the folder's others (`skipped`: name -> reason); gone after `ttl_s`
        unless published again (a worker that left takes its list along)."""
        tx = self._r.pipeline(transaction=False)
        tx.set(loras_key(model), json.dumps(sorted(names)), ex=ttl_s)
        tx.set(loras_skipped_key(model), json.dumps(dict(sorted((skipped or {}).items()))),
               ex=ttl_s)  # fmt: skip
        tx.execute()

    def publish_embeddings(self, model: str, record: Mapping[str, object], ttl_s: int) -> None:
        """The embeddings the model's workers loaded and skipped (A1111's shape)."""
        self._r.set(embeddings_key(model), json.dumps(record), ex=ttl_s)

    def refreshes(self, what: str) -> int:
        """How many times A1111's refresh-loras or refresh-embeddings (`what`) was asked for
        (workers read their folders again when it moves)."""
        value = self._r.get(refresh_key(what))
        return int(value) if isinstance(value, bytes | str) else 0

    def retire(self, worker: str, token: str) -> None:
        self._retire(keys=[worker_key(worker), WORKERS], args=[token, worker])


def _entry_order(entry_id: bytes) -> tuple[int, int]:
    millis, _, seq = entry_id.partition(b"-")
    return int(millis), int(seq or 0)
