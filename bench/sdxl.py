"""SDXL on one GPU, side by side in one run: plain diffusers against sdserve over HTTP.

SDXL-sized random weights (`make-tiny-model --arch sdxl` and `sdxl-refiner`), 1024x1024,
30 steps, Euler, guidance 7. Two stages, each writing OUT/sdxl.json as it goes:

  diffusers  `StableDiffusionXLPipeline`: one image at a time, then batches of 1, 2, 4 and 8
             images a call (its best batch is the baseline), then one at a time again with its
             UNet compiled (torch.compile, CUDA graphs), the fair figure for "alone"
  service    the whole service as processes (Valkey, `sdserve api`, `sdserve worker` holding
             the base and the refiner, continuous batching, an empty compile cache): its start,
             then (a) uniform closed loop, (b) mixed steps, samplers and guidance, (r) every job
             with the refiner (switch at 0.8), (c) Poisson arrivals of (b) at 60% of (a), and
             one request alone; the GPU memory each model holds (the worker's log); with
             `--restart`, a second start with the compile cache
  restart    that second start alone (after a `service` stage on the same machine)

Throughput in images/s and in 30-step equivalents/s (steps run / 30; a refined job's steps
are its base's and its refiner's). The table, with the issue's targets, goes to OUT/sdxl.md.

    python3 -m bench.sdxl --out DIR [--stages service,diffusers,restart] [--seconds 30]
        [--warmup 15] [--restart] [--loads a,b,r,c] [--sd15] [--no-refiner]
        [--diffusers-batches 1,2,4,8] [--no-compiled]
"""

from __future__ import annotations

import asyncio
import random
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from bench import batching
from bench.batching import chosen_loads, closed_loop, compile_cache, poisson, rate, service
from bench.bench import one_request, percentile, prompt
from bench.worker_metrics import GPU_SUMS, LOGGED, Window, fully_warm, gpu_share, metric
from worker.tiny import build_tiny_model

SIDE, STEPS, GUIDANCE, SAMPLER = 1024, 30, 7.0, "euler"
SWITCH = 0.8
MIX_STEPS = (20, 30, 40)
MIX_SAMPLERS = ("euler", "dpmpp_2m", "euler_a")
BATCHES = (1, 2, 4, 8)
LOADS = ("a", "b", "r", "c")  # the service's loads, in the order they run


def uniform(i: int) -> dict[str, Any]:
    return {"prompt": prompt(i), "seed": i, "steps": STEPS, "scheduler": SAMPLER,
            "guidance_scale": GUIDANCE, "width": SIDE, "height": SIDE,
            "model": "xl"}  # fmt: skip


def mixed(i: int) -> dict[str, Any]:
    rng = random.Random(i)
    return uniform(i) | {"steps": rng.choice(MIX_STEPS), "scheduler": rng.choice(MIX_SAMPLERS),
                         "guidance_scale": round(rng.uniform(4, 9), 2)}  # fmt: skip


