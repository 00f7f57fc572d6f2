"""The ETA's lab: the whole service on the CPU, its GPU work timed as an H200 times it.

`eta_s` at submission missed its target on the GPU (38% p50 against 20%) and a CPU run of
`bench.eta` says nothing of it: there the tiny model's steps are the CPU's, a few rows cost
what many do, and the two cores that run them also run the client, the API and Redis. Here the
API, Redis, the client and the worker's loop, bookkeeping, PNGs and storage are the real ones;
only the UNet call and the VAE decode are stood in for, by waits as long as the eleventh GPU
check measured them (a step: 5.5 ms + 1.9 ms a row of its row bucket, 123 ms at 62 rows; a
decode: 8 ms an image), returning zeros and a smooth picture. The worker sleeps where the GPU
would work, so the host's cores stay free for the rest. The Poisson load of the GPU check runs
(mixed steps, samplers and guidance at 512x512, at 60% of the uniform rate the model gives),
and its ETA errors and their parts are printed as `bench.gpu_check` prints them.

This says whether the service's estimate is right about a GPU's timing, not what a GPU does:
the stand-ins' times do not vary as a GPU's do.

    python3 -m bench.eta_lab --out DIR [--rate 6.0] [--seconds 60] [--slower 1] [--side 512]
    python3 -m bench.eta_lab model         (the same load in a model without any host)
    python3 -m bench.eta_lab worker        (the stand-in worker: what the lab starts)
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

STEP_BASE_S = 0.0055  # a UNet call: base + per row x its row bucket (the eleventh check)
STEP_ROW_S = 0.0019
DECODE_S = 0.008  # a 512x512 decode, an image


def paced_worker() -> None:
    """The worker, its UNet calls and decodes replaced by waits of a GPU's length (times
    `SDSERVE_LAB_SLOWER`: a slower GPU, for a host too small to keep up with the H200's)."""
    import os

    import torch

    from worker import compiled
    from worker.process import serve
    from worker.settings import WorkerSettings

    slower = float(os.environ.get("SDSERVE_LAB_SLOWER", "1"))

    def unet_call(calls: compiled.CompiledCalls, sample: torch.Tensor, *args: Any,
                  **kwargs: Any) -> torch.Tensor:  # fmt: skip
        time.sleep(slower * (STEP_BASE_S + STEP_ROW_S * calls.tuning.row_bucket(len(sample))))
        out_channels = int(calls.unet.config.out_channels)
        return sample.new_zeros((len(sample), out_channels, *sample.shape[2:]))

    def decode(calls: compiled.CompiledCalls, latents: torch.Tensor, _compiled: bool) -> Any:
        time.sleep(slower * DECODE_S * len(latents))
        n, _, h, w = latents.shape
        scale = 8
        ramp = torch.linspace(-1, 1, w * scale).expand(n, 3, h * scale, w * scale)
        return ramp.clone()

    compiled.CompiledCalls._unet_call = unet_call  # type: ignore[method-assign,assignment]
    compiled.CompiledCalls.decode = decode  # type: ignore[method-assign,assignment]
    serve(WorkerSettings())


