"""A job and what it made: `GET /jobs/{id}`, its images, its live preview and events, `DELETE`
to cancel."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, HTTPException, Path, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, StreamingResponse

from app.auth import Caller
from app.endings import Endings, ended_or_after
from app.jobs.api_store import ApiStore
from app.jobs.contract import TERMINAL, JobView, Status
from app.jobs.storage import result_key
from app.routes.context import NOT_FOUND, UNAUTHORIZED, Context, error, find_job

PRESIGNED_URL_S = 300


def router(ctx: Context) -> APIRouter:
    routes = APIRouter()
    store, storage, settings, authenticated = (
        ctx.store,
        ctx.storage,
        ctx.settings,
        ctx.authenticated,
    )

    @routes.get(
        "/jobs/{job_id}",
        response_model=JobView,
        responses={**UNAUTHORIZED, **NOT_FOUND},
        summary="A job",
    )
    def get_job(job_id: str, caller: Caller = authenticated) -> JobView:
        return find_job(store, job_id, caller)

    @routes.delete(
        "/jobs/{job_id}",
        response_model=JobView,
        responses={**UNAUTHORIZED, **NOT_FOUND, **error(409, "The job had already ended.")},
        summary="Cancel a job",
        description="A queued job is canceled at once; a running one stops at its next step.",
    )
    def cancel_job(job_id: str, caller: Caller = authenticated) -> JobView:
        find_job(store, job_id, caller)  # an unknown id (or another key's) is a 404, not a 409
        if not store.cancel(job_id, caller.key_id):
            raise HTTPException(409, f"job already {find_job(store, job_id, caller).status.value}")
        return find_job(store, job_id, caller)

    @routes.get(
        "/jobs/{job_id}/images/{index}.png",
        response_class=Response,
        responses={
            200: {"content": {"image/png": {}}, "description": "The PNG."},
            307: {"description": "With SDSERVE_STORAGE_REDIRECT: to a presigned URL (5 min)."},
            **UNAUTHORIZED,
            **NOT_FOUND,
            **error(409, "The job has not succeeded (yet)."),
            **error(410, "The images have expired."),
        },
        summary="One image of a finished job",
    )
    def get_image(
        job_id: str, index: int = Path(ge=0, le=7), caller: Caller = authenticated
    ) -> Response:
        view = find_job(store, job_id, caller)
        if view.status is Status.EXPIRED:
            raise HTTPException(410, "the images of this job have expired")
        if view.status is not Status.SUCCEEDED:
            raise HTTPException(409, f"job is {view.status.value}; images exist once it succeeded")
        if index >= len(view.images):
            raise HTTPException(404, f"no image {index}: the job has {len(view.images)}")
        key = result_key(job_id, index)
        if settings.storage_redirect and (url := storage.url(key, PRESIGNED_URL_S)):
            return RedirectResponse(url, status_code=307)
        data = storage.get(key)
        if data is None:
            raise HTTPException(410, "the images of this job have expired")
        return Response(data, media_type="image/png")

    # HEAD as GET without the body (uvicorn drops it): link checkers and download tools ask
    # first. Not in the OpenAPI text, which lists the GET.
    routes.add_api_route("/jobs/{job_id}/images/{index}.png", get_image, methods=["HEAD"],
                         response_class=Response, include_in_schema=False)  # fmt: skip

    @routes.get(
        "/jobs/{job_id}/preview.jpg",
        response_class=Response,
        responses={
            200: {"content": {"image/jpeg": {}}, "description": "The JPEG."},
            **UNAUTHORIZED,
            **error(
                404,
                "No such job for this API key, or it has no preview (not running, not yet at"
                " its first preview step, or previews are off).",
            ),
        },
        summary="A running job's live preview",
        description="Its images as they would be if denoising stopped at its last preview "
        "step, side by side, one pixel per latent (64x64 for a 512x512 image): a cheap "
        "approximation, not the VAE's decode. `preview_url` in the job names the latest.",
    )
    def get_preview(job_id: str, caller: Caller = authenticated) -> Response:
        find_job(store, job_id, caller)
        data = store.preview(job_id)
        if data is None:
            raise HTTPException(404, "this job has no preview")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    @routes.get(
        "/jobs/{job_id}/events",
        response_class=StreamingResponse,
        responses={
            200: {
                "content": {"text/event-stream": {}},
                "description": "One event a change: `event:` the status, `data:` the job.",
            },
            **UNAUTHORIZED,
            **NOT_FOUND,
        },
        summary="A job's changes, live (Server-Sent Events)",
        description="An event whenever the status, queue position, step or preview changes (a"
        " running job's events carry its progress, `eta_s` and `preview_url`); the stream "
        "ends with the job (succeeded, failed, canceled). A `: keep-alive` comment every 15 s.",
    )
    def job_events(job_id: str, caller: Caller = authenticated) -> StreamingResponse:
        find_job(store, job_id, caller)  # a 404 now, not a stream that ends at once
        return StreamingResponse(
            _events(store, job_id, caller.key_id, ctx.endings),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return routes


EVENT_POLL_S = 0.25
KEEPALIVE_S = 15.0


async def _events(store: ApiStore, job_id: str, owner: str, endings: Endings) -> AsyncIterator[str]:
    """SSE: the job whenever what a watcher sees of it changes, until it ends (its end as soon
    as it is published: app/endings.py)."""
    last: tuple[Any, ...] | None = None
    quiet = 0.0
    with endings.watch(job_id) as ended:
        while True:
            view = await run_in_threadpool(store.view, job_id, owner)
            if view is None:  # the record itself expired
                return
            seen = (view.status, view.position, view.progress, view.preview_url)
            if seen != last:
                yield f"event: {view.status.value}\ndata: {view.model_dump_json()}\n\n"
                last, quiet = seen, 0.0
            elif quiet >= KEEPALIVE_S:
                yield ": keep-alive\n\n"
                quiet = 0.0
            if view.status in TERMINAL:
                return
            began = time.monotonic()
            await ended_or_after(ended, EVENT_POLL_S)
            quiet += time.monotonic() - began
