"""ControlNet through the service (issue 24, 1-2 and 6, native routes), on the CPU with the
tiny model, tiny random ControlNets and a real Valkey: `GET /v1/controlnets`; units on
`/v1/txt2img` (a JSON body past 64 KiB only with their pictures) and `/v1/img2img` (JSON and
multipart), fitted and preprocessed by the API and stored as the job's `control{k}`; what cannot
run is a 422 naming the field; each image equals the engine's for the same control image and
unit alone; the infotext carries A1111's `ControlNet 0: "..."`."""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from app.api import create_app
from app.settings import ApiSettings
from tests.conftest import JobStore, serving, wait_for
from tests.test_rows import max_diff, run
from tests.test_sdxl_service import SMALL, all_succeed, working
from tests.test_worker import png
from worker.controls import ControlUse
from worker.engine import BatchShape, Engine, ImageSpec, Tuning
from worker.settings import WorkerSettings
from worker.tiny_addons import build_tiny_controlnet


@pytest.fixture(scope="module")
def nets(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("controlnets")
    return {name: str(build_tiny_controlnet(tiny_model, root / name, seed=k + 1))
            for k, name in enumerate(("edges", "depth"))}  # fmt: skip


@pytest.fixture
def served(redis_url: str, tiny_model: Path, nets: dict[str, str]) -> Iterator[httpx.Client]:
    settings = ApiSettings(redis_url=redis_url, auth="off", models={"sd": str(tiny_model)},
                           controlnets=nets)  # fmt: skip
    store = JobStore.connect(redis_url, 3600, 5)
    with serving(create_app(store, settings)) as url, httpx.Client(base_url=url) as client:
        yield client


def b64(picture: Image.Image) -> str:
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def noisy(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def worker_parts(
    redis_url: str, model: Path, nets: dict[str, str], name: str
) -> tuple[WorkerSettings, dict[str, Engine], JobStore]:
    """A worker's settings and engine serving the ControlNets, and the store it reads."""
    settings = WorkerSettings(redis_url=redis_url, models={"sd": str(model)}, worker_name=name,
                              max_batch=4, batching="continuous", controlnets=nets)  # fmt: skip
    tuning = Tuning(max_batch=4, rows=True, controlnets=tuple(nets.items()))
    engines = {"sd": Engine(str(model), torch.device("cpu"), tuning)}
    return settings, engines, JobStore.connect(redis_url, 3600, 5)


def test_a_controlnet_that_does_not_fit_the_model_is_refused_once_its_workers_said(
    redis_url: str, tiny_model: Path, nets: dict[str, str], tmp_path: Path
) -> None:
    """An SDXL ControlNet on an SD 1.x model: the worker skips it at load (it cannot steer that
    UNet) and says so in its heartbeat; the API then refuses the unit with a 422 naming
    `controlnets[0].model`, not a job that fails at the worker. Before any worker has said,
    the job is taken (it waits for a worker, as any job does)."""
    from worker.tiny import build_tiny_model

    xl = build_tiny_model(tmp_path / "xl", "tiny-sdxl")
    both = {**nets, "xl-edges": str(build_tiny_controlnet(xl, tmp_path / "xl-edges"))}
    api = ApiSettings(redis_url=redis_url, auth="off", models={"sd": str(tiny_model)},
                      controlnets=both)  # fmt: skip
    store = JobStore.connect(redis_url, 3600, 5)
    unit = {"model": "xl-edges", "image": b64(noisy(64, 64, 1))}
    with serving(create_app(store, api)) as url, httpx.Client(base_url=url) as client:
        early = client.post("/v1/txt2img", json={**SMALL, "controlnets": [unit]})
        assert early.status_code == 202, early.text
        assert client.delete(f"/jobs/{early.json()['id']}").status_code == 200
        settings, engines, _ = worker_parts(redis_url, tiny_model, both, "misfit")
        assert sorted(engines["sd"].controls.models) == ["depth", "edges"]  # type: ignore[union-attr]
        with working(settings, store, engines):

            def refused() -> bool:
                answer = client.post("/v1/txt2img", json={**SMALL, "controlnets": [unit]})
                return answer.status_code == 422

            wait_for(refused, 30, "a 422 once the worker said what it holds")
            answer = client.post("/v1/txt2img", json={**SMALL, "controlnets": [
                {**unit, "model": "edges"}, unit]})  # fmt: skip
            assert answer.status_code == 422, answer.text
            error = answer.json()["detail"][0]
            assert error["loc"] == ["body", "controlnets", 1, "model"]
            assert "no live worker of model sd holds ControlNet 'xl-edges'" in error["msg"]
            # A1111's units: named where they were sent (a disabled one before it is skipped).
            a1111 = client.post(
                "/sdapi/v1/txt2img",
                json={
                    **SMALL,
                    "alwayson_scripts": {
                        "controlnet": {"args": [{"enabled": False}, {**unit, "enabled": True}]}
                    },
                },
            )
            assert a1111.status_code == 422, a1111.text
            assert a1111.json()["detail"][0]["loc"] == [
                "body", "alwayson_scripts", "controlnet", "args", 1, "model"]  # fmt: skip
            fitting = client.post("/v1/txt2img", json={**SMALL, "controlnets": [
                {**unit, "model": "edges"}]})  # fmt: skip
            assert fitting.status_code == 202, fitting.text
            all_succeed(client, {"fitting": fitting.json()["id"]})


def test_controlnets_through_the_service(
    served: httpx.Client, redis_url: str, tiny_model: Path, nets: dict[str, str]
) -> None:
    assert served.get("/v1/controlnets").json()["data"] == [{"name": "edges"}, {"name": "depth"}]
    picture = b64(noisy(64, 64, 1))

    def refused(body: dict[str, Any], route: str = "/v1/txt2img") -> str:
        answer = served.post(route, json=body)
        assert answer.status_code == 422, answer.text
        return answer.text

    unit = {"model": "edges", "image": picture}
    unknown = refused({**SMALL, "controlnets": [{**unit, "model": "sketch"}]})
    assert "unknown ControlNet 'sketch'" in unknown and '"controlnets",0,"model"' in unknown
    assert "must come after start" in refused({**SMALL, "controlnets": [{**unit, "start": 0.6,
                                                                        "end": 0.5}]})  # fmt: skip
    # A hires fix's second pass past a tile's pixels runs in tiles, which ControlNets do not
    # steer: refused up front, not failed at the worker after the first pass.
    tiled = refused({**SMALL, "width": 1024, "height": 1024, "hires": {"scale": 1.5},
                     "controlnets": [unit]})  # fmt: skip
    assert '"hires","scale"' in tiled and "1536x1536, over the 1024x1024 pixels" in tiled
    unread = refused({**SMALL, "controlnets": [{**unit, "image": "bm90IGFuIGltYWdl"}]})
    assert '"controlnets",0,"image"' in unread and "not a PNG, JPEG or WebP" in unread
    assert "'none', 'invert' or 'canny'" in refused(
        {**SMALL, "controlnets": [{**unit, "preprocess": "openpose"}]}
    )
    # Past 64 KiB: refused without ControlNet pictures, taken with them.
    big = b64(noisy(160, 160, 2))
    assert len(big) > 64 * 1024
    assert served.post("/v1/txt2img", json={**SMALL, "prompt": "x" * 70_000}).status_code == 413

    settings, engines, store = worker_parts(redis_url, tiny_model, nets, "controls")
    with working(settings, store, engines):
        ids = {
            "plain": served.post("/v1/txt2img", json=SMALL).json()["id"],
            "edges": served.post("/v1/txt2img", json={
                **SMALL, "controlnets": [{**unit, "weight": 0.8}]}).json()["id"],
            "canny": served.post("/v1/txt2img", json={**SMALL, "controlnets": [
                {"model": "depth", "image": big, "preprocess": "canny", "resize": "crop",
                 "mode": "control", "end": 0.7}]}).json()["id"],
            "hires": served.post("/v1/txt2img", json={
                **SMALL, "hires": {"scale": 2.0, "steps": 2}, "controlnets": [unit]}).json()["id"],
            "img2img": served.post("/v1/img2img", json={
                **SMALL, "image": b64(noisy(64, 64, 3)), "strength": 0.8,
                "controlnets": [{**unit, "mode": "prompt"}]}).json()["id"],
            "form": served.post("/v1/img2img", data={
                **{k: str(v) for k, v in SMALL.items()}, "strength": "0.8",
                "controlnets": json.dumps([{"model": "depth", "image": picture,
                                            "preprocess": "invert"}])},
                files={"image": ("a.png", base64.b64decode(b64(noisy(64, 64, 3))),
                                 "image/png")}).json()["id"],
        }  # fmt: skip
        all_succeed(served, ids)

    def stored(job: str) -> Image.Image:
        answer = served.get(f"/jobs/{ids[job]}/inputs/control0.png")
        assert answer.status_code == 200, answer.text
        return Image.open(io.BytesIO(answer.content)).convert("RGB")

    # The API fitted and preprocessed: Canny's edges are black or white, at the job's size.
    edges = np.asarray(stored("canny"))
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) <= {0, 255}
    assert served.get(f"/jobs/{ids['plain']}/inputs/control0.png").status_code == 404

    def alone(uses: tuple[ControlUse, ...]) -> np.ndarray:
        engine = engines["sd"]
        spec = ImageSpec("a cat", "", 7.5, 4, "plain", controls=uses)
        lane = engine.prepare("k", [spec], BatchShape(64, 64, 3, "dpmpp_2m"))
        return run(engine, [lane])["k"][0]

    made = {name: np.asarray(png(store, job, 0)) for name, job in ids.items()}
    assert max_diff(made["plain"], alone(())) <= 1
    assert max_diff(made["edges"], alone((ControlUse("edges", stored("edges"), 0.8),))) <= 1
    canny = (ControlUse("depth", stored("canny"), end=0.7, guess=True),)
    assert max_diff(made["canny"], alone(canny)) <= 1
    assert max_diff(made["edges"], made["plain"]) > 2, "the ControlNet shows"
    info = png(store, ids["canny"], 0).info["parameters"]
    assert (
        'ControlNet 0: "Module: canny, Model: depth, Weight: 1.0, Resize Mode: Crop and'
        " Resize, Threshold A: 100.0, Threshold B: 200.0, Guidance Start: 0.0, Guidance"
        ' End: 0.7, Control Mode: ControlNet is more important"'
    ) in info, info


def test_a1111_controlnet_through_the_service(
    served: httpx.Client, redis_url: str, tiny_model: Path, nets: dict[str, str]
) -> None:
    """The extension's routes and `alwayson_scripts.controlnet.args`, sent by A1111's client
    package (`webuiapi`) unchanged: its image equals the native route's for the same unit."""
    import webuiapi

    assert served.get("/controlnet/model_list").json() == {"model_list": ["edges", "depth"]}
    assert "canny" in served.get("/controlnet/module_list").json()["module_list"]
    assert served.get("/controlnet/version").json() == {"version": 2}
    detected = served.post("/controlnet/detect", json={
        "controlnet_module": "canny", "controlnet_input_images": [b64(noisy(96, 64, 5))],
        "controlnet_threshold_a": 50, "controlnet_threshold_b": 150}).json()  # fmt: skip
    edges = np.asarray(Image.open(io.BytesIO(base64.b64decode(detected["images"][0]))))
    assert edges.shape[:2] == (64, 96) and set(np.unique(edges)) <= {0, 255}
    # A value of the wrong kind is a 422 naming the field sent (these were 500s).
    for field, value in (("controlnet_threshold_a", "abc"), ("controlnet_threshold_a", math.inf),
                         ("controlnet_threshold_b", [1]), ("controlnet_module", ["canny"]),
                         ("controlnet_threshold_a", -5),
                         # Below the lower threshold's default of 100 (a 500 before).
                         ("controlnet_threshold_b", 1),
                         ("controlnet_processor_res", 100000)):  # fmt: skip
        answer = served.post("/controlnet/detect", content=json.dumps({  # Infinity too
            "controlnet_module": "canny", "controlnet_input_images": [b64(noisy(8, 8, 5))],
            field: value}), headers={"content-type": "application/json"})  # fmt: skip
        assert answer.status_code == 422, (field, value, answer.text)
        assert answer.json()["detail"][0]["loc"] == ["body", field], answer.text
    answer = served.post("/controlnet/detect", json={
        "controlnet_module": "canny", "controlnet_input_images": [b64(noisy(8, 8, 5))],
        "controlnet_threshold_a": 120, "controlnet_threshold_b": 110})  # fmt: skip
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"][0]["msg"] == (
        "Value error, controlnet_threshold_b must not be below controlnet_threshold_a"
    ), answer.text

    picture = noisy(64, 64, 1)
    payload = {"prompt": "a cat", "width": 64, "height": 64, "steps": 3, "seed": 4,
               "cfg_scale": 7.5, "sampler_name": "DPM++ 2M"}  # fmt: skip
    unit = {"enabled": True, "module": "none", "model": "edges [0123abcd]", "weight": 0.8,
            "image": b64(picture), "resize_mode": "Just Resize", "control_mode": "Balanced",
            "low_vram": False, "pixel_perfect": False, "hr_option": "Both"}  # fmt: skip

    def refused(change: dict[str, Any]) -> str:
        body = {**payload, "alwayson_scripts": {"controlnet": {"args": [{**unit, **change}]}}}
        answer = served.post("/sdapi/v1/txt2img", content=json.dumps(body),  # Infinity too
                             headers={"content-type": "application/json"})  # fmt: skip
        assert answer.status_code == 422, answer.text
        return answer.text

    assert '"alwayson_scripts","controlnet","args",0,"model"' in refused({"model": "sketch"})
    assert "is not offered" in refused({"module": "openpose"})
    assert "does not know this field" in refused({"foo": 1})
    assert "a unit's mask is not offered" in refused({"mask": b64(picture)})
    # Values of the wrong kind are 422s naming the extension's field (these were 500s), and a
    # native field's refusal names the extension's field too.
    where = '"alwayson_scripts","controlnet","args",0,'
    for change, field in (({"module": "canny", "threshold_a": "abc"}, "threshold_a"),
                          ({"module": "canny", "threshold_b": math.inf}, "threshold_b"),
                          ({"module": "canny", "threshold_a": -5}, "threshold_a"),
                          ({"module": ["canny"]}, "module"), ({"resize_mode": []}, "resize_mode"),
                          ({"control_mode": {}}, "control_mode"), ({"enabled": "maybe"}, "enabled"),
                          ({"pixel_perfect": [True]}, "pixel_perfect"),
                          ({"guidance_start": "soon"}, "guidance_start")):  # fmt: skip
        assert f'{where}"{field}"' in refused(change), change
    # A check across a unit's fields says it in the extension's names.
    assert "guidance_end (0.2) must come after guidance_start (0.8)" in refused(
        {"guidance_start": 0.8, "guidance_end": 0.2}
    )
    assert "threshold_b must not be below threshold_a" in refused(
        {"module": "canny", "threshold_a": 200, "threshold_b": 100}
    )
    # A refusal of the native request names the extension's units: five units (four at most).
    five = {**payload, "alwayson_scripts": {"controlnet": {"args": [unit] * 5}}}
    answer = served.post("/sdapi/v1/txt2img", json=five)
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"][0]["loc"] == ["body", "alwayson_scripts", "controlnet", "args"]

    settings, engines, store = worker_parts(redis_url, tiny_model, nets, "controls-a1111")
    with working(settings, store, engines):
        native = served.post("/v1/txt2img", json={**SMALL, "controlnets": [
            {"model": "edges", "image": b64(picture), "weight": 0.8}]}).json()["id"]  # fmt: skip
        all_succeed(served, {"native": native})
        host, port = served.base_url.host, served.base_url.port
        client = webuiapi.WebUIApi(host=host, port=port, sampler="DPM++ 2M", steps=3)
        # A fresh `alwayson_scripts`: webuiapi writes its units into the argument's default
        # dict, which every later call in this process would send again.
        made = client.txt2img(prompt="a cat", width=64, height=64, seed=4, cfg_scale=7.5,
                              alwayson_scripts={},
                              controlnet_units=[webuiapi.ControlNetUnit(
                                  image=picture, model="edges", weight=0.8,
                                  resize_mode="Just Resize")])  # fmt: skip
        # img2img: a unit without a picture takes the init image, as the extension does.
        sourced = served.post("/sdapi/v1/img2img", json={
            **payload, "init_images": [b64(picture)], "denoising_strength": 0.5,
            "alwayson_scripts": {"controlnet": {"args": [
                {k: v for k, v in unit.items() if k != "image"}]}}})  # fmt: skip
        assert sourced.status_code == 200, sourced.text
        infotext = json.loads(sourced.json()["info"])["infotexts"][0]
        assert 'ControlNet 0: "Module: none, Model: edges' in infotext
    assert 'ControlNet 0: "Module: none, Model: edges, Weight: 0.8' in made.info["infotexts"][0]
    ours = np.asarray(png(store, native, 0))
    assert max_diff(np.asarray(made.image.convert("RGB")), ours) <= 1
