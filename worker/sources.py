"""What a job brings the engine: its images' prompts and seeds, its source picture (img2img,
inpainting, upscaling) from storage, a hires fix's second pass; and inpainting's last touch:
the result laid over the source through the blurred mask, so that outside it the source's
pixels come back exactly (the VAE alone would only come close)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter

from app.jobs.contract import (
    InpaintRequest,
    JobRequest,
    Txt2ImgRequest,
    UpscaleRequest,
    drawn_size,
)
from app.jobs.storage import Storage, input_key
from worker.engine import BatchShape, Engine, ImageSpec, Source
from worker.rows import Lane


class MissingInput(LookupError):
    """A source picture that is not in storage (swept: the job waited longer than the TTL)."""


def image_specs(request: JobRequest) -> list[ImageSpec]:
    """What the engine needs of a request, per image."""
    return [
        ImageSpec(
            request.prompt,
            request.negative_prompt,
            request.guidance_scale,
            seed,
            request.prompt_syntax,
        )
        for seed in request.seeds()
    ]


def in_lanes(request: JobRequest) -> bool:
    """Whether static batching runs the job alone through the row hooks (it starts from a
    picture, or has a second pass) rather than in a batch of text-to-image jobs."""
    return not isinstance(request, Txt2ImgRequest) or request.hires is not None


def next_pass(engine: Engine, request: JobRequest, lane: Lane) -> Lane | None:
    """The lane of a finished first pass's hires fix; None when the job is done."""
    if not isinstance(request, Txt2ImgRequest) or request.hires is None or lane.earlier_steps:
        return None
    size = request.hires_size()
    assert size is not None, "a hires fix has a size"
    steps = request.hires.steps or request.steps
    shape = BatchShape(*size, steps, request.scheduler)
    return engine.second_pass(lane, image_specs(request), shape, request.hires)


def load_source(storage: Storage, job_id: str, request: JobRequest) -> Source | None:
    """The job's source, or None for text to image."""
    if request.kind == "txt2img":
        return None
    image = _picture(storage, job_id, "image").convert("RGB")
    mask = None
    if isinstance(request, InpaintRequest):
        mask = _picture(storage, job_id, "mask").convert("L")
    if isinstance(request, UpscaleRequest) and request.method == "x4":
        return Source(image, 1.0, noise_level=request.noise_level)
    # Pixel upscaling's picture is stored already enlarged: it runs as image to image.
    enlarge = isinstance(request, UpscaleRequest) and request.method == "latent"
    return Source(image, request.strength, mask, enlarge)


def job_shape(request: JobRequest) -> BatchShape:
    """What the engine denoises for a job: its size, steps and sampler. The x4 upscaler always
    draws four times the picture's size (a job of scale 2 is halved at the end)."""
    return BatchShape(*drawn_size(request), request.steps, request.scheduler)


def _picture(storage: Storage, job_id: str, name: str) -> Image.Image:
    data = storage.get(input_key(job_id, name))
    if data is None:
        raise MissingInput(f"the job's {name} is no longer in storage")
    picture = Image.open(io.BytesIO(data), formats=["PNG"])  # written by the API, as PNG
    picture.load()
    return picture


def overlay(pixels: np.ndarray, source: Source, blur: int) -> np.ndarray:
    """The result where the mask is white, the source where it is black, blended across the
    mask's edge blurred by `blur` pixels. The mask is first made black or white as the
    denoising saw it."""
    assert source.mask is not None, "an overlay needs a mask"
    mask = source.mask.point(lambda v: 255 if v >= 128 else 0)
    if blur:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    made = Image.fromarray(pixels, "RGB")
    return np.asarray(Image.composite(made, source.image, mask))


def finished(
    images: list[np.ndarray | None], source: Source | None, request: JobRequest
) -> list[np.ndarray | None]:
    """A job's images as it is handed them back: inpainting's laid over its source, the x4
    upscaler's resized to the job's size (Lanczos) when that is smaller."""
    size = (request.width, request.height)
    if isinstance(request, UpscaleRequest) and request.method == "x4":
        return [image if image is None or image.shape[1::-1] == size
                else np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))
                for image in images]  # fmt: skip
    if source is None or source.mask is None or not isinstance(request, InpaintRequest):
        return images
    return [None if image is None else overlay(image, source, request.mask_blur)
            for image in images]  # fmt: skip
