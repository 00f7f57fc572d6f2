"""The HTTP front end: validates requests, queues jobs, reports them and serves their images."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, NoReturn

import redis
from fastapi import Depends, FastAPI, Header, HTTPException, Path, Response, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import openai_images
from app.auth import ANONYMOUS, Caller
from app.jobs.api_store import ApiStore
from app.jobs.contract import (
    SEED_MAX,
    TERMINAL,
    JobView,
    Status,
    Submission,
    Txt2ImgRequest,
    is_job_id,
)
from app.jobs.store import is_full
from app.jobs.webhook_store import WebhookStore
from app.metrics import ApiMetrics, HttpMetrics
from app.openai_images import first_error
from app.settings import ApiSettings
from app.storage import Storage, expiry_cutoff, open_storage, result_key
from app.webhooks import WebhookSender, refusal

log = logging.getLogger("sdserve.api")

MAX_BODY_BYTES = 64 * 1024
RETRY_AFTER_S = 5
PRESIGNED_URL_S = 300
# The openai SDK retries 409, 429 and 5xx; where a retry cannot help, it is told not to.
NO_RETRY = {"x-should-retry": "false"}

API_DESCRIPTION = """
Asynchronous text-to-image. `POST /v1/txt2img` answers `202` at once with a job id; poll
`GET /jobs/{id}` until `status` is `succeeded`, then download `GET /jobs/{id}/images/{k}.png`.

Requests of the same width, height, steps and scheduler run together in one batch; prompt,
negative prompt, guidance scale and seed are per image, each image with its own random
generator. The same request and seed give the same image, alone or beside other requests: what
the neighbours ask for never matters, and the batch's size and the image's place in it change a
pixel by at most one level of 8-bit colour.
"""


class Accepted(BaseModel):
    id: str
    status: Status = Field(description="`queued`, or where a replay's job has got to.")
    url: str


class Detail(BaseModel):
    detail: str


def _error(status: int, description: str) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": Detail, "description": description}}


_NOT_FOUND = _error(404, "No such job for this API key (or a malformed id).")
_UNAUTHORIZED = _error(401, "Missing, malformed or unknown API key (`WWW-Authenticate: Bearer`).")
_UNAVAILABLE = _error(503, "The queue (Redis) is unreachable; retry after `Retry-After` seconds.")
# The `Idempotency-Key` header of both submitting routes: printable ASCII, no spaces.
IDEMPOTENCY_KEY = Header(default=None, min_length=1, max_length=255, pattern=r"^[\x21-\x7e]+$")


class JobEnded(HTTPException):
    """A job that ended without images, answered to a client that waited for it. Sending the
    call again cannot change the answer (a retry finds the same job), unless it timed out."""

    def __init__(self, status: int, detail: str, code: str | None) -> None:
        super().__init__(status, detail, headers=None if status == 504 else NO_RETRY)
        self.code = code


class NoSniff:
    """`X-Content-Type-Options: nosniff` on every answer: a browser never guesses a type."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["X-Content-Type-Options"] = "nosniff"
            await send(message)

        await self.app(scope, receive, send_with_header)


