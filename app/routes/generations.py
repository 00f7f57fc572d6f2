"""OpenAI's Images API: `POST /v1/images/generations` and `POST /v1/images/edits` queue a job and
wait for its images."""

from __future__ import annotations

import base64
import time
from typing import Any

from fastapi import APIRouter, HTTPException
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from PIL import Image
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import Request

from app import openai_images
from app.auth import Caller
from app.endings import ended_or_after
from app.jobs.contract import TERMINAL, ErrorCode, JobView, Status
from app.jobs.storage import result_key
from app.routes import sources
from app.routes.context import IDEMPOTENCY_KEY, Context, JobEnded, find_job
from app.routes.submit import Submitter
from app.uploads import UploadError, as_mask, read_image


def router(ctx: Context, submit: Submitter) -> APIRouter:
    routes = APIRouter()
    storage, settings, authenticated = ctx.storage, ctx.settings, ctx.authenticated

    @routes.post(
        "/v1/images/generations",
        response_model=openai_images.ImagesResponse,
        responses={
            **openai_error(401, "Missing, malformed or unknown API key."),
            **openai_error(409, "The job was canceled, or the Idempotency-Key reused."),
            **openai_error(413, "Body over 64 KiB."),
            **openai_error(
                422,
                "Invalid field (`param` names it), or a job its worker refused"
                " (`code` invalid_request).",
            ),
            **openai_error(429, "Queue full, or this key's rate or jobs in flight at a limit."),
            **openai_error(500, "The job failed (`code` says why: numerical, out_of_memory, ...)."),
            **openai_error(503, "The queue (Redis) or the image storage is unreachable."),
            **openai_error(504, "Not done within SDSERVE_SYNC_TIMEOUT_S; the job goes on."),
        },
        summary="OpenAI-compatible: generate and wait",
        description="The OpenAI Images API's `images.generate`: `prompt`, `n`, `size`, "
        "`response_format` (`url` or `b64_json`), `model` (one of `GET /v1/models`); sdserve's "
        "own parameters as extra fields. Answers when the images are made; same queue and "
        "batching as `/v1/txt2img`. A client that hangs up cancels its job.",
    )
    async def images_generations(
        request: openai_images.ImagesRequest,
        http: Request,
        caller: Caller = authenticated,
        idempotency_key: str | None = IDEMPOTENCY_KEY,
    ) -> openai_images.ImagesResponse:
        job_id, _status, _replayed = await run_in_threadpool(
            submit, request.job(), http, caller, idempotency_key, _retrying(http)
        )
        return await answer(job_id, http, caller, request.prompt, request.response_format)

    @routes.post(
        "/v1/images/edits",
        response_model=openai_images.ImagesResponse,
        responses={
            **openai_error(401, "Missing, malformed or unknown API key."),
            **openai_error(409, "The job was canceled, or the Idempotency-Key reused."),
            **openai_error(413, "Body over SDSERVE_MAX_UPLOAD_BYTES, or an image too large."),
            **openai_error(415, "Not multipart/form-data."),
            **openai_error(
                422,
                "Invalid field or picture (`param` names it), or a job its"
                " worker refused (`code` invalid_request).",
            ),
            **openai_error(429, "Queue full, or this key's rate or jobs in flight at a limit."),
            **openai_error(500, "The job failed (`code` says why)."),
            **openai_error(503, "The queue (Redis) or the image storage is unreachable."),
            **openai_error(504, "Not done within SDSERVE_SYNC_TIMEOUT_S; the job goes on."),
        },
        summary="OpenAI-compatible: edit a picture and wait",
        description="The OpenAI Images API's `images.edit`, multipart: `image` (PNG, JPEG or "
        "WebP), `mask` (alpha 0 is edited; without one, an image with transparency is its own "
        "mask; with neither, the whole picture is redrawn at `strength`), `prompt`, `n`, "
        "`size`, `response_format`; sdserve's own fields (`strength`, `seed`, `steps`, ...) as "
        "extra form fields.",
        openapi_extra=sources.form_body(openai_images.EditsRequest, ("image", "mask"), json=False),
    )
    async def images_edits(
        http: Request,
        caller: Caller = authenticated,
        idempotency_key: str | None = IDEMPOTENCY_KEY,
    ) -> openai_images.ImagesResponse:
        if http.headers.get("content-type", "").split(";")[0].strip() != "multipart/form-data":
            raise HTTPException(415, "images.edit takes multipart/form-data")
        form = await http.form(max_files=4, max_fields=64,
                               max_part_size=settings.max_upload_bytes)  # fmt: skip
        fields: dict[str, Any] = {}
        data: dict[str, bytes] = {}
        for name, value in form.multi_items():
            key = "image" if name == "image[]" else name
            if isinstance(value, UploadFile):
                if key not in ("image", "mask"):
                    raise sources.not_a_file(key, openai_images.EditsRequest, ("image", "mask"))
                if key in data:
                    raise sources.invalid(key, "takes one picture")
                data[key] = await value.read()
            elif key in fields:  # as /v1/img2img: a field given twice is a mistake
                raise sources.invalid(key, "is given twice")
            else:
                fields[key] = value
        if "image" not in data:
            raise sources.invalid("image", "is required: a file part")
        try:
            request = openai_images.EditsRequest.model_validate(fields, strict=False)
        except ValidationError as e:
            raise RequestValidationError(sources.located(e)) from None
        try:

            def read() -> dict[str, Image.Image]:
                pictures = sources.read_pictures(data)
                if "mask" not in pictures and (holes := transparency(data["image"])) is not None:
                    pictures["mask"] = holes
                return pictures

            pictures = await sources.decoded(ctx, submit, http, caller, idempotency_key, read)
            width, height = request.sides()
            stored, pngs = await run_in_threadpool(
                sources.fit, pictures, width, height, request.mask_crop, request.mask_blur,
                request.resize_mode,
            )  # fmt: skip
        except UploadError as e:
            raise sources.as_http_error(e) from None
        job = sources.as_request(lambda: request.job(stored))
        job_id, _status, _replayed = await run_in_threadpool(
            sources.queue_with_pictures, ctx, submit, job, pngs, http, caller, idempotency_key,
            _retrying(http),
        )  # fmt: skip
        return await answer(job_id, http, caller, request.prompt, request.response_format)

    async def answer(job_id: str, http: Request, caller: Caller, prompt: str,
                     response_format: str) -> openai_images.ImagesResponse:  # fmt: skip
        """Wait for the job, then its images in OpenAI's shape."""
        view = await finished_job(ctx, job_id, http, caller)
        data = []
        for k, url in enumerate(view.images):
            if response_format == "url":
                data.append(openai_images.ImageData(url=f"{str(http.base_url).rstrip('/')}{url}",
                                                    revised_prompt=prompt))  # fmt: skip
                continue
            png = await run_in_threadpool(storage.get, result_key(job_id, k))
            if png is None:
                raise JobEnded(410, "the images of this job have expired", "expired")
            data.append(openai_images.ImageData(b64_json=base64.b64encode(png).decode(),
                                                revised_prompt=prompt))  # fmt: skip
        return openai_images.ImagesResponse(created=int(time.time()), data=data)

    return routes


