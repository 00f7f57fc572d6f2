"""OpenAI's Images API: `POST /v1/images/generations` queues a job and waits for its images."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from starlette.requests import Request

from app import openai_images
from app.auth import Caller
from app.jobs.contract import TERMINAL, Status
from app.routes.context import IDEMPOTENCY_KEY, Context, JobEnded, find_job
from app.routes.submit import Submitter
from app.storage import result_key


def router(ctx: Context, submit: Submitter) -> APIRouter:
    routes = APIRouter()
    store, storage, settings, authenticated = (
        ctx.store,
        ctx.storage,
        ctx.settings,
        ctx.authenticated,
    )

    @routes.post(
        "/v1/images/generations",
        response_model=openai_images.ImagesResponse,
        responses={
            **openai_error(401, "Missing, malformed or unknown API key."),
            **openai_error(409, "The job was canceled, or the Idempotency-Key reused."),
            **openai_error(413, "Body over 64 KiB."),
            **openai_error(422, "Invalid field (`param` names it)."),
            **openai_error(429, "Queue full, or this key's rate or jobs in flight at a limit."),
            **openai_error(500, "The job failed (`code` says why: numerical, out_of_memory, ...)."),
            **openai_error(503, "The queue (Redis) is unreachable."),
            **openai_error(504, "Not done within SDSERVE_SYNC_TIMEOUT_S; the job goes on."),
        },
        summary="OpenAI-compatible: generate and wait",
        description="The OpenAI Images API's `images.generate`: `prompt`, `n`, `size`, "
        "`response_format` (`url` or `b64_json`), `model` (ignored); sdserve's own parameters "
        "as extra fields. Answers when the images are made; same queue and batching as "
        "`/v1/txt2img`. A client that hangs up cancels its job.",
    )
    async def images_generations(
        request: openai_images.ImagesRequest,
        http: Request,
        caller: Caller = authenticated,
        idempotency_key: str | None = IDEMPOTENCY_KEY,
    ) -> openai_images.ImagesResponse:
        # The openai SDK numbers its automatic retries of one call; a retry (after a 504, a
        # 5xx or a dropped connection) lands on the job the first try made.
        retrying = http.headers.get("x-stainless-retry-count", "0") not in ("", "0")
        job_id, _status, _replayed = await run_in_threadpool(
            submit, request.job(), http, caller, idempotency_key, retrying
        )
        deadline = time.monotonic() + settings.sync_timeout_s
        while True:
            view = await run_in_threadpool(find_job, store, job_id, caller)
            if view.status in TERMINAL:
                break
            if await http.is_disconnected():  # nobody waits: free the GPU
                await run_in_threadpool(store.cancel, job_id, caller.key_id)
                raise JobEnded(409, "the client hung up: job canceled", "canceled")
            if time.monotonic() > deadline:
                message = f"not done in {settings.sync_timeout_s}s; it goes on at /jobs/{job_id}"
                raise JobEnded(504, message, "timeout")
            await asyncio.sleep(0.1)
        if view.status is not Status.SUCCEEDED:
            error = view.error
            if error is not None:
                raise JobEnded(500, error.message, error.code)
            raise JobEnded(409, f"the job was {view.status.value}", view.status.value)
        data = []
        for k, url in enumerate(view.images):
            if request.response_format == "url":
                data.append(openai_images.ImageData(url=f"{str(http.base_url).rstrip('/')}{url}",
                                                    revised_prompt=request.prompt))  # fmt: skip
                continue
            png = await run_in_threadpool(storage.get, result_key(job_id, k))
            if png is None:
                raise JobEnded(410, "the images of this job have expired", "expired")
            data.append(openai_images.ImageData(b64_json=base64.b64encode(png).decode(),
                                                revised_prompt=request.prompt))  # fmt: skip
        return openai_images.ImagesResponse(created=int(time.time()), data=data)

    return routes


def openai_error(status: int, description: str) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": openai_images.OpenAIErrorBody, "description": description}}