def modelled(rate: float, seconds: float = 3000.0, seed: int = 0) -> dict[str, float]:
    """The same load without any host: Poisson arrivals of 20-40-step guided jobs, steps of
    the rows in flight by their row bucket, a decode for each job a step ends, a finish of
    0.10 s (sd 0.03). Each job's estimate at submission as the service makes it (the pace's
    line at the rows it will run beside: half the rows now, half their recent mean, and its
    own), and one that also knows when each job in flight ends (their rows leave then, and
    arrivals fill in towards the mean over a job's length). The p50 of |error| / actual of
    each: how far an estimate made at submission can get."""
    import bisect
    import math
    import random
    import statistics

    buckets = [2, 4, 8, 12, 16, 20, 24, 32, 40, 48, 56, 62]

    def step_s(rows: float) -> float:  # the fitted line, as the pace has it
        return STEP_BASE_S + STEP_ROW_S * rows

    rng = random.Random(seed)
    now, arrival, mean = 0.0, rng.expovariate(rate), 0.0
    lanes: list[list[int]] = []  # [steps left, rows, job]
    jobs: list[dict[str, Any]] = []
    while now < seconds:
        while arrival <= now:
            rows_now = sum(lane[1] for lane in lanes)
            leaving = sorted((left, rows) for left, rows, _ in lanes)
            jobs.append({"at": arrival, "steps": rng.choice((20, 25, 30, 40)), "rows": 2,
                         "now": rows_now, "mean": mean, "leaving": leaving})  # fmt: skip
            lanes.append([jobs[-1]["steps"], 2, len(jobs) - 1])
            arrival += rng.expovariate(rate)
        rows = sum(lane[1] for lane in lanes)
        if not rows:
            now = arrival
            continue
        took = STEP_BASE_S + STEP_ROW_S * buckets[bisect.bisect_left(buckets, min(rows, 62))]
        fade = math.exp(-took / 3.0)  # the rows' 3-s average (worker/progress.py)
        mean = fade * mean + (1 - fade) * rows
        now += took
        for lane in lanes:
            lane[0] -= 1
        ended = [lane for lane in lanes if lane[0] == 0]
        now += DECODE_S * len(ended)
        for lane in ended:
            jobs[lane[2]]["end"] = now + max(0.02, rng.gauss(0.10, 0.03))
        lanes = [lane for lane in lanes if lane[0] > 0]
    done = [j for j in jobs if "end" in j and j["at"] > 50]

    def beside(j: dict[str, Any]) -> float:
        return float(j["steps"] * step_s((j["now"] + j["mean"]) / 2 + j["rows"]) + 0.10)

    def knowing(j: dict[str, Any]) -> float:
        total = 0.0
        for i in range(j["steps"]):
            still = sum(rows for left, rows in j["leaving"] if left > i)
            total += step_s(still + j["rows"] + j["mean"] * min(1.0, i / 29))
        return total + 0.10

    def p50(estimate: Any) -> float:
        return float(statistics.median(abs(estimate(j) - (j["end"] - j["at"]))
                                       / (j["end"] - j["at"]) for j in done))  # fmt: skip

    return {"jobs": len(done), "rows_now": statistics.mean(j["now"] for j in done),
            "service": p50(beside), "knowing_ends": p50(knowing)}  # fmt: skip


def main() -> None:
    if sys.argv[1:] == ["worker"]:
        paced_worker()
        return
    if sys.argv[1:2] == ["model"]:
        for rate in (3.0, 6.0):
            found = modelled(rate)
            print(f"{rate}/s, {found['jobs']} jobs, {found['rows_now']:.1f} rows now on"
                  f" average: at submission p50 {found['service']:.1%} (the service's"
                  f" estimate), {found['knowing_ends']:.1%} (knowing when each job in flight"
                  " ends)")  # fmt: skip
        return
    from bench import batching
    from bench.paces import parts_lines

    parser = batching.service_parser(__doc__ or "", seconds=60)
    parser.set_defaults(device="cpu", model="/tmp/sdserve-bench/tiny", arch="tiny", warmup=10)
    parser.add_argument("--rate", type=float, default=6.0, help="arrivals a second")
    parser.add_argument("--slower", type=float, default=1.0,
                        help="the stand-ins' times, this many times the H200's (run the rate"
                        " divided by as much: the same rows in flight, a host's load shared"
                        " over more time)")  # fmt: skip
    args = parser.parse_args()
    work = batching.prepare(args)
    results: dict[str, Any] = batching.provenance(args.device) | {"slower": args.slower}
    extra = {"SDSERVE_COMPILE": "off", "SDSERVE_LAB_SLOWER": str(args.slower)}
    with batching.service(args.model, "continuous", args, work, work / "inductor-eta-lab", extra,
                          worker=("bench.eta_lab", "worker")) as running:  # fmt: skip
        load = asyncio.run(batching.poisson(running.url, args.rate, batching.mixed, args.warmup,
                                            args.seconds, running.redis_url))  # fmt: skip
    results["poisson"] = load
    (args.out / "eta_lab.json").write_text(json.dumps(results, indent=2))
    eta = load["eta"]
    print(
        f"rate {args.rate}/s: p50 / p95 {load['latency_p50_s']:.2f} /"
        f" {load['latency_p95_s']:.2f} s, {load['requests']} jobs, {load['failed']} failed"
    )
    for moment in ("at_submission", "at_half"):
        e = eta[moment]
        print(
            f"eta_s {moment}: p50 {e['p50']}, p90 {e['p90']}, median signed"
            f" {e['median_signed']}, jobs {e['jobs']}"
        )
    if eta.get("parts"):
        print("\n".join(parts_lines(eta["parts"])))


if __name__ == "__main__":
    main()
