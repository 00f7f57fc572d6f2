"""What a job brings the engine, per image and per job, and what the engine reports back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from PIL import Image

from app.jobs.masks import Cut
from app.jobs.prompts import Syntax
from worker.adapters import LoraUse
from worker.controls import ControlUse


class NotHeld(LookupError):
    """A job reached a worker without an engine it needs: the job fails, never the worker."""


class NoUpscaler(NotHeld):
    """An x4 upscaling job reached a worker without the x4 upscaler (SDSERVE_UPSCALER)."""


class NoRefiner(NotHeld):
    """A job's refiner is not among the worker's models (SDSERVE_WORKER_MODELS)."""


class NoVae(NotHeld):
    """A job's VAE is not one this worker holds for its model (SDSERVE_VAES)."""


@dataclass(frozen=True)
class ImageSpec:
    """What differs between the images of one batch."""

    prompt: str
    negative_prompt: str
    guidance_scale: float
    seed: int
    syntax: Syntax = "plain"  # how both prompts read (app/jobs/prompts.py)
    clip_skip: int = 1  # the layer the prompt is read at (1: the last); the negative reads at 1
    loras: tuple[LoraUse, ...] = ()  # its LoRAs, on both prompts' rows (worker/adapters.py)
    vae: str | None = None  # the VAE that encodes and decodes it (SDSERVE_VAES); None: the model's
    controls: tuple[ControlUse, ...] = ()  # its ControlNet units (worker/controls.py)


@dataclass(frozen=True)
class Uncut:
    """A masked-area inpainting job's picture and mask at their own size, and its cut."""

    image: Image.Image  # RGB
    mask: Image.Image  # L, white repaints
    cut: Cut


@dataclass(frozen=True)
class Source:
    """img2img and inpainting: the picture a job starts from, at the job's size."""

    image: Image.Image  # RGB
    strength: float  # 0 < strength <= 1: how much of the schedule runs (1: all of it)
    mask: Image.Image | None = None  # L, white repaints; None: img2img
    # Latent upscaling: the picture is at its own size, and its latents (the VAE's mode: no
    # noise drawn) are enlarged to the job's size, as a hires fix's latents are.
    enlarge: bool = False
    # The x4 upscaler: the picture, at its own size, noised to this level, is what the UNet
    # sees beside the latents (the whole schedule runs; `strength` is not used).
    noise_level: int | None = None
    # Inpainting: the picture the VAE encodes where it is not `image` (masked content "fill":
    # the masked part filled in from around it). `image` is still what the result is laid
    # over.
    encoded: Image.Image | None = None
    # Inpainting of the masked area only: the picture and mask at their own size, and the cut
    # of them that `image` and `mask` are; the result is laid back into the picture.
    uncut: Uncut | None = None
    # The picture and mask as the VAE and the mask's blend take them (CPU tensors, pinned),
    # made by `LatentMaker.ready` in the thread that read them: a job's join then does no
    # image work on the GPU's thread. None: made at the join.
    pixels: Any = None
    mask_pixels: Any = None


@dataclass(frozen=True)
class BatchShape:
    """What the images of one batch share."""

    width: int
    height: int
    steps: int
    scheduler: str


# Called after each step with the number of steps done; returning False abandons the batch.
StepCallback = Callable[[int], bool]


class Observer(Protocol):
    """Told how long the parts of each batch took (metrics)."""

    def stepped(self, seconds: float, rows: int, bucket: int, padding: int) -> None: ...

    def decoded(self, seconds: float) -> None: ...

    def encoded(self, seconds: float) -> None: ...

    def waited(self, seconds: float) -> None: ...
