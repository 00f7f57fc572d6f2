"""ControlNet units' pictures, on the API's side (issue 24): read as every upload is, fitted to
the job's size, preprocessed, and stored beside the job as `control{k}` (what the worker reads
is the control image itself). Done here, in the API's threads: the GPU's loop never waits on a
preprocessor, and `GET /jobs/{id}/inputs/control{k}.png` shows what the ControlNet saw."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageOps
from pydantic import Field

from app.jobs.contract import ControlNetSettings, ControlResize
from app.jobs.masks import Cut
from app.uploads import flatten, read_image

# What A1111's /controlnet/module_list calls the preprocessors served (ours: native names).
MODULES = {"none": "none", "invert": "invert (from white bg & black line)", "canny": "canny"}


class ControlNetBody(ControlNetSettings):
    """A ControlNet unit as a request sends it: its picture as base64."""

    image: str = Field(
        description="The control picture: PNG, JPEG or WebP as base64 (plain or a"
        " `data:image/...;base64,` URL); fitted to the job's size (`resize`), then preprocessed."
    )


def fitted(picture: Image.Image, size: tuple[int, int], how: ControlResize) -> Image.Image:
    """The picture at `size` (width, height): stretched, cropped to cover, or padded black."""
    if picture.size == size:
        return picture
    if how == "crop":
        return ImageOps.fit(picture, size, Image.Resampling.LANCZOS)
    if how == "fill":
        return ImageOps.pad(picture, size, Image.Resampling.LANCZOS, color=(0, 0, 0))
    return picture.resize(size, Image.Resampling.LANCZOS)


def preprocessed(picture: Image.Image, unit: ControlNetSettings) -> Image.Image:
    """The control image a preprocessor makes of an RGB picture."""
    if unit.preprocess == "invert":
        return ImageOps.invert(picture)
    if unit.preprocess == "canny":
        import cv2

        edges: Any = cv2.Canny(np.asarray(picture), unit.low_threshold, unit.high_threshold)
        return Image.fromarray(np.stack([edges] * 3, -1).astype(np.uint8))
    return picture


def control_picture(field: str, data: bytes, unit: ControlNetSettings, size: tuple[int, int],
                    cut: Cut | None = None) -> Image.Image:  # fmt: skip
    """A unit's sent bytes as its control image for a job of `size` (UploadError naming
    `field` for a picture that cannot be read): fitted, then preprocessed at the job's size;
    or, with a `processor_res`, preprocessed with its short side at that, then fitted. With a
    `cut` (inpainting of the masked area only): fitted to the whole source, then cut as it
    is."""
    picture = flatten(read_image(field, data).image)

    def fit(picture: Image.Image) -> Image.Image:
        return fitted(picture, size, unit.resize) if cut is None else cut.of(
            fitted(picture, cut.whole, unit.resize))  # fmt: skip

    if unit.processor_res is None or unit.preprocess == "none":
        return preprocessed(fit(picture), unit)
    return fit(preprocessed(at_processor_res(picture, unit), unit))


def at_processor_res(picture: Image.Image, unit: ControlNetSettings) -> Image.Image:
    """The picture with its short side at the unit's `processor_res` (as it is without one),
    where a preprocessor detects at A1111's processor resolution."""
    if unit.processor_res is None:
        return picture
    scale = unit.processor_res / min(picture.size)
    scaled = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    return picture.resize(scaled, Image.Resampling.LANCZOS)
