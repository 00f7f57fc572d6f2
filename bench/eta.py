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
import random
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from bench.batching import closed_loop, mixed, prepare, service, service_parser, uniform
from bench.bench import percentile

TERMINAL = {"succeeded", "failed", "canceled", "expired"}


@dataclass
class Watched:
    steps: int
    at_submission: tuple[float, float] | None = None  # (ETA, when it was read)
    at_half: tuple[float, float] | None = None
    finished: float = 0.0
    status: str = ""


async def watch(http: httpx.AsyncClient, body: dict[str, Any], poll_s: float) -> Watched:
    seen = Watched(int(body["steps"]))
    job = (await http.post("/v1/txt2img", json=body)).json()
    view = (await http.get(job["url"])).json()
    if view["eta_s"] is not None:
        seen.at_submission = (view["eta_s"], time.monotonic())
    while view["status"] not in TERMINAL:
        progress = view.get("progress")
        half = progress is not None and progress["step"] * 2 >= progress["steps"]
        if half and seen.at_half is None and view["eta_s"] is not None:
            seen.at_half = (view["eta_s"], time.monotonic())
        await asyncio.sleep(poll_s)
        view = (await http.get(job["url"])).json()
    seen.finished, seen.status = time.monotonic(), view["status"]
    return seen


async def poisson_watch(url: str, rate: float, seconds: float) -> list[Watched]:
    rng = random.Random(11)
    tasks = []
    async with httpx.AsyncClient(base_url=url, timeout=600,
                                 limits=httpx.Limits(max_connections=512)) as http:  # fmt: skip
        start = at = time.monotonic()
        i = 0
        while at < start + seconds:
            at += rng.expovariate(rate)
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            tasks.append(asyncio.create_task(watch(http, mixed(5_000_000 + i), 0.05)))
            i += 1
        return list(await asyncio.gather(*tasks))


def errors(watched: list[Watched], moment: str) -> dict[str, Any]:
    signed = []  # (ETA - actual) / actual: above 0, the ETA said longer than it took
    for w in watched:
        read = getattr(w, moment)
        if read is None or w.status != "succeeded":
            continue
        eta, when = read
        actual = w.finished - when
        if actual > 0:
            signed.append((eta - actual) / actual)
    relative = sorted(abs(e) for e in signed)
    return {
        "jobs": len(relative),
        "without_eta": sum(getattr(w, moment) is None for w in watched),
        "p50": percentile(relative, 50) if relative else None,
        "p90": percentile(relative, 90) if relative else None,
        "median_signed": percentile(sorted(signed), 50) if signed else None,
    }


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
    return "\n".join(lines) + "\n"


def main() -> None:
    args = service_parser(__doc__ or "", seconds=60).parse_args()
    work = prepare(args)
    results: dict[str, Any] = {"device": args.device, "date": time.strftime("%Y-%m-%d"),
                               "command": " ".join(sys.argv)}  # fmt: skip
    with service(args.model, "continuous", args, work, work / "inductor-eta") as (url, _, _log):
        capacity = asyncio.run(closed_loop(url, args.clients, uniform, args.warmup, 20))
        results["capacity_img_s"] = capacity["img_s"]
        results["rate_per_s"] = rate = 0.6 * capacity["img_s"]
        watched = asyncio.run(poisson_watch(url, rate, args.seconds))
    results["failed"] = sum(w.status != "succeeded" for w in watched)
    results["at_submission"] = errors(watched, "at_submission")
    results["at_half"] = errors(watched, "at_half")
    results["jobs"] = [asdict(w) for w in watched]
    (args.out / "eta.json").write_text(json.dumps(results, indent=2))
    (args.out / "eta.md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