def sd_request(i: int) -> dict[str, Any]:
    """A request for the SD 1.5-sized model at its own default size (`--sd15`)."""
    side = max(SIDE // 2, 64)  # 512 beside SDXL's 1024; 64 in the CPU smoke run
    return uniform(i) | {"model": "sd", "width": side, "height": side}


def refined(i: int) -> dict[str, Any]:
    return uniform(i) | {"refiner": {"model": "refiner", "switch_at": SWITCH}}


def models(work: Path, tiny: bool, sd15: bool = False, refiner: bool = True) -> dict[str, Path]:
    """The base and the refiner at SDXL's sizes, built once (random weights, fp16); at the tiny
    sizes for a CPU smoke run. With `sd15`, an SD 1.5-sized model too (`sd`), served beside
    them by the same worker; without `refiner`, the base alone (or with SD 1.5)."""
    arch = "tiny-sdxl" if tiny else "sdxl"
    archs = {"xl": arch, "refiner": f"{arch}-refiner"} if refiner else {"xl": arch}
    if sd15:
        archs["sd"] = "tiny" if tiny else "sd15"
    made = {name: work / arch for name, arch in archs.items()}
    for name, path in made.items():
        if not (path / "model_index.json").exists():
            started = time.monotonic()
            build_tiny_model(path, archs[name])
            print(f"built {name} in {time.monotonic() - started:.0f}s", flush=True)
    return made


# -- diffusers ------------------------------------------------------------------------------


def free_gpu() -> None:
    """Hand back what diffusers' stage left in this process's allocator, for a service stage
    after it: its batch of 16 at 1024x1024 held so much that a worker started next ran out of
    memory at its warm-up (an H100, 2026-12-07)."""
    import gc

    import torch

    torch._dynamo.reset()  # the compiled run's graphs hold its UNet and their memory pool
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def diffusers_stage(
    base: Path, batches_run: tuple[int, ...] = BATCHES, compiled: bool = True
) -> dict[str, Any]:
    import torch
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(base), torch_dtype=torch.float16)
    pipe = pipe.to("cuda")
    pipe.set_progress_bar_config(disable=True)
    result: dict[str, Any] = {}

    def call(count: int, seed: int) -> float:
        torch.cuda.synchronize()
        started = time.perf_counter()
        seeds = [torch.Generator("cuda").manual_seed(seed + k) for k in range(count)]
        pipe([prompt(seed + k) for k in range(count)], num_inference_steps=STEPS,
             guidance_scale=GUIDANCE, height=SIDE, width=SIDE, output_type="np",
             generator=seeds)  # fmt: skip
        torch.cuda.synchronize()
        return time.perf_counter() - started

    call(1, 0)  # the first call's kernel choices
    result["alone_s"] = statistics.median(call(1, 10 + k) for k in range(3))
    print(f"diffusers alone {result['alone_s']:.2f}s", flush=True)
    batches = {}
    for count in batches_run:
        call(count, 100)
        seconds = statistics.median(call(count, 200 + k) for k in range(2))
        batches[count] = count / seconds
        print(f"diffusers batch {count}: {batches[count]:.3f} img/s", flush=True)
    result["batches_img_s"] = batches
    result["best_batch"] = max(batches, key=lambda k: batches[k])
    result["best_img_s"] = max(batches.values())
    result["memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if not compiled:
        return result
    # Compiled as diffusers' own guide does it (channels-last, CUDA graphs), one at a time.
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)
    started = time.monotonic()
    call(1, 0)
    call(1, 1)
    result["compile_s"] = time.monotonic() - started
    result["alone_compiled_s"] = statistics.median(call(1, 20 + k) for k in range(3))
    print(f"diffusers alone compiled {result['alone_compiled_s']:.2f}s (compiled in"
          f" {result['compile_s']:.0f}s)", flush=True)  # fmt: skip
    return result


# -- the service ----------------------------------------------------------------------------


async def alone(
    url: str, requests: int, body: Callable[[int], dict[str, Any]] = uniform
) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        await one_request(http, body(0), poll_s=0.01)
        latencies = []
        for i in range(requests):
            done = await one_request(http, body(50_000 + i), poll_s=0.01)
            latencies.append(done.finished - done.submitted)
    return {"latency_p50_s": percentile(sorted(latencies), 50), "requests": requests}


def held_memory(log: Path) -> dict[str, str]:
    """What the worker said each model holds on the GPU."""
    found = re.findall(r"model (\w+) \(.*?\): (.*?); loaded in (.*)$", log.read_text(), re.M)
    return {name: f"{held}; loaded in {rest}" for name, held, rest in found}


