"""SDXL served beside SD 1.x by one deployment (SDSERVE_MODELS), on the CPU with the tiny models
and a real Valkey: the native and A1111 routes choose either model, one worker holds both, each
job's images are its own model's (an SDXL job's equal the SDXL engine's image for it alone, and
not the SD model's), and img2img runs on SDXL too; SDXL's refiner finishes jobs of the SDXL
model that name it (native and A1111), its passes batched across jobs."""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from app.jobs.storage import open_storage
from tests.conftest import JobStore, wait_for
from tests.test_continuous import serve
from tests.test_rows import max_diff, run
from tests.test_worker import png
from worker.engine import BatchShape, Engine, ImageSpec, Source, Tuning
from worker.previews import Previews
from worker.rows import Lane
from worker.runner import Runner
from worker.settings import WorkerSettings
from worker.tiny import build_tiny_model

SMALL = {"prompt": "a cat", "width": 64, "height": 64, "steps": 3, "seed": 4}


@pytest.fixture(scope="module")
def models(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    xl = build_tiny_model(tmp_path_factory.mktemp("xl") / "tiny-sdxl", "tiny-sdxl")
    refiner = build_tiny_model(tmp_path_factory.mktemp("xl") / "refiner", "tiny-sdxl-refiner")
    return {"sd": str(tiny_model), "xl": str(xl), "refiner": str(refiner)}


@contextmanager
def working(
    settings: WorkerSettings, store: JobStore, engines: dict[str, Engine]
) -> Iterator[Runner]:
    """A worker holding `engines`, stepping in a thread until the block ends."""
    runner = Runner(settings, store, engines, open_storage(settings.storage))
    runner.open()
    done = threading.Event()
    thread = serve(runner, done)
    try:
        yield runner
    finally:
        done.set()
        thread.join(60)
        runner.close()


def all_succeed(served: httpx.Client, ids: dict[str, str]) -> None:
    for name, job_id in ids.items():

        def succeeded(j: str = job_id) -> bool:
            return bool(served.get(f"/jobs/{j}").json()["status"] == "succeeded")

        wait_for(succeeded, 120, name)


def picture() -> str:
    y, x = np.mgrid[0:64, 0:64]
    rgb = np.stack([x * 4, y * 4, (x + y) * 2], -1).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def test_sd_and_sdxl_jobs_in_one_deployment(
    served: httpx.Client, redis_url: str, models: dict[str, str]
) -> None:
    ids = {
        "sd": served.post("/v1/txt2img", json=SMALL).json()["id"],
        "xl": served.post("/v1/txt2img", json={**SMALL, "model": "xl"}).json()["id"],
        "xl img2img": served.post(
            "/v1/img2img", json={**SMALL, "model": "xl", "image": picture(), "strength": 0.6}
        ).json()["id"],
    }
    a1111 = served.post("/sdapi/v1/txt2img", json={
        "prompt": "a cat", "width": 64, "height": 64, "steps": 3, "seed": 4,
        "override_settings": {"sd_model_checkpoint": "xl"}})  # fmt: skip
    # Not done within the API's sync wait (no worker yet): it goes on as a job of model xl.
    assert a1111.status_code == 504 and "/jobs/" in a1111.text, a1111.text
    ids["a1111 xl"] = a1111.json()["detail"].split("/jobs/")[1].split()[0]
    assert served.get(f"/jobs/{ids['a1111 xl']}").json()["request"]["model"] == "xl"
    settings = WorkerSettings(redis_url=redis_url, models=models, worker_name="both",
                              max_batch=4, batching="continuous")  # fmt: skip
    engines = {name: Engine(source, torch.device("cpu"), Tuning(max_batch=4, rows=True))
               for name, source in models.items()}  # fmt: skip
    assert engines["xl"].family.name == "sdxl" and engines["sd"].family.name == "sd"
    store = JobStore.connect(redis_url, 3600, 5)
    with working(settings, store, engines):
        all_succeed(served, ids)

    def lone(engine: Engine, name: str, source: Source | None = None) -> np.ndarray:
        """The job's image from this engine, alone."""
        view = store.view(ids[name])
        assert view is not None
        r = view.request
        spec = ImageSpec(r.prompt, r.negative_prompt, r.guidance_scale, view.seeds[0],
                         r.prompt_syntax)  # fmt: skip
        shape = BatchShape(r.width, r.height, r.steps, r.scheduler)
        return run(engine, [engine.prepare("k", [spec], shape, source)])["k"][0]

    for name, model in [("sd", "sd"), ("xl", "xl"), ("a1111 xl", "xl")]:
        made = np.asarray(png(store, ids[name], 0))
        assert max_diff(made, lone(engines[model], name)) <= 1, name
        other = "sd" if model == "xl" else "xl"
        assert max_diff(made, lone(engines[other], name)) > 10, name  # another family's
    source = Source(Image.open(io.BytesIO(base64.b64decode(picture()))).convert("RGB"), 0.6)
    made = np.asarray(png(store, ids["xl img2img"], 0))
    assert max_diff(made, lone(engines["xl"], "xl img2img", source)) <= 1
    assert "Model: tiny-sdxl" in png(store, ids["xl"], 0).info["parameters"]

    # With the workers' records published: a text-to-image request without a size gets its
    # model's default (SDXL 1024, SD 512); a size sent stays.
    def size_of(body: dict[str, object], route: str = "/v1/txt2img") -> tuple[int, int]:
        job = served.post(route, json=body).json()
        request = served.get(f"/jobs/{job['id']}").json()["request"]
        return request["width"], request["height"]

    assert size_of({"prompt": "a", "model": "xl"}) == (1024, 1024)
    assert size_of({"prompt": "a", "model": "xl", "width": 640}) == (640, 1024)
    assert size_of({"prompt": "a"}) == (512, 512)


def test_a_refiner_finishes_sdxl_jobs_batched_across_jobs(
    served: httpx.Client, redis_url: str, models: dict[str, str]
) -> None:
    """Jobs of the SDXL model with a refiner (native txt2img twice, img2img, A1111's
    `refiner_checkpoint`): each image equals the base-then-refiner passes alone (the tests in
    tests/test_sdxl.py equal those to diffusers' ensemble), the jobs' refiner passes share UNet
    calls, the infotext names the refiner; what cannot run is a 422 naming the field, and a
    worker without the refiner fails such a job (`invalid_request`), staying up."""
    from app.jobs.contract import JobRequest
    from tests.test_sdxl import run_passes
    from worker.tasks import task

    def refused(route: str, body: dict[str, object]) -> str:
        answer = served.post(route, json=body)
        assert answer.status_code == 422, answer.text
        return answer.text

    refine = {"model": "refiner", "switch_at": 0.7}
    xl = {**SMALL, "model": "xl"}
    assert "refiner" in refused("/v1/txt2img", {**xl, "refiner": {"model": "nope"}})
    assert "switch_at" in refused("/v1/txt2img", {**xl, "refiner": {**refine, "switch_at": 1.0}})
    hires = refused("/v1/txt2img", {**xl, "refiner": refine, "hires": {"scale": 2}})
    assert "hires fix" in hires and '"refiner"' in hires
    assert "refiner" in refused("/v1/inpaint", {**xl, "image": picture(), "mask": picture(),
                                                "refiner": refine})  # fmt: skip
    a1111 = {"prompt": "a cat", "width": 64, "height": 64, "steps": 3, "seed": 6,
             "override_settings": {"sd_model_checkpoint": "xl"}}  # fmt: skip
    assert "refiner_checkpoint" in refused("/sdapi/v1/txt2img",
                                           {**a1111, "refiner_checkpoint": "nope"})  # fmt: skip
    assert "refiner_switch_at" in refused("/sdapi/v1/txt2img", {
        **a1111, "refiner_checkpoint": "refiner", "refiner_switch_at": 1.0})  # fmt: skip

    ids = {
        "one": served.post("/v1/txt2img", json={**xl, "refiner": refine}).json()["id"],
        "two": served.post(
            "/v1/txt2img", json={**xl, "seed": 5, "negative_prompt": "rain", "refiner": refine}
        ).json()["id"],
        "img2img": served.post(
            "/v1/img2img", json={**xl, "image": picture(), "strength": 0.9, "refiner": refine}
        ).json()["id"],
    }
    sync = served.post("/sdapi/v1/txt2img", json={**a1111, "refiner_checkpoint": "refiner",
                                                  "refiner_switch_at": 0.7})  # fmt: skip
    assert sync.status_code == 504, sync.text  # no worker yet: it goes on as a job
    ids["a1111"] = sync.json()["detail"].split("/jobs/")[1].split()[0]
    settings = WorkerSettings(redis_url=redis_url, models=models, worker_name="refining",
                              max_batch=4, batching="continuous")  # fmt: skip
    engines = {name: Engine(source, torch.device("cpu"), Tuning(max_batch=4, rows=True))
               for name, source in models.items()}  # fmt: skip
    calls: list[int] = []  # lanes in each of the refiner's UNet calls
    refiner_step = engines["refiner"].step

    def counted(lanes: Sequence[Lane], previews: Collection[str] = ()) -> Previews | None:
        calls.append(len(lanes))
        return refiner_step(lanes, previews)

    engines["refiner"].step = counted  # type: ignore[method-assign]
    store = JobStore.connect(redis_url, 3600, 5)
    with working(settings, store, engines):
        all_succeed(served, ids)
    assert max(calls) >= 3, calls  # the jobs' refiner passes in one call

    def alone(request: JobRequest, source: Source | None) -> np.ndarray:
        work = task(request)
        base, refiner = engines["xl"], engines["refiner"]
        if source is not None:
            source = base.ready(source, work.shape(request))
        lane = work.begin(base, "k", work.shape(request), source, request, refiner)
        return run_passes(base, refiner, {"k": (request, lane)})["k"]

    engines["refiner"].step = refiner_step  # type: ignore[method-assign]
    picture_source = Source(Image.open(io.BytesIO(base64.b64decode(picture()))).convert("RGB"), 0.9)
    for name, job_id in ids.items():
        view = store.view(job_id)
        assert view is not None and getattr(view.request, "refiner", None) is not None
        made = np.asarray(png(store, job_id, 0))
        source = picture_source if name == "img2img" else None
        assert max_diff(made, alone(view.request, source)) <= 1, name
    assert (
        "Refiner: refiner, Refiner switch at: 0.7" in png(store, ids["a1111"], 0).info["parameters"]
    )

    # With the workers' records published, a refiner of another family is refused.
    wrong = refused("/v1/txt2img", {**SMALL, "model": "sd", "refiner": refine})
    assert "SDXL" in wrong and "SD 1.x" in wrong and '"model"' in wrong

    # A worker without the refiner: the job fails, naming it; the worker goes on.
    failing = served.post("/v1/txt2img", json={**xl, "refiner": refine}).json()["id"]
    plain = served.post("/v1/txt2img", json=xl).json()["id"]
    held = {name: models[name] for name in ("xl",)}
    settings = WorkerSettings(redis_url=redis_url, models=models, worker_models=list(held),
                              worker_name="no-refiner", max_batch=4,
                              batching="continuous")  # fmt: skip
    with working(settings, store, {"xl": engines["xl"]}):
        all_succeed(served, {"plain": plain})
    view = served.get(f"/jobs/{failing}").json()
    assert view["status"] == "failed" and view["error"]["code"] == "invalid_request", view
    assert "refiner" in view["error"]["message"]
