"""The HTTP API over real HTTP with a real Redis server (no worker, no model)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from app.api import create_app
from app.jobs.contract import Txt2ImgRequest
from app.jobs.storage import open_storage, result_key
from app.settings import ApiSettings
from tests.conftest import JobStore, enqueue, free_port, serving

VALID = {"prompt": "a red fox", "seed": 1}


def fields(response: httpx.Response) -> set[str]:
    """The request fields a 422 names."""
    assert response.status_code == 422, response.text
    return {str(e["loc"][1]) if len(e["loc"]) > 1 else "body" for e in response.json()["detail"]}


def test_accepts_with_202_location_and_id(api: httpx.Client) -> None:
    r = api.post("/v1/txt2img", json=VALID)
    assert r.status_code == 202
    body = r.json()
    assert body["status"] == "queued"
    assert body["url"] == f"/jobs/{body['id']}" == r.headers["location"]
    assert len(body["id"]) == 22


def test_job_view_while_queued(api: httpx.Client) -> None:
    ids = [api.post("/v1/txt2img", json={**VALID, "n": 3}).json()["id"] for _ in range(3)]
    views = [api.get(f"/jobs/{i}").json() for i in ids]
    assert [v["position"] for v in views] == [0, 1, 2]
    v = views[0]
    assert v["status"] == "queued" and v["progress"] is None and v["error"] is None
    assert v["started_at"] is None and v["finished_at"] is None and v["images"] == []
    assert v["seeds"] == [1, 2, 3]
    assert v["request"] == {
        "kind": "txt2img", "model": "default", "hires": None, "refiner": None, "clip_skip": 1,
        "loras": [], "vae": None, "controlnets": [], "prompt": "a red fox", "negative_prompt": "",
        "prompt_syntax": "plain",
        "prompt_length": None, "width": 512,
        "height": 512, "steps": 25,
        "guidance_scale": 7.5, "scheduler": "dpmpp_2m", "seed": 1, "n": 3, "timeout_s": 3600,
        "webhook_url": None, "webhook_events": ["succeeded", "failed", "canceled"],
    }  # fmt: skip


def test_server_chooses_a_seed_when_absent(api: httpx.Client) -> None:
    job = api.post("/v1/txt2img", json={"prompt": "x", "n": 2}).json()
    view = api.get(job["url"]).json()
    seed = view["request"]["seed"]
    assert 0 <= seed < 2**32
    assert view["seeds"] == [seed, (seed + 1) % 2**32]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"seed": 1}, "prompt"),
        ({**VALID, "width": 2056}, "width"),
        ({**VALID, "width": 1536, "height": 1024}, "height"),  # over 1024 x 1024 pixels
        ({**VALID, "height": 56}, "height"),
        ({**VALID, "steps": 101}, "steps"),
        ({**VALID, "steps": "25"}, "steps"),
        ({**VALID, "guidance_scale": 30.5}, "guidance_scale"),
        ({**VALID, "scheduler": "k_euler"}, "scheduler"),
        ({**VALID, "seed": 2**32}, "seed"),
        ({**VALID, "n": 9}, "n"),
        ({**VALID, "nsfw": False}, "nsfw"),
        ({**VALID, "prompt": "x" * 2001}, "prompt"),
    ],
)
def test_invalid_fields_are_named_in_a_422(
    api: httpx.Client, body: dict[str, Any], field: str
) -> None:
    assert field in fields(api.post("/v1/txt2img", json=body))


@pytest.mark.parametrize("key", ["³", "2", "a.1.b", "x.²"])
def test_a_refused_setting_of_any_name_is_a_422_naming_it(api: httpx.Client, key: str) -> None:
    """A setting the caller cannot choose here: whatever the key (the fuzzer sent "³", which
    `str.isdigit` calls a digit and `int` refuses: a 500 then), a 422 names it."""
    r = api.post("/sdapi/v1/options", json={key: 1})
    assert r.status_code == 422, r.text
    loc = r.json()["detail"][0]["loc"]
    assert ".".join(str(part) for part in loc[1:]) == key


def test_edges_are_accepted(api: httpx.Client) -> None:
    for body in [
        {"prompt": "x" * 2000, "width": 1024, "height": 1024, "steps": 100, "n": 8},
        {"prompt": "x", "width": 64, "height": 64, "steps": 1, "guidance_scale": 0, "seed": 0},
        {"prompt": "x", "guidance_scale": 30, "seed": 2**32 - 1, "scheduler": "unipc"},
    ]:
        assert api.post("/v1/txt2img", json=body).status_code == 202, body


@pytest.mark.parametrize(
    "raw", [b"{bad json", b"[1, 2]", b"null", b'"prompt"', b'{"prompt": NaN}', b""]
)
def test_malformed_bodies_are_422(api: httpx.Client, raw: bytes) -> None:
    r = api.post("/v1/txt2img", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text


def test_a_body_over_64_kib_is_413(api: httpx.Client) -> None:
    big = json.dumps({"prompt": "x", "negative_prompt": "y" * 70_000}).encode()
    r = api.post("/v1/txt2img", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        for start in range(0, len(big), 4096):
            yield big[start : start + 4096]

    r = api.post("/v1/txt2img", content=chunked(), headers={"content-type": "application/json"})
    assert r.request.headers["transfer-encoding"] == "chunked"
    assert r.status_code == 413


def test_unknown_and_malformed_ids_are_404(api: httpx.Client) -> None:
    for path in ["/jobs/AAAAAAAAAAAAAAAAAAAAAA", "/jobs/short", "/jobs/..%2F..%2Fetc",
                 "/jobs/AAAAAAAAAAAAAAAAAAAAAA/images/0.png"]:  # fmt: skip
        r = api.get(path)
        assert r.status_code == 404, path
    assert api.delete("/jobs/AAAAAAAAAAAAAAAAAAAAAA").status_code == 404


def test_cancel_a_queued_job_then_not_again(api: httpx.Client) -> None:
    first = api.post("/v1/txt2img", json=VALID).json()
    second = api.post("/v1/txt2img", json=VALID).json()
    r = api.delete(first["url"])
    assert r.status_code == 200
    assert r.json()["status"] == "canceled" and r.json()["finished_at"] is not None
    assert api.get(second["url"]).json()["position"] == 0  # moved up
    again = api.delete(first["url"])
    assert again.status_code == 409 and "canceled" in again.json()["detail"]
    assert api.get(f"{first['url']}/images/0.png").status_code == 409


def test_images_of_an_unfinished_job_are_409(api: httpx.Client) -> None:
    job = api.post("/v1/txt2img", json=VALID).json()
    r = api.get(f"{job['url']}/images/0.png")
    assert r.status_code == 409 and "queued" in r.json()["detail"]
    assert api.get(f"{job['url']}/images/8.png").status_code == 422


def test_readiness_needs_a_live_worker(api: httpx.Client, store: JobStore) -> None:
    assert api.get("/healthz").json() == {"status": "ok"}
    r = api.get("/readyz")
    assert r.status_code == 503 and r.json()["detail"] == "no live worker"
    store.heartbeat("w1", "token", ttl_s=5, info="{}")
    assert api.get("/readyz").json() == {"status": "ready", "workers": 1}
    store.retire("w1", "token")
    assert api.get("/readyz").status_code == 503


def test_redis_unreachable_is_503_with_retry_after() -> None:
    dead = JobStore.connect(f"redis://127.0.0.1:{free_port()}/0", 60, timeout_s=1)
    settings = ApiSettings(redis_url="redis://127.0.0.1:1/0", auth="off")
    with serving(create_app(dead, settings)) as url, httpx.Client(base_url=url) as client:
        for r in [
            client.post("/v1/txt2img", json=VALID),
            client.get("/jobs/AAAAAAAAAAAAAAAAAAAAAA"),
            client.delete("/jobs/AAAAAAAAAAAAAAAAAAAAAA"),
            client.get("/readyz"),
        ]:
            assert r.status_code == 503, r.text
            assert int(r.headers["retry-after"]) > 0
        assert client.get("/healthz").status_code == 200


def test_openapi_documents_the_contract(api: httpx.Client) -> None:
    schema = api.get("/openapi.json").json()
    assert {"/v1/txt2img", "/jobs/{job_id}", "/jobs/{job_id}/images/{index}.png"} <= set(
        schema["paths"]
    )
    request = schema["components"]["schemas"]["Txt2ImgRequest"]
    assert request["additionalProperties"] is False and request["examples"]
    assert api.get("/docs").status_code == 200


def _refs(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_every_reference_in_the_openapi_document_resolves(api: httpx.Client) -> None:
    # Routes that read their own bodies publish pydantic's schemas by hand; their nested models
    # (a ControlNet unit, a LoRA) must land among the components the references name, or a
    # client generator (or schemathesis) skips those fields.
    document = api.get("/openapi.json").json()
    schemas = document["components"]["schemas"]
    refs = set(_refs(document["paths"])) | set(_refs(schemas))
    assert "#/components/schemas/ControlNetBody" in refs  # the nested models are reached
    missing = {ref for ref in refs if ref.removeprefix("#/components/schemas/") not in schemas}
    assert not missing
    assert "$defs" not in json.dumps(document)


@pytest.mark.parametrize("api_settings", [{"max_queue": 2}], indirect=True)
def test_a_full_queue_answers_429_with_retry_after(api: httpx.Client) -> None:
    codes = [api.post("/v1/txt2img", json=VALID).status_code for _ in range(4)]
    assert codes == [202, 202, 429, 429]
    r = api.post("/v1/txt2img", json=VALID)
    assert int(r.headers["retry-after"]) > 0 and "queue is full" in r.json()["detail"]


def test_an_idempotency_key_replays_its_first_job(api: httpx.Client) -> None:
    headers = {"Idempotency-Key": "order-42"}
    body = {"prompt": "a red fox", "n": 2}  # no seed: the server's choice must not matter
    first = api.post("/v1/txt2img", json=body, headers=headers)
    again = api.post("/v1/txt2img", json=body, headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    other = api.post("/v1/txt2img", json={**body, "n": 3}, headers=headers)
    assert other.status_code == 409 and "Idempotency-Key" in other.json()["detail"]
    fresh = api.post("/v1/txt2img", json=body, headers={"Idempotency-Key": "order-43"})
    assert fresh.json()["id"] != first.json()["id"]


@pytest.mark.parametrize("key", ["", "x" * 256, "with space", "tab\there"])
def test_a_malformed_idempotency_key_is_named(api: httpx.Client, key: str) -> None:
    r = api.post("/v1/txt2img", json=VALID, headers={"Idempotency-Key": key})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["header", "idempotency-key"]


def test_timeout_is_filled_from_the_default_and_bounded(api: httpx.Client) -> None:
    job = api.post("/v1/txt2img", json={**VALID, "timeout_s": 30}).json()
    assert api.get(job["url"]).json()["request"]["timeout_s"] == 30
    assert "timeout_s" in fields(api.post("/v1/txt2img", json={**VALID, "timeout_s": 0}))
    assert "timeout_s" in fields(api.post("/v1/txt2img", json={**VALID, "timeout_s": 86401}))


def test_expired_images_answer_410(redis_url: str) -> None:
    store = JobStore.connect(redis_url, result_ttl_s=2, timeout_s=5)
    store.ensure_group()
    job_id = enqueue(store, Txt2ImgRequest(prompt="x", seed=1))
    [job] = store.start(store.read("w1", 1, 100), "w1")
    settings = ApiSettings(redis_url=redis_url, auth="off")
    open_storage(settings.storage).put(result_key(job_id, 0), b"\x89PNG...")
    # The server up before the job ends: its start took over the result's TTL (then 1 s)
    # once on a fresh clone's busy cores, and the first read found the result expired.
    with serving(create_app(store, settings)) as url, httpx.Client(base_url=url) as client:
        store.succeed(job, 1)
        assert client.get(f"/jobs/{job_id}/images/0.png").status_code == 200
        head = client.head(f"/jobs/{job_id}/images/0.png")  # as GET, without the body
        assert head.status_code == 200 and head.headers["content-type"] == "image/png"
        assert head.content == b"" and head.headers["content-length"] == str(len(b"\x89PNG..."))
        deadline = time.monotonic() + 10
        while client.get(f"/jobs/{job_id}").json()["status"] != "expired":
            assert time.monotonic() < deadline, "the result never expired"
            time.sleep(0.1)
        assert client.get(f"/jobs/{job_id}/images/0.png").status_code == 410
        assert client.head(f"/jobs/{job_id}/images/0.png").status_code == 410


def test_made_up_http_methods_add_no_metric_series(api: httpx.Client) -> None:
    for k in range(300):
        assert api.request(f"JUNK{k}", "/jobs/x").status_code in (404, 405)
    body = api.get("/metrics").text
    assert "JUNK" not in body and 'method="other"' in body
    series = [line for line in body.splitlines() if line.startswith("sdserve_http_requests_total")]
    assert len(series) <= 4, series
