"""The GPU check: one command, run before and after every change to worker/.

Builds the SD1.5-sized random-weight model (if missing), starts the service as processes
(Valkey, `sdserve api`, `sdserve worker`, continuous batching, an empty compile cache), then:

  kinds    every request kind once, one after another (txt2img, unguided, n=2, a 2-chunk
           prompt, img2img, inpainting, upscaling pixel and latent, hires fix latent and pixel):
           each must finish, and the worker's `sdserve_worker_recompiles_total` stay 0
  loads    short windows of: (a) uniform, 25 steps DPM++ 2M, CFG 7.5; (b) mixed steps, samplers
           and guidance; (c) Poisson arrivals of mixed requests at 60% of (a), and how far
           each job's `eta_s` (read at submission and at half its steps) was; (d) half img2img
           at strength 0.75; (e) prompts of 2-3 chunks of 75 tokens; alone: one request at a time
  restart  the worker again, with the compile cache the first start left

With `--loras` (issue 23) the worker serves 8 LoRAs (bench/loras.py writes them): the kinds
are run again with LoRAs on them, and (l) is (a) with half the requests carrying LoRAs, against
(a) on the same worker (≥ 0.90), once all 8 are resident (their first loads are not in its
window).

With `--controlnets` (issue 24) the worker serves a ControlNet of the model's size
(bench/controlnets.py writes it): the kinds a unit goes on are run again with one, (k) is (a)
with every request controlled and (h) with half of them, against what (a) and (k) predict for
half and half (≥ 0.95). bench/controlnets.py adds diffusers' ControlNet pipeline beside it.

With `--masked-contexts` the worker puts rows of every prompt length in one UNet call, shorter
contexts padded and masked (`SDSERVE_MASKED_CONTEXTS`): its (a) and (e) against a run without
say whether the mask costs the uniform load what it gains the mixed one (bench/masked.py times
the UNet call alone).

(Static batching's side, `--static`, went with static batching on 2026-12-04; BENCHMARKS.md
keeps the comparisons.)
Prints one table, every figure beside its target, writes OUT/gpu_check.{json,md}, and exits 1
when a target is missed (2 when a kind failed or compiled while serving).

    python3 -m bench.gpu_check --out DIR [--seconds 15] [--warmup 5] [--kinds-only --arch ARCH]
        [--loras] [--controlnets] [--masked-contexts] [--loads a,e] [--no-restart]
        [--keep-cache] [--profile] [--profile-start]

`--loads` runs some loads only ((a) always: the others are read against it), `--no-restart`
skips the cached start, and `--keep-cache` starts from the compile cache an earlier run on the
same machine left: a shorter run for a comparison, not the check.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from bench import batching, threads
from bench.batching import (
    THROUGHPUT_HEADS,
    chosen_loads,
    closed_loop,
    half_img2img,
    mixed,
    poisson,
    rate,
    service,
    throughput,
    uniform,
)
from bench.bench import idle
from bench.paces import parts_lines
from bench.worker_metrics import GPU_SUMS, LOGGED, Window, fully_warm, gpu_share, metric
from worker.metrics import JOIN_PARTS, LOOP_PHASES

TERMINAL = {"succeeded", "failed", "canceled", "expired"}
CHUNK_PROMPT = "a red fox in deep snow, golden hour, "  # 37 tokens of the byte tokenizer


def picture(side: int, mask: bool = False) -> str:
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:side, 0:side]
    if mask:
        pixels = ((x > side // 3) & (y > side // 4)).astype(np.uint8) * 255
        image = Image.fromarray(pixels, "L")
    else:
        rgb = np.stack([x * 255 // side, y * 255 // side, (x + y) * 127 // side], -1)
        image = Image.fromarray(rgb.astype(np.uint8))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def kinds(side: int) -> dict[str, tuple[str, dict[str, Any]]]:
    """One request of every kind, at the compiled size (a hires fix's and an upscale's result
    at it too)."""
    half = side // 2
    base = {"prompt": "a lighthouse at dusk", "seed": 5, "steps": 25, "width": side,
            "height": side}  # fmt: skip
    return {
        "txt2img": ("/v1/txt2img", base),
        "txt2img unguided, n=2": ("/v1/txt2img", base | {"guidance_scale": 1.0, "n": 2}),
        "txt2img 2-chunk prompt": ("/v1/txt2img", base | {"prompt": CHUNK_PROMPT * 3}),
        "img2img": ("/v1/img2img", base | {"image": picture(side), "strength": 0.75}),
        "inpaint": ("/v1/inpaint", base | {"image": picture(side), "mask": picture(side, True)}),
        "upscale pixel x2": ("/v1/upscale", {"image": picture(half), "scale": 2, "seed": 5}),
        "upscale latent x2": (
            "/v1/upscale",
            {"image": picture(half), "scale": 2, "seed": 5, "method": "latent"},
        ),
        "hires latent": (
            "/v1/txt2img",
            base | {"width": half, "height": half, "hires": {"scale": 2, "method": "latent"}},
        ),
        "hires pixel": (
            "/v1/txt2img",
            base | {"width": half, "height": half, "hires": {"scale": 2, "method": "pixel"}},
        ),
    }


async def one(http: httpx.AsyncClient, route: str, body: dict[str, Any]) -> tuple[str, float]:
    started = time.monotonic()
    job = (await http.post(route, json=body)).json()
    if "url" not in job:
        return f"refused: {job}", 0.0
    while True:
        view = (await http.get(job["url"])).json()
        if view["status"] in TERMINAL:
            return view["status"], time.monotonic() - started
        await asyncio.sleep(0.02)


def lora_kinds(side: int) -> dict[str, tuple[str, dict[str, Any]]]:
    """Every kind again, with LoRAs (one, two, at other weights) on it."""
    from bench.loras import lora_set

    return {f"{name} + LoRAs": (route, body | {"loras": lora_set(2 * k + 1)})
            for k, (name, (route, body)) in enumerate(kinds(side).items())}  # fmt: skip


async def every_kind(
    url: str, side: int, loras: bool = False, controls: bool = False
) -> list[dict[str, Any]]:
    rows = []
    cases = kinds(side) | (lora_kinds(side) if loras else {})
    if controls:
        from bench.controlnets import control_kinds

        cases |= control_kinds(side)
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        for name, (route, body) in cases.items():
            status, seconds = await one(http, route, body)
            rows.append({"kind": name, "status": status, "seconds": seconds,
                         "recompiles": recompiles()})  # fmt: skip
            print(f"kind {name}: {status} in {seconds:.2f}s", flush=True)
    return rows


def recompiles() -> float:
    return metric("sdserve_worker_recompiles_total")


def cudagraph_skips() -> float:
    """Compiled calls CUDA graphs did not capture, in the warm-up and since (run slower)."""
    return metric("sdserve_worker_cudagraph_skips")


# Every load the check can run: the closed loops (l with --loras, k and h with --controlnets)
# and the Poisson one (c).
LOADS = ("a", "b", "c", "d", "e", "l", "k", "h")
NEEDS = {"h": "k"}  # (h) is read against what (a) and (k) predict


def long_prompts(i: int) -> dict[str, Any]:
    """(a)'s request with a prompt of two or three chunks of 75 tokens."""
    return uniform(i) | {"prompt": f"{i} " + CHUNK_PROMPT * (3 if i % 2 else 5)}


