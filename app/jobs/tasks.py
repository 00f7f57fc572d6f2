"""Request kinds as tasks: what both sides need to know of each kind of job, in one place.

The API counts a job's steps and UNet rows (its ETA, its admission, its progress) and the
worker runs them; both read them here, so the two cannot disagree. A task is one class:

    txt2img   text to image (and, with `hires`, the second pass that follows it: `hires`)
    img2img   a picture noised to `strength`, then denoised toward the prompt
    inpaint   img2img where the mask is white
    upscale   a picture enlarged (pixels or latents), then redrawn at `strength`
    x4        the Stable Diffusion x4 upscaler: four times the picture, every step, its own engine

The worker's side of each task (how its inputs load, its latents, its next pass, how it
finishes, its infotext) is worker/tasks.py, under the same names. A new kind of job is a
request class in the contract (app/jobs/contract.py), a task here and there, and a route.
"""

from __future__ import annotations

from typing import ClassVar

from app.jobs.contract import (
    JobRequest,
    Txt2ImgRequest,
    UpscaleRequest,
    upscale_drawn,
)
from app.jobs.tiles import TILE, TILE_OVERLAP, tile_count


def run_steps(steps: int, strength: float) -> int:
    """Steps a pass from a picture runs: the last `strength` of its schedule, and at least one
    (A1111's rule; diffusers would run none and fail). The worker starts its plans here
    (worker/plans.py `start_step`), and the API's progress and ETA count with it: one rule."""
    return max(1, min(int(steps * strength), steps))


def refined_steps(steps: int, switch_at: float) -> int:
    """Steps a refiner runs after the switch: the schedule's timesteps below it, about
    `1 - switch_at` of them (the worker counts them in its models' own schedules, and its
    progress says so)."""
    return round(steps * (1 - switch_at))


class Task:
    name: ClassVar[str]
    # Which engine runs it: the request's model ("model"), or the x4 upscaler ("x4").
    engine: ClassVar[str] = "model"
    # Whether its inputs include a picture the client sent (stored beside the job).
    from_picture: ClassVar[bool] = True

    def drawn(self, request: JobRequest) -> tuple[int, int]:
        """The (width, height) its model draws (its first pass's)."""
        return request.width, request.height

    def steps(self, request: JobRequest) -> int:
        """Denoising steps the whole job runs, every pass: with a refiner, the model's steps
        above the switch and the refiner's below it (all of them below, when the picture's
        strength starts under the switch)."""
        ran = run_steps(request.steps, request.strength)  # type: ignore[union-attr]
        refiner = getattr(request, "refiner", None)
        return ran if refiner is None else max(ran, refined_steps(request.steps, refiner.switch_at))

    def rows(self, request: JobRequest, tile: int = TILE, overlap: int = TILE_OVERLAP) -> int:
        """UNet rows it puts in each call: cond and uncond per image (per tile of it) when
        guided."""
        tiles = tile_count(self.drawn(request), tile, overlap)
        return request.n * tiles * (2 if request.guidance_scale > 1 else 1)


class Txt2Img(Task):
    name = "txt2img"
    from_picture = False

    def steps(self, request: JobRequest) -> int:
        """The schedule's steps (a refiner's share of them included), and a hires fix's."""
        assert isinstance(request, Txt2ImgRequest)
        second = HIRES.steps(request) if request.hires is not None else 0
        return request.steps + second


class Hires(Task):
    """A hires fix's second pass: the first pass's picture enlarged, then redrawn at the
    fix's strength (as img2img), at the larger size."""

    name = "hires"
    from_picture = False

    def drawn(self, request: JobRequest) -> tuple[int, int]:
        assert isinstance(request, Txt2ImgRequest)
        size = request.hires_size()
        assert size is not None, "a hires fix has a size"
        return size

    def steps(self, request: JobRequest) -> int:
        assert isinstance(request, Txt2ImgRequest) and request.hires is not None
        return run_steps(request.hires.steps or request.steps, request.hires.strength)


class Img2Img(Task):
    name = "img2img"


class Inpaint(Task):
    name = "inpaint"


class Upscale(Task):
    """`method` pixel or latent: the model redraws the enlarged picture."""

    name = "upscale"


class X4(Task):
    name = "x4"
    engine = "x4"

    def drawn(self, request: JobRequest) -> tuple[int, int]:
        """Always four times the picture (a job of scale 2 is halved at the end)."""
        assert isinstance(request, UpscaleRequest)
        return upscale_drawn((request.image.width, request.image.height), 4, "x4")

    def steps(self, request: JobRequest) -> int:
        return request.steps  # every step: the upscaler starts from noise


HIRES = Hires()
TASKS: dict[str, Task] = {t.name: t for t in (Txt2Img(), HIRES, Img2Img(), Inpaint(), Upscale(),
                                              X4())}  # fmt: skip


def task_name(request: JobRequest) -> str:
    """The task a request is: its kind, but for upscaling by the x4 upscaler."""
    if isinstance(request, UpscaleRequest) and request.method == "x4":
        return "x4"
    return request.kind


def task_of(request: JobRequest) -> Task:
    return TASKS[task_name(request)]


def denoising_steps(request: JobRequest) -> int:
    """Steps a job runs, every pass (its task's rule)."""
    return task_of(request).steps(request)


def unet_rows(request: JobRequest, tile: int = TILE, overlap: int = TILE_OVERLAP) -> int:
    """Rows a job puts in each UNet call (its task's rule)."""
    return task_of(request).rows(request, tile, overlap)


def drawn_size(request: JobRequest) -> tuple[int, int]:
    """The (width, height) a job's model draws first (its task's rule)."""
    return task_of(request).drawn(request)
