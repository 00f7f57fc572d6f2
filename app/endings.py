"""Jobs' ends as they happen: the routes that answer when a job is done (A1111's and OpenAI's,
which hold the request open) wait here for their job's end, where they found it only at their
next look (every tenth of a second: half of that added on average to every answer, a fifth of
a lone 512x512 job's quarter second).

Every terminal write (a worker's result or failure, a cancel, a deadline; the FINISH script)
publishes the job's id on `keys.ENDED`. One listener thread per API process subscribes to it
and wakes the waiters of that id. A message lost (Redis restarting, the listener reconnecting)
costs only latency: the waiters still look at the job every tenth of a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import redis

from app.jobs.keys import ENDED

log = logging.getLogger("sdserve.api")

RECONNECT_S = 1.0  # between attempts, while Redis is away


async def ended_or_after(ended: asyncio.Event, seconds: float) -> None:
    """Back when the watched job's end is published, or after `seconds`: the caller looks at
    the job either way (the end, once written, stays)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(ended.wait(), seconds)
    ended.clear()


class Endings:
    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._lock = threading.Lock()
        # job id -> the events of the requests waiting for it, with their event loops
        self._waiting: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="endings", daemon=True)
        self.subscribed = threading.Event()  # set while the subscription stands

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(5)

    @contextmanager
    def watch(self, job_id: str) -> Iterator[asyncio.Event]:
        """An event set when the job ends, from now on (watch first, then look at the job: an
        end between the look and the wait is not missed)."""
        mine = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._waiting.setdefault(job_id, set()).add(mine)
        try:
            yield mine[1]
        finally:
            with self._lock:
                waiters = self._waiting.get(job_id, set())
                waiters.discard(mine)
                if not waiters:
                    self._waiting.pop(job_id, None)

    def ended(self, job_id: str) -> None:
        """Wake whoever waits for the job (the listener's call; any thread)."""
        with self._lock:
            waiters = list(self._waiting.get(job_id, ()))
        for loop, event in waiters:
            if not loop.is_closed():
                loop.call_soon_threadsafe(event.set)

    def _listen(self) -> None:
        while not self._stopping.is_set():
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(ENDED)
                self.subscribed.set()
                while not self._stopping.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message is not None and message["type"] == "message":
                        self.ended(message["data"].decode())
            except Exception as e:  # Redis away, or anything else: the thread never dies
                self.subscribed.clear()
                log.warning("listening for jobs' ends failed (the routes look every 0.1 s"
                            " meanwhile): %s", e)  # fmt: skip
                self._stopping.wait(RECONNECT_S)
            finally:
                self.subscribed.clear()
                pubsub.close()