PROFILED = ("a", "l")  # --profile: the loads whose worker threads py-spy samples


def sampled(args: Any, pid: int, work: Path, name: str) -> Future[dict[str, Any]] | None:
    """With --profile, the worker's threads sampled over the load's measured window (after
    its warm-up), on a thread of its own while the load runs."""
    if not args.profile or name not in PROFILED:
        return None

    def later() -> dict[str, Any]:
        time.sleep(args.warmup)
        return threads.profile(pid, args.seconds, work, name)

    pool = ThreadPoolExecutor(1, thread_name_prefix="py-spy")
    sampling = pool.submit(later)
    pool.shutdown(wait=False)  # its thread ends with the sampling, not with the check
    return sampling


def run(args: Any, work: Path) -> dict[str, Any]:
    cache = batching.compile_cache(work, "gpu-check", args)
    result: dict[str, Any] = {}
    if args.keep_cache:
        result["cache_kept"] = True  # its start is no cold start
    warm, secs = args.warmup, args.seconds
    chosen = chosen_loads(args.loads, LOADS, NEEDS)  # refused before a start of minutes
    extra = {}
    if args.loras:
        from bench.loras import write_loras

        folder = work / f"loras-{Path(args.model).name}"
        write_loras(Path(args.model), folder)
        extra = {"SDSERVE_LORA_DIR": str(folder), "SDSERVE_LORA_SLOTS": "10"}
    if args.controlnets:
        from bench.controlnets import setting

        extra |= setting(Path(args.model), work)
    if args.masked_contexts:
        extra["SDSERVE_MASKED_CONTEXTS"] = "true"
    with service(args.model, "continuous", args, work, cache, extra) as running:
        url, startup, log = running
        ready_at = time.monotonic()
        result["cold_start_s"] = startup
        print(f"continuous: ready in {startup:.0f}s (no compile cache)", flush=True)
        result["kinds"] = asyncio.run(every_kind(url, args.side, args.loras, args.controlnets))
        result["cold_warm_s"] = fully_warm(startup, ready_at)
        print(f"continuous: fully warm {result['cold_warm_s']:.0f}s after its start", flush=True)
        if args.kinds_only:
            result["alone"] = asyncio.run(idle(url, 6, args.side))
            result["recompiles"] = recompiles()
            result["cudagraph_skips"] = cudagraph_skips()
            result["worker_log"] = [line for line in log.read_text().splitlines()
                                    if re.search(LOGGED, line)]  # fmt: skip
            return result
        # (d) next to (a): a call cut short by its time limit has printed both (the loop's
        # phases under each say where (d)'s time goes).
        loads = {"a": uniform, "d": half_img2img, "b": mixed, "e": long_prompts}
        if args.loras:
            from bench.loras import with_loras

            loads["l"] = with_loras
        if args.controlnets:
            from bench.controlnets import controlled, half

            loads |= {"k": controlled, "h": half}
        for name, body in [(n, b) for n, b in loads.items() if n in chosen]:
            if name == "l":
                # Each of the 8 LoRAs resident first, as bench.loras does: their first loads
                # (1.2-1.8 s each under load) are a figure of their own. The kinds above
                # happen to use six of them, and the other two loaded in (l)'s first seconds
                # (every check until 2026-12-07), their jobs' rows empty meanwhile.
                from bench.loras import preload

                result["l_preload_s"] = asyncio.run(preload(url))
            window = Window(warm, secs, GPU_SUMS)
            sampling = sampled(args, running.worker_pid, work, name)
            result[name] = asyncio.run(closed_loop(url, args.clients, body, warm, secs, window))
            ends = window.ends()
            result[name]["gpu"] = gpu_share(*ends) if ends else None
            if sampling is not None:
                result[name]["threads"] = sampling.result()
            print(f"({name}): {result[name]}", flush=True)
        if "c" in chosen:
            rate_s = max(0.6 * rate(result["a"], "img_s"), 0.05)
            window = Window(warm, secs, GPU_SUMS)
            result["c"] = asyncio.run(poisson(url, rate_s, mixed, warm, secs, running.redis_url))
            # Where a Poisson job's second goes: its steps' time at the rows in flight, and
            # the rows padded up to a bucket (the latency target is a step-time target at
            # these rows).
            ends = window.ends()
            result["c"]["gpu"] = gpu_share(*ends) if ends else None
            print(f"(c): {result['c']}", flush=True)
        result["alone"] = asyncio.run(idle(url, 12))
        result["recompiles"] = recompiles()
        result["cudagraph_skips"] = cudagraph_skips()
        result["worker_log"] = [line for line in log.read_text().splitlines()
                                if re.search(LOGGED, line)]  # fmt: skip
    if args.no_restart:
        return result
    # With --profile-start, py-spy samples the cached start from the worker's spawn: where its
    # seconds go by stage (imports, loading, each part of the warm-up) and what torch does in
    # each (dynamo's trace, the cache's graphs read, CUDA graphs recorded).
    start_sampling: list[Future[Path | None]] = []

    def sample(pid: int) -> None:
        if args.profile_start:
            seconds = result["cold_start_s"] + 10  # a cached start takes less
            start_sampling.append(threads.start_sampler(pid, seconds, work / "start.txt"))

    with service(args.model, "continuous", args, work, cache, extra,
                 spawned_worker=sample) as (_url, startup, log):  # fmt: skip
        result["warm_start_s"] = startup
        print(f"continuous: ready in {startup:.0f}s (with the compile cache)", flush=True)
        result["cached_warm_s"] = fully_warm(startup, time.monotonic())
        # Where a cached start's seconds go (the target is 30): the worker's own timings.
        result["warm_worker_log"] = [line for line in log.read_text().splitlines()
                                     if re.search(LOGGED, line)]  # fmt: skip
    if start_sampling:  # py-spy stops when the worker does
        samples = start_sampling[0].result()
        result["start_phases"] = threads.start_phases(samples)
        if samples is not None:  # the raw samples too, for a closer look
            (args.out / "start-samples.txt").write_text(samples.read_text())
    return result


