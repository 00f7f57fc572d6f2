"""What every task brings the engine from a request: its images' prompts and seeds, and its
pictures from storage; and inpainting's last touch, the result laid over the source through the
blurred mask. Which of these a job uses is its task's to say (worker/tasks.py)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from app.jobs.contract import JobRequest
from app.jobs.masks import repainted
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
    mask's edge blurred by `blur` pixels (`repainted`). A masked-area job's result is laid
    back into the whole picture, at its size."""
    made = Image.fromarray(pixels, "RGB")
    if source.uncut is not None:
        whole = source.uncut
        return np.asarray(whole.cut.back(made, whole.image, whole.mask, blur))
    assert source.mask is not None, "an overlay needs a mask"
    return np.asarray(Image.composite(made, source.image, repainted(source.mask, blur)))


# A1111's "fill": the blur radii of the layers laid over each other, widest first, and how
# many times each is laid. The wide ones reach a large mask's middle; the narrow ones, laid
# last, keep the colours near its edge those of their neighbours.
FILL_LAYERS = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))


def filled(picture: Image.Image, mask: Image.Image, blur: int) -> Image.Image:
    """The picture with what the mask repaints replaced by colours spread in from around it
    (masked content "fill"), for the VAE to encode: the rest of the picture is blurred at
    each of `FILL_LAYERS`' radii, premultiplied (a blur of it averages only the picture's
    colours, its coverage the alpha), and each blur laid over the last; the sharp picture,
    laid last, leaves what the mask keeps as it was."""
    kept = Image.new("RGBa", picture.size)
    kept.paste(picture.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(repainted(mask, blur)))
    made = Image.new("RGBA", picture.size)
    for radius, times in FILL_LAYERS:
        layer = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(times):
            made.alpha_composite(layer)
    return made.convert("RGB")