class BodyLimit:
    """Refuse request bodies over a size before anything parses them (413)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            status = 413 if declared.isdigit() else 400
            response = JSONResponse({"detail": self._message(declared)}, status_code=status)
            await response(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            # A chunked body has no length up front: count it as it arrives.
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self._message(None))
            return message

        await self.app(scope, counted, send)

    def _message(self, declared: bytes | None) -> str:
        if declared is not None and not declared.isdigit():
            return "Content-Length is not a number"
        return f"request body is larger than {self.max_bytes} bytes"


class Sweeper:
    """Deletes images older than the result TTL from storage, in one API process at a time
    (a lock in Redis per interval): a directory has no lifecycle rules, and this way a bucket
    needs none either."""

    def __init__(self, store: ApiStore, storage: Storage, settings: ApiSettings) -> None:
        self.store, self.storage, self.settings = store, storage, settings
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sweeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()

    def _loop(self) -> None:
        interval = self.settings.sweep_interval_s
        while not self._stopping.wait(interval):
            try:
                if self.store.sweep_turn(interval):
                    removed = self.storage.sweep(expiry_cutoff(self.settings.result_ttl_s))
                    log.info("swept %d expired images from storage", removed)
            except Exception:  # storage or Redis away: the next turn tries again
                log.exception("sweeping expired images failed")


def create_app(store: ApiStore, settings: ApiSettings) -> FastAPI:
    storage = open_storage(settings.storage)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
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
        yield
        sweeper.stop()
        if sender is not None:
            sender.stop()

    app = FastAPI(
        lifespan=lifespan,
        title="sdserve",
        version="0.1.0",
        description=API_DESCRIPTION,
        responses=_UNAVAILABLE,
        docs_url="/docs" if settings.docs else None,
        redoc_url="/redoc" if settings.docs else None,
        openapi_url="/openapi.json" if settings.docs else None,
    )
    metrics = ApiMetrics(store)
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)
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
    keyring = settings.keyring()
    bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>`")

    def authenticate(
        credentials: HTTPAuthorizationCredentials | None = Security(bearer),
    ) -> Caller:
        if settings.auth == "off":
            return ANONYMOUS
        caller = keyring.find(credentials.credentials) if credentials else None
        if caller is None:
            challenge = 'Bearer error="invalid_token"' if credentials else "Bearer"
            what = "unknown API key" if credentials else "missing API key: Authorization: Bearer"
            raise HTTPException(401, what, headers={"WWW-Authenticate": challenge})
        return caller

    authenticated = Depends(authenticate)

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
            # FastAPI's answer to a body it cannot even decode (not UTF-8): for a client that
            # is one more malformed body, the same 422 as broken JSON.
            message = "body is not valid UTF-8 JSON"
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

    def submit_job(
        request: Txt2ImgRequest,
        http: Request,
        caller: Caller,
        idempotency_key: str | None,
        retrying: bool | None = None,
    ) -> tuple[str, Status, bool]:
        """Limits, then the job queued (or a replay's job found): its id, its status, and
        whether it is a replay. `retrying` (OpenAI route, no Idempotency-Key): whether the
        client says this is its automatic retry of a call, which then lands on the job the
        first try made."""

        def too_many(reason: str, message: str, retry_after_s: float) -> NoReturn:
            http.state.rejected = reason  # for the metrics
            raise HTTPException(
                429, message, headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))}
            )

        if request.webhook_url is not None:
            _check_webhook(request.webhook_url, settings)
        # What the client sent, before the server fills anything in, identifies a retry.
        sent = hashlib.sha256(request.model_dump_json().encode()).hexdigest()
        normalized = request.model_copy(
            update={
                "seed": secrets.randbelow(SEED_MAX + 1) if request.seed is None else request.seed,
                "timeout_s": request.timeout_s or settings.job_timeout_s,
            }
        )
        idempotency = (idempotency_key, sent) if idempotency_key is not None else None
        retry = (sent, retrying) if retrying is not None and idempotency is None else None
        rate = (caller.rate_per_s, caller.burst) if caller.rate_per_s else None
        outcome, job_id = store.submit(normalized, settings.max_queue, caller.key_id,
                                       caller.max_in_flight, idempotency, rate, retry)  # fmt: skip
        if outcome is Submission.LATE:  # Redis stalled; the call created nothing
            raise redis.TimeoutError("the submission ran too late on Redis")
        if outcome is Submission.RATE_LIMITED:
            message = f"rate limit: {caller.rate_per_s:g} submissions a second for this key"
            too_many("rate_limited", message, float(job_id))
        if outcome is Submission.FULL:
            message = f"the queue is full ({settings.max_queue} jobs waiting)"
            too_many("queue_full", message, RETRY_AFTER_S)
        if outcome is Submission.BUSY:
            message = f"this key has {caller.max_in_flight} jobs queued or running, its limit"
            too_many("in_flight", message, RETRY_AFTER_S)
        if outcome is Submission.CONFLICT:
            raise HTTPException(
                409, "this Idempotency-Key was used with another request", headers=NO_RETRY
            )
        if outcome is Submission.REPLAYED:
            return job_id, _job(store, job_id, caller).status, True
        http.state.accepted = True  # for the metrics: a new job
        return job_id, Status.QUEUED, False

    @app.post(
        "/v1/txt2img",
        status_code=202,
        response_model=Accepted,
        responses={
            **_UNAUTHORIZED,
            **_error(409, "This Idempotency-Key came with another request."),
            **_error(413, "Body over 64 KiB."),
            422: {"description": "Invalid field."},
            **_error(
                429,
                "The queue is full, or this key's rate or jobs in flight are at their limit;"
                " retry after `Retry-After` seconds.",
            ),
        },
        summary="Queue a text-to-image job",
        description="With an `Idempotency-Key` header, sending the same request again (a retry "
        "after a lost answer) answers the job the first one made, instead of a second job.",
    )
    def txt2img(
        request: Txt2ImgRequest,
        http: Request,
        response: Response,
        caller: Caller = authenticated,
        idempotency_key: str | None = IDEMPOTENCY_KEY,
    ) -> Accepted:
        job_id, status, replayed = submit_job(request, http, caller, idempotency_key)
        url = f"/jobs/{job_id}"
        response.headers["Location"] = url
        if replayed:
            response.headers["Idempotent-Replayed"] = "true"
        return Accepted(id=job_id, status=status, url=url)

    @app.get(
        "/jobs/{job_id}",
        response_model=JobView,
        responses={**_UNAUTHORIZED, **_NOT_FOUND},
        summary="A job",
    )
    def get_job(job_id: str, caller: Caller = authenticated) -> JobView:
        return _job(store, job_id, caller)

    @app.delete(
        "/jobs/{job_id}",
        response_model=JobView,
        responses={**_UNAUTHORIZED, **_NOT_FOUND, **_error(409, "The job had already ended.")},
        summary="Cancel a job",
        description="A queued job is canceled at once; a running one stops at its next step.",
    )
    def cancel_job(job_id: str, caller: Caller = authenticated) -> JobView:
        _job(store, job_id, caller)  # an unknown id (or another key's) is a 404, not a 409
        if not store.cancel(job_id, caller.key_id):
            raise HTTPException(409, f"job already {_job(store, job_id, caller).status.value}")
        return _job(store, job_id, caller)

    @app.get(
        "/jobs/{job_id}/images/{index}.png",
        response_class=Response,
        responses={
            200: {"content": {"image/png": {}}, "description": "The PNG."},
            **_UNAUTHORIZED,
            **_NOT_FOUND,
            **_error(409, "The job has not succeeded (yet)."),
            **_error(410, "The images have expired."),
        },
        summary="One image of a finished job",
    )
    def get_image(
        job_id: str, index: int = Path(ge=0, le=7), caller: Caller = authenticated
    ) -> Response:
        view = _job(store, job_id, caller)
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

    @app.get(
        "/jobs/{job_id}/events",
        response_class=StreamingResponse,
        responses={
            200: {
                "content": {"text/event-stream": {}},
                "description": "One event a change: `event:` the status, `data:` the job.",
            },
            **_UNAUTHORIZED,
            **_NOT_FOUND,
        },
        summary="A job's changes, live (Server-Sent Events)",
        description="An event whenever the status, queue position or step changes; the stream "
        "ends with the job (succeeded, failed, canceled). A `: keep-alive` comment every 15 s.",
    )
    def job_events(job_id: str, caller: Caller = authenticated) -> StreamingResponse:
        _job(store, job_id, caller)  # a 404 now, not a stream that ends at once
        return StreamingResponse(
            _events(store, job_id, caller.key_id),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.post(
        "/v1/images/generations",
        response_model=openai_images.ImagesResponse,
        responses={
            **_openai_error(401, "Missing, malformed or unknown API key."),
            **_openai_error(409, "The job was canceled, or the Idempotency-Key reused."),
            **_openai_error(413, "Body over 64 KiB."),
            **_openai_error(422, "Invalid field (`param` names it)."),
            **_openai_error(429, "Queue full, or this key's rate or jobs in flight at a limit."),
            **_openai_error(
                500, "The job failed (`code` says why: numerical, out_of_memory, ...)."
            ),
            **_openai_error(503, "The queue (Redis) is unreachable."),
            **_openai_error(504, "Not done within SDSERVE_SYNC_TIMEOUT_S; the job goes on."),
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
            submit_job, request.job(), http, caller, idempotency_key, retrying
        )
        deadline = time.monotonic() + settings.sync_timeout_s
        while True:
            view = await run_in_threadpool(_job, store, job_id, caller)
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

    # The browser playground: three fixed files of this package, read once.
    static = resources.files("app") / "static"
    pages = {
        name: ((static / name).read_bytes(), media_type)
        for name, media_type in [
            ("playground.html", "text/html; charset=utf-8"),
            ("playground.js", "text/javascript; charset=utf-8"),
            ("playground.css", "text/css; charset=utf-8"),
        ]
    }

    @app.get("/", include_in_schema=False)
    def playground() -> Response:
        return _page(pages["playground.html"])

    @app.get("/playground.js", include_in_schema=False)
    def playground_js() -> Response:
        return _page(pages["playground.js"])

    @app.get("/playground.css", include_in_schema=False)
    def playground_css() -> Response:
        return _page(pages["playground.css"])

    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", summary="Liveness: the process answers")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        summary="Readiness: Redis answers and a worker's heartbeat is fresh",
        responses=_error(503, "Not ready; `detail` says why."),
    )
    def readyz() -> JSONResponse:
        try:
            workers = store.live_workers() if store.ping() else []
        except redis.RedisError:
            return _not_ready("redis unreachable")
        if not workers:
            return _not_ready("no live worker")
        return JSONResponse({"status": "ready", "workers": len(workers)})

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


# The playground runs only its own script, talks only to this server, and shows images it
# fetched itself (blob: URLs).
PLAYGROUND_CSP = (
    "default-src 'self'; img-src 'self' blob:; script-src 'self'; style-src 'self';"
    " connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


def _page(page: tuple[bytes, str]) -> Response:
    content, media_type = page
    return Response(
        content, media_type=media_type, headers={"Content-Security-Policy": PLAYGROUND_CSP}
    )


def _openai_error(status: int, description: str) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": openai_images.OpenAIErrorBody, "description": description}}


EVENT_POLL_S = 0.25
KEEPALIVE_S = 15.0


async def _events(store: ApiStore, job_id: str, owner: str) -> AsyncIterator[str]:
    """SSE: the job whenever what a watcher sees of it changes, until it ends."""
    last: tuple[Any, ...] | None = None
    quiet = 0.0
    while True:
        view = await run_in_threadpool(store.view, job_id, owner)
        if view is None:  # the record itself expired
            return
        seen = (view.status, view.position, view.progress)
        if seen != last:
            yield f"event: {view.status.value}\ndata: {view.model_dump_json()}\n\n"
            last, quiet = seen, 0.0
        elif quiet >= KEEPALIVE_S:
            yield ": keep-alive\n\n"
            quiet = 0.0
        if view.status in TERMINAL:
            return
        await asyncio.sleep(EVENT_POLL_S)
        quiet += EVENT_POLL_S


def _check_webhook(url: str, settings: ApiSettings) -> None:
    """422 on webhook_url when this server sends no webhooks or the target is refused."""
    reason = (
        "this server sends no webhooks (SDSERVE_WEBHOOK_SECRET is not set)"
        if settings.webhook_secret is None
        else refusal(url, settings.webhook_allow_private)
    )
    if reason:
        raise RequestValidationError(
            [{"loc": ("body", "webhook_url"), "msg": reason, "type": "value_error"}]
        )


def _not_ready(reason: str) -> JSONResponse:
    return JSONResponse(
        {"detail": reason}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)}
    )


def _job(store: ApiStore, job_id: str, caller: Caller) -> JobView:
    """The job, if this caller owns it; another key's job is as unknown as a missing one."""
    view = store.view(job_id, caller.key_id) if is_job_id(job_id) else None
    if view is None:
        raise HTTPException(404, "job not found")
    return view
