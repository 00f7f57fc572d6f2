"""How a worker stops, and how it talks to Redis meanwhile.

Told to stop (SIGTERM), the work in hand gets the stop grace to finish; a thread that died of an
error no retry can mend stops everything at once (`serve` then exits 1, and the orchestrator
restarts the worker). Every Redis call of the worker goes through `redis`: retried with backoff
while Redis is away (or full), given up once stopping.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import redis

from app.jobs.store import is_transient

log = logging.getLogger("sdserve.worker")
R = TypeVar("R")

MAX_BACKOFF_S = 10.0


class Shutdown:
    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.stopping = threading.Event()
        self.fatal: BaseException | None = None
        self._grace_ends = math.inf

    def stop(self) -> None:
        """Stop taking work; what is in hand has the stop grace to finish."""
        self._grace_ends = time.monotonic() + self.grace_s
        self.stopping.set()

    def die(self, error: BaseException, where: str) -> None:
        """An error no retry can mend: stop everything; nothing more runs on the GPU."""
        log.critical("%s died: %s: %s", where, type(error).__name__, error, exc_info=error)
        if self.fatal is None:
            self.fatal = error
        self._grace_ends = 0.0
        self.stopping.set()

    def out_of_grace(self) -> bool:
        return self.stopping.is_set() and time.monotonic() > self._grace_ends

    def guarded(self, loop: Callable[[], None], name: str) -> threading.Thread:
        """A thread running `loop`; if it dies, the worker does (`die`)."""

        def run() -> None:
            try:
                loop()
            except BaseException as e:
                self.die(e, name)

        return threading.Thread(target=run, name=name, daemon=True)

    def redis(self, call: Callable[[], R]) -> R | None:
        """Run a Redis call, retrying with backoff while Redis is away (or full); None once
        stopping. Any other Redis error propagates: retrying would only hide it."""
        delay = 0.5
        while True:
            try:
                return call()
            except redis.RedisError as e:
                if not is_transient(e):
                    raise
                log.warning("redis unavailable (%s); retrying in %.1fs", e, delay)
                if self.stopping.wait(delay):
                    return None
                delay = min(delay * 2, MAX_BACKOFF_S)
