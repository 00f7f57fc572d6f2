"""Host numbers on the device without stalling the GPU's stream; the stream the prompt reader
encodes on beside the loop's."""

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
    anything in it that makes the host wait (a read of a GPU value) waits for those too: a
    uniform load's cohort of 31 prompts took 1.2 s to read beside steps of 0.14 s (H100,
    2026-12-05). On a stream of its own it waits for its own work only, and its kernels take
    the GPU's next free room between the UNet's."""
    if device.type != "cuda":
        return None
    return torch.cuda.Stream(device, priority=-1)  # type: ignore[no-untyped-call]


@contextmanager
def beside_the_loop(stream: torch.cuda.Stream | None) -> Iterator[None]:
    """GPU work of this thread on `stream` (on the current one where None), and done on the
    GPU when the block ends: whatever it made is whole before the loop's thread reads it."""
    if stream is None:
        yield
        return
    with torch.cuda.stream(stream):
        yield
    stream.synchronize()  # this stream's work only: short


def for_the_loop(made: Iterable[Any]) -> None:
    """Tensors this thread made on a stream other than the loop's, marked as used by the
    loop's stream too: the caching allocator then lends their memory again only once the
    loop's stream has done with them (not as soon as the making stream has, while UNet calls
    queued on the loop's stream may still read them)."""
    for tensor in _tensors(made):
        if not tensor.is_cuda:
            continue
        loop = torch.cuda.default_stream(tensor.device)
        if torch.cuda.current_stream(tensor.device) != loop:
            tensor.record_stream(loop)


def _tensors(values: Iterable[Any]) -> Iterator[torch.Tensor]:
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            yield from _tensors(getattr(value, f.name) for f in dataclasses.fields(value))
        elif isinstance(value, tuple | list):
            yield from _tensors(value)
