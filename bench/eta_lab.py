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


def main() -> None:
    from bench import batching
    from bench.paces import parts_lines

    if sys.argv[1:] == ["worker"]:
        paced_worker()
        return
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
