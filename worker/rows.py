"""The images in flight: per-row denoising state, stepped one UNet call at a time.

A `Lane` is one job's images. They share one plan (a job's images have the same steps and
sampler: worker/plans.py); each image keeps its own generator (its starting noise, and an
ancestral sampler's fresh noise each step), and the lane its guidance, its prompt embeddings and
the last few samples, outputs and noise its sampler reaches back to. Lanes of different jobs
never share state: that is what lets any mix of steps, samplers and guidance share one UNet
call, and jobs join and leave between steps.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch
from diffusers.utils.torch_utils import randn_tensor

from worker.adapters import RowMix
from worker.controls import RowControl
from worker.plans import Plan
from worker.tiles import Tiling

Size = tuple[int, int]  # (width, height) in pixels
# One step's tensors, indexed by SAMPLE, OUTPUT, NOISE (None: the step drew no noise).
Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


@dataclass(eq=False)
class Inpainting:
    """What inpainting puts back outside the mask after every step: the source's latents,
    noised to the next step's timestep with the lane's starting noise."""

    mask: torch.Tensor  # (1, 1, height / 8, width / 8): 1 repaints, 0 keeps the source
    source: torch.Tensor  # the source image's latents, (images, channels, height / 8, width / 8)
    noise: torch.Tensor  # the lane's starting noise, the same shape


@dataclass(eq=False)
class Lane:
    key: str  # the job's id
    size: Size
    plan: Plan
    latents: torch.Tensor  # (images, channels, height / 8, width / 8): the sample now
    generators: list[torch.Generator]
    guidance: torch.Tensor  # (images, 1, 1, 1)
    cond: torch.Tensor  # prompt embeddings, (images, 77 x chunks, dim)
    # Negative-prompt embeddings; None when guidance is 1 or less, as diffusers does: then the
    # UNet sees no unconditional rows for this lane.
    uncond: torch.Tensor | None
    # SDXL's added conditioning of the cond and uncond rows (worker/families.py), row for row
    # with `cond` and `uncond`; None for SD 1.x/2.x.
    cond_added: dict[str, torch.Tensor] | None = None
    uncond_added: dict[str, torch.Tensor] | None = None
    inpainting: Inpainting | None = None
    # A UNet's extra input channels: an inpainting UNet's mask and masked source's latents
    # (images, 5, ...), the x4 upscaler's noised low-resolution picture (images, 3, ...).
    conditioning: torch.Tensor | None = None
    # The x4 upscaler's noise level per row (its class label); None for other UNets.
    class_labels: torch.Tensor | None = None
    # A picture larger than one UNet call holds: its latents go through the UNet as tiles
    # (worker/tiles.py), `size` is a tile's, and the per-row tensors above (cond, uncond,
    # guidance, conditioning) have a row per tile of each image.
    tiling: Tiling | None = None
    step: int = 0
    # Steps of the job's earlier passes (a hires fix's first, a refiner's base), and of the
    # passes still to come, for its progress.
    earlier_steps: int = 0
    later_steps: int = 0
    # The model whose engine steps it, where not the job's own: a refiner's pass.
    model: str | None = None
    # Each cond row's LoRAs (its uncond row takes the same), where the worker serves LoRAs.
    mix: RowMix | None = None
    # The VAE that decodes it (SDSERVE_VAES); None: the model's.
    vae: str | None = None
    # Its images' ControlNet units, each on its image's cond row (worker/controls.py).
    controls: tuple[RowControl, ...] = ()
    # The inputs of the last `plan.window` steps, newest last.
    history: deque[Inputs] = field(default_factory=deque)

    @property
    def images(self) -> int:
        return len(self.latents)

    @property
    def steps(self) -> int:
        return len(self.plan.steps)

    @property
    def job_steps(self) -> int:
        """Steps of the job's every pass."""
        return self.earlier_steps + self.steps + self.later_steps

    @property
    def done(self) -> bool:
        return self.step >= self.steps

    @property
    def rows(self) -> int:
        """Its images' rows in a UNet call (a row per tile, when tiled), cond only."""
        return self.images * (1 if self.tiling is None else self.tiling.count)

    @property
    def unet_rows(self) -> int:
        """Rows this lane puts in a UNet call: cond, and uncond when guided."""
        return self.rows * (1 if self.uncond is None else 2)

    def timestep(self) -> float:
        return self.plan.steps[self.step].timestep

    def model_input(self) -> torch.Tensor:
        scale = self.plan.steps[self.step].input_scale
        scaled = self.latents if scale == 1 else self.latents * scale
        if self.tiling is not None:
            scaled = self.tiling.split(scaled)
        if self.conditioning is None:
            return scaled
        return torch.cat([scaled, self.conditioning], 1)

    def advance(self, output: torch.Tensor) -> None:
        """Take this step's model output (guidance applied, a row per tile when tiled): the
        sample moves to the weighted sum of the plan's terms, added up in float32 and stored in
        the latents' dtype, as diffusers' samplers do."""
        if self.tiling is not None:
            output = self.tiling.merge(output)
        plan = self.plan.steps[self.step]
        noise = None
        if plan.noise:  # drawn as diffusers' samplers draw it, image by image
            noise = randn_tensor(
                output.shape, generator=self.generators, device=output.device, dtype=output.dtype
            )
        self.history.append((self.latents, output, noise))
        while len(self.history) > self.plan.window:
            self.history.popleft()
        total: torch.Tensor | None = None
        for term in plan.terms:
            tensor = self.history[-1 - term.age][term.source]
            assert tensor is not None, "a noise term on a step that drew none"
            if total is None:
                total = tensor.to(torch.float32) * term.weight
            else:
                total.add_(tensor, alpha=term.weight)
        assert total is not None, "a step with no terms"
        self.latents = total.to(self.latents.dtype)
        if self.inpainting is not None:  # as diffusers' inpainting pipeline does
            keep, mask = self.inpainting, self.inpainting.mask
            source, noise = plan.renoise
            kept = keep.source * source + keep.noise * noise
            self.latents = (1 - mask) * kept + mask * self.latents
        self.step += 1
