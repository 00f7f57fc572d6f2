"""The worker's settings (env prefix SDSERVE_)."""

from __future__ import annotations

import socket

from pydantic import Field

from app.settings import CommonSettings, cache_dir

# The tiny model lives here unless SDSERVE_MODEL names another; it is built on first start.
TINY_MODEL_DIR = cache_dir() / "tiny-model"


class WorkerSettings(CommonSettings):
    model: str = Field(
        default=str(TINY_MODEL_DIR),
        min_length=1,
        description="Hub id or local diffusers folder. Default: the tiny model, built if missing.",
    )
    device: str = Field(
        default="auto",
        pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$",
        description="auto (CUDA when present), cpu, cuda or cuda:N.",
    )
    max_batch: int = Field(default=8, ge=1, le=256, description="Images per UNet batch.")
    batch_window_ms: int = Field(
        default=50, ge=0, le=10_000, description="How long a batch waits to fill up."
    )
    heartbeat_ttl_s: int = Field(
        default=15, ge=3, le=600, description="A worker silent this long counts as gone."
    )
    worker_name: str = Field(
        default_factory=socket.gethostname,
        pattern=r"^[A-Za-z0-9_.:-]{1,100}$",
        description="Consumer name; unique per worker (several workers on one host: set it).",
    )
