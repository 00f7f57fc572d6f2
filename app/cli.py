"""The `sdserve` command: api, worker, dev, make-tiny-model.

The worker side is imported only by the subcommands that need it, so the API image (no torch)
runs `sdserve api` without it.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from app import logs
from app.settings import ApiSettings, load


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sdserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    api = sub.add_parser("api", help="serve the HTTP API")
    dev = sub.add_parser("dev", help="run Redis, the API and one worker locally; Ctrl-C stops all")
    for p in (api, dev):
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=8000)
    sub.add_parser("worker", help="run one GPU (or CPU) worker")
    tiny = sub.add_parser("make-tiny-model", help="write a random-weight model (diffusers)")
    tiny.add_argument("dir", type=Path)
    tiny.add_argument(
        "--arch",
        choices=["tiny", "sd15"],
        default="tiny",
        help="tiny: for tests and local runs (default); sd15: SD 1.5's sizes, for benchmarks",
    )
    args = parser.parse_args(argv)

    if args.command == "api":
        serve_api(args.host, args.port)
    elif args.command == "worker":
        from worker.settings import WorkerSettings

        settings = load(WorkerSettings)  # before torch is imported: a bad setting fails fast
        from worker.runner import serve

        serve(settings)
    elif args.command == "dev":
        from app.dev import run_dev

        raise SystemExit(run_dev(args.host, args.port))
    else:
        from worker.tiny import build_tiny_model

        print(build_tiny_model(args.dir, args.arch))


def serve_api(host: str, port: int) -> None:
    import uvicorn

    from app.api import create_app
    from app.jobs import JobStore

    settings = load(ApiSettings)
    logs.configure(settings.log_json)
    store = JobStore.connect(settings.redis_url, settings.result_ttl_s, settings.redis_timeout_s)
    logging.getLogger("sdserve.api").info("serving on http://%s:%d", host, port)
    uvicorn.run(create_app(store, settings), host=host, port=port, log_config=None)
