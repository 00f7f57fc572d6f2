"""The API's Prometheus metrics: its own requests, plus the queue's state read from Redis.

One process per container, no multiprocess mode: each API replica counts its own requests. The
queue figures (depth, lag, live workers, dead letters, job durations) are global, read from
Redis at scrape time, so every replica reports the same values; aggregate them with max().
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.jobs.api_store import ApiStore

HTTP_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
SUBMITS = {"/v1/txt2img", "/v1/images/generations"}  # POSTed to, these make jobs
# A label value comes from this set only: a client's made-up method names are "other", so no
# request can add a series.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Why a submission was refused, by status; a 429 says which limit in `scope["state"]`.
REJECTIONS = {401: "unauthorized", 409: "idempotency_conflict", 413: "too_large",
              422: "invalid", 503: "unavailable"}  # fmt: skip


class ApiMetrics:
    """The metrics of one API app, in a registry of its own."""

    def __init__(self, store: ApiStore) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "sdserve_http_requests",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "sdserve_http_request_duration_seconds",
            "Time to answer an HTTP request, by route template and method.",
            ["route", "method"],
            buckets=HTTP_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.accepted = Counter(
            "sdserve_jobs_accepted",
            "Jobs queued (202), by model.",
            ["model"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "sdserve_jobs_rejected",
            "Submissions refused, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.registry.register(QueueCollector(store))


class QueueCollector(Collector):
    """Read at scrape time from Redis; when Redis does not answer, only `sdserve_redis_up`."""

    def __init__(self, store: ApiStore) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily | HistogramMetricFamily]:
        up = GaugeMetricFamily("sdserve_redis_up", "1 if Redis answered this scrape, else 0.")
        try:
            state = self.store.queue_state()
        except redis.RedisError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        # Per model: the label's values are the configured models, a bounded set.
        for name, doc, by_model in [
            ("sdserve_queue_depth", "Jobs waiting for a worker, by model.", state.queued),
            ("sdserve_queue_lag", "Stream entries no worker has read yet, by model.", state.lag),
            (
                "sdserve_stream_length",
                "Entries in the model's job stream (acked ones are trimmed).",
                state.stream_length,
            ),
        ]:
            family = GaugeMetricFamily(name, doc, labels=["model"])
            for model, count in by_model.items():
                family.add_metric([model], count)
            yield family
        for name, doc, overall in [
            ("sdserve_workers_live", "Workers with a fresh heartbeat.", state.workers),
            ("sdserve_dead_letters", "Entries in the dead-letter stream.", state.dead_letters),
            (
                "sdserve_webhook_backlog",
                "Webhook events not yet sent (all senders).",
                state.webhook_backlog,
            ),
        ]:
            yield GaugeMetricFamily(name, doc, value=overall)
        durations = HistogramMetricFamily(
            "sdserve_job_duration_seconds",
            "Accepted to finished, by final status (all replicas, all time).",
            labels=["status"],
        )
        for status, (buckets, total) in state.durations.items():
            durations.add_metric([status], buckets, total)
        yield durations


class HttpMetrics:
    """Count and time every request by its route template (never the raw path: ids would make
    one series a job)."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            method = scope["method"] if scope["method"] in METHODS else "other"
            self.metrics.requests.labels(template, method, str(status)).inc()
            self.metrics.latency.labels(template, method).observe(time.perf_counter() - started)
            if method == "POST" and scope["path"] in SUBMITS:
                state = scope.get("state", {})
                if state.get("accepted"):  # a new job (not a replay), whatever came after
                    self.metrics.accepted.labels(state["accepted"]).inc()
                elif status >= 400:
                    reason = state.get("rejected") or REJECTIONS.get(status, "error")
                    self.metrics.rejected.labels(reason).inc()
