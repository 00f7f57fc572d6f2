"""Jobs that start from a picture: `POST /v1/img2img`, `POST /v1/inpaint` and `POST /v1/upscale`,
and the owner's way back to the pictures sent (`GET /jobs/{id}/inputs/{name}.png`).

The routes take JSON (images as base64, plain or `data:image/...;base64,`) or multipart/form-data
(images as file parts, the other fields as form fields). Images are read safely (app/uploads.py),
fitted to the job's size, and stored once beside the job's results under the id the job will
get; the queued job refers to them by that id and their digest, never carries their bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

from fastapi import APIRouter, HTTPException, Path, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from PIL import Image
from pydantic import BaseModel, Field, ValidationError, field_validator
from starlette.datastructures import UploadFile
from starlette.requests import Request

from app.auth import Caller
from app.jobs.contract import (
    PIXELS_MAX,
    SIDE_MAX,
    SIDE_MIN,
    SIDE_STEP,
    GenerationRequest,
    Img2ImgRequest,
    InpaintRequest,
    MaskBlur,
    RefinerField,
    Side,
    SourceRequest,
    Status,
    StoredImage,
    Strength,
    UpscaleRequest,
    Upscaling,
    new_job_id,
    upscale_drawn,
)
from app.jobs.storage import INPUTS, input_key
from app.routes.context import (
    IDEMPOTENCY_KEY,
    RETRY_AFTER_S,
    UNAUTHORIZED,
    Context,
    error,
    find_job,
)
from app.routes.submit import Accepted, Submitter
from app.uploads import UploadError, as_mask, flatten, from_base64, read_image, to_png

log = logging.getLogger("sdserve.api")
T = TypeVar("T")

UPLOAD_ROUTES = frozenset({"/v1/img2img", "/v1/inpaint", "/v1/upscale", "/v1/images/edits",
                           "/sdapi/v1/img2img"})  # fmt: skip
IMAGE_FIELD = Field(
    description="The source picture: PNG, JPEG or WebP as base64 (plain or a "
    "`data:image/...;base64,` URL), or a file part in multipart/form-data."
)


class SourceBody(GenerationRequest):
    # Optional here (the source's size when absent); the queued request always has them.
    width: Side | None = Field(default=None, description="Pixels; the source's width if absent.")  # type: ignore[assignment]
    height: Side | None = Field(default=None, description="Pixels; the source's height if absent.")  # type: ignore[assignment]
    image: str = IMAGE_FIELD

    # A multipart form's field is text: there, the LoRAs are its JSON list's.
    _form_loras = field_validator("loras", mode="before")(classmethod(lambda _c, v: form_json(v)))


class Img2ImgBody(SourceBody):
    strength: Strength = 0.75
    refiner: RefinerField = None

    @field_validator("refiner", mode="before")
    @classmethod
    def _form_text(cls, value: object) -> object:
        """A multipart form's field is text: there, the refiner is its JSON object's."""
        return form_json(value)


class InpaintBody(SourceBody):
    strength: Strength = 1.0
    mask_blur: MaskBlur = 4
    mask: str = Field(
        description="Same size as the image. White repaints, black keeps; a mask with "
        "transparency: transparent (alpha 0) repaints, as OpenAI's edits read it. Base64 or a "
        "file part, as `image`."
    )


class UpscaleBody(Upscaling):
    image: str = Field(description="The picture to enlarge; sent as `image` is to img2img.")

    _form_loras = field_validator("loras", mode="before")(classmethod(lambda _c, v: form_json(v)))


def fitted_size(width: int, height: int) -> tuple[int, int]:
    """A source's own size as a job size: scaled down (aspect kept) to fit within the largest
    side and the most pixels, then each side rounded down to a multiple of 8."""
    scale = min(1.0, SIDE_MAX / max(width, height), math.sqrt(PIXELS_MAX / (width * height)))
    return (math.floor(width * scale / SIDE_STEP) * SIDE_STEP,
            math.floor(height * scale / SIDE_STEP) * SIDE_STEP)  # fmt: skip


def invalid(field: str, message: str, kind: str = "value_error") -> RequestValidationError:
    return RequestValidationError([{"loc": ("body", field), "msg": message, "type": kind}])


def as_http_error(error: UploadError) -> Exception:
    """A picture that cannot be used: 413 if too large, else 422 naming its field."""
    if error.status == 413:
        return HTTPException(413, str(error))
    return invalid(error.field, error.message)


async def _read(http: Request, model: type[BaseModel], files: tuple[str, ...],
                limit: int) -> tuple[Any, dict[str, bytes]]:  # fmt: skip
    """The body as `model`, and each image field's bytes."""
    content_type = http.headers.get("content-type", "").split(";")[0].strip().lower()
    raw: dict[str, Any]
    data: dict[str, bytes] = {}
    if content_type == "application/json":
        try:
            body = model.model_validate_json(await http.body())
        except ValidationError as e:
            raise RequestValidationError(located(e)) from None
        for name in files:
            data[name] = from_base64(name, getattr(body, name))
        return body, data
    if content_type != "multipart/form-data":
        raise HTTPException(415, "send application/json or multipart/form-data")
    form = await http.form(max_files=len(files), max_fields=64, max_part_size=limit)
    raw = {}
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            if name not in files:
                raise invalid(name, "is not a file field")
            data[name] = await value.read()
            raw[name] = ""  # present; its bytes are in `data`
        elif name == "webhook_events":
            raw.setdefault(name, []).append(value)
        elif name in raw:
            raise invalid(name, "is given twice")
        else:
            raw[name] = value
    try:
        # Form fields are text: numbers are read from it (lax), everything else as JSON is.
        body = model.model_validate(raw, strict=False)
    except ValidationError as e:
        raise RequestValidationError(located(e)) from None
    for name in files:
        if name not in data:
            data[name] = from_base64(name, getattr(body, name))
    return body, data


