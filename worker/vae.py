"""The VAE both ways: pictures to latents (img2img, inpainting, upscaling, a pixel hires fix) and
latents to pixels, the decode started on the GPU and picked up when it is done, so the loop
never waits for it."""

from __future__ import annotations

import copy
import logging
from collections import deque
from typing import Any

import numpy as np
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from worker.compiled import CompiledCalls
from worker.components import Components
from worker.inputs import Observer
from worker.timing import GpuTimer

log = logging.getLogger("sdserve.engine")


class Vae:
    def __init__(
        self, parts: Components, calls: CompiledCalls, chunk: int, module: Any = None
    ) -> None:
        """`module`: another VAE than the model's (SDSERVE_VAES), run eagerly: only the
        model's own decoder and encoder are compiled (no VAE a request chooses compiles while
        serving)."""
        self.parts = parts
        self.calls = calls
        self.chunk = chunk  # images per decode call: its memory grows with the pixels
        self.module: Any = parts.vae if module is None else module
        self.own = module is None
        self.scaling = float(self.module.config.scaling_factor)
        self.observer: Observer | None = None
        self._fp32: Any = None
        # Encodes timed on the GPU, read once the GPU has got there (a later call): timing
        # never makes the loop wait.
        self._encodes: deque[GpuTimer] = deque(maxlen=64)

    def sample_latents(
        self, image: torch.Tensor, generators: list[torch.Generator]
    ) -> torch.Tensor:
        """A sample of the VAE's latents of `image` per generator, scaled."""
        posterior = self._encode(image)
        samples = [posterior.sample(generator=g) for g in generators]
        # Canonical layout: a channels-last VAE gives channels-last latents; and the UNet's
        # dtype (an upcast VAE's latents are fp32, as diffusers casts them back).
        latents: torch.Tensor = torch.cat(samples) * self.scaling
        return latents.to(self.parts.dtype).contiguous()

    def mode_latents(self, image: torch.Tensor) -> torch.Tensor:
        """The VAE's most likely latents of `image`, scaled (no noise drawn)."""
        latents: torch.Tensor = self._encode(image).mode()
        scaled: torch.Tensor = latents * self.scaling
        return scaled.to(self.parts.dtype).contiguous()

    def _encode(self, image: torch.Tensor) -> Any:
        timer = GpuTimer(self.parts.device)
        vae = self.module
        if self.own:  # compiled for a picture of a compiled size (worker/compiled.py)
            compiled = self.calls.compiled((image.shape[-1], image.shape[-2]))
            posterior = DiagonalGaussianDistribution(self.calls.encode(image, compiled))
        else:
            posterior = vae.encode(image.to(vae.dtype)).latent_dist  # an upcast VAE's: fp32
        self._encodes.append(timer.stop())
        while self._encodes and self._encodes[0].ready():
            done = self._encodes.popleft()
            if self.observer is not None:
                self.observer.encoded(done.seconds())
        return posterior

    def decode(self, latents: torch.Tensor, compiled: bool = False) -> list[np.ndarray | None]:
        """Pixels per latent: HxWx3 uint8, or None for an image that stays non-finite."""
        return self.images(self.decode_async(latents, compiled))

    @torch.inference_mode()
    def decode_async(self, latents: torch.Tensor, compiled: bool = False) -> Decoding:
        """Start decoding: fixed-size chunks (padded), so that a chunk's shape, and so its
        kernels and rounding, never depend on the batch around it; pixels and a finite flag per
        image are copied to the host behind the GPU's work, so the caller does not wait."""
        chunk = self.chunk
        timer = GpuTimer(self.parts.device)
        scaled = latents.to(self.module.dtype) / self.scaling  # as diffusers: cast, then scale
        parts = []
        for start in range(0, len(scaled), chunk):
            part = scaled[start : start + chunk]
            padded = torch.cat([part, part[-1:].expand(chunk - len(part), *part.shape[1:])])
            if self.own:
                parts.append(self.calls.decode(padded, compiled)[: len(part)])
            else:
                parts.append(self.module.decode(padded.contiguous()).sample[: len(part)])
        pixels = torch.cat(parts)
        finite = torch.isfinite(pixels).flatten(1).all(1)
        return Decoding(latents, to_uint8(pixels), finite, timer, self)

    @torch.inference_mode()
    def images(self, decoding: Decoding) -> list[np.ndarray | None]:
        """A decoding's pixels (waiting for it if it is not ready). An image that came out
        non-finite is decoded once more in fp32 (fp16 VAEs overflow on some latents); None if
        that fails too."""
        decoding.wait()
        if self.observer is not None:
            self.observer.decoded(decoding.timer.seconds())
        out: list[np.ndarray | None] = []
        for row, pixels, finite in zip(
            decoding.latents, decoding.pixels, decoding.finite.tolist(), strict=True
        ):
            if finite:
                out.append(pixels.numpy())
                continue
            log.warning("non-finite pixels: decoding again in fp32")
            again = self._fp32_vae().decode(row[None].float() / self.scaling).sample
            out.append(to_uint8(again)[0].cpu().numpy() if torch.isfinite(again).all() else None)
        return out

    def _fp32_vae(self) -> Any:
        """The VAE in fp32, made on first need (most deployments never need it)."""
        if self._fp32 is None:
            vae = self.module
            self._fp32 = vae if vae.dtype == torch.float32 else copy.deepcopy(vae).float()
        return self._fp32


class Decoding:
    """A decode under way: pixels and finite flags on their way to the host (pinned memory, so
    the copy runs behind the GPU's queue), and the latents for an fp32 retry."""

    def __init__(
        self,
        latents: torch.Tensor,
        pixels: torch.Tensor,
        finite: torch.Tensor,
        timer: GpuTimer,
        codec: Vae,
    ) -> None:
        self.latents = latents
        self.codec = codec  # the VAE that decodes it (and decodes again in fp32)
        if pixels.is_cuda:
            self.pixels = torch.empty(pixels.shape, dtype=pixels.dtype, pin_memory=True)
            self.finite = torch.empty(finite.shape, dtype=finite.dtype, pin_memory=True)
            self.pixels.copy_(pixels, non_blocking=True)
            self.finite.copy_(finite, non_blocking=True)
        else:
            self.pixels, self.finite = pixels, finite
        self.timer = timer.stop()  # after the copies: ready means the host has the pixels

    def ready(self) -> bool:
        return self.timer.ready()

    def wait(self) -> None:
        self.timer.wait()


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] to (N, H, W, 3) uint8, rounded as diffusers does."""
    image = (pixels / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
    return image.permute(0, 2, 3, 1).contiguous()
