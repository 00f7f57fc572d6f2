"""The `sdserve` command: settings validation, the tiny model, import boundaries, `sdserve dev`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, sdserve_env, wait_for

SDSERVE = str(Path(sys.executable).parent / "sdserve")


@pytest.mark.parametrize(
    ("command", "variable", "value"),
    [
        ("worker", "SDSERVE_MAX_BATCH", "0"),
        ("worker", "SDSERVE_DEVICE", "tpu"),
        ("worker", "SDSERVE_BATCH_WINDOW_MS", "soon"),
        ("worker", "SDSERVE_COMPILED_SIZES", "[[100, 100]]"),
        ("worker", "SDSERVE_COMPILE", "sometimes"),
        ("api", "SDSERVE_REDIS_URL", "http://localhost:6379"),
        ("api", "SDSERVE_RESULT_TTL_S", "-1"),
        ("api", "SDSERVE_API_KEYS", "not-json"),
        ("api", "SDSERVE_API_KEYS_FILE", "/nonexistent/keys"),
        ("api", "SDSERVE_API_KEYS_FILE", "/tmp"),
        ("api", "SDSERVE_CORS_ORIGINS", "a.example"),
        ("api", "SDSERVE_WEBHOOK_SECRET", ""),
        ("api", "SDSERVE_STORAGE", "/relative/or/bare/path"),
        ("api", "SDSERVE_STORAGE_REDIRECT", "true"),  # with a directory: nothing to redirect to
        ("worker", "SDSERVE_COMPILED_SIZES", "512x51"),
        ("worker", "SDSERVE_COMPILED_SIZES", "512by512"),
        ("worker", "SDSERVE_MODEL", "/nonexistent"),
        ("api", "SDSERVE_MODELS", "a=x,a=y"),  # a name twice
        ("api", "SDSERVE_MODELS", "bad name=x"),
        ("api", "SDSERVE_MODELS", "just-a-source"),
        ("worker", "SDSERVE_MODELS", "a=/nonexistent"),
        ("worker", "SDSERVE_WORKER_MODELS", "nope"),
        ("worker", "SDSERVE_TILE_OVERLAP", "600"),  # over half the tile
        ("worker", "SDSERVE_TILE", "100"),  # not a multiple of 8
        ("worker", "SDSERVE_BATCHING", "static"),  # removed: the message says so
    ],
)
def test_invalid_settings_stop_the_process_naming_the_variable(
    command: str, variable: str, value: str
) -> None:
    env = {**sdserve_env("redis://127.0.0.1:1/0"), variable: value}
    done = subprocess.run([SDSERVE, command], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"  {variable}=" in done.stderr
    assert "Traceback" not in done.stderr
    if value == "static":
        assert "static batching was removed" in done.stderr


def test_make_tiny_model_writes_a_diffusers_folder(tmp_path: Path) -> None:
    target = tmp_path / "tiny"
    subprocess.run([SDSERVE, "make-tiny-model", str(target)], check=True, timeout=120)
    index = json.loads((target / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for part in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]:
        assert (target / part).is_dir() and index[part][1]
    assert (target / "tokenizer" / "tokenizer.json").is_file()
    # A folder it cannot write is a usage error, not a traceback after torch's imports.
    (tmp_path / "a-file").write_text("")
    refused = subprocess.run([SDSERVE, "make-tiny-model", str(tmp_path / "a-file" / "tiny")],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"cannot write {tmp_path / 'a-file' / 'tiny'}" in refused.stderr, refused.stderr


def _imports(modules: list[str]) -> set[str]:
    code = f"import sys; import {', '.join(modules)}; print(' '.join(sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {name.split(".")[0] for name in done.stdout.split()}


def test_app_never_imports_torch_and_worker_never_imports_fastapi() -> None:
    api_side = _imports(
        ["app.api", "app.cli", "app.dev", "app.jobs", "app.settings", "app.jobs.logs"]
    )
    assert not api_side & {"torch", "diffusers", "transformers", "worker"}
    worker_side = _imports(["worker.process", "worker.engine", "worker.tiny", "worker.images"])
    assert not worker_side & {"fastapi", "starlette", "uvicorn"}


def test_dev_serves_a_png_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    port = free_port()
    env = {**sdserve_env("redis://unused"), "XDG_CACHE_HOME": str(tmp_path)}
    env.pop("SDSERVE_REDIS_URL")
    log = tmp_path / "dev.log"
    with log.open("w") as out:
        dev = subprocess.Popen(
            [SDSERVE, "dev", "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_for(lambda: "sdserve is ready" in log.read_text(), 180, "sdserve dev")
        assert "curl -s -X POST" in log.read_text()
        assert (tmp_path / "sdserve" / "models" / "tiny-model" / "model_index.json").is_file()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            body = {"prompt": "a lighthouse at dusk", "seed": 42, "steps": 4}
            job = client.post("/v1/txt2img", json=body).json()

            def done() -> str | None:
                images: list[str] = client.get(job["url"]).json()["images"]
                return images[0] if images else None

            image = client.get(wait_for(done, 120, "the image"))
            assert image.headers["content-type"] == "image/png" and image.content[:4] == b"\x89PNG"
        dev.send_signal(signal.SIGINT)
        assert dev.wait(60) == 0
    finally:
        if dev.poll() is None:
            dev.kill()
    with pytest.raises(httpx.ConnectError):  # the API is gone
        httpx.get(f"http://127.0.0.1:{port}/healthz")
    time.sleep(0.5)
    valkey = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True)
    assert [pid for pid in valkey.stdout.split() if int(pid) != os.getpid()] == []


def test_a_taken_metrics_port_stops_the_worker_before_the_model_loads(tiny_model: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = sdserve_env("redis://127.0.0.1:1/0", tiny_model, metrics_port=str(port))
        started = time.monotonic()
        done = subprocess.run([SDSERVE, "worker"], env=env, capture_output=True, text=True,
                              timeout=60)  # fmt: skip
    assert done.returncode == 2 and f"SDSERVE_METRICS_PORT={port}" in done.stderr
    assert "Traceback" not in done.stderr and "loaded" not in done.stderr
    assert time.monotonic() - started < 30


def test_unwritable_storage_stops_both_processes_naming_it(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    storage = (blocker / "inside").as_uri()
    for command in ("api", "worker"):
        env = sdserve_env("redis://127.0.0.1:1/0", storage=storage)
        done = subprocess.run([SDSERVE, command], env=env, capture_output=True, text=True,
                              timeout=60)  # fmt: skip
        assert done.returncode == 2 and f"SDSERVE_STORAGE={storage}" in done.stderr, command
        assert "Traceback" not in done.stderr


def test_list_settings_read_plain_text_as_well_as_json() -> None:
    from app.settings import ApiSettings
    from worker.settings import WorkerSettings

    env = {"SDSERVE_CORS_ORIGINS": "https://a.example", "SDSERVE_COMPILED_SIZES": "512x512,768x512"}
    for name, value in env.items():
        os.environ[name] = value
    try:
        assert ApiSettings(auth="off").cors_origins == ["https://a.example"]
        assert WorkerSettings().compiled_sizes == [(512, 512), (768, 512)]
    finally:
        for name in env:
            del os.environ[name]


def test_an_empty_folder_or_list_setting_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    # Compose passes `${SDSERVE_LORA_DIR:-}` when the operator sets nothing: an empty path
    # must not become the working directory, scanned for LoRAs. (An empty webhook secret
    # stays an error: test_invalid_settings_stop_the_process_naming_the_variable.)
    from app.settings import ApiSettings
    from worker.settings import WorkerSettings

    for name in ("LORA_DIR", "EMBEDDINGS_DIR", "UPSCALER", "CONTROLNETS", "VAES", "MODELS"):
        monkeypatch.setenv(f"SDSERVE_{name}", "")
    worker = WorkerSettings()
    assert worker.lora_dir is None and worker.embeddings_dir is None
    assert worker.upscaler == "" and worker.controlnets == {} and worker.vaes == {}
    assert ApiSettings(auth="off").models == {}


def test_a_lora_or_embeddings_folder_that_is_not_there_stops_the_worker(tmp_path: Path) -> None:
    for name in ("SDSERVE_LORA_DIR", "SDSERVE_EMBEDDINGS_DIR"):
        missing = {name.removeprefix("SDSERVE_").lower(): str(tmp_path / "nope")}
        env = sdserve_env("redis://127.0.0.1:1/0", None, **missing)
        done = subprocess.run([SDSERVE, "worker"], env=env, capture_output=True, text=True,
                              timeout=60)  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert name in done.stderr and "no such folder" in done.stderr
        assert "Traceback" not in done.stderr