# A waiting request looks at its job this often besides its end's message: a client that hung
# up is found within it, and an end whose message was lost costs at most this.
LOOK_S = 0.1


async def finished_job(ctx: Context, job_id: str, http: Request, caller: Caller) -> JobView:
    """Wait for the job to succeed (at most SDSERVE_SYNC_TIMEOUT_S: then a 504, the job goes
    on); a failed or canceled job is an error answer, and a client that hangs up cancels it."""
    deadline = time.monotonic() + ctx.settings.sync_timeout_s
    with ctx.endings.watch(job_id) as ended:  # before the first look: no end is missed
        while True:
            view = await run_in_threadpool(find_job, ctx.store, job_id, caller)
            if view.status in TERMINAL:
                break
            if await http.is_disconnected():  # nobody waits: free the GPU
                await run_in_threadpool(ctx.store.cancel, job_id, caller.key_id)
                raise JobEnded(409, "the client hung up: job canceled", "canceled")
            if time.monotonic() > deadline:
                message = (f"not done in {ctx.settings.sync_timeout_s:g}s; it goes on at"
                           f" /jobs/{job_id}")  # fmt: skip
                if view.workers == 0:  # say why: nothing runs it until a worker of its model
                    message += f" (no live worker holds model {view.request.model})"
                raise JobEnded(504, message, "timeout")
            # Its end, as published; a look every LOOK_S whatever happens (a hang-up, the
            # deadline, a message lost while Redis restarted).
            await ended_or_after(ended, LOOK_S)
    if view.status is not Status.SUCCEEDED:
        error = view.error
        if error is not None:  # a request its worker could not honour is the caller's to fix
            status = 422 if error.code == ErrorCode.INVALID else 500
            raise JobEnded(status, error.message, error.code)
        raise JobEnded(409, f"the job was {view.status.value}", view.status.value)
    return view


def _retrying(http: Request) -> bool:
    # The openai SDK numbers its automatic retries of one call; a retry (after a 504, a 5xx or
    # a dropped connection) lands on the job the first try made.
    return http.headers.get("x-stainless-retry-count", "0") not in ("", "0")


def transparency(data: bytes) -> Image.Image | None:
    """An image's own transparency as a mask (OpenAI's edits without a mask), if it has any."""
    picture = read_image("image", data).image
    if "A" not in picture.getbands() and "transparency" not in picture.info:
        return None
    mask = as_mask(picture)
    return mask if mask.getextrema()[1] else None


def openai_error(status: int, description: str) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": openai_images.OpenAIErrorBody, "description": description}}
