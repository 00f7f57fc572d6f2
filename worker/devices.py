"""Host numbers on the device without stalling the GPU's stream."""

from __future__ import annotations

from collections.abc import Sequence
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
