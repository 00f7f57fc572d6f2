"""Entries read from the stream but not yet on the GPU, filled while the GPU is busy."""

from __future__ import annotations

import threading
import time
from typing import Generic, TypeVar

T = TypeVar("T")


class Inbox(Generic[T]):
    """A bounded buffer between the reader thread and the GPU loop.

    The reader keeps it topped up while a batch runs, so the next batch is already gathered when
    the GPU comes free. The batching window only delays an idle GPU: it runs from the moment the
    first entry arrived, which for a busy GPU lies long in the past.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: list[T] = []
        self._first_at = 0.0
        self._changed = threading.Condition()

    def room(self) -> int:
        with self._changed:
            return self.capacity - len(self._items)

    def put(self, items: list[T]) -> None:
        if not items:
            return
        with self._changed:
            if not self._items:
                self._first_at = time.monotonic()
            self._items.extend(items)
            self._changed.notify_all()

    def wait_for_room(self, timeout_s: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: len(self._items) < self.capacity, timeout_s)

    def take(self, window_s: float, timeout_s: float, limit: int | None = None) -> list[T]:
        """Up to `limit` (default `capacity`) entries, once full or `window_s` after the first
        one arrived.

        Empty if nothing arrived within `timeout_s`.
        """
        limit = self.capacity if limit is None else min(limit, self.capacity)
        with self._changed:
            if not self._changed.wait_for(lambda: bool(self._items), timeout_s):
                return []
            deadline = self._first_at + window_s
            while len(self._items) < limit and (left := deadline - time.monotonic()) > 0:
                self._changed.wait(left)
            taken, self._items = self._items[:limit], self._items[limit:]
            self._first_at = time.monotonic()
            self._changed.notify_all()
            return taken

    def drain(self) -> list[T]:
        with self._changed:
            taken, self._items = self._items, []
            self._changed.notify_all()
            return taken
