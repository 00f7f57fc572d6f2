"""The buffer between the reader thread and the GPU loop (pure, threads only)."""

from __future__ import annotations

import threading
import time

from worker.inbox import Inbox


def test_an_idle_gpu_waits_the_window_for_company() -> None:
    inbox: Inbox[int] = Inbox(capacity=4)
    inbox.put([1])
    threading.Timer(0.05, inbox.put, [[2, 3]]).start()
    started = time.monotonic()
    assert inbox.take(window_s=0.3, timeout_s=1) == [1, 2, 3]
    assert 0.25 < time.monotonic() - started < 1


def test_a_full_batch_goes_at_once() -> None:
    inbox: Inbox[int] = Inbox(capacity=2)
    inbox.put([1, 2, 3])
    started = time.monotonic()
    assert inbox.take(window_s=10, timeout_s=1) == [1, 2]
    assert time.monotonic() - started < 0.5
    assert inbox.room() == 1 and inbox.drain() == [3]


def test_a_busy_gpu_does_not_wait_again() -> None:
    inbox: Inbox[int] = Inbox(capacity=8)
    inbox.put([1])
    time.sleep(0.2)  # the GPU was busy while this arrived: its window is spent
    started = time.monotonic()
    assert inbox.take(window_s=0.2, timeout_s=1) == [1]
    assert time.monotonic() - started < 0.1


def test_nothing_arrives_nothing_taken_and_room_is_signalled() -> None:
    inbox: Inbox[int] = Inbox(capacity=1)
    assert inbox.take(window_s=0, timeout_s=0.05) == []
    inbox.put([1])
    assert not inbox.wait_for_room(0.05)
    threading.Timer(0.05, inbox.take, [0, 1]).start()
    assert inbox.wait_for_room(1)