def checks(r: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """(figure, measured, target, met) rows, for the loads the run has."""
    rows: list[tuple[str, str, str, bool]] = []
    for k in r["kinds"]:
        rows.append((f"kind: {k['kind']}", f"{k['status']}, {k['seconds']:.2f} s",
                     "succeeded, no compile", k["status"] == "succeeded"))  # fmt: skip
    rows.append(("recompiles while serving (all of the above and the loads)",
                 f"{r['recompiles']:.0f}", "0", r["recompiles"] == 0))  # fmt: skip
    if "cudagraph_skips" in r:  # an older run's results have none
        rows.append(("compiled calls CUDA graphs skipped", f"{r['cudagraph_skips']:.0f}", "0",
                     r["cudagraph_skips"] == 0))  # fmt: skip
    # Throughput is the steady figure (the worker's rows over the window) where there is one:
    # the jobs that end in a 15 s window come in cohorts (bench/batching.py `steady`).
    a_img, a_eq = rate(r["a"], "img_s"), rate(r["a"], "eq25_s")
    rows.append(("(a) uniform img/s", f"{a_img:.2f}", "≥ 10", a_img >= 10.0))
    for key, name in (("b", "(b) mixed"), ("d", "(d) 50/50 img2img"), ("e", "(e) 2-3 chunks")):
        if key not in r:
            continue
        eq = rate(r[key], "eq25_s")
        share = eq / a_eq if a_eq else 0.0
        target = 0.90 if key == "e" else 0.95
        rows.append((f"{name}, 25-step eq./s of (a)'s", f"{eq:.2f} = {share:.2f}",
                     f"≥ {target:.2f}", share >= target))  # fmt: skip
    if "l" in r:
        img = rate(r["l"], "img_s")
        share = img / a_img if a_img else 0.0
        preloaded = r.get("l_preload_s")
        first = f" (its 8 LoRAs made resident first in {preloaded:.1f} s)" if preloaded else ""
        rows.append(("(l) half with LoRAs img/s, / (a)", f"{img:.2f} = {share:.2f}{first}",
                     "≥ 0.90", share >= 0.90))  # fmt: skip
    if "h" in r and "k" in r:  # a run before NEEDS ran (h) without (k): no prediction to read
        from bench.controlnets import predicted

        expected = predicted(a_img, rate(r["k"], "img_s"))
        share = rate(r["h"], "img_s") / expected
        rows.append(("(h) half controlled img/s, / what (a) and (k) predict",
                     f"{rate(r['h'], 'img_s'):.2f} / {expected:.2f} = {share:.2f}", "≥ 0.95",
                     share >= 0.95))  # fmt: skip
    if "c" in r:
        c = r["c"]
        rows.append((f"(c) Poisson {c['rate_per_s']:.2f}/s p50 / p95 s",
                     f"{c['latency_p50_s']:.2f} / {c['latency_p95_s']:.2f}", "≤ 1.0 / 2.0",
                     c["latency_p50_s"] <= 1.0 and c["latency_p95_s"] <= 2.0))  # fmt: skip
        eta = c["eta"]
        shares = [eta[moment]["p50"] for moment in ("at_submission", "at_half")]
        met = all(x is not None and x <= 0.20 for x in shares)
        rows.append(("(c) `eta_s` error p50: at submission / at half the steps",
                     " / ".join("-" if x is None else f"{x:.0%}" for x in shares),
                     "≤ 20% / ≤ 20%", met))  # fmt: skip
    alone = r["alone"]["latency_p50_s"]
    rows.append(("alone p50 s", f"{alone:.3f}", "≤ 0.25", alone <= 0.25))
    if r.get("cache_kept"):  # --keep-cache: a start from what an earlier run compiled
        rows.append(("start s, from the compile cache kept", f"{r['cold_start_s']:.0f}", "≤ 30",
                     r["cold_start_s"] <= 30))  # fmt: skip
    elif "warm_start_s" in r:
        rows.append(("cold start s / with the compile cache",
                     f"{r['cold_start_s']:.0f} / {r['warm_start_s']:.0f}", "≤ 90 / ≤ 30",
                     r["cold_start_s"] <= 90 and r["warm_start_s"] <= 30))  # fmt: skip
    else:  # --no-restart
        rows.append(("cold start s", f"{r['cold_start_s']:.0f}", "≤ 90",
                     r["cold_start_s"] <= 90))  # fmt: skip
    if "cold_warm_s" in r:  # the entries left for idle time recorded (kinds sent meanwhile)
        cached = f" / {r['cached_warm_s']:.0f}" if "cached_warm_s" in r else ""
        rows.append(("fully warm s after the start: cold (every kind sent meanwhile) / cached"
                     " (idle)", f"{r['cold_warm_s']:.0f}{cached}", "stated", True))  # fmt: skip
    return rows


def table(r: dict[str, Any], rows: list[tuple[str, str, str, bool]]) -> str:
    lines = [f"GPU: {r['gpu']}, {r['date']}, commit {r['commit']}, `{r['command']}`", "",
             "| figure | measured | target | |", "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {a} | {b} | {c} | {'met' if ok else '**missed**'} |" for a, b, c, ok in rows]
    lines += ["", f"| load | {THROUGHPUT_HEADS} | p50 / p95 s | queue wait p50 / p95 s |"
              " GPU in steps / decodes / encodes | step ms | rows a step | padding rows |"
              f" loop's host time: {' / '.join(LOOP_PHASES)} (of it waiting for the GPU) |"
              f" taken to joined, mean ms ({' / '.join(JOIN_PARTS)}); calls ahead |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for key in [k for k in ("a", "b", "c", "d", "e", "l", "k", "h") if k in r]:
        x = r[key]
        g = x.get("gpu")
        gpu = "| | | | | |"
        if g:
            shares = f"{g['step_share']:.0%} / {g['decode_share']:.0%} / {g['encode_share']:.0%}"
            loop = " / ".join(f"{share:.0%}" for share in g.get("loop", {}).values())
            loop += f" ({g.get('lead_wait', float('nan')):.0%})"
            split = " / ".join(f"{ms:.0f}" for ms in g.get("join_parts_ms", {}).values())
            joins = (
                f"{g.get('join_wait_ms', float('nan')):.0f} ({split});"
                f" {g.get('take_ahead', float('nan')):.0f}"
            )  # older runs: nan
            gpu = (f"{shares} | {g['step_ms']:.1f} | {g['rows_per_step']:.1f} |"
                   f" {g['padding_share']:.0%} | {loop} | {joins} |")  # fmt: skip
        ends = f"{x['latency_p50_s']:.2f} / {x['latency_p95_s']:.2f}"
        waits = f"{x['queue_wait_p50_s']:.2f} / {x['queue_wait_p95_s']:.2f}"
        lines.append(f"| ({key}) | {throughput(x)} | {ends} | {waits} | {gpu}")
    parts = r["c"]["eta"].get("parts") if "c" in r else None  # an older run's have none
    if parts:
        lines += ["", *parts_lines(parts)]
    for profiled in [k for k in PROFILED if r.get(k, {}).get("threads")]:
        lines += ["", *threads.lines(profiled, r[profiled]["threads"])]
    if r.get("start_phases"):
        lines += ["", *threads.start_lines(r["start_phases"])]
    return "\n".join(lines) + "\n"


SWITCHES = {
    "--kinds-only": "only the start, every kind once (no compile while serving) and alone: a"
    " model too large for the loads in one call (SDXL: --arch sdxl --side 1024 --max-batch 8)",
    "--loras": "serve 8 LoRAs: kinds with LoRAs, (l) half with",
    "--controlnets": "serve a ControlNet: kinds with a unit, (k) every request and (h) half"
    " controlled",
    "--no-restart": "no second start with the compile cache",
    "--masked-contexts": "the worker with SDSERVE_MASKED_CONTEXTS: rows of every prompt length"
    " in one call",
    "--profile": "sample the worker's threads with py-spy during (a) and (l): where each one"
    " waits, and which holds Python's lock (bench/threads.py)",
    "--profile-start": "sample the cached start with py-spy: its seconds by stage and what"
    " torch does in each (bench/threads.py)",
}


def main() -> None:
    parser = batching.service_parser(__doc__ or "", seconds=15)
    parser.set_defaults(warmup=5)
    for flag, what in SWITCHES.items():
        parser.add_argument(flag, action="store_true", help=what)
    parser.add_argument(
        "--loads",
        help="the loads to run, comma-separated (a is always run; default: all): a shorter"
        " check, e.g. --loads a,e --no-restart beside --masked-contexts",
    )
    args = parser.parse_args()
    work = batching.prepare(args)
    batching.SOURCE_PICTURE.append(batching.source_picture())
    results: dict[str, Any] = batching.provenance(args.device)
    results |= run(args, work)
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=2))  # kept if cut off
    if args.kinds_only:
        for line in results["worker_log"]:
            print(line)
        kinds_ok = results["recompiles"] == 0 and all(
            k["status"] == "succeeded" for k in results["kinds"]
        )
        print(
            f"{args.arch} at {args.side}: start {results['cold_start_s']:.0f} s, alone p50"
            f" {results['alone']['latency_p50_s']:.3f} s, recompiles {results['recompiles']:.0f}"
        )
        sys.exit(0 if kinds_ok else 2)
    rows = checks(results)
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=2))
    text = table(results, rows)
    (args.out / "gpu_check.md").write_text(text)
    print(text)
    for when in ("worker_log", "warm_worker_log"):  # the cold start's, then the cached one's
        print(f"{when}:", *results.get(when, []), sep="\n")
    kinds_ok = all(ok for name, _, _, ok in rows if name.startswith(("kind", "recompiles")))
    sys.exit(0 if all(ok for *_, ok in rows) else 1 if kinds_ok else 2)


if __name__ == "__main__":
    main()
