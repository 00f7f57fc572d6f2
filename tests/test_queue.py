"""The queue on a real Redis-protocol server: atomic enqueue, delivery, acks, terminal states."""

from __future__ import annotations

import time
from typing import Any

import redis

from app.jobs.contract import ErrorCode, Status, Submission, Txt2ImgRequest
from app.jobs.keys import GROUP, QUEUED, STREAM, job_key, worker_key
from app.jobs.worker_store import Report
from tests.conftest import JobStore, enqueue


def request(**kw: object) -> Txt2ImgRequest:
    return Txt2ImgRequest.model_validate({"prompt": "x", "seed": 5, **kw})


def pending(r: redis.Redis) -> int:
    return int(r.xpending(STREAM, GROUP)["pending"])


def test_submit_stores_record_position_and_entry_together(store: JobStore, redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    job_id = enqueue(store, request(n=2))
    assert r.hget(job_key(job_id), "status") == b"queued"
    assert r.zrank(QUEUED, job_id) == 0
    [(_entry_id, fields)] = r.xrange(STREAM)  # type: ignore[misc]
    assert fields == {b"job": job_id.encode()}
    assert r.ttl(job_key(job_id)) == -1  # nothing queued ever expires


def test_work_flows_queued_running_succeeded_and_is_acked(store: JobStore, redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    store.ensure_group()
    ids = [enqueue(store, request(prompt=f"p{i}")) for i in range(3)]
    deliveries = store.read("w1", count=10, block_ms=100)
    assert [d.job_id for d in deliveries] == ids  # first come, first served
    jobs = store.start(deliveries, "w1")
    assert [j.request.prompt for j in jobs] == ["p0", "p1", "p2"]
    view = store.view(ids[0])
    assert view is not None and view.status is Status.RUNNING and view.position is None
    assert view.progress is not None and (view.progress.step, view.progress.steps) == (0, 25)
    assert store.report({ids[0]: Report(7, None)}, {}) == set()
    view = store.view(ids[0])
    assert view is not None and view.progress is not None and view.progress.step == 7
    assert pending(r) == 3

    assert store.succeed(jobs[0], 1)
    assert pending(r) == 2  # acked only with the result
    view = store.view(ids[0])
    assert view is not None and view.status is Status.SUCCEEDED
    assert view.images == [f"/jobs/{ids[0]}/images/0.png"]
    assert r.ttl(job_key(ids[0])) > 3600  # the record outlives the images (result TTL 3600 s)
    assert not r.keys("*image*")  # images live in storage, never in Redis


def test_terminal_states_never_change(store: JobStore) -> None:
    store.ensure_group()
    job_id = enqueue(store, request())
    [job] = store.start(store.read("w1", 1, 100), "w1")
    assert store.fail(job, ErrorCode.NUMERICAL, "nan")
    assert not store.succeed(job, 1)  # a late or repeated completion
    assert not store.cancel(job_id)
    view = store.view(job_id)
    assert view is not None and view.status is Status.FAILED and view.images == []
    assert view.error is not None and view.error.code == "numerical"


def test_cancel_while_queued_skips_the_work(store: JobStore, redis_url: str) -> None:
    store.ensure_group()
    canceled, kept = enqueue(store, request()), enqueue(store, request())
    assert store.cancel(canceled)
    deliveries = store.read("w1", 10, 100)
    jobs = store.start(deliveries, "w1")
    assert [j.id for j in jobs] == [kept]
    assert pending(redis.Redis.from_url(redis_url)) == 1  # the canceled entry was acked


def test_cancel_while_running_is_reported_to_the_worker(store: JobStore) -> None:
    store.ensure_group()
    job_id = enqueue(store, request())
    [job] = store.start(store.read("w1", 1, 100), "w1")
    assert store.cancel(job_id)
    assert store.report({job_id: Report(3, None)}, {}) == {job_id}
    assert not store.succeed(job, 1)
    view = store.view(job_id)
    assert view is not None and view.status is Status.CANCELED and view.images == []


def test_unacked_entries_come_back_to_their_consumer(store: JobStore) -> None:
    store.ensure_group()
    job_id = enqueue(store, request())
    [first] = store.read("w1", 1, 100)
    store.start([first], "w1")
    # The worker died before storing a result; restarted under its name it finds the entry.
    assert store.read("w1", 1, 100) == []
    [again] = store.reclaim("w1", 0, cap=3, count=10, owner="w1")
    assert (again.entry_id, again.job_id, again.deliveries) == (first.entry_id, job_id, 2)
    [job] = store.start([again], "w1")  # a running job is run again, not dropped
    assert store.succeed(job, 1)
    assert store.reclaim("w1", 0, cap=3, count=10, owner="w1") == []
    view = store.view(job_id)
    assert view is not None and view.status is Status.SUCCEEDED


def test_a_dead_workers_entries_go_to_a_live_one(store: JobStore) -> None:
    store.ensure_group()
    ids = [enqueue(store, request(prompt=f"p{i}")) for i in range(3)]
    store.start(store.read("dead", 10, 100), "dead")
    live = store.read("live", 10, 100)
    time.sleep(0.05)
    store.touch("live", live)  # the live worker's heartbeat
    taken = store.reclaim("live", min_idle_ms=40, cap=3, count=10)
    assert sorted(d.job_id for d in taken) == sorted(ids)
    assert {d.deliveries for d in taken} == {2}


def test_touched_entries_are_not_taken(store: JobStore) -> None:
    store.ensure_group()
    enqueue(store, request())
    held = store.read("busy", 10, 100)
    time.sleep(0.05)
    store.touch("busy", held)
    assert store.reclaim("other", min_idle_ms=40, cap=3, count=10) == []


def test_suspects_come_one_at_a_time_and_poison_is_buried(store: JobStore, redis_url: str) -> None:
    store.ensure_group()
    ids = [enqueue(store, request(prompt=f"p{i}")) for i in range(3)]
    store.start(store.read("w1", 10, 100), "w1")  # delivery 1, run; w1 dies
    again = store.reclaim("w2", 0, cap=3, count=10)  # delivery 2, together
    assert len(again) == 3
    store.start(again, "w2")  # w2 dies with them
    [suspect] = store.reclaim("w3", 0, cap=3, count=10)  # delivery 3: one at a time
    assert suspect.deliveries == 3 and suspect.suspect
    store.start([suspect], "w3")
    # w3 dies with it. The next reclaim buries it (3 runs = the cap) and takes one more suspect.
    [next_one] = store.reclaim("w4", 0, cap=3, count=10)
    assert next_one.job_id != suspect.job_id
    view = store.view(suspect.job_id)
    assert view is not None and view.status is Status.FAILED
    assert view.error is not None and view.error.code == "poison"
    [letter] = store.dead_letters()
    assert letter["job"] == suspect.job_id and letter["deliveries"] == "3"
    assert redis.Redis.from_url(redis_url).xpending(STREAM, GROUP)["pending"] == 2
    assert {suspect.job_id, next_one.job_id} <= set(ids)


def test_a_worker_that_dies_holding_entries_it_never_started_did_not_die_with_them(
    store: JobStore, redis_url: str
) -> None:
    """Entries a worker read ahead into its inbox and never started count no death when it
    dies: however often that happens, they are neither suspects nor buried; the one it had
    started counts one."""
    store.ensure_group()
    ran = enqueue(store, request(prompt="ran"))
    ids = [enqueue(store, request(prompt=f"held {i}")) for i in range(3)]
    held = store.read("w1", 10, 100)
    store.start([d for d in held if d.job_id == ran], "w1")  # w1 dies: the rest never started
    for _ in range(5):  # the same name restarted, dying each time before it starts them
        back = {d.job_id: d for d in store.reclaim("w1", 0, cap=3, count=10, owner="w1")}
        assert {back[i].deliveries for i in ids} == {1} and not any(back[i].suspect for i in ids)
    assert back[ran].deliveries == 2  # died once with it (then never started again)
    assert store.dead_letters() == []
    r = redis.Redis.from_url(redis_url)
    counts = {e["message_id"]: e["times_delivered"] for e in
              r.xpending_range(STREAM, GROUP, "-", "+", 10)}  # fmt: skip
    assert sorted(counts.values()) == [1, 1, 1, 2]  # what the stream says agrees
    jobs = store.start(list(back.values()), "w1")  # they run, and complete
    assert sorted(job.id for job in jobs) == sorted([ran, *ids])
    for job in jobs:
        assert store.succeed(job, 1)


def test_the_queue_cap_refuses_exactly_the_excess(store: JobStore) -> None:
    normalized = request(timeout_s=60)
    outcomes = [store.submit(normalized, max_queued=3)[0] for _ in range(5)]
    assert outcomes == [Submission.QUEUED] * 3 + [Submission.FULL] * 2
    assert store.queue_state().queued == {"default": 3}


def test_idempotency_replays_the_first_job_and_refuses_another_request(store: JobStore) -> None:
    normalized = request(timeout_s=60)
    first = store.submit(normalized, 10, idempotency=("key-1", "hash-a"))
    assert first[0] is Submission.QUEUED
    assert store.submit(normalized, 10, idempotency=("key-1", "hash-a")) == (
        Submission.REPLAYED,
        first[1],
    )
    assert store.submit(normalized, 10, idempotency=("key-1", "hash-b")) == (
        Submission.CONFLICT,
        first[1],
    )
    assert store.submit(normalized, 10, idempotency=("key-2", "hash-a"))[0] is Submission.QUEUED
    assert store.queue_state().queued == {"default": 2}


def test_a_job_past_its_deadline_fails_without_running(store: JobStore) -> None:
    store.ensure_group()
    job_id = enqueue(store, request(timeout_s=1))
    time.sleep(1.1)
    assert store.start(store.read("w1", 1, 100), "w1") == []
    view = store.view(job_id)
    assert view is not None and view.status is Status.FAILED
    assert view.error is not None and view.error.code == "deadline_exceeded"


def test_silent_consumers_holding_nothing_are_forgotten(store: JobStore, redis_url: str) -> None:
    store.ensure_group()
    store.read("gone", 1, 1)
    time.sleep(0.05)
    store.forget_consumers(min_idle_ms=10)
    assert redis.Redis.from_url(redis_url).xinfo_consumers(STREAM, GROUP) == []


def test_jobs_queued_before_any_worker_existed_are_read(store: JobStore) -> None:
    job_id = enqueue(store, request())  # no group yet
    store.ensure_group()
    store.ensure_group()  # idempotent
    assert [d.job_id for d in store.read("w1", 10, 100)] == [job_id]


def test_a_lost_group_is_made_again(store: JobStore, redis_url: str) -> None:
    store.ensure_group()
    redis.Redis.from_url(redis_url).xgroup_destroy(STREAM, GROUP)
    job_id = enqueue(store, request())
    assert [d.job_id for d in store.read("w1", 10, 100)] == [job_id]


def test_succeeded_jobs_say_expired_after_the_ttl(store: JobStore) -> None:
    store.ensure_group()
    job_id = enqueue(store, request())
    [job] = store.start(store.read("w1", 1, 100), "w1")
    store.succeed(job, 1)
    view = store.view(job_id)
    assert view is not None and view.finished_at is not None
    later = view.finished_at.timestamp() + store.result_ttl_s + 1
    expired = store.view(job_id, now=later)
    assert expired is not None and expired.status is Status.EXPIRED and expired.images == []


def test_unreadable_request_fails_the_job_instead_of_the_worker(
    store: JobStore, redis_url: str
) -> None:
    store.ensure_group()
    job_id = enqueue(store, request())
    redis.Redis.from_url(redis_url).hset(job_key(job_id), "request", '{"prompt": 3}')
    assert store.start(store.read("w1", 1, 100), "w1") == []
    status = redis.Redis.from_url(redis_url).hmget(job_key(job_id), "status", "error_code")
    assert status == [b"failed", b"invalid_request"]


def test_a_restarted_name_does_not_renew_what_its_predecessor_held(store: JobStore) -> None:
    """The same-name restart: the new process touches only what it holds, so entries its dead
    predecessor had (and it did not take back) go idle and any worker takes them."""
    store.ensure_group()
    ids = [enqueue(store, request(prompt=f"p{i}")) for i in range(2)]
    store.start(store.read("k", 10, 100), "k")  # the first process of "k" dies with both
    enqueue(store, request(prompt="new"))
    mine = store.read("k", 10, 100)  # the restarted "k" reads a new entry
    time.sleep(0.05)
    store.touch("k", mine)  # its heartbeat
    taken = store.reclaim("other", min_idle_ms=40, cap=3, count=10)
    assert sorted(d.job_id for d in taken) == sorted(ids)


def test_a_worker_name_is_held_by_one_process(store: JobStore) -> None:
    assert store.heartbeat("k", "token-a", 5, "{}")
    assert not store.heartbeat("k", "token-b", 5, "{}")  # a second live process, same name
    store.retire("k", "token-b")  # not its name to give up
    holder = store.client.hget(worker_key("k"), "token")
    assert holder == b"token-a" and store.live_workers() == ["k"]
    store.retire("k", "token-a")
    assert store.client.hget(worker_key("k"), "token") is None and store.live_workers() == []
    assert store.heartbeat("k", "token-b", 5, "{}")


def test_handed_back_jobs_are_queued_again_in_their_place(store: JobStore) -> None:
    store.ensure_group()
    first, second = enqueue(store, request(prompt="a")), enqueue(store, request(prompt="b"))
    deliveries = store.read("w1", 10, 100)
    store.start(deliveries[:1], "w1")  # `first` runs, `second` was read but never started
    store.report({first: Report(4, None)}, {})
    store.hand_back(deliveries)
    views = [store.view(first), store.view(second)]
    assert [(v.status, v.position, v.progress) for v in views if v] == [
        (Status.QUEUED, 0, None),
        (Status.QUEUED, 1, None),
    ]
    again = store.read("w2", 10, 100)
    assert [d.job_id for d in again] == [first, second]
    assert store.reclaim("w2", 0, cap=3, count=10, owner="w1") == []  # the old entries: acked


def test_progress_never_recreates_a_lost_record(store: JobStore, redis_url: str) -> None:
    store.ensure_group()
    job_id = enqueue(store, request())
    [job] = store.start(store.read("w1", 1, 100), "w1")
    redis.Redis.from_url(redis_url).delete(job_key(job_id))  # Redis lost its data
    # gone: the worker stops working on it
    assert store.report({job_id: Report(3, None)}, {}) == {job_id}
    assert store.record(job_id) == {} and store.view(job_id) is None
    assert not store.succeed(job, 1)


def test_a_partial_record_is_unknown_not_an_error(store: JobStore, redis_url: str) -> None:
    redis.Redis.from_url(redis_url).hset(job_key("A" * 22), "step", 3)  # what old workers left
    assert store.view("A" * 22) is None


def test_trimming_keeps_every_pending_and_unread_entry(store: JobStore, redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    store.ensure_group()
    ids = [enqueue(store, request(prompt=f"p{i}")) for i in range(6)]
    deliveries = store.read("w1", 4, 100)  # 4 read, 2 unread
    jobs = store.start(deliveries, "w1")
    store.succeed(jobs[0], 1)
    store.succeed(jobs[2], 1)  # acked: entries 0 and 2; pending: 1 and 3
    assert store.trim() == 1  # only entry 0 lies before the oldest pending one
    entries: Any = r.xrange(STREAM)
    left = [fields[b"job"].decode() for _id, fields in entries]
    assert left == ids[1:]
    store.succeed(jobs[1], 1)
    store.succeed(jobs[3], 1)
    assert store.trim() == 2  # 1 and 2; 3 is the last delivered, kept as the group's mark
    assert [d.job_id for d in store.read("w1", 10, 100)] == ids[4:]


def test_a_submission_redis_runs_too_late_creates_nothing(store: JobStore) -> None:
    """Redis stalled past the API's timeout, so the API answered 503: when Redis resumes and
    runs the call, it must not create a job nobody was told of."""
    stalled = JobStore(store.client, 3600)
    stalled._timeout_s = 1.0
    stalled._clock_offset = -10.0  # as if the call reached Redis 10 s after it was sent
    assert stalled.submit(request(timeout_s=60), 10) == (Submission.LATE, "")
    assert store.queue_state().queued == {"default": 0}
    assert store.queue_state().stream_length == {"default": 0}


def test_rate_tokens_are_spent_only_by_queued_jobs(store: JobStore) -> None:
    normalized = request(timeout_s=60)
    rate = (0.001, 1)  # one token, refilled in 1000 s
    first = store.submit(normalized, 10, "k", idempotency=("a", "h"), rate=rate)
    assert first[0] is Submission.QUEUED
    # A replay and a refusal (conflict, full) take no token ...
    assert store.submit(normalized, 10, "k", idempotency=("a", "h"), rate=rate)[0] is (
        Submission.REPLAYED
    )
    assert store.submit(normalized, 10, "k", idempotency=("a", "x"), rate=rate)[0] is (
        Submission.CONFLICT
    )
    # ... and the bucket is empty now: a new job waits.
    outcome, wait = store.submit(normalized, 10, "k", rate=rate)
    assert outcome is Submission.RATE_LIMITED and float(wait) > 900
    assert store.queue_state().queued == {"default": 1}


def test_an_automatic_retry_lands_on_the_first_tries_job(store: JobStore) -> None:
    normalized = request(timeout_s=60)
    outcome, first = store.submit(normalized, 10, "k", retry=("h", False))
    assert outcome is Submission.QUEUED
    assert store.submit(normalized, 10, "k", retry=("h", True)) == (Submission.REPLAYED, first)
    # A new call (not a retry) with the same body is a new job; its retries land on it.
    outcome, second = store.submit(normalized, 10, "k", retry=("h", False))
    assert outcome is Submission.QUEUED and second != first
    assert store.submit(normalized, 10, "k", retry=("h", True)) == (Submission.REPLAYED, second)
    assert store.submit(normalized, 10, "other", retry=("h", True))[0] is Submission.QUEUED


def test_a_handed_back_job_past_its_deadline_says_so(store: JobStore) -> None:
    store.ensure_group()
    job_id = enqueue(store, request(timeout_s=1))
    deliveries = store.read("w1", 1, 100)
    store.start(deliveries, "w1")  # it ran, then its worker stopped and handed it back
    store.hand_back(deliveries)
    time.sleep(1.1)
    assert store.start(store.read("w2", 1, 100), "w2") == []
    view = store.view(job_id)
    assert view is not None and view.error is not None
    assert view.error.code == "deadline_exceeded" and "handed back" in view.error.message
