"""The HTTP front end, assembled: middleware, error answers, background threads, and the routers
(app/routes/) that validate requests, queue jobs, report them and serve their images."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import redis
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from app import openai_images
from app.endings import Endings
from app.jobs.api_store import ApiStore
from app.jobs.storage import open_storage
from app.jobs.store import is_full
from app.jobs.webhook_store import WebhookStore
from app.malloc import map_large_blocks
from app.metrics import ApiMetrics, HttpMetrics
from app.middleware import BodyLimit, NoSniff
from app.openai_images import first_error
from app.routes import a1111, generations, jobs, models, service, sources, submit
from app.routes.context import RETRY_AFTER_S, UNAVAILABLE, JobEnded, make_context
from app.settings import ApiSettings
from app.sweeper import Sweeper
from app.webhooks import WebhookSender

log = logging.getLogger("sdserve.api")

MAX_BODY_BYTES = 64 * 1024

API_DESCRIPTION = """
Asynchronous image generation: text to image, image to image, inpainting, upscaling and the
hires fix, for SD 1.x/2.x and SDXL models (with a refiner), with LoRAs, embeddings and
ControlNets per request. `POST /v1/txt2img` (or `/v1/img2img`, `/v1/inpaint`, `/v1/upscale`)
answers `202` at once with a job id; poll `GET /jobs/{id}` until `status` is `succeeded`, then
download `GET /jobs/{id}/images/{k}.png`. A1111's `/sdapi/v1/...` and OpenAI's
`/v1/images/...` routes answer when the job is done.

Workers step many users' images together, one UNet call per step (continuous batching: any mix
of kinds, steps, samplers and guidance; a job joins between two steps). Prompt, negative prompt,
guidance scale and seed are per image, each image with its own random generator. The same
request and seed give the same image, alone or beside other requests: what the neighbours ask
for never matters, and who shares a call changes a pixel by at most one level of 8-bit colour.
"""


def create_app(store: ApiStore, settings: ApiSettings) -> FastAPI:
    storage = open_storage(settings.storage)
    store.models = settings.model_names()
    endings = Endings(store.client)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        map_large_blocks()  # in each serving process: decodes give their memory back
        sender = None
        if settings.webhook_secret is not None:
            secret = settings.webhook_secret.get_secret_value().encode()
            consumer = f"{socket.gethostname()}-{os.getpid()}"
            events = WebhookStore(store.client, store.result_ttl_s, store.record_grace_s)
            sender = WebhookSender(events, store, secret, settings.webhook_allow_private,
                                   consumer)  # fmt: skip
            sender.start()
        sweeper = Sweeper(store, storage, settings)
        sweeper.start()
        endings.start()
        yield
        endings.stop()
        sweeper.stop()
        if sender is not None:
            sender.stop()

    app = FastAPI(
        lifespan=lifespan,
        title="sdserve",
        version="0.1.0",
        description=API_DESCRIPTION,
        responses=UNAVAILABLE,
        docs_url="/docs" if settings.docs else None,
        redoc_url="/redoc" if settings.docs else None,
        openapi_url="/openapi.json" if settings.docs else None,
    )
    metrics = ApiMetrics(store)
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES, upload_bytes=settings.max_upload_bytes,
                       upload_paths=sources.UPLOAD_ROUTES)  # fmt: skip
    app.add_middleware(NoSniff)
    app.add_middleware(HttpMetrics, metrics=metrics)  # outermost: it sees every answer
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key"],
            expose_headers=["Location", "Retry-After", "Idempotent-Replayed"],
        )

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        # Logged here, in full; the client learns nothing of the inside.
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return _answer(request, 500, "internal error")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # The offending input is not echoed: it may be huge, or NaN, which JSON cannot carry.
        errors = [{"loc": e["loc"], "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        message, param = first_error(errors)
        return _answer(request, 422, message, param=param, detail=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:
            # FastAPI's answer to a body it cannot even decode (not UTF-8 JSON, or multipart
            # that the form parser refused: a bad boundary, too many files or fields): for a
            # client that is one more malformed body, a 422 that says which.
            message = "body is not valid UTF-8 JSON"
            if request.headers.get("content-type", "").lower().startswith("multipart/"):
                message = f"body is not valid multipart/form-data: {exc.detail}"
            error = {"loc": ["body"], "msg": message, "type": "json_invalid"}
            return _answer(request, 422, message, detail=[error])
        code = exc.code if isinstance(exc, JobEnded) else None
        return _answer(request, exc.status_code, str(exc.detail), headers=exc.headers, code=code)

    @app.exception_handler(redis.RedisError)
    async def _redis_down(request: Request, exc: redis.RedisError) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)}
        if is_full(exc):
            message = "the job queue is out of memory (Redis at maxmemory); nothing was queued"
            return _answer(request, 503, message, headers=headers)
        if not isinstance(exc, redis.ConnectionError | redis.TimeoutError):
            log.error("redis error on %s %s", request.method, request.url.path, exc_info=exc)
        return _answer(request, 503, "the job queue is unavailable", headers=headers)

    generate_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        fresh = app.openapi_schema is None
        document = generate_openapi()
        if fresh:
            lift_definitions(document)
        return document

    app.openapi = openapi  # type: ignore[method-assign]

    ctx = make_context(store, storage, settings, endings)
    submitter = submit.Submitter(ctx)
    app.include_router(sources.router(ctx, submitter))
    app.include_router(jobs.router(ctx))
    app.include_router(generations.router(ctx, submitter))
    app.include_router(a1111.router(ctx, submitter))
    app.include_router(a1111.controlnet_router(ctx, submitter))
    app.include_router(models.router(ctx))
    app.include_router(service.router(ctx, metrics))
    return app


def _answer(
    request: Request,
    status: int,
    message: str,
    *,
    headers: Mapping[str, str] | None = None,
    param: str | None = None,
    code: str | None = None,
    detail: Any = None,
) -> JSONResponse:
    """An error answer: OpenAI's shape on its routes, `{"detail": ...}` everywhere else."""
    if request.url.path.startswith(openai_images.PREFIX):
        body = openai_images.error_body(status, message, param, code)
    else:
        body = {"detail": message if detail is None else detail}
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def lift_definitions(document: dict[str, Any]) -> None:
    """Move the nested models of request bodies published by hand (pydantic's `$defs`, whose
    references already point at the components) into the document's components, where those
    references look. FastAPI does this only for the bodies it reads itself."""
    schemas: dict[str, Any] = document.setdefault("components", {}).setdefault("schemas", {})

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for name, schema in node.pop("$defs", {}).items():
                schemas.setdefault(name, schema)
                walk(schema)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(document["paths"])
