"""GPU time of a call, read with CUDA events (the host clock would also count launch gaps)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def event_times_ms(fn: Callable[[], Any], repeats: int, warmup: int = 3) -> list[float]:
    """Milliseconds of `repeats` calls of `fn`, each its own, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times
