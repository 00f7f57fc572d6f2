"""The HTTP front end: validates requests, queues jobs, reports them and serves their images."""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
from typing import Any

import redis
from fastapi import Depends, FastAPI, Header, HTTPException, Path, Response, Security
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.auth import ANONYMOUS, Caller
from app.jobs import SEED_MAX, JobStore, JobView, Status, Submission, Txt2ImgRequest, is_job_id
from app.metrics import ApiMetrics, HttpMetrics
from app.settings import ApiSettings

log = logging.getLogger("sdserve.api")

MAX_BODY_BYTES = 64 * 1024
RETRY_AFTER_S = 5

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


def create_app(store: JobStore, settings: ApiSettings) -> FastAPI:
    app = FastAPI(
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
        return JSONResponse({"detail": "internal error"}, status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # The offending input is not echoed: it may be huge, or NaN, which JSON cannot carry.
        errors = [{"loc": e["loc"], "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400:
            # FastAPI's answer to a body it cannot even decode (not UTF-8): for a client that
            # is one more malformed body, the same 422 as broken JSON.
            error = {"loc": ["body"], "msg": "body is not valid UTF-8 JSON", "type": "json_invalid"}
            return JSONResponse({"detail": [error]}, status_code=422)
        return await http_exception_handler(request, exc)

    @app.exception_handler(redis.RedisError)
    async def _redis_down(_request: Request, _exc: redis.RedisError) -> JSONResponse:
        return JSONResponse(
            {"detail": "the job queue is unavailable"},
            status_code=503,
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )

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
        idempotency_key: str | None = Header(
            default=None, min_length=1, max_length=255, pattern=r"^[\x21-\x7e]+$"
        ),
    ) -> Accepted:
        if caller.rate_per_s:
            wait = store.take_token(caller.key_id, caller.rate_per_s, caller.burst)
            if wait > 0:
                http.state.rejected = "rate_limited"
                raise HTTPException(
                    429,
                    f"rate limit: {caller.rate_per_s:g} submissions a second for this key",
                    headers={"Retry-After": str(math.ceil(wait))},
                )
        # What the client sent, before the server fills anything in, identifies a retry.
        sent = hashlib.sha256(request.model_dump_json().encode()).hexdigest()
        normalized = request.model_copy(
            update={
                "seed": secrets.randbelow(SEED_MAX + 1) if request.seed is None else request.seed,
                "timeout_s": request.timeout_s or settings.job_timeout_s,
            }
        )
        idempotency = (idempotency_key, sent) if idempotency_key is not None else None
        outcome, job_id = store.submit(
            normalized, settings.max_queue, caller.key_id, caller.max_in_flight, idempotency
        )
        if outcome is Submission.FULL:
            http.state.rejected = "queue_full"
            raise HTTPException(
                429,
                f"the queue is full ({settings.max_queue} jobs waiting)",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        if outcome is Submission.BUSY:
            http.state.rejected = "in_flight"
            raise HTTPException(
                429,
                f"this key has {caller.max_in_flight} jobs queued or running, its limit",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        if outcome is Submission.CONFLICT:
            raise HTTPException(409, "this Idempotency-Key was used with another request")
        url = f"/jobs/{job_id}"
        response.headers["Location"] = url
        status = Status.QUEUED
        if outcome is Submission.REPLAYED:
            http.state.replayed = True
            response.headers["Idempotent-Replayed"] = "true"
            status = _job(store, job_id, caller).status
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
        data = store.image(job_id, index)
        if data is None:
            raise HTTPException(410, "the images of this job have expired")
        return Response(data, media_type="image/png")

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


def _not_ready(reason: str) -> JSONResponse:
    return JSONResponse(
        {"detail": reason}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)}
    )


def _job(store: JobStore, job_id: str, caller: Caller) -> JobView:
    """The job, if this caller owns it; another key's job is as unknown as a missing one."""
    view = store.view(job_id, caller.key_id) if is_job_id(job_id) else None
    if view is None:
        raise HTTPException(404, "job not found")
    return view
