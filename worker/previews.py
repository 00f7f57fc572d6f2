"""Live previews: what each image in flight looks like now, without a VAE decode.

At a step, a row's model output says what the finished image would be if denoising stopped
here (the predicted clean latents, x0). A linear map from latent channels to RGB turns those
latents into a small picture (one pixel per latent, 64x64 for a 512x512 image): a
multiply-add per pixel, where a VAE decode costs about a UNet step. The map is fitted per model
at its first preview: the VAE encodes pictures of smooth random colour and decodes them again,
and least squares finds the colours the decoder makes of their latents. So it suits any VAE,
tiny test models included.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from worker.timing import GpuTimer

FIT_PICTURES = 24
FIT_LATENTS = 8  # latents per side of each fitting picture


def fit_colours(vae: Any, device: torch.device, dtype: torch.dtype, scale: int) -> torch.Tensor:
    """(latent channels + 1, 3): the map from a latent (and a constant 1) to RGB in [0, 1]."""
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(FIT_PICTURES, 3, 4, 4, generator=generator)
    side = FIT_LATENTS * scale
    pictures = F.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)
    with torch.inference_mode():
        encoded = vae.encode((pictures * 2 - 1).to(device=device, dtype=dtype)).latent_dist
        latents = encoded.mode() * vae.config.scaling_factor
        decoded = vae.decode(latents / vae.config.scaling_factor).sample
    # Against the decoder's pictures, not the ones encoded: the preview should look like the
    # image the decode will give (for a trained VAE the two agree; for a random one, not).
    colours = F.avg_pool2d((decoded.to("cpu", torch.float64) / 2 + 0.5).clamp(0, 1), scale)
    latents = latents.to("cpu", torch.float64)
    inputs = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    inputs = torch.cat([inputs, torch.ones(len(inputs), 1, dtype=torch.float64)], 1)
    targets = colours.permute(0, 2, 3, 1).reshape(-1, 3)
    solution: torch.Tensor = torch.linalg.lstsq(inputs, targets).solution
    return solution


def clean_latents(
    sample: torch.Tensor, output: torch.Tensor, signal: torch.Tensor | float, prediction: str
) -> torch.Tensor:
    """x0 from the UNet's input `sample` (= signal * x0 + noise_level * noise) and its output
    (the noise, or v for v-prediction models); `signal` per row (N, 1, 1, 1) or for all."""
    noise_level = (1 - signal**2) ** 0.5
    clean: torch.Tensor
    if prediction == "v_prediction":
        clean = sample * signal - output * noise_level
    else:
        clean = (sample - output * noise_level) / signal
    return clean


def colours(latents: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) latents to (N, h, w, 3) uint8 through the fitted map."""
    channels = latents.shape[1]
    rgb = torch.einsum("nchw,cr->nhwr", latents.to(weights.dtype), weights[:channels])
    rgb = rgb + weights[channels]
    return rgb.clamp(0, 1).mul(255).round().to(torch.uint8)


class Previews:
    """The previews of one step's lanes, made together and on their way to the host as a decode
    is (pinned memory behind the GPU's queue): the row loop never waits for them. `parts[0]`
    holds the whole pictures' previews, one more part each picture in tiles (its own size)."""

    def __init__(
        self,
        parts: list[torch.Tensor],
        timer: GpuTimer,
        rows: dict[str, tuple[int, int, int, int]],
    ) -> None:
        self.rows = rows  # lane key -> (part, first row, images, the step it shows)
        self.parts: list[torch.Tensor] = []
        for pixels in parts:
            if pixels.is_cuda:
                pinned = torch.empty(pixels.shape, dtype=pixels.dtype, pin_memory=True)
                self.parts.append(pinned.copy_(pixels, non_blocking=True))
            else:
                self.parts.append(pixels)
        self.timer = timer.stop()

    def ready(self) -> bool:
        return self.timer.ready()

    def pictures(self, key: str) -> tuple[int, list[np.ndarray]]:
        """A lane's step and its images' previews (HxWx3 uint8); call once `ready`."""
        part, first, images, step = self.rows[key]
        pixels = self.parts[part]
        return step, [picture.numpy() for picture in pixels[first : first + images]]
