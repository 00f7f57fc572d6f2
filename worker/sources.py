"""What every task brings the engine from a request: its images' prompts and seeds, and its
pictures from storage; and inpainting's last touch, the result laid over the source through the
blurred mask. Which of these a job uses is its task's to say (worker/tasks.py)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter

from app.jobs.contract import JobRequest
from app.jobs.storage import Storage, input_key
from worker.adapters import LoraUse
from worker.controls import ControlUse
from worker.inputs import ImageSpec, Source


class MissingInput(LookupError):
    """A source picture that is not in storage (swept: the job waited longer than the TTL)."""


def image_specs(request: JobRequest, controls: tuple[ControlUse, ...] = ()) -> list[ImageSpec]:
    """What the engine needs of a request, per image (`controls`: its ControlNet units, their
    pictures read: `control_uses`)."""
    loras = tuple(LoraUse(lora.name, lora.weight if lora.text_weight is None else lora.text_weight,
                          lora.weight) for lora in request.loras)  # fmt: skip
    return [
        ImageSpec(
            request.prompt,
            request.negative_prompt,
            request.guidance_scale,
            seed,
            request.prompt_syntax,
            request.clip_skip,
            loras,
            request.vae,
            controls,
        )
        for seed in request.seeds()
    ]


def control_uses(storage: Storage, job_id: str, request: JobRequest) -> tuple[ControlUse, ...]:
    """The job's ControlNet units with their control images (stored by the API, fitted and
    preprocessed already), read off the GPU's thread."""
    return tuple(
        ControlUse(unit.model, picture(storage, job_id, f"control{k}").convert("RGB"),
                   unit.weight, unit.start, unit.end, guess=unit.mode == "control",
                   soft=unit.mode == "prompt")
        for k, unit in enumerate(getattr(request, "controlnets", []))
    )  # fmt: skip


def picture(storage: Storage, job_id: str, name: str) -> Image.Image:
    """One of the job's stored pictures (`image`, `mask`)."""
    data = storage.get(input_key(job_id, name))
    if data is None:
        raise MissingInput(f"the job's {name} is no longer in storage")
    loaded = Image.open(io.BytesIO(data), formats=["PNG"])  # written by the API, as PNG
    loaded.load()
    return loaded


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