def located(error: ValidationError) -> list[dict[str, Any]]:
    return [{"loc": ("body", *e["loc"]), "msg": e["msg"], "type": e["type"]}
            for e in error.errors()]  # fmt: skip


def _stored(image: Image.Image) -> tuple[bytes, StoredImage]:
    png = to_png(image)
    return png, StoredImage(sha256=hashlib.sha256(png).hexdigest(), width=image.width,
                            height=image.height)  # fmt: skip


async def decoded(ctx: Context, submit: Submitter, http: Request, caller: Caller,
                  idempotency_key: str | None, work: Callable[[], T]) -> T:  # fmt: skip
    """`work` (decoding a request's pictures) once the key's limits say yes (a request they
    refuse decodes nothing), at most SDSERVE_MAX_DECODES at once in this process: a small
    body may declare 4096 x 4096 pixels, and its decode holds some 20 bytes a pixel."""
    await run_in_threadpool(submit.admit, http, caller, idempotency_key)
    async with ctx.decodes:
        # Again once its turn came: others of the same key may have been queued meanwhile.
        await run_in_threadpool(submit.admit, http, caller, idempotency_key)
        return await run_in_threadpool(work)


def read_pictures(data: dict[str, bytes]) -> dict[str, Image.Image]:
    """The source (RGB) and, if sent, the mask (L, white repaints), the same size."""
    sent = read_image("image", data["image"]).image
    pictures = {"image": flatten(sent)}
    if "mask" in data:
        mask = as_mask(read_image("mask", data["mask"]).image)
        if mask.size != sent.size:
            raise invalid("mask", f"is {mask.width}x{mask.height}; the image is "
                           f"{sent.width}x{sent.height}: they must match")  # fmt: skip
        pictures["mask"] = mask
    return pictures


def fit(pictures: dict[str, Image.Image], width: int | None,
        height: int | None) -> tuple[dict[str, Any], dict[str, bytes]]:  # fmt: skip
    """The job's size (missing sides from the source, fitted) and the pictures at that size:
    the request's size and stored-image fields, and the PNGs to store by name."""
    source = pictures["image"]
    fitted = fitted_size(*source.size)
    size = (width or fitted[0], height or fitted[1])
    if min(size) < SIDE_MIN:
        raise invalid("image", f"is {source.width}x{source.height}: under {SIDE_MIN} pixels a "
                       "side once fitted; give width and height")  # fmt: skip
    # Resized as diffusers' pipelines resize (Lanczos, the aspect not kept if width and height
    # say otherwise), once, here.
    fields: dict[str, Any] = {"width": size[0], "height": size[1]}
    pngs = {}
    for name, picture in pictures.items():
        if picture.size != size:
            picture = picture.resize(size, Image.Resampling.LANCZOS)
        pngs[name], fields[name] = _stored(picture)
    return fields, pngs


