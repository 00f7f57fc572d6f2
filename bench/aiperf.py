"""NVIDIA's `aiperf` against sdserve's OpenAI images endpoint, beside the project's own load
generator, in one run on one service.

The whole service as processes (bench.batching's), continuous batching. Two loads of the same
concurrency, duration and request (512x512, 25 steps DPM++ 2M, CFG 7.5):

  own     bench.batching's closed loop: `POST /v1/txt2img`, poll `GET /jobs/{id}` every 50 ms,
          download the PNG (latency: submission to PNG in hand)
  aiperf  `aiperf profile --endpoint-type image-generation`: `POST /v1/images/generations`, one
          call that waits and answers the image as base64 (latency: the call)

aiperf is not a dependency of sdserve (it pins packages of its own): install it in its own
environment and pass its executable with --aiperf. Results to OUT/aiperf.json and OUT/aiperf.md.

    python -m bench.aiperf --out DIR --aiperf /path/to/venv/bin/aiperf [--device cpu --side 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import bench.batching
from bench.batching import closed_loop, prepare, service, service_parser, uniform


def run_aiperf(executable: str, url: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """aiperf's closed loop at the same concurrency; its JSON export, summarized."""
    extra = {"size": f"{bench.batching.SIDE}x{bench.batching.SIDE}", "steps": 25,
             "scheduler": "dpmpp_2m", "guidance_scale": 7.5}  # fmt: skip
    command = [
        executable, "profile", "--endpoint-type", "image-generation", "--url", url,
        # The model's own tokenizer makes aiperf's prompts (its builtin one downloads).
        "--model", "sdserve", "--tokenizer", str(Path(args.model) / "tokenizer"),
        "--concurrency", str(args.clients),
        "--benchmark-duration", str(args.seconds), "--warmup-duration", str(args.warmup),
        "--prompt-input-tokens-mean", "20", "--prompt-input-tokens-stddev", "0",
        "--extra-inputs", json.dumps(extra), "--ui-type", "none", "--artifact-dir", str(out),
        "--random-seed", "7",
    ]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.seconds * 4 + 600)
    (out / "aiperf.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"aiperf failed ({done.returncode}); see {out / 'aiperf.log'}")
    export = out / "profile_export_aiperf.json"  # the profiling phase's summary
    if not export.exists():
        raise SystemExit(f"aiperf wrote no {export}")
    metrics = json.loads(export.read_text())
    return {"seconds": time.monotonic() - started, "export": str(export), "metrics": metrics}


def pick(metrics: dict[str, Any], name: str, stat: str) -> float | None:
    """A statistic of one of aiperf's metrics (`request_latency`'s `p50`, ...)."""
    entry = metrics.get(name)
    if isinstance(entry, dict) and isinstance(entry.get(stat), int | float):
        return float(entry[stat])
    return None


def table(results: dict[str, Any]) -> str:
    own, theirs = results["own"], results["aiperf"]["metrics"]
    latency_unit = str((theirs.get("request_latency") or {}).get("unit", "ms"))
    scale = 1000.0 if latency_unit == "ms" else 1.0

    def seconds(stat: str) -> str:
        value = pick(theirs, "request_latency", stat)
        return "-" if value is None else f"{value / scale:.2f} s"

    throughput = pick(theirs, "request_throughput", "avg")
    lines = [
        f"{results['device']}, {results['date']}: {results['clients']} concurrent clients,"
        f" {results['side']}x{results['side']}, 25 steps, `{results['command']}`",
        "",
        "| load generator | route | images/s | latency p50 | latency p95 |",
        "|---|---|---|---|---|",
        f"| own (bench.batching) | `POST /v1/txt2img` + polling | {own['img_s']:.2f}"
        f" | {own['latency_p50_s']:.2f} s | {own['latency_p95_s']:.2f} s |",
        f"| aiperf {results['aiperf_version']} | `POST /v1/images/generations` (waits)"
        f" | {'-' if throughput is None else f'{throughput:.2f}'} | {seconds('p50')}"
        f" | {seconds('p95')} |",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = service_parser(__doc__ or "", seconds=30)
    parser.add_argument("--aiperf", required=True, help="the aiperf executable")
    args = parser.parse_args()
    work = prepare(args)
    version = subprocess.run([args.aiperf, "--version"], capture_output=True, text=True)
    results: dict[str, Any] = {
        "device": args.device, "date": time.strftime("%Y-%m-%d"), "side": args.side,
        "clients": args.clients, "command": " ".join(sys.argv),
        "aiperf_version": (version.stdout or version.stderr).strip().split()[-1],
    }  # fmt: skip
    with service(args.model, "continuous", args, work, work / "inductor-aiperf") as (url, _, _log):
        results["own"] = asyncio.run(
            closed_loop(url, args.clients, uniform, args.warmup, args.seconds)
        )
        results["aiperf"] = run_aiperf(args.aiperf, url, args, args.out / "aiperf-artifacts")
    (args.out / "aiperf.json").write_text(json.dumps(results, indent=2))
    (args.out / "aiperf.md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
