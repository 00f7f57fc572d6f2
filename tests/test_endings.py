"""Jobs' ends as Redis publishes them (app/endings.py), against a real Valkey: a waiter wakes
when its job ends (and not for another job's end), the listener comes back after its connection
is killed, and A1111's synchronous route answers at its job's end, not at its next look."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from app.endings import Endings
from app.jobs.contract import Txt2ImgRequest
from app.routes import generations
from tests.conftest import JobStore, enqueue, wait_for
from tests.test_continuous import serve
from tests.test_worker import runner

REQUEST = Txt2ImgRequest(prompt="a fox", width=64, height=64, steps=2, seed=1)


def woken(endings: Endings, job_id: str, end: threading.Thread, within_s: float) -> bool:
    """Whether a waiter of `job_id` wakes within `within_s` of starting `end`."""

    async def wait() -> bool:
        with endings.watch(job_id) as ended:
            end.start()
            try:
                await asyncio.wait_for(ended.wait(), within_s)
            except TimeoutError:
                return False
            return True

    try:
        return asyncio.run(wait())
    finally:
        end.join()


@pytest.fixture
def endings(store: JobStore) -> Iterator[Endings]:
    listening = Endings(store.client)
    listening.start()
    wait_for(listening.subscribed.is_set, 10, "the subscription")
    yield listening
    listening.stop()


def test_a_waiter_wakes_at_its_jobs_end_and_no_other(store: JobStore, endings: Endings) -> None:
    mine, other = enqueue(store, REQUEST), enqueue(store, REQUEST)
    assert not woken(endings, mine, threading.Thread(target=store.cancel, args=[other]), 0.5)
    began = time.monotonic()
    assert woken(endings, mine, threading.Thread(target=store.cancel, args=[mine]), 5)
    assert time.monotonic() - began < 1
    # An end written twice publishes once (the record's end never changes).
    assert not woken(endings, mine, threading.Thread(target=store.cancel, args=[mine]), 0.5)


def test_the_listener_comes_back_when_its_connection_is_killed(
    store: JobStore, endings: Endings, redis_url: str
) -> None:
    assert redis.Redis.from_url(redis_url).client_kill_filter(_type="pubsub") >= 1

    def an_end_wakes() -> bool:  # an end published while it reconnects is lost: try another
        job = enqueue(store, REQUEST)
        return woken(endings, job, threading.Thread(target=store.cancel, args=[job]), 1)

    wait_for(an_end_wakes, 15, "an end to wake its waiter again")


def test_a1111_answers_at_its_jobs_end_not_its_next_look(
    monkeypatch: pytest.MonkeyPatch,
    api: httpx.Client,
    store: JobStore,
    tiny_model: Path,
    redis_url: str,
) -> None:
    """With looks 30 s apart the answer still comes as soon as the job is done."""
    monkeypatch.setattr(generations, "LOOK_S", 30.0)
    r = runner(store, tiny_model, redis_url, max_batch=2, batch_window_ms=0)
    r.open()
    done = threading.Event()
    worker = serve(r, done)
    try:
        began = time.monotonic()  # its first look sees the job queued; the next, 30 s on
        body = {"prompt": "a fox", "steps": 2, "width": 64, "height": 64, "seed": 3}
        answer = api.post("/sdapi/v1/txt2img", json=body, timeout=60)
        took = time.monotonic() - began
    finally:
        done.set()
        worker.join(60)
        r.close()
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["images"]) == 1
    assert took < 20, took
