"""LoRAs and embeddings through the service (issue 23, 1-4, 9), on the CPU with the tiny SD and
SDXL models and a real Valkey: workers publish the LoRAs each model takes (`GET /v1/loras`, A1111's
`/sdapi/v1/loras`, no server paths); native `loras` and A1111's `<lora:name:w>` tags reach the
rows; each image equals the engine's for the same LoRAs alone; what cannot run is a 422 naming
the field or the tag; a file corrupted after it was listed fails its job `lora_unreadable` and
the worker goes on; where the live workers take no LoRAs (no LoRA folder) a LoRA is a 422, and
a job that a worker without LoRAs took fails `invalid_request`, a 422 on the routes that wait;
refresh-loras makes the workers read their folders again; the infotext
carries the tags and A1111's `Lora hashes`. Embeddings: A1111's `/sdapi/v1/embeddings` lists
what the default model's workers loaded and skipped, a prompt that names one is counted with
its vectors and the infotext says `TI hashes`, refresh-embeddings takes a new file."""

from __future__ import annotations

import base64
import hashlib
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
import torch
from PIL import Image

from app.api import create_app
from app.jobs.keys import stream_key
from app.settings import ApiSettings
from tests.conftest import JobStore, serving, wait_for
from tests.test_rows import max_diff, run
from tests.test_sdxl_service import SMALL, all_succeed, working
from tests.test_worker import png
from worker.adapters import LoraUse
from worker.engine import BatchShape, Engine, ImageSpec, Tuning
from worker.lora_files import short_hash
from worker.settings import WorkerSettings
from worker.tiny import build_tiny_model
from worker.tiny_addons import build_tiny_embedding, build_tiny_lora


