"""The worker's side of each task (what both sides share is app/jobs/tasks.py, under the same
names): how a job's inputs load, the shape it is denoised at, the pass that follows a finished
one (a hires fix's second, a refiner's), how its images are finished, and its words in A1111's
infotext. The loop (worker/continuous.py) asks a job's task; it never asks its kind.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from app.jobs import tasks as shared
from app.jobs.contract import InpaintRequest, JobRequest, Txt2ImgRequest, UpscaleRequest
from app.jobs.masks import Cut
from app.jobs.storage import Storage
from worker.controls import ControlUse
from worker.engine import Engine
from worker.inputs import BatchShape, Source, Uncut
from worker.plans import until_switch
from worker.rows import Lane
from worker.sources import filled, image_specs, overlay, picture

Words = dict[str, Any]  # infotext settings, in A1111's order


class TaskWork:
    rule: ClassVar[shared.Task]
    # It starts from a stored picture (`source`): read, and preprocessed, off the GPU's thread.
    reads_picture: ClassVar[bool] = True

    def source(self, storage: Storage, job_id: str, request: Any) -> Source | None:
        """What the job starts from: its picture, noised to `strength` (None: from noise)."""
        return Source(source_picture(storage, job_id), request.strength)

    def begin(
        self,
        engine: Engine,
        key: str,
        shape: BatchShape,
        source: Source | None,
        request: Any,
        refiner: Engine | None = None,
        controls: tuple[ControlUse, ...] = (),
    ) -> Lane:
        """Its lane at the first step (`prepare`), with its ControlNet units (`controls`).
        With a refiner, the model runs the steps above the switch and the refiner the rest
        (`next_pass`); where a picture's strength starts below the switch, the refiner runs
        them all."""
        lane = self.prepare(engine, key, shape, source, request, controls)
        wanted = getattr(request, "refiner", None)
        if wanted is None:
            return lane
        assert refiner is not None, "the loop finds the refiner's engine"
        later = refiner.latents.refiner_plan(shape, wanted.switch_at)
        if later is None:  # the switch is below the schedule's last step: no refiner pass
            return lane
        lane.plan = until_switch(lane.plan, engine.scheduler_config, wanted.switch_at)
        lane.later_steps = len(later.steps)
        if lane.done:
            refined = self.next_pass(engine, request, lane, refiner)
            assert refined is not None
            return refined
        return lane

    def prepare(
        self,
        engine: Engine,
        key: str,
        shape: BatchShape,
        source: Source | None,
        request: Any,
        controls: tuple[ControlUse, ...] = (),
    ) -> Lane:
        """Its lane at the first step: how its latents are prepared (from its picture)."""
        assert source is not None, "a task that reads a picture has one"
        return engine.latents.from_picture(key, image_specs(request, controls), shape, source)

    def shape(self, request: JobRequest) -> BatchShape:
        """What the engine denoises first: the drawn size, steps and sampler."""
        return BatchShape(*self.rule.drawn(request), request.steps, request.scheduler)

    def next_pass(
        self,
        engine: Engine,
        request: Any,
        lane: Lane,
        refiner: Engine | None = None,
        controls: tuple[ControlUse, ...] = (),
    ) -> Lane | None:
        """The lane of the pass that follows a finished one (a refiner's, after its base
        model's); None when the job is done."""
        wanted = getattr(request, "refiner", None)
        if wanted is None or lane.model is not None:
            return None
        assert refiner is not None, "the loop finds the refiner's engine"
        # The job's LoRAs, VAE and ControlNets are its model's: the refiner runs without.
        specs = [replace(spec, loras=(), vae=None) for spec in image_specs(request)]
        made = refiner.latents.refined(lane, specs, self.shape(request), wanted.switch_at)
        if made is not None:
            made.model = wanted.model
        return made

    def finished(
        self, images: list[np.ndarray | None], source: Source | None, request: Any
    ) -> list[np.ndarray | None]:
        """The images as the job hands them back."""
        return images

    def words(self, request: Any) -> Words:
        """Its settings in A1111's infotext, after the common ones."""
        return {"Denoising strength": request.strength}


class Txt2Img(TaskWork):
    rule = shared.TASKS["txt2img"]
    reads_picture = False

    def source(self, storage: Storage, job_id: str, request: Any) -> Source | None:
        return None

    def prepare(
        self,
        engine: Engine,
        key: str,
        shape: BatchShape,
        source: Source | None,
        request: Any,
        controls: tuple[ControlUse, ...] = (),
    ) -> Lane:
        """From noise; a hires fix's second pass counted in its progress."""
        lane = engine.latents.from_noise(key, image_specs(request, controls), shape)
        if request.hires is not None:
            lane.later_steps = shared.HIRES.steps(request)
        return lane

    def next_pass(
        self,
        engine: Engine,
        request: Any,
        lane: Lane,
        refiner: Engine | None = None,
        controls: tuple[ControlUse, ...] = (),
    ) -> Lane | None:
        """A hires fix's second pass (`hires` in app/jobs/tasks.py) after the first, or a
        refiner's (the API takes one or the other)."""
        assert isinstance(request, Txt2ImgRequest)
        if request.hires is None:
            return super().next_pass(engine, request, lane, refiner, controls)
        if lane.earlier_steps:
            return None
        size = shared.HIRES.drawn(request)
        shape = BatchShape(*size, request.hires.steps or request.steps, request.scheduler)
        # The ControlNets steer the second pass too (their images resized to it), as A1111's.
        return engine.second_pass(lane, image_specs(request, controls), shape, request.hires)

    def words(self, request: Any) -> Words:
        hires = request.hires
        if hires is None:
            return {}
        words: Words = {"Denoising strength": hires.strength, "Hires upscale": hires.scale}
        if hires.steps:
            words["Hires steps"] = hires.steps
        words["Hires upscaler"] = "Latent" if hires.method == "latent" else "Lanczos"
        return words


class Img2Img(TaskWork):
    rule = shared.TASKS["img2img"]


class Inpaint(TaskWork):
    rule = shared.TASKS["inpaint"]

    def source(self, storage: Storage, job_id: str, request: Any) -> Source | None:
        """The picture and mask; of the masked area only (`crop_box`), their cut, drawn at
        the job's size. With masked content "fill", the picture the VAE encodes is filled
        under the mask."""
        image = source_picture(storage, job_id)
        mask = picture(storage, job_id, "mask").convert("L")
        uncut = None
        if request.crop_box is not None:
            cut = Cut(request.crop_box, image.size, (request.width, request.height))
            uncut = Uncut(image, mask, cut)
            image, mask = cut.of(image), cut.of(mask)
        encoded = (
            filled(image, mask, request.mask_blur) if request.masked_content == "fill" else None
        )
        return Source(image, request.strength, mask, encoded=encoded, uncut=uncut)

    def finished(
        self, images: list[np.ndarray | None], source: Source | None, request: Any
    ) -> list[np.ndarray | None]:
        """Laid over the source through the blurred mask: outside it the source's pixels come
        back exactly (the VAE alone would only come close). Of the masked area only: laid
        back into the whole picture, at its size."""
        assert isinstance(request, InpaintRequest) and source is not None
        return [None if image is None else overlay(image, source, request.mask_blur)
                for image in images]  # fmt: skip

    def words(self, request: Any) -> Words:
        words = super().words(request) | {"Mask blur": request.mask_blur}
        if request.masked_content == "fill":
            words["Masked content"] = "fill"
        if request.mask_crop is not None:
            words |= {"Inpaint area": "Only masked", "Masked area padding": request.mask_crop}
        return words


class Upscale(TaskWork):
    rule = shared.TASKS["upscale"]

    def source(self, storage: Storage, job_id: str, request: Any) -> Source | None:
        """Pixel upscaling's picture is stored already enlarged: it runs as image to image.
        Latent upscaling's is encoded at its own size, its latents enlarged."""
        latent = request.method == "latent"
        return Source(source_picture(storage, job_id), request.strength, enlarge=latent)

    def words(self, request: Any) -> Words:
        upscaler = "Latent" if request.method == "latent" else "Lanczos"
        return super().words(request) | {"Hires upscale": request.scale,
                                         "Hires upscaler": upscaler}  # fmt: skip


class X4(TaskWork):
    rule = shared.TASKS["x4"]

    def source(self, storage: Storage, job_id: str, request: Any) -> Source | None:
        return Source(source_picture(storage, job_id), 1.0, noise_level=request.noise_level)

    def prepare(
        self,
        engine: Engine,
        key: str,
        shape: BatchShape,
        source: Source | None,
        request: Any,
        controls: tuple[ControlUse, ...] = (),
    ) -> Lane:
        """Noise beside the picture noised to the request's level."""
        assert source is not None, "the x4 upscaler reads a picture"
        specs = image_specs(request)
        engine.latents.codec(specs)  # a VAE it does not hold: refused now, not at the decode
        return engine.latents.from_low_res(key, specs, shape, source)

    def finished(
        self, images: list[np.ndarray | None], source: Source | None, request: Any
    ) -> list[np.ndarray | None]:
        """Resized to the job's size (Lanczos) when that is smaller: a job of scale 2."""
        assert isinstance(request, UpscaleRequest)
        size = (request.width, request.height)
        return [image if image is None or image.shape[1::-1] == size
                else np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))
                for image in images]  # fmt: skip

    def words(self, request: Any) -> Words:  # every step runs: no strength
        return {"Hires upscale": request.scale, "Hires upscaler": "SD x4 upscaler",
                "Noise level": request.noise_level}  # fmt: skip


def source_picture(storage: Storage, job_id: str) -> Image.Image:
    """The job's source picture, in RGB."""
    return picture(storage, job_id, "image").convert("RGB")


WORK: dict[str, TaskWork] = {w.rule.name: w for w in (Txt2Img(), Img2Img(), Inpaint(), Upscale(),
                                                       X4())}  # fmt: skip


def task(request: JobRequest) -> TaskWork:
    """The worker's side of the request's task."""
    return WORK[shared.task_name(request)]
