"""The service's own routes: the browser playground, `/metrics`, and the health probes."""

from __future__ import annotations

from importlib import resources

import redis
from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.metrics import ApiMetrics
from app.routes.context import RETRY_AFTER_S, Context, error


def router(ctx: Context, metrics: ApiMetrics) -> APIRouter:
    routes = APIRouter()
    store = ctx.store

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

    @routes.get("/", include_in_schema=False)
    def playground() -> Response:
        return _page(pages["playground.html"])

    @routes.get("/playground.js", include_in_schema=False)
    def playground_js() -> Response:
        return _page(pages["playground.js"])

    @routes.get("/playground.css", include_in_schema=False)
    def playground_css() -> Response:
        return _page(pages["playground.css"])

    @routes.get("/metrics", include_in_schema=False)
    def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @routes.get("/healthz", summary="Liveness: the process answers")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @routes.get(
        "/readyz",
        summary="Readiness: Redis answers and a worker's heartbeat is fresh",
        responses=error(503, "Not ready; `detail` says why."),
    )
    def readyz() -> JSONResponse:
        try:
            workers = store.live_workers() if store.ping() else []
        except redis.RedisError:
            return _not_ready("redis unreachable")
        if not workers:
            return _not_ready("no live worker")
        return JSONResponse({"status": "ready", "workers": len(workers)})

    return routes


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


def _not_ready(reason: str) -> JSONResponse:
    return JSONResponse(
        {"detail": reason}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)}
    )