@pytest.fixture(scope="module")
def models(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    xl = build_tiny_model(tmp_path_factory.mktemp("xl") / "tiny-sdxl", "tiny-sdxl")
    return {"sd": str(tiny_model), "xl": str(xl)}


@pytest.fixture(scope="module")
def folder(models: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    loras = tmp_path_factory.mktemp("loras")
    build_tiny_lora(Path(models["sd"]), loras / "style.safetensors", "peft", rank=4, seed=1)
    build_tiny_lora(Path(models["sd"]), loras / "detail.safetensors", "kohya", rank=8, seed=2)
    build_tiny_lora(Path(models["sd"]), loras / "fragile.safetensors", "peft", rank=4, seed=3)
    build_tiny_lora(Path(models["xl"]), loras / "xlstyle.safetensors", "kohya", rank=4, seed=4)
    return loras


@pytest.fixture(scope="module")
def embeddings(models: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("embeddings")
    build_tiny_embedding(Path(models["sd"]), folder / "glow.safetensors", "a1111", 3)
    build_tiny_embedding(Path(models["xl"]), folder / "xlglow.safetensors", "a1111", 2)
    return folder


def listed(served: httpx.Client) -> dict[str, list[str]]:
    return {e["name"]: e["models"] for e in served.get("/v1/loras").json()["data"]}


def test_loras_through_the_service(
    served: httpx.Client, redis_url: str, models: dict[str, str], folder: Path, embeddings: Path
) -> None:
    assert listed(served) == {}  # no worker yet: nothing published, nothing refused
    settings = WorkerSettings(redis_url=redis_url, models=models, worker_name="loras",
                              max_batch=4, batching="continuous", heartbeat_ttl_s=3,
                              lora_dir=folder, embeddings_dir=embeddings)  # fmt: skip
    tuning = Tuning(max_batch=4, rows=True, loras=folder, lora_slots=4, lora_row_rank=16,
                    embeddings=embeddings)  # fmt: skip
    engines = {name: Engine(source, torch.device("cpu"), tuning)
               for name, source in models.items()}  # fmt: skip
    store = JobStore.connect(redis_url, 3600, 5)

    def refused(route: str, body: dict[str, object]) -> str:
        answer = served.post(route, json=body)
        assert answer.status_code == 422, answer.text
        return answer.text

    with working(settings, store, engines) as runner:
        wait_for(lambda: len(listed(served)) == 4, 30, "the workers' LoRAs")
        assert listed(served) == {"detail": ["sd"], "fragile": ["sd"], "style": ["sd"],
                                  "xlstyle": ["xl"]}  # fmt: skip
        a1111 = served.get("/sdapi/v1/loras").json()
        assert {e["name"] for e in a1111} == {"detail", "fragile", "style", "xlstyle"}
        assert all(e["path"] is None for e in a1111)

        unknown = refused("/v1/txt2img", {**SMALL, "loras": [{"name": "nope"}]})
        assert "no LoRA named 'nope'" in unknown and '"loras",0,"name"' in unknown
        assert "is for xl, not sd" in refused("/v1/txt2img", {**SMALL, "loras": [
            {"name": "style"}, {"name": "xlstyle"}]})  # fmt: skip
        assert "weight" in refused("/v1/txt2img", {**SMALL, "loras": [{"name": "style",
                                                                       "weight": 5}]})  # fmt: skip
        tag = refused("/sdapi/v1/txt2img", {"prompt": "a cat <lora:style:abc>"})
        assert "<lora:style:abc>: 'abc' is not a weight" in tag, tag
        assert '"loc":["body","prompt"]' in tag, tag  # it named the body
        # A tag naming an unknown LoRA: the prompt it was sent in, not a `loras` list.
        tag = refused("/sdapi/v1/txt2img", {"prompt": "a cat <lora:nope:1>"})
        assert "no LoRA named 'nope'" in tag and '"loc":["body","prompt"]' in tag, tag

        ids = {
            "plain": served.post("/v1/txt2img", json=SMALL).json()["id"],
            "style": served.post("/v1/txt2img", json={
                **SMALL, "loras": [{"name": "style", "weight": 0.8}]}).json()["id"],
            "both": served.post("/v1/txt2img", json={
                **SMALL, "loras": [{"name": "style", "weight": 0.5},
                                   {"name": "detail", "weight": 1.2, "text_weight": 0.3}]}
            ).json()["id"],
            "xl": served.post("/v1/txt2img", json={
                **SMALL, "model": "xl", "loras": [{"name": "xlstyle"}]}).json()["id"],
            # Tags only: accepted, then stored as a prompt that did not read back (a 500 on
            # every GET of the job, and the worker failed it as unreadable).
            "tags only": served.post("/v1/txt2img", json={
                **SMALL, "prompt": "<lora:style:0.8>", "prompt_syntax": "a1111"}).json()["id"],
        }  # fmt: skip
        # "both" the A1111 way: its LoRAs as tags, its sampler and guidance named (A1111's
        # defaults are Euler a and 7).
        tagged = served.post("/sdapi/v1/txt2img", json={
            "prompt": "a cat <lora:detail:0.3:1.2> <lora:style:0.5>", "width": 64, "height": 64,
            "steps": 3, "seed": 4, "sampler_name": "DPM++ 2M", "cfg_scale": 7.5})  # fmt: skip
        a1111 = None
        if tagged.status_code == 504:  # past the API's sync wait: it goes on as a job
            ids["a1111"] = tagged.json()["detail"].split("/jobs/")[1].split()[0]
        else:
            assert tagged.status_code == 200, tagged.text
            assert "Lora hashes" in tagged.json()["info"]
            a1111 = np.asarray(Image.open(io.BytesIO(base64.b64decode(
                tagged.json()["images"][0]))).convert("RGB"))  # fmt: skip
        all_succeed(served, ids)

        # Loaded once each (style, detail, xlstyle), then found on the GPU.
        registry = runner.metrics.registry
        misses = registry.get_sample_value("sdserve_worker_lora_uses_total", {"result": "miss"})
        hits = registry.get_sample_value("sdserve_worker_lora_uses_total", {"result": "hit"})
        assert misses == 3 and hits is not None and hits >= 1, (misses, hits)
        assert registry.get_sample_value("sdserve_worker_loras_resident") == 3
        assert registry.get_sample_value("sdserve_worker_lora_load_seconds_count") == 3
        # Embeddings: the default model's, loaded and skipped, as A1111 lists them.
        listing = served.get("/sdapi/v1/embeddings").json()
        assert listing["loaded"]["glow"]["vectors"] == 3, listing
        assert listing["skipped"]["xlglow"]["vectors"] == 2, listing  # SDXL's: not for sd
        glowing = served.post("/v1/txt2img", json={**SMALL, "prompt": "a cat, glow"}).json()
        bare = served.post("/v1/txt2img", json={**SMALL, "prompt": "a cat,"}).json()
        all_succeed(served, {"glow": glowing["id"], "bare": bare["id"]})

        def tokens(job: dict[str, str]) -> int:
            request = served.get(f"/jobs/{job['id']}").json()["request"]
            return int(request["prompt_length"]["prompt"]["tokens"])

        assert tokens(glowing) == tokens(bare) + 3  # the API counts its 3 vectors
        info = png(store, glowing["id"], 0).info["parameters"]
        glow_hash = hashlib.sha256((embeddings / "glow.safetensors").read_bytes()).hexdigest()
        assert f'TI hashes: "glow: {glow_hash[:12]}"' in info, info
        build_tiny_embedding(Path(models["sd"]), embeddings / "late.safetensors", "a1111", 1)
        assert served.post("/sdapi/v1/refresh-embeddings").status_code == 200
        wait_for(lambda: "late" in served.get("/sdapi/v1/embeddings").json()["loaded"], 30,
                 "the refreshed embeddings")  # fmt: skip
        # Corrupted after it was listed: the job fails with its own code, the worker goes on.
        fragile = folder / "fragile.safetensors"
        fragile.write_bytes(fragile.read_bytes()[:200])
        bad = served.post("/v1/txt2img", json={**SMALL, "loras": [{"name": "fragile"}]}).json()
        after = served.post("/v1/txt2img", json={**SMALL, "seed": 9}).json()
        all_succeed(served, {"after": after["id"]})
        wait_for(lambda: served.get(f"/jobs/{bad['id']}").json()["status"] == "failed", 30, "bad")
        error = served.get(f"/jobs/{bad['id']}").json()["error"]
        assert error["code"] == "lora_unreadable" and "fragile" in error["message"]
        # refresh-loras: the workers read the folder again; the broken file leaves the list,
        # and a request naming it is told why.
        assert served.post("/sdapi/v1/refresh-loras").status_code == 200
        wait_for(lambda: "fragile" not in listed(served), 30, "the refreshed list")
        why = refused("/v1/txt2img", {**SMALL, "loras": [{"name": "fragile"}]})
        assert "skip LoRA 'fragile'" in why and '"loras",0,"name"' in why, why

    def alone(model: str, uses: tuple[LoraUse, ...], prompt: str = "a cat") -> np.ndarray:
        engine = engines[model]
        assert engine.adapters is not None
        engine.adapters.fetch("alone", uses)
        spec = ImageSpec(prompt, "", 7.5, 4, "plain", loras=uses)
        try:
            return run(engine, [engine.prepare("k", [spec], BatchShape(64, 64, 3, "dpmpp_2m"))])[
                "k"
            ][0]
        finally:
            engine.adapters.release("alone")

    style = (LoraUse("style", 0.8, 0.8),)
    both = (LoraUse("style", 0.5, 0.5), LoraUse("detail", 0.3, 1.2))
    made = {name: np.asarray(png(store, job, 0)) for name, job in ids.items()}
    assert max_diff(made["plain"], alone("sd", ())) <= 1
    assert max_diff(made["style"], alone("sd", style)) <= 1
    assert max_diff(made["both"], alone("sd", both)) <= 1
    assert max_diff(made["xl"], alone("xl", (LoraUse("xlstyle", 1, 1),))) <= 1
    assert max_diff(made["style"], made["plain"]) > 2
    # The tags' LoRAs, the text without them: the same image, whichever way it came back.
    assert max_diff(made.get("a1111", a1111), made["both"]) <= 1
    info = png(store, ids["both"], 0).info["parameters"]
    first = info.splitlines()[0]
    assert first == "a cat <lora:style:0.5> <lora:detail:0.3:1.2>", first
    hashes = {name: short_hash(folder / f"{name}.safetensors") for name in ("style", "detail")}
    assert f'Lora hashes: "style: {hashes["style"]}, detail: {hashes["detail"]}"' in info


def test_loras_where_no_worker_takes_them(redis_url: str, models: dict[str, str]) -> None:
    """Workers without SDSERVE_LORA_DIR: once their heartbeat says so, a LoRA is a 422 naming
    it, natively and as an A1111 tag. A1111's call queued before any worker had said waits for
    its job, which such a worker fails `invalid_request`: a 422 too (it was a 500)."""
    api = ApiSettings(redis_url=redis_url, auth="off", models={"sd": models["sd"]},
                      sync_timeout_s=120)  # fmt: skip
    store = JobStore.connect(redis_url, 3600, 5)
    settings = WorkerSettings(redis_url=redis_url, models={"sd": models["sd"]},
                              worker_name="plain", max_batch=4, batching="continuous",
                              heartbeat_ttl_s=3)  # fmt: skip
    engines = {"sd": Engine(models["sd"], torch.device("cpu"), Tuning(max_batch=4, rows=True))}
    tagged = {"prompt": "a cat <lora:style:0.8>", "width": 64, "height": 64, "steps": 2}
    queue = redis.Redis.from_url(redis_url)  # the job is queued before a worker starts
    with (
        serving(create_app(store, api)) as url,
        httpx.Client(base_url=url, timeout=150) as client,
        ThreadPoolExecutor(2) as pool,
    ):
        waiting = pool.submit(client.post, "/sdapi/v1/txt2img", json=tagged)
        openai = pool.submit(client.post, "/v1/images/generations", json={
            "prompt": "a cat", "size": "64x64", "steps": 2,
            "loras": [{"name": "style"}]})  # fmt: skip
        wait_for(lambda: queue.xlen(stream_key("sd")) == 2, 30, "the queued jobs")
        with working(settings, store, engines):
            answer = waiting.result(150)
            assert answer.status_code == 422, answer.text
            assert "serves no LoRAs" in answer.text, answer.text
            answer = openai.result(150)
            assert answer.status_code == 422, answer.text
            assert answer.json()["error"]["code"] == "invalid_request", answer.text

            def refused() -> bool:
                return client.post("/v1/txt2img", json={
                    **SMALL, "loras": [{"name": "style"}]}).status_code == 422  # fmt: skip

            wait_for(refused, 30, "the heartbeat that says no LoRAs")
            native = client.post("/v1/txt2img", json={**SMALL, "loras": [{"name": "style"}]})
            assert "no live worker of model sd takes LoRAs" in native.text, native.text
            assert '"loras",0,"name"' in native.text, native.text
            tag = client.post("/sdapi/v1/txt2img", json=tagged)
            assert tag.status_code == 422 and "takes LoRAs" in tag.text, tag.text
            plain = client.post("/sdapi/v1/txt2img", json={**tagged, "prompt": "a cat"})
            assert plain.status_code == 200, plain.text  # without a LoRA: served
