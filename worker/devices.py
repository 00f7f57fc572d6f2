"""Host numbers on the device without stalling the GPU's stream; the streams beside the loop's
(the prompt reader's encoder calls, LoRA weights written)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch


def on_device(values: Sequence[Any], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host numbers as a tensor on the device, without waiting for the GPU (`placed`)."""
    on_gpu: torch.Tensor = placed(torch.tensor(values, dtype=dtype), device)
    return on_gpu


def placed(host: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """A host tensor on the device without waiting for the GPU: a plain `.to(cuda)` copies
    from pageable memory and synchronizes the stream, so the host would stop running ahead of
    the GPU at every step (and at every job's join)."""
    if dtype is not None:
        host = host.to(dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def read_stream(device: torch.device) -> torch.cuda.Stream | None:
    """A CUDA stream of its own, above the loop's in priority, for the prompt reader's encoder
    calls (worker/continuous.py); None off CUDA. On the loop's stream an encoder call queues
    behind the UNet calls the loop has launched (up to two, `worker/timing.py` `Lead`), and
    whatever in it makes the host wait (a read of a GPU value) waits for those too: a uniform
    load's cohort of 31 prompts took 1.2 s to read beside steps of 0.14 s (H100, 2026-12-05),
    for encoder calls of a few milliseconds. On a stream of its own it would wait for its own
    work only, its kernels taking the GPU's next free room between the UNet's (`Handover`
    keeps the two threads' calls in order). Measured (an H200 and an H100, 2026-12-06): the
    prompts' part of the join wait fell by about 40% in three pairs of four, the throughput
    did not move, so SDSERVE_READ_STREAM stays off."""
    return side_stream(device, priority=-1)


def side_stream(device: torch.device, priority: int = 0) -> torch.cuda.Stream | None:
    """A CUDA stream beside the loop's (None off CUDA): work on it waits for its own only."""
    if device.type != "cuda":
        return None
    return torch.cuda.Stream(device, priority=priority)  # type: ignore[no-untyped-call]


@contextmanager
def beside_the_loop(stream: torch.cuda.Stream | None) -> Iterator[None]:
    """GPU work of this thread on `stream` (on the current one where None). What it hands the
    loop is whole before the loop can see it: `Handover` waits for it."""
    if stream is None:
        yield
        return
    with torch.cuda.stream(stream):
        yield


class Handover:
    """Encoder calls that take turns under one lock (a model's `reading`) from two threads: the
    loop's, on the loop's stream, and the prompt reader's, on its own (`read_stream`). They
    share state on the GPU (the text encoders' LoRA rows), and the cache of encodings hands
    what one made to the other, so on the GPU too each call must follow the last, and what the
    reader made must be whole, and stay allocated, for the loop's stream:

    - a call on the reader's stream starts on the GPU after the loop's last one ended (its
      kernels may still be queued behind UNet calls when the lock is let go);
    - what a call on the reader's stream made is done before the lock is let go (the reader's
      thread waits for its own stream only), and is marked as used by the loop's stream too,
      so the caching allocator lends that memory again only once the loop's stream has done
      with it (not as soon as the reader's has)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._loop_done: torch.cuda.Event | None = None

    def _streams(self) -> tuple[torch.cuda.Stream, torch.cuda.Stream] | None:
        """(this thread's stream, the loop's), on CUDA."""
        if self.device.type != "cuda":
            return None
        return torch.cuda.current_stream(self.device), torch.cuda.default_stream(self.device)

    def before(self) -> None:
        """Under the lock, before a call's work is queued."""
        streams = self._streams()
        if streams is not None and streams[0] != streams[1] and self._loop_done is not None:
            streams[0].wait_event(self._loop_done)

    def after(self, made: Iterable[Any]) -> None:
        """Under the lock, after a call's work is queued; `made`: what it made."""
        streams = self._streams()
        if streams is None:
            return
        mine, loop = streams
        if mine == loop:
            done = torch.cuda.Event()  # type: ignore[no-untyped-call]
            done.record(loop)
            self._loop_done = done
            return
        for tensor in _tensors(made):
            if tensor.is_cuda:
                tensor.record_stream(loop)
        mine.synchronize()


def _tensors(values: Iterable[Any]) -> Iterator[torch.Tensor]:
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            yield from _tensors(getattr(value, f.name) for f in dataclasses.fields(value))
        elif isinstance(value, tuple | list):
            yield from _tensors(value)