def service_stage(
    args: Any, work: Path, made: dict[str, Path], result: dict[str, Any], save: Callable[[], None]
) -> None:
    """Fills `result` in, saving after each figure (a call cut short keeps what it had)."""
    chosen = chosen_loads(args.loads, LOADS)  # refused before a start of minutes
    cache = compile_cache(work, "sdxl", args)
    result["cache_kept"] = args.keep_cache  # then its start is no cold start
    extra = {"SDSERVE_MODELS": ",".join(f"{name}={path}" for name, path in made.items())}
    warm, secs = args.warmup, args.seconds
    with service(str(made["xl"]), "continuous", args, work, cache, extra) as (url, startup, log):
        result["cold_start_s"] = startup
        result["memory"] = held_memory(log)
        print(f"ready in {startup:.0f}s: {result['memory']}", flush=True)
        # Alone and the loads on a fully warm worker: while the start's entries left for idle
        # time are recorded (about 1 s each at 1024x1024), a job arriving waits for one.
        result["fully_warm_s"] = fully_warm(startup, time.monotonic())
        print(f"fully warm {result['fully_warm_s']:.0f}s after the start", flush=True)
        result["worker_log"] = [line for line in log.read_text().splitlines()
                                if re.search(LOGGED, line)]  # fmt: skip
        save()
        result["alone"] = asyncio.run(alone(url, 5))
        print(f"alone: {result['alone']}", flush=True)
        if "sd" in made:  # the SD 1.5 model served beside SDXL's: its own size, its own rows
            result["alone_sd"] = asyncio.run(alone(url, 5, sd_request))
            result["recompiles"] = metric("sdserve_worker_recompiles_total")
            print(f"alone, SD 1.5: {result['alone_sd']}", flush=True)
        for name, body in (("a", uniform), ("b", mixed), ("r", refined)):
            if name not in chosen:
                continue
            window = Window(warm, secs, GPU_SUMS)  # where the GPU's time went (its decodes)
            result[name] = asyncio.run(closed_loop(url, args.clients, body, warm, secs))
            ends = window.ends()
            result[name]["gpu"] = gpu_share(*ends) if ends else None
            result["recompiles"] = metric("sdserve_worker_recompiles_total")
            print(f"({name}): {result[name]}", flush=True)
            save()
        if "c" in chosen:
            rate_s = max(0.6 * rate(result["a"], "img_s"), 0.05)
            result["c"] = asyncio.run(poisson(url, rate_s, mixed, warm, secs))
            result["recompiles"] = metric("sdserve_worker_recompiles_total")
            print(f"(c): {result['c']}", flush=True)
            save()
    if args.restart:
        restart(args, work, made, result)


def restart(args: Any, work: Path, made: dict[str, Path], result: dict[str, Any]) -> None:
    """The service started again, with the compile cache its first start left."""
    extra = {"SDSERVE_MODELS": ",".join(f"{name}={path}" for name, path in made.items())}
    cache = work / "inductor-sdxl"
    with service(str(made["xl"]), "continuous", args, work, cache, extra) as (_u, took, _l):
        result["warm_start_s"] = took
        print(f"ready in {took:.0f}s with the compile cache", flush=True)


# -- the table ------------------------------------------------------------------------------


