"""The OpenAI Images API shape (`POST /v1/images/generations` and `/v1/images/edits`), mapped
onto sdserve jobs.

The official `openai` clients work unchanged: `size` becomes width and height, sdserve's own
parameters come as extra body fields (`extra_body={"seed": 7, "steps": 30}` in Python), and the
answer waits for the job. Errors take OpenAI's `{"error": {...}}` form on these routes.
"""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.jobs.contract import (
    LORAS_MAX,
    STRICT_INPUT,
    Count,
    Guidance,
    Img2ImgRequest,
    InpaintRequest,
    Lora,
    MaskBlur,
    MaskCrop,
    MaskedContent,
    NegativePrompt,
    Prompt,
    ResizeMode,
    SchedulerName,
    Seed,
    SourceRequest,
    Steps,
    Strength,
    Timeout,
    Txt2ImgRequest,
    is_side,
    size_problem,
)

PREFIX = "/v1/images/"
_SIZE = re.compile(r"(\d{1,5})x(\d{1,5})")
AUTO = "auto"  # OpenAI's size for "the model's own": here its default side
# The fields of OpenAI's shape that are not the job's (what comes back, who asks).
NOT_THE_JOB = {"size", "response_format", "user", "safety_identifier", "quality", "output_format",
               "background", "moderation"}  # fmt: skip
# OpenAI's fields that its API lets a client send as null, meaning the default.
NULLABLE = NOT_THE_JOB | {"n", "model"}


class ImagesRequest(BaseModel):
    model_config = ConfigDict(
        **STRICT_INPUT,
        json_schema_extra={
            "examples": [
                {
                    "prompt": "a lighthouse at dusk",
                    "n": 1,
                    "size": "512x512",
                    "response_format": "b64_json",
                    "seed": 7,
                }
            ]
        },
    )

    prompt: Prompt
    n: Count = 1
    size: str = Field(
        default="auto",
        description="WIDTHxHEIGHT (sides multiples of 8 from 64 to 2048, at most 1024x1024"
        " pixels), or auto: the model's default (1024x1024 for an SDXL model, 512x512 otherwise).",
    )
    response_format: Literal["url", "b64_json"] = "url"
    model: str | None = Field(
        default=None,
        max_length=200,
        description="Which of the server's models (`GET /v1/models`); its default when absent.",
    )
    user: str | None = Field(default=None, max_length=256, description="Accepted and ignored.")
    safety_identifier: str | None = Field(
        default=None, max_length=256, description="Accepted and ignored (`user`'s successor)."
    )
    # OpenAI's settings of what comes back, accepted at the values that describe what sdserve
    # makes (opaque PNGs at the model's own quality, nothing filtered); any other value is a
    # 422 naming the field, never an image that is not what was asked.
    quality: Literal["auto", "standard"] | None = Field(
        default=None, description="auto or standard: the model's own (no other is offered)."
    )
    output_format: Literal["png"] | None = Field(default=None, description="png: what it makes.")
    background: Literal["auto", "opaque"] | None = Field(
        default=None, description="auto or opaque: its images are opaque."
    )
    moderation: Literal["auto", "low"] | None = Field(
        default=None, description="Accepted and ignored: sdserve filters no prompt or image."
    )
    # sdserve's own parameters, as extra body fields.
    negative_prompt: NegativePrompt = ""
    steps: Steps = 25
    guidance_scale: Guidance = 7.5
    scheduler: SchedulerName = "dpmpp_2m"
    seed: Seed | None = None
    timeout_s: Timeout | None = None
    loras: list[Lora] = Field(
        default=[], max_length=LORAS_MAX, description="LoRAs on its images (`GET /v1/loras`)."
    )

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        """OpenAI's own optional fields are nullable in its API: a client's null (the `openai`
        package sends `n=None` as one) is the field's default. sdserve's fields keep theirs."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in NULLABLE}
        return data

    @field_validator("size")
    @classmethod
    def _size(cls, size: str) -> str:
        if size == AUTO:
            return size
        match = _SIZE.fullmatch(size)
        if match is None:
            raise ValueError("size is WIDTHxHEIGHT, like 512x512, or auto")
        if not all(is_side(int(side)) for side in match.groups()):
            raise ValueError("each side is a multiple of 8 from 64 to 2048")
        problem = size_problem(*(int(side) for side in match.groups()))
        if problem is not None:
            raise ValueError(problem)
        return size

    def job(self) -> Txt2ImgRequest:
        fields = self.model_dump(exclude=NOT_THE_JOB)
        if self.size != AUTO:  # auto: no size, so the model's default side (app/routes/submit.py)
            width, height = (int(side) for side in self.size.split("x"))
            fields |= {"width": width, "height": height}
        return Txt2ImgRequest.model_validate(fields)


class EditsRequest(ImagesRequest):
    """`images.edit`'s form fields (the pictures come as file parts): with a mask, or an image
    with transparency, an inpainting job (transparent is edited, as OpenAI reads masks);
    without, image to image."""

    size: str | None = Field(  # type: ignore[assignment]
        default=None, description="WIDTHxHEIGHT; the image's own size (fitted) if absent or auto."
    )
    strength: Strength | None = Field(
        default=None, description="1.0 with a mask, 0.75 without, when absent."
    )
    mask_blur: MaskBlur = 4
    mask_crop: MaskCrop = None
    masked_content: MaskedContent = "original"
    resize_mode: ResizeMode = "resize"

    @field_validator("size")
    @classmethod
    def _size(cls, size: str | None) -> str | None:  # type: ignore[override]  # it may be absent
        return None if size is None else ImagesRequest._size(size)

    @field_validator("loras", mode="before")
    @classmethod
    def _form_loras(cls, value: object) -> object:
        """A form field is text: there, the LoRAs are its JSON list's."""
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return json.loads(value)
        return value

    def sides(self) -> tuple[int | None, int | None]:
        if self.size is None or self.size == AUTO:
            return None, None
        width, height = (int(side) for side in self.size.split("x"))
        return width, height

    def job(self, fields: dict[str, Any]) -> SourceRequest:  # type: ignore[override]
        """The job, given the stored pictures' fields (size, image, and mask if any)."""
        masking = {"mask_blur", "mask_crop", "masked_content"}
        known = self.model_dump(exclude=NOT_THE_JOB | masking | {"strength"})
        known |= fields
        if "mask" in fields:
            return InpaintRequest.model_validate(
                {**known, **self.model_dump(include=masking), "strength": self.strength or 1.0},
                strict=False,
            )
        return Img2ImgRequest.model_validate(
            {**known, "strength": self.strength or 0.75}, strict=False
        )


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]


class OpenAIError(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorBody(BaseModel):
    error: OpenAIError


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object: client mistakes are `invalid_request_error`."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    error = OpenAIError(message=message, type=kind, param=param, code=code)
    return OpenAIErrorBody(error=error).model_dump()


def first_error(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """A validation error as OpenAI reports one: a message and the field it is about."""
    error = errors[0]
    field = ".".join(str(part) for part in error["loc"][1:]) or None
    return (f"{field}: {error['msg']}" if field else error["msg"]), field
