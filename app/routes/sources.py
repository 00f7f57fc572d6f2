"""Jobs that bring pictures: `POST /v1/img2img`, `POST /v1/inpaint` and `POST /v1/upscale` start
from one, and these and `POST /v1/txt2img` may bring ControlNet units' pictures; and the owner's
way back to the pictures sent (`GET /jobs/{id}/inputs/{name}.png`).

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
from collections.abc import Callable, Sequence
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
from app.controls import ControlNetBody, control_picture
from app.framing import framed
from app.jobs.contract import (
    CONTROLNETS_MAX,
    PIXELS_MAX,
    SIDE_MAX,
    SIDE_MIN,
    SIDE_STEP,
    GenerationRequest,
    Img2ImgRequest,
    InpaintRequest,
    MaskBlur,
    MaskCrop,
    MaskedContent,
    RefinerField,
    ResizeMode,
    Side,
    SourceRequest,
    SourceResize,
    Status,
    StoredImage,
    Strength,
    Txt2ImgRequest,
    UpscaleRequest,
    Upscaling,
    new_job_id,
    upscale_drawn,
)
from app.jobs.masks import Cut, mask_box
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
TEXT_BODY_BYTES = 64 * 1024  # app/api.py's limit of every route that takes no pictures
T = TypeVar("T")

# Bodies up to SDSERVE_MAX_UPLOAD_BYTES; txt2img's only with ControlNet pictures (64 KiB else).
UPLOAD_ROUTES = frozenset({"/v1/txt2img", "/v1/img2img", "/v1/inpaint", "/v1/upscale",
                           "/v1/images/edits", "/sdapi/v1/txt2img", "/sdapi/v1/img2img",
                           "/controlnet/detect"})  # fmt: skip
IMAGE_FIELD = Field(
    description="The source picture: PNG, JPEG or WebP as base64 (plain or a "
    "`data:image/...;base64,` URL), or a file part in multipart/form-data."
)


CONTROLNETS_FIELD: Any = Field(
    default=[],
    max_length=CONTROLNETS_MAX,
    description="ControlNet units on every image of the job (several add up), each with its"
    " picture as base64; rows of other jobs in the same UNet call have theirs, or none.",
)


class SourceBody(GenerationRequest):
    # Optional here (the source's size when absent); the queued request always has them.
    width: Side | None = Field(default=None, description="Pixels; the source's width if absent.")  # type: ignore[assignment]
    height: Side | None = Field(default=None, description="Pixels; the source's height if absent.")  # type: ignore[assignment]
    image: str = IMAGE_FIELD
    resize_mode: ResizeMode = "resize"
    controlnets: list[ControlNetBody] = CONTROLNETS_FIELD  # type: ignore[assignment]

    # A multipart form's field is text: there, the LoRAs and ControlNets are its JSON list's.
    _form_lists = field_validator("loras", "controlnets", mode="before")(
        classmethod(lambda _c, v: form_json(v))
    )


class Txt2ImgBody(Txt2ImgRequest):
    controlnets: list[ControlNetBody] = CONTROLNETS_FIELD  # type: ignore[assignment]


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
    mask_crop: MaskCrop = None
    masked_content: MaskedContent = "original"
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
    """A 422 naming the field (dotted: `controlnets.0.image` is located as a path)."""
    # Only ASCII digits are a list index ("³".isdigit() is true, and int() refuses it).
    path = tuple(int(p) if p.isascii() and p.isdigit() else p for p in field.split("."))
    return RequestValidationError([{"loc": ("body", *path), "msg": message, "type": kind}])


def not_a_file(name: str, model: type[BaseModel], files: Sequence[str]) -> RequestValidationError:
    """A 422 for a file part under a name that takes none: one of the route's text fields sent
    as a file, or a name the route does not have."""
    if name in model.model_fields:
        return invalid(name, "is a text field: send it as a form field, not a file")
    return invalid(name, f"is no field of this route (its pictures: {', '.join(files)})",
                   "extra_forbidden")  # fmt: skip


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
    # One file part more than the route's pictures: a stray one is named (below), not
    # counted by the form parser's "too many files".
    form = await http.form(max_files=len(files) + 1, max_fields=64, max_part_size=limit)
    raw = {}
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            if name not in files:
                raise not_a_file(name, model, files)
            if name in data:
                raise invalid(name, "takes one picture")
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


def fit(pictures: dict[str, Image.Image], width: int | None, height: int | None,
        crop: int | None = None, blur: int = 0, how: SourceResize = "resize",
        ) -> tuple[dict[str, Any], dict[str, bytes]]:  # fmt: skip
    """The job's size (missing sides from the source, fitted) and the pictures at that size,
    fitted `how` (`framed`): the request's size and stored-image fields, and the PNGs to store
    by name. With `crop` (inpainting of the masked area only, its margin; `blur`: the mask's)
    the pictures are stored at their own size, and the box of them drawn at the job's size is
    `crop_box`."""
    for name, side in (("width", width), ("height", height)):
        if side and not SIDE_MIN <= side <= SIDE_MAX:  # before Pillow is asked for that size
            raise invalid(
                name,
                f"is {side}: from {SIDE_MIN} to {SIDE_MAX} pixels, or 0 for the picture's own size",
            )
    source = pictures["image"]
    fitted = fitted_size(*source.size)
    size = (width or fitted[0], height or fitted[1])
    if min(size) < SIDE_MIN:
        raise invalid("image", f"is {source.width}x{source.height}: under {SIDE_MIN} pixels a "
                       "side once fitted; give width and height")  # fmt: skip
    # Resized as diffusers' pipelines resize (Lanczos; stretched unless `how` keeps the aspect),
    # once, here.
    fields: dict[str, Any] = {"width": size[0], "height": size[1]}
    if crop is not None and "mask" in pictures:
        fields["crop_box"] = mask_box(pictures["mask"], crop, blur, size)
        size = source.size
    pngs = {}
    for name, picture in pictures.items():
        pngs[name], fields[name] = _stored(framed(picture, size, how))
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
        rounded = "" if own == source.size else (f" (its sides rounded down to multiples of"
                                                 f" {SIDE_STEP}: {own[0]}x{own[1]})")  # fmt: skip
        raise invalid("image", f"is {source.width}x{source.height}{rounded}: x{scale} makes "
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


def cut_of(fields: dict[str, Any]) -> Cut | None:
    """The cut a masked-area inpainting job draws (`fit`'s fields); None for a whole one."""
    if fields.get("crop_box") is None:
        return None
    whole = (fields["image"].width, fields["image"].height)
    return Cut(fields["crop_box"], whole, (fields["width"], fields["height"]))


def control_pictures(
    units: list[ControlNetBody], size: tuple[int, int], cut: Cut | None = None
) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
    """The units as queued (each picture fitted, preprocessed and described) and the control
    images to store, `control{k}`. With a `cut` (inpainting of the masked area only) each
    picture is fitted to the whole source and cut as it is, so that it lines up with the
    part drawn."""
    queued, pngs = [], {}
    for k, unit in enumerate(units):
        field = f"controlnets.{k}.image"
        picture = control_picture(field, from_base64(field, unit.image), unit, size, cut)
        pngs[f"control{k}"], stored = _stored(picture)
        queued.append({**unit.model_dump(exclude={"image"}), "image": stored.model_dump()})
    return queued, pngs


def queue_with_pictures(ctx: Context, submit: Submitter, request: SourceRequest | Txt2ImgRequest,
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


def as_request(make: Callable[[], T]) -> T:
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


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI request body of a JSON route that reads its own body."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


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
                    # The upscaler is a model of its own: the job's model's LoRAs and VAEs
                    # do not fit it.
                    for field, what in (("loras", "LoRAs"), ("vae", "VAE choice")):
                        if getattr(body, field):
                            why = f"the x4 upscaler takes no {what} (pixel or latent: the model)"
                            raise invalid(field, why)
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
                crop = getattr(body, "mask_crop", None), getattr(body, "mask_blur", 0)
                fields, pngs = await run_in_threadpool(fit, pictures, body.width, body.height,
                                                       *crop, body.resize_mode)  # fmt: skip
            units = getattr(body, "controlnets", [])  # upscaling takes none
            if units:
                size = (fields["width"], fields["height"])
                async with ctx.decodes:
                    fields["controlnets"], controls = await run_in_threadpool(
                        control_pictures, units, size, cut_of(fields)
                    )
                pngs |= controls
        except UploadError as e:
            raise as_http_error(e) from None
        known = {**body.model_dump(exclude={*files, "controlnets"}), **fields}
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

    @routes.post(
        "/v1/txt2img",
        status_code=202,
        response_model=Accepted,
        responses={
            **UNAUTHORIZED,
            **error(409, "This Idempotency-Key came with another request."),
            **error(413, f"Body over 64 KiB (over {limit} bytes with ControlNet pictures)."),
            **error(415, "Not JSON."),
            422: {"description": "Invalid field, or a ControlNet picture that cannot be read."},
            **error(
                429,
                "The queue is full, or this key's rate or jobs in flight are at their limit;"
                " retry after `Retry-After` seconds.",
            ),
            **error(503, "The queue (Redis) or the image storage is unreachable."),
        },
        summary="Queue a text-to-image job",
        description="With an `Idempotency-Key` header, sending the same request again (a retry "
        "after a lost answer) answers the job the first one made, instead of a second job.",
        openapi_extra=json_body(Txt2ImgBody),
    )
    async def txt2img(
        http: Request,
        response: Response,
        caller: Caller = authenticated,
        idempotency_key: str | None = IDEMPOTENCY_KEY,
    ) -> Accepted:
        content_type = http.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise HTTPException(415, "send application/json")
        raw = await http.body()
        # Pictures make a large body; without them a text-to-image request is small.
        if len(raw) > TEXT_BODY_BYTES and b'"controlnets"' not in raw:
            raise HTTPException(413, f"body over {TEXT_BODY_BYTES} bytes")
        try:
            body = Txt2ImgBody.model_validate_json(raw)
        except ValidationError as e:
            raise RequestValidationError(located(e)) from None
        if not body.controlnets:
            request = as_request(lambda: Txt2ImgRequest.model_validate_json(raw))
            found = await run_in_threadpool(submit, request, http, caller, idempotency_key)
        else:
            side = submit.side_of(body.model)
            sent = json.loads(raw)
            size = (sent.get("width", side), sent.get("height", side))
            try:
                work = partial(control_pictures, body.controlnets, size)
                units, pngs = await decoded(ctx, submit, http, caller, idempotency_key, work)
            except UploadError as e:
                raise as_http_error(e) from None
            request = as_request(lambda: Txt2ImgRequest.model_validate(
                sent | {"controlnets": units}, strict=False))  # fmt: skip
            found = await run_in_threadpool(queue_with_pictures, ctx, submit, request, pngs, http,
                                            caller, idempotency_key)  # fmt: skip
        job_id, status, replayed = found
        url = f"/jobs/{job_id}"
        response.headers["Location"] = url
        if replayed:
            response.headers["Idempotent-Replayed"] = "true"
        return Accepted(id=job_id, status=status, url=url)

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
        summary="A job's input picture (image, mask, or a ControlNet unit's control image:"
        " control0 to control3), sized as the job used it",
    )
    def get_input(job_id: str, name: str = Path(pattern="^(image|mask|control[0-3])$"),
                  caller: Caller = authenticated) -> Response:  # fmt: skip
        view = find_job(ctx.store, job_id, caller)
        units = getattr(view.request, "controlnets", [])
        held = (len(units) > int(name[7:]) if name.startswith("control")
                else getattr(view.request, name, None) is not None)  # fmt: skip
        if name not in INPUTS or not held:
            raise HTTPException(404, f"job {job_id} has no {name}")
        data = storage.get(input_key(job_id, name))
        if data is None:
            raise HTTPException(410, "the inputs of this job have expired")
        return Response(data, media_type="image/png")

    return routes
