"""GPU time without waiting for the GPU (CUDA events read when the GPU has got there), and the
host time of a loop's phases."""

from __future__ import annotations

import time
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
