"""Several models in one deployment (SDSERVE_MODELS), on the CPU with two tiny models of other
weights and a real Valkey: requests choose a model on every route, unknown names are a 422
listing the served ones, each model has its own queue that only its workers read, a worker
holding both runs each job on its own model, and `/v1/models` and the metrics show each model's
workers and queue."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from app import a1111
from app.jobs.storage import open_storage
from tests.conftest import JobStore, wait_for
from tests.test_continuous import serve
from tests.test_worker import alone, max_diff, png
from worker.engine import Engine, Tuning
from worker.runner import Runner
from worker.settings import WorkerSettings

SMALL = {"prompt": "a cat", "width": 64, "height": 64, "steps": 3, "seed": 4}


@pytest.fixture(scope="module")
def models(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from worker.tiny import build_tiny_model

    other = build_tiny_model(tmp_path_factory.mktemp("other") / "tiny", seed=1)
    return {"anime": str(tiny_model), "photo": str(other)}


@pytest.fixture(scope="module")
def engines(models: dict[str, str]) -> dict[str, Engine]:
    return {name: Engine(source, torch.device("cpu"), Tuning(max_batch=4))
            for name, source in models.items()}  # fmt: skip


def worker(redis_url: str, models: dict[str, str], engines: dict[str, Engine],
           holds: list[str], name: str) -> Runner:  # fmt: skip
    settings = WorkerSettings(redis_url=redis_url, models=models, worker_models=holds,
                              worker_name=name, max_batch=4, batching="continuous")  # fmt: skip
    store = JobStore.connect(redis_url, 3600, 5)
    held = {model: engines[model] for model in settings.held_models()}
    return Runner(settings, store, held, open_storage(settings.storage))


def status(client: httpx.Client, job_id: str) -> str:
    return str(client.get(f"/jobs/{job_id}").json()["status"])


def test_each_model_has_its_queue_and_its_workers(
    served: httpx.Client, redis_url: str, models: dict[str, str], engines: dict[str, Engine]
) -> None:
    default = served.post("/v1/txt2img", json=SMALL).json()["id"]
    chosen = served.post("/v1/txt2img", json={**SMALL, "model": "photo"}).json()["id"]
    assert served.get(f"/jobs/{default}").json()["request"]["model"] == "anime"  # the first
    listed = served.get("/v1/models").json()
    assert [(m["id"], m["default"], m["queued"], m["workers"]) for m in listed["data"]] == [
        ("anime", True, 1, []), ("photo", False, 1, [])]  # fmt: skip
    metrics = served.get("/metrics").text
    assert 'sdserve_queue_depth{model="photo"} 1.0' in metrics

    # A worker holding only "photo" runs its job; "anime"'s waits, first in its own queue.
    only = worker(redis_url, models, engines, ["photo"], "photo-worker")
    only.open()
    done = threading.Event()
    thread = serve(only, done)
    try:
        wait_for(lambda: status(served, chosen) == "succeeded", 120, "the photo job")
        waiting = served.get(f"/jobs/{default}").json()
        assert waiting["status"] == "queued" and waiting["position"] == 0
        # It says that no live worker holds its model, and has no ETA made up from the
        # other model's workers (issue 21, 6); the photo job's worker is counted for photo.
        assert waiting["workers"] == 0 and waiting["eta_s"] is None
        holders = {m["id"]: m["workers"] for m in served.get("/v1/models").json()["data"]}
        assert holders == {"anime": [], "photo": ["photo-worker"]}
    finally:
        done.set()
        thread.join(60)
        only.close()
    # A worker holding both runs it, on its own model.
    both = worker(redis_url, models, engines, [], "both-worker")
    assert list(both.engines.models) == ["anime", "photo"]
    both.open()
    done = threading.Event()
    thread = serve(both, done)
    try:
        wait_for(lambda: status(served, default) == "succeeded", 120, "the anime job")
    finally:
        done.set()
        thread.join(60)
        both.close()
    store = JobStore.connect(redis_url, 3600, 5)
    for job_id, model in [(default, "anime"), (chosen, "photo")]:
        made = png(store, job_id, 0)
        assert max_diff(made, alone(engines[model], store, job_id, 0)) <= 1
        other = "photo" if model == "anime" else "anime"
        assert max_diff(made, alone(engines[other], store, job_id, 0)) > 10  # other weights
        assert f"Model: {Path(models[model]).name}" in made.info["parameters"]


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/v1/txt2img", {**SMALL, "model": "dall-e-3"}),
        ("/v1/images/generations", {"prompt": "x", "model": "dall-e-3"}),
        ("/sdapi/v1/txt2img", {"prompt": "x", "override_settings":
                               {"sd_model_checkpoint": "dall-e-3"}}),
    ],
)  # fmt: skip
def test_an_unknown_model_is_a_422_listing_the_served_ones(
    served: httpx.Client, route: str, body: dict[str, Any]
) -> None:
    answer = served.post(route, json=body)
    assert answer.status_code == 422, answer.text
    assert "anime, photo" in answer.text and "dall-e-3" in answer.text


def test_the_openai_and_a1111_routes_choose_a_model(served: httpx.Client) -> None:
    # No worker here: the waiting routes give up after a second (504), saying why; the job
    # is queued.
    waited = served.post("/v1/images/generations", json={"prompt": "x", "model": "photo",
                                                         "size": "64x64"})  # fmt: skip
    assert waited.status_code == 504
    assert "no live worker holds model photo" in waited.json()["error"]["message"]
    assert [m["queued"] for m in served.get("/v1/models").json()["data"]] == [0, 1]
    fields = a1111.Txt2ImgPayload(prompt="x", override_settings={
        "sd_model_checkpoint": "photo"}).job_fields(["anime", "photo"])  # fmt: skip
    assert fields["model"] == "photo"
    assert a1111.Txt2ImgPayload(prompt="x").job_fields(["anime", "photo"])["model"] == "anime"
    listed = served.get("/sdapi/v1/sd-models").json()
    assert [m["title"] for m in listed] == ["anime", "photo"]
    assert served.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "anime"


def test_models_that_do_not_fit_stop_the_worker_naming_them(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The second model runs out of GPU memory while it loads: exit 2, both named."""
    from worker import engines as runner

    loaded: list[str] = []

    class Filling:
        def __init__(self, source: str, _device: Any, _tuning: Any, vae: Any = None) -> None:
            if loaded:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
            loaded.append(source)

        def warm_up(self) -> None:
            pass

        def weight_bytes(self) -> int:
            return 2**20

    monkeypatch.setattr(runner, "Engine", Filling)
    monkeypatch.setattr(runner, "prepare_model", lambda source: source)
    with pytest.raises(SystemExit) as stopped:
        runner.load_engines({"anime": "a", "photo": "b"}, torch.device("cpu"), Tuning())
    assert stopped.value.code == 2
    assert "model photo does not fit in cpu's memory beside anime" in capsys.readouterr().err
