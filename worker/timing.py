"""GPU time without waiting for the GPU (CUDA events read when the GPU has got there), and the
host time of a loop's phases."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch


class GpuTimer:
    """The GPU time of some work, without waiting for it: CUDA events on a GPU, the host's
    clock on the CPU (where the work is done when the call returns)."""

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._started = time.perf_counter()
        self._ended = self._started
        self._events: tuple[Any, Any] | None = None
        if self._cuda:
            event: Any = torch.cuda.Event
            self._events = (event(enable_timing=True), event(enable_timing=True))
            self._events[0].record()

    def stop(self) -> GpuTimer:
        if self._events is not None:
            self._events[1].record()
        self._ended = time.perf_counter()
        return self

    def ready(self) -> bool:
        return self._events is None or bool(self._events[1].query())

    def wait(self) -> None:
        if self._events is not None:
            self._events[1].synchronize()

    def seconds(self) -> float:
        if self._events is not None:
            return float(self._events[0].elapsed_time(self._events[1])) / 1000
        return self._ended - self._started


# UNet calls the host may have queued on the GPU beyond the one it runs. Enough that the host's
# work for the next call (a few ms to tens of ms) is done while the GPU runs those; few enough
# that other threads' GPU work (the prompt reader's encoder calls, LoRAs written into their
# slots, decodes) waits behind at most that many calls, and that the loop's thread, waiting
# with Python's lock let go, leaves those threads the lock (running ahead without a bound, it
# could hold it for all but its launches).
RUN_AHEAD = 2


class Lead:
    """How far the host runs ahead of the GPU: after each call `launched` marks the stream,
    and waits for the mark of the call `calls` back (on the CPU the work is done when the call
    returns: no marks)."""

    def __init__(self, device: Any, calls: int = RUN_AHEAD,
                 mark: Callable[[], Any] | None = None) -> None:  # fmt: skip
        self.calls = calls
        self._mark = mark
        if mark is None and getattr(device, "type", device) == "cuda":
            self._mark = _cuda_mark
        self._marks: deque[Any] = deque()

    def launched(self) -> float:
        """The host's seconds spent waiting for the GPU here."""
        if self._mark is None:
            return 0.0
        self._marks.append(self._mark())
        started = time.perf_counter()
        while len(self._marks) > self.calls:
            self._marks.popleft().synchronize()
        return time.perf_counter() - started


def _cuda_mark() -> Any:
    make: Any = torch.cuda.Event
    event = make()
    event.record()
    return event


class Phases:
    """Host time between marks, summed per phase into a labelled counter: where a loop's
    thread spends its seconds (a wait for the GPU counts in the phase that waits)."""

    def __init__(self, counter: Any) -> None:
        self._counter = counter
        self._at = time.perf_counter()

    def done(self, phase: str) -> None:
        now = time.perf_counter()
        self._counter.labels(phase).inc(now - self._at)
        self._at = now
