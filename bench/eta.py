"""How right `eta_s` is: Poisson arrivals of mixed requests at 60% of the service's capacity.

The whole service as processes (bench.batching's), continuous batching. First 64 closed-loop
clients of uniform requests measure the capacity (images/s); then requests of mixed steps,
samplers and guidance arrive as a Poisson process at 60% of it. Each job is watched: its
`eta_s` right after submission, and at the first look once half its steps are done, against
the time it then actually took. Reported: p50 and p90 of |ETA - actual| / actual at both
moments (the target: p50 <= 20%), and how many jobs had no ETA yet (before the worker had
measured its pace). Results to OUT/eta.json and OUT/eta.md.

    python -m bench.eta --out DIR [--device cpu --side 64 --model DIR] [--seconds 60]
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from bench.batching import (
    closed_loop,
    mixed,
    poisson,
    prepare,
    rate,
    service,
    service_parser,
    uniform,
)
from bench.paces import parts_lines


def table(results: dict[str, Any]) -> str:
    lines = [
        f"ETA error, {results['device']}, {results['date']}: Poisson arrivals of mixed requests"
        f" at {results['rate_per_s']:.2f}/s (60% of {results['capacity_img_s']:.2f} img/s)",
        "",
        "| when read | jobs | without an ETA | p50 abs. error / actual | p90 | median signed |",
        "|---|---|---|---|---|---|",
    ]

    def share(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.0f}%"

    for moment, label in (("at_submission", "at submission"), ("at_half", "at 50% done")):
        row = results[moment]
        lines.append(
            f"| {label} | {row['jobs']} | {row['without_eta']} | {share(row['p50'])}"
            f" | {share(row['p90'])} | {100 * (row['median_signed'] or 0):+.0f}% |"
        )
    if "parts" in results:
        lines += ["", *parts_lines(results["parts"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = service_parser(__doc__ or "", seconds=60).parse_args()
    work = prepare(args)
    results: dict[str, Any] = {"device": args.device, "date": time.strftime("%Y-%m-%d"),
                               "command": " ".join(sys.argv)}  # fmt: skip
    with service(args.model, "continuous", args, work, work / "inductor-eta") as running:
        url = running.url
        capacity = asyncio.run(closed_loop(url, args.clients, uniform, args.warmup, 20))
        results["capacity_img_s"] = rate(capacity, "img_s")
        results["rate_per_s"] = rate_s = max(0.6 * results["capacity_img_s"], 0.05)
        poissons = poisson(url, rate_s, mixed, args.warmup, args.seconds, running.redis_url)
        load = asyncio.run(poissons)
    results["failed"] = load["failed"]
    results |= load["eta"]
    (args.out / "eta.json").write_text(json.dumps(results, indent=2))
    (args.out / "eta.md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
