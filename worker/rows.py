"""The images in flight: per-row denoising state, stepped one UNet call at a time.

A `Lane` is one job's images. They share one sampler instance (a job's images have the same
steps and scheduler, so the same timesteps, step index and multistep history); each image keeps
its own generator (its starting noise, and an ancestral sampler's fresh noise each step), and
the lane its guidance and prompt embeddings. Lanes of different jobs never share state: that is
what lets any mix of steps, schedulers and guidance share one UNet call, and jobs join and
leave between steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

Size = tuple[int, int]  # (width, height) in pixels


@dataclass(eq=False)
class Lane:
    key: str  # the job's id
    size: Size
    sampler: Any  # a diffusers scheduler instance of this lane's own
    latents: torch.Tensor  # (images, channels, height / 8, width / 8)
    generators: list[torch.Generator]
    guidance: torch.Tensor  # (images, 1, 1, 1)
    cond: torch.Tensor  # prompt embeddings, (images, 77, dim)
    # Negative-prompt embeddings; None when guidance is 1 or less, as diffusers does: then the
    # UNet sees no unconditional rows for this lane.
    uncond: torch.Tensor | None
    ancestral: bool
    step: int = 0

    @property
    def images(self) -> int:
        return len(self.latents)

    @property
    def steps(self) -> int:
        return len(self.sampler.timesteps)

    @property
    def done(self) -> bool:
        return self.step >= self.steps

    @property
    def unet_rows(self) -> int:
        """Rows this lane puts in a UNet call: cond, and uncond when guided."""
        return self.images * (1 if self.uncond is None else 2)

    def timestep(self) -> torch.Tensor:
        return self.sampler.timesteps[self.step]  # type: ignore[no-any-return]