def enlarge(pictures: dict[str, Image.Image], scale: int, method: str,
            largest: int) -> tuple[dict[str, Any], dict[str, bytes]]:  # fmt: skip
    """An upscaling job's size (the picture's, each side rounded down to a multiple of 8, times
    `scale`) and the picture to store: already at that size for `pixel` (resized once, here,
    from the picture as sent), at its own for `latent` (the worker enlarges its latents)."""
    source = pictures["image"]
    own = (source.width // SIDE_STEP * SIDE_STEP, source.height // SIDE_STEP * SIDE_STEP)
    size = (own[0] * scale, own[1] * scale)
    if min(size) < SIDE_MIN:
        raise invalid("image", f"is {source.width}x{source.height}: x{scale} makes "
                      f"{size[0]}x{size[1]}, under {SIDE_MIN} pixels a side")  # fmt: skip
    drawn = upscale_drawn(own, scale, method)  # x4 draws four times, whatever the scale
    if max(drawn) > largest:
        how = "the x4 upscaler draws" if drawn != size else f"x{scale} makes"
        raise invalid("image", f"is {source.width}x{source.height}: {how} {drawn[0]}x"
                      f"{drawn[1]}, over the {largest}-pixel limit of a side")  # fmt: skip
    stored = size if method == "pixel" else own
    if source.size != stored:
        source = source.resize(stored, Image.Resampling.LANCZOS)
    png, fields = _stored(source)
    return {"width": size[0], "height": size[1], "image": fields}, {"image": png}


def queue_with_pictures(ctx: Context, submit: Submitter, request: SourceRequest,
                        pngs: dict[str, bytes], http: Request, caller: Caller,
                        idempotency_key: str | None,
                        retrying: bool | None = None) -> tuple[str, Status, bool]:  # fmt: skip
    """Store the pictures under the new job's id, then queue it (blocking: run it in a thread).
    Pictures nothing will refer to (a refusal, or a replay that found an earlier job) are
    removed again."""
    job_id = new_job_id()
    try:
        for name, png in pngs.items():
            ctx.storage.put(input_key(job_id, name), png)
    except Exception as e:  # a full disk, a bucket away: as Redis away, try again later
        log.error("storing a job's pictures failed: %s: %s", type(e).__name__, e)
        with contextlib.suppress(Exception):
            for name in pngs:
                ctx.storage.delete(input_key(job_id, name))
        raise HTTPException(503, "image storage is unavailable; try again later",
                            headers={"Retry-After": str(RETRY_AFTER_S)}) from None  # fmt: skip
    queued = False
    try:
        found = submit(request, http, caller, idempotency_key, retrying, job_id)
        queued = found[0] == job_id
        return found
    finally:
        if not queued:
            for name in pngs:
                ctx.storage.delete(input_key(job_id, name))


def as_request(make: Callable[[], SourceRequest]) -> SourceRequest:
    """The queued request, or a 422 naming the field."""
    try:
        return make()
    except ValidationError as e:
        raise RequestValidationError(located(e)) from None


def form_json(value: object) -> object:
    """A form field's JSON text as its value (JSON bodies give the value itself); text that
    is not JSON stays, for the field's own error."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def form_body(model: type[BaseModel], files: tuple[str, ...], json: bool = True) -> dict[str, Any]:
    """The OpenAPI request body of a route that reads its own body: multipart/form-data with
    the pictures as binary parts, and (`json`) JSON with them as base64 strings."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    binary = {name: {"type": "string", "format": "binary"} for name in files}
    content = {"multipart/form-data": {"schema": {
        **schema, "properties": {**schema["properties"], **binary}}}}  # fmt: skip
    if json:
        content["application/json"] = {"schema": schema}
    return {"requestBody": {"required": True, "content": content}}


def router(ctx: Context, submit: Submitter) -> APIRouter:
    routes = APIRouter()
    authenticated, storage = ctx.authenticated, ctx.storage
    limit = ctx.settings.max_upload_bytes

    async def queue(http: Request, response: Response, caller: Caller,
                    idempotency_key: str | None, body_model: type[BaseModel],
                    make: Callable[[dict[str, Any]], SourceRequest]) -> Accepted:  # fmt: skip
        files = ("image", "mask") if body_model is InpaintBody else ("image",)
        try:
            body, data = await _read(http, body_model, files, limit)
            pictures = await decoded(ctx, submit, http, caller, idempotency_key,
                                     partial(read_pictures, data))  # fmt: skip
            if isinstance(body, UpscaleBody):
                if body.method == "x4" and not ctx.settings.upscaler:
                    raise invalid("method", "this server has no x4 upscaler (SDSERVE_UPSCALER)")
                if body.method == "x4":
                    model = body.model or ctx.store.models[0]
                    held = await run_in_threadpool(ctx.store.workers_of, model)
                    # Live workers of the model, none with the upscaler: nothing can run it.
                    # (None live: the job waits for one, as any job does.)
                    if held and not any(beat.upscaler for beat in held):
                        raise invalid("method", f"no live worker of model {model} has the x4"
                                      " upscaler (SDSERVE_UPSCALER)")  # fmt: skip
                fields, pngs = await run_in_threadpool(
                    enlarge, pictures, body.scale, body.method, ctx.settings.max_upscale_side
                )
            else:
                fields, pngs = await run_in_threadpool(fit, pictures, body.width, body.height)
        except UploadError as e:
            raise as_http_error(e) from None
        known = {**body.model_dump(exclude=set(files)), **fields}
        request = as_request(lambda: make(known))
        found_id, status, replayed = await run_in_threadpool(
            queue_with_pictures, ctx, submit, request, pngs, http, caller, idempotency_key
        )
        url = f"/jobs/{found_id}"
        response.headers["Location"] = url
        if replayed:
            response.headers["Idempotent-Replayed"] = "true"
        return Accepted(id=found_id, status=status, url=url)

    answers = {
        **UNAUTHORIZED,
        **error(409, "This Idempotency-Key came with another request."),
        **error(413, f"Body over {limit} bytes, or an image over 4096 x 4096 pixels."),
        **error(415, "Neither JSON nor multipart/form-data."),
        422: {"description": "Invalid field, or an image that cannot be read."},
        **error(429, "The queue is full, or this key is at its limit; see `Retry-After`."),
        **error(503, "The queue (Redis) or the image storage is unreachable; see `Retry-After`."),
    }

    def add(path: str, name: str, summary: str, body_model: type[BaseModel],
            request_model: type[SourceRequest]) -> None:  # fmt: skip
        files = ("image", "mask") if body_model is InpaintBody else ("image",)

        async def queue_one(
            http: Request,
            response: Response,
            caller: Caller = authenticated,
            idempotency_key: str | None = IDEMPOTENCY_KEY,
        ) -> Accepted:
            return await queue(http, response, caller, idempotency_key, body_model,
                               lambda f: request_model.model_validate(f, strict=False))  # fmt: skip

        routes.add_api_route(path, queue_one, methods=["POST"], name=name, status_code=202,
                             response_model=Accepted, responses=answers, summary=summary,
                             openapi_extra=form_body(body_model, files))  # fmt: skip

    add("/v1/img2img", "img2img", "Queue an image-to-image job", Img2ImgBody, Img2ImgRequest)
    add("/v1/inpaint", "inpaint", "Queue an inpainting job", InpaintBody, InpaintRequest)
    add("/v1/upscale", "upscale", "Queue an upscaling job (a hires fix of a picture)",
        UpscaleBody, UpscaleRequest)  # fmt: skip

    @routes.get(
        "/jobs/{job_id}/inputs/{name}.png",
        response_class=Response,
        responses={
            200: {"content": {"image/png": {}}, "description": "The picture as the job uses it."},
            **UNAUTHORIZED,
            **error(404, "No such job for this API key, or no such input for it."),
            **error(410, "The inputs have expired."),
        },
        summary="A job's input picture (image or mask), sized as the job used it",
    )
    def get_input(job_id: str, name: str = Path(pattern="^(image|mask)$"),
                  caller: Caller = authenticated) -> Response:  # fmt: skip
        view = find_job(ctx.store, job_id, caller)
        if name not in INPUTS or getattr(view.request, name, None) is None:
            raise HTTPException(404, f"job {job_id} has no {name}")
        data = storage.get(input_key(job_id, name))
        if data is None:
            raise HTTPException(410, "the inputs of this job have expired")
        return Response(data, media_type="image/png")

    return routes