def table(r: dict[str, Any]) -> str:
    lines = [f"SDXL, {r['gpu']}, {r['date']}, commit {r['commit']}, `{r['command']}`", ""]
    d, s = r.get("diffusers"), r.get("service")
    rows: list[tuple[str, str, str]] = []
    if d:
        batches = ", ".join(f"{k}: {v:.3f}" for k, v in d["batches_img_s"].items())
        rows.append(("diffusers img/s by batch", batches, ""))
        rows.append(("diffusers alone, eager / compiled s",
                     f"{d['alone_s']:.2f} / {d.get('alone_compiled_s', float('nan')):.2f}",
                     ""))  # fmt: skip
    if s:
        rows += service_rows(s, d)
    lines += ["| figure | measured | target |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines) + "\n"


def service_rows(s: dict[str, Any], d: dict[str, Any] | None) -> list[tuple[str, str, str]]:
    """The service's figures against their targets, as far as the run got."""
    rows: list[tuple[str, str, str]] = []

    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    def eq30(key: str) -> float:
        return rate(s[key], "eq25_s") * 25 / STEPS

    rows.append(
        (
            f"start s: first ({batching.start_name(s)}) / with the compile cache",
            f"{s['cold_start_s']:.0f} / {s.get('warm_start_s', float('nan')):.0f}",
            "",
        )
    )
    if "fully_warm_s" in s:  # an older run's results have none
        rows.append(("fully warm s after the start (idle)", f"{s['fully_warm_s']:.0f}", ""))
    for name, held in s["memory"].items():
        rows.append((f"GPU memory, model {name}", held, ""))
    if "alone" in s and d and "alone_compiled_s" in d:
        ratio = s["alone"]["latency_p50_s"] / d["alone_compiled_s"]
        rows.append(
            (
                "alone p50 s, / diffusers compiled",
                f"{s['alone']['latency_p50_s']:.2f} = {ratio:.2f}",
                f"≤ 1.10 {verdict(ratio <= 1.10)}",
            )
        )
    if "alone_sd" in s:
        rows.append(
            ("alone p50 s, SD 1.5 beside SDXL", f"{s['alone_sd']['latency_p50_s']:.2f}", "")
        )
    if "a" in s:
        rows.append(("(a) uniform img/s", f"{rate(s['a'], 'img_s'):.3f}", ""))
        g = s["a"].get("gpu")  # an older run's have none
        if g:
            rows.append(("(a) GPU in steps / decodes; step ms at rows a step",
                         f"{g['step_share']:.0%} / {g['decode_share']:.0%};"
                         f" {g['step_ms']:.0f} at {g['rows_per_step']:.1f}", ""))  # fmt: skip
        if d:
            ratio = rate(s["a"], "img_s") / d["best_img_s"]
            rows.append(
                ("(a) / diffusers' best batch", f"{ratio:.2f}", f"≥ 1.3 {verdict(ratio >= 1.3)}")
            )
    for key, name, target in (("b", "(b) mixed", 0.95), ("r", "(r) base + refiner", 0.90)):
        if key in s:
            share = eq30(key) / eq30("a")
            rows.append((f"{name}, 30-step eq./s of (a)'s", f"{eq30(key):.3f} = {share:.2f}",
                         f"≥ {target:.2f} {verdict(share >= target)}"))  # fmt: skip
    if "c" in s:
        c = s["c"]
        rows.append(
            (
                f"(c) Poisson {c['rate_per_s']:.2f}/s p50 / p95 s",
                f"{c['latency_p50_s']:.2f} / {c['latency_p95_s']:.2f}",
                "",
            )
        )
    if "recompiles" in s:
        rows.append(
            (
                "recompiles while serving",
                f"{s['recompiles']:.0f}",
                f"0 {verdict(s['recompiles'] == 0)}",
            )
        )
    return rows


def main() -> None:
    parser = batching.service_parser(__doc__ or "", seconds=30)
    parser.set_defaults(max_batch=8, clients=16, warmup=15, side=1024, model="")
    parser.add_argument("--stages", default="service,diffusers")
    parser.add_argument(
        "--sd15",
        action="store_true",
        help="the worker holds an SD 1.5-sized model too (issue 22: the start of a worker"
        " holding both families), and one SD 1.5 request runs alone",
    )
    parser.add_argument(
        "--no-refiner",
        action="store_true",
        help="the worker holds no refiner (issue 22: the start of a worker holding SD 1.5 and"
        " SDXL, with --sd15); the load (r) is then refused",
    )
    parser.add_argument(
        "--loads",
        help="the service's loads, comma-separated (a is always run; default: a,b,r,c), e.g."
        " --loads a,c to fit a start and the Poisson load in one device call",
    )
    parser.add_argument(
        "--diffusers-batches",
        default=",".join(map(str, BATCHES)),
        help="diffusers' batch sizes (default 1,2,4,8), e.g. 8 alone (its best on an H100) to"
        " fit the service's start beside it in one device call",
    )
    parser.add_argument(
        "--no-compiled",
        action="store_true",
        help="diffusers' stage skips its compiled one-at-a-time run (no alone ratio)",
    )
    parser.add_argument(
        "--restart",
        action="store_true",
        help="start the service again with the compile cache the first left",
    )
    args = parser.parse_args()
    global SIDE
    SIDE = args.side  # a CPU smoke run: --device cpu --side 64 (the tiny SDXL)
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path("/tmp/sdserve-bench")
    work.mkdir(parents=True, exist_ok=True)
    if args.no_refiner and "r" in chosen_loads(args.loads, LOADS):
        parser.error("--no-refiner leaves no refiner for the load (r): choose --loads without r")
    made = models(work, args.device == "cpu", args.sd15, refiner=not args.no_refiner)
    results, save = batching.recorded(args.out, "sdxl", args.device)

    for stage in args.stages.split(","):
        if stage == "service":
            results["service"] = {}
            service_stage(args, work, made, results["service"], save)
        elif stage == "restart":
            restart(args, work, made, results.setdefault("service", {}))
        elif stage == "diffusers":
            batches = tuple(int(b) for b in args.diffusers_batches.split(","))
            results["diffusers"] = diffusers_stage(made["xl"], batches, not args.no_compiled)
            free_gpu()
        save()
    (args.out / "sdxl.md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
