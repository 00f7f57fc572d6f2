"""LoRAs per row on one GPU (issue 23, 8), side by side in one run: the service without and with
LoRAs, and plain diffusers grouping requests by their LoRA set (its only way).

SD1.5-sized (`--arch sd15`) or SDXL-sized (`--arch sdxl --side 1024`) random weights; 8 LoRAs of
ranks 16 to 128 written for the model (`worker/tiny_addons.py`, kohya and PEFT layouts); half the
requests carry one of them, one in five of those two (their ranks within the row's 128). Stages,
each writing OUT/loras.json as it goes:

  service    the whole service as processes with SDSERVE_LORA_DIR: its start, (n) the uniform
             closed loop without LoRAs, (l) the same with half the requests carrying LoRAs,
             each LoRA's first load (the worker's log), one request alone without a LoRA and
             one with a LoRA not yet on the GPU, the pools' memory, recompiles
  diffusers  `load_lora_weights` of the 8 files, `set_adapters` per group: the same request
             stream grouped by LoRA set into batches of up to --max-batch, against its own
             batches without LoRAs

    python3 -m bench.loras --out DIR [--arch sd15] [--stages service,diffusers] [--seconds 30]
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from bench import batching
from bench.batching import closed_loop, compile_cache, prepare, rate, service
from bench.bench import one_request
from bench.worker_metrics import GPU_SUMS, Window, fully_warm, gpu_share, metric
from worker.tiny_addons import build_tiny_lora

RANKS = (16, 32, 64, 128, 16, 32, 64, 128)
NAMES = [f"lora{k}" for k in range(len(RANKS))]
STEPS = 25


def lora_set(i: int) -> list[dict[str, Any]]:
    """Request i's LoRAs: none for even i; one, or (one in five) two whose ranks fit in 128."""
    if i % 2 == 0:
        return []
    rng = random.Random(i)
    first = rng.randrange(len(NAMES))
    chosen = [{"name": NAMES[first], "weight": round(rng.uniform(0.5, 1.0), 2)}]
    if rng.random() < 0.2:
        room = [k for k in range(len(NAMES)) if k != first and RANKS[k] + RANKS[first] <= 128]
        if room:
            chosen.append({"name": NAMES[rng.choice(room)], "weight": 0.5})
    return chosen


def plain(i: int) -> dict[str, Any]:
    return batching.uniform(i)


def with_loras(i: int) -> dict[str, Any]:
    return batching.uniform(i) | {"loras": lora_set(i)}


def write_loras(model: Path, folder: Path) -> dict[str, float]:
    """The 8 LoRAs (and `cold`, used once, later), written once; seconds each took."""
    folder.mkdir(parents=True, exist_ok=True)
    took = {}
    for k, (name, rank) in enumerate(zip([*NAMES, "cold"], [*RANKS, 64], strict=True)):
        path = folder / f"{name}.safetensors"
        if not path.exists():
            started = time.monotonic()
            build_tiny_lora(model, path, "kohya" if k % 2 else "peft", rank, seed=k)
            took[name] = time.monotonic() - started
    return took


# -- the service ----------------------------------------------------------------------------


def service_stage(args: Any, work: Path, folder: Path, result: dict[str, Any], save: Any) -> None:
    cache = compile_cache(work, "loras", args)
    result["cache_kept"] = args.keep_cache  # then its start is no cold start
    # `cold` is not there at start: it comes later, for the uncached request.
    cold = folder / "cold.safetensors"
    aside = folder.parent / "cold.safetensors"
    if cold.exists():
        cold.rename(aside)
    extra = {"SDSERVE_LORA_DIR": str(folder), "SDSERVE_LORA_SLOTS": "10",
             "SDSERVE_HEARTBEAT_TTL_S": "3"}  # fmt: skip
    with service(args.model, "continuous", args, work, cache, extra) as (url, startup, log):
        result["cold_start_s"] = startup
        text = log.read_text()
        # Once per engine: on CUDA the compile helpers (worker/helpers.py) log it too.
        result["pools"] = sorted(set(re.findall(r"LoRAs from .*", text)))
        print(f"ready in {startup:.0f}s: {result['pools']}", flush=True)
        result["fully_warm_s"] = fully_warm(startup, time.monotonic())  # loads on a warm worker
        save()
        for name, body in (("n", plain), ("l", with_loras)):
            if name == "l":  # each LoRA's first load is a figure of its own, not in (l)'s window
                result["preload_s"] = asyncio.run(preload(url))
            # Where the worker's time went: a slower step, or fewer rows a step (jobs waiting
            # to join), tell apart what (l) loses to the kernel and what to the loop.
            window = Window(args.warmup, args.seconds, GPU_SUMS)
            result[name] = asyncio.run(closed_loop(url, args.clients, body, args.warmup,
                                                   args.seconds, window))  # fmt: skip
            ends = window.ends()
            result[name]["gpu"] = gpu_share(*ends) if ends else None
            print(f"({name}): {result[name]}", flush=True)
            save()
        result["first_loads"] = re.findall(r"LoRA (\S+) loaded in ([\d.]+)s", log.read_text())
        aside.rename(cold)
        result["alone"] = asyncio.run(alone_pair(url))
        print(f"alone: {result['alone']}", flush=True)
        result["recompiles"] = metric("sdserve_worker_recompiles_total")
        save()


async def preload(url: str) -> float:
    """One request for each of the 8 LoRAs at once, until all are done: their first loads."""
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        await asyncio.gather(*[one_request(http, plain(90_000 + k) | {"loras": [{"name": name}]},
                                           0.05) for k, name in enumerate(NAMES)])  # fmt: skip
    return time.monotonic() - started


async def alone_pair(url: str) -> dict[str, float]:
    """One request alone without a LoRA (p50 of 5), and one with `cold` (not yet on the GPU:
    its file read and written into the pools while the request waits)."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        for _ in range(30):  # the worker lists the folder each heartbeat
            names = [e["name"] for e in (await http.get("/v1/loras")).json()["data"]]
            if "cold" in names:
                break
            await asyncio.sleep(0.5)
        times = []
        for i in range(5):
            done = await one_request(http, plain(70_000 + i), poll_s=0.01)
            times.append(done.finished - done.submitted)
        done = await one_request(http, plain(80_000) | {"loras": [{"name": "cold"}]}, 0.01)
        warm = await one_request(http, plain(80_001) | {"loras": [{"name": "cold"}]}, 0.01)
    return {"plain_p50_s": statistics.median(times),
            "uncached_lora_s": done.finished - done.submitted,
            "cached_lora_s": warm.finished - warm.submitted}  # fmt: skip


# -- diffusers ------------------------------------------------------------------------------


def diffusers_stage(args: Any, folder: Path, requests: int) -> dict[str, Any]:
    """The same request stream (the first `requests` of it) in batches of up to max_batch:
    without LoRAs, and grouped by LoRA set (set_adapters per group)."""
    import torch
    from diffusers import DiffusionPipeline

    device = args.device
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    load = {}
    for name in NAMES:
        started = time.perf_counter()
        pipe.load_lora_weights(str(folder / f"{name}.safetensors"), adapter_name=name)
        load[name] = time.perf_counter() - started

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def run(batch: list[int]) -> None:
        generators = [torch.Generator(device).manual_seed(i) for i in batch]
        pipe([batching.uniform(i)["prompt"] for i in batch], num_inference_steps=STEPS,
             guidance_scale=7.5, height=args.side, width=args.side, output_type="np",
             generator=generators)  # fmt: skip

    def stream(grouped: bool) -> float:
        groups: dict[str, list[int]] = {}
        for i in range(requests):
            key = json.dumps(lora_set(i) if grouped else [])
            groups.setdefault(key, []).append(i)
        sync()
        started = time.perf_counter()
        for key, members in groups.items():
            chosen = json.loads(key)
            if chosen:
                pipe.enable_lora()
                pipe.set_adapters([c["name"] for c in chosen], [c["weight"] for c in chosen])
            else:
                pipe.disable_lora()
            for at in range(0, len(members), args.max_batch):
                run(members[at : at + args.max_batch])
        sync()
        return requests / (time.perf_counter() - started)

    stream(False)  # first calls' kernel choices
    result = {"load_s": load, "requests": requests}
    result["plain_img_s"] = stream(False)
    result["grouped_img_s"] = stream(True)
    print(f"diffusers: {result}", flush=True)
    return result


# -- the table ------------------------------------------------------------------------------


def table(r: dict[str, Any]) -> str:
    lines = [f"LoRAs per row, {r['gpu']}, {r['date']}, commit {r['commit']}, `{r['command']}`",
             "", "| figure | measured | target |", "|---|---|---|"]  # fmt: skip
    s, d = r.get("service", {}), r.get("diffusers")
    rows: list[tuple[str, str, str]] = []
    if "n" in s:
        rows.append(("sdserve (n) no LoRA img/s", f"{rate(s['n'], 'img_s'):.2f}", ""))
    if "l" in s:
        img = rate(s["l"], "img_s")
        share = img / rate(s["n"], "img_s")
        verdict = "met" if share >= 0.9 else "**missed**"
        rows.append(("sdserve (l) half with LoRAs img/s, / (n)",
                     f"{img:.2f} = {share:.2f}", f"≥ 0.90 {verdict}"))  # fmt: skip
    gpu = {k: s[k]["gpu"] for k in ("n", "l") if s.get(k, {}).get("gpu")}
    if len(gpu) == 2:
        off, on = gpu["n"], gpu["l"]
        rows.append(("step ms at rows a step: (n) / (l)",
                     f"{off['step_ms']:.1f} at {off['rows_per_step']:.1f} /"
                     f" {on['step_ms']:.1f} at {on['rows_per_step']:.1f}", ""))  # fmt: skip
        rows.append(("GPU in steps / decodes: (n) / (l)",
                     f"{off['step_share']:.0%} / {off['decode_share']:.0%} /"
                     f" {on['step_share']:.0%} / {on['decode_share']:.0%}", ""))  # fmt: skip
        rows.append(("taken to joined ms: (n) / (l)",
                     f"{off['join_wait_ms']:.0f} / {on['join_wait_ms']:.0f}", ""))  # fmt: skip
    if d:
        share = d["grouped_img_s"] / d["plain_img_s"]
        rows.append(("diffusers grouped by LoRA set img/s, / its no-LoRA",
                     f"{d['grouped_img_s']:.2f} = {share:.2f}", ""))  # fmt: skip
        if "l" in s:
            rows.append(("sdserve (l) / diffusers grouped",
                         f"{rate(s['l'], 'img_s') / d['grouped_img_s']:.2f}", ""))  # fmt: skip
    if s.get("first_loads"):
        loads = [float(t) for _name, t in s["first_loads"]]
        rows.append(("a LoRA's first load s, median / max",
                     f"{statistics.median(loads):.2f} / {max(loads):.2f}", ""))  # fmt: skip
    if "alone" in s:
        a = s["alone"]
        rows.append(("alone s: no LoRA / LoRA not cached / cached",
                     f"{a['plain_p50_s']:.2f} / {a['uncached_lora_s']:.2f} /"
                     f" {a['cached_lora_s']:.2f}", ""))  # fmt: skip
    if "recompiles" in s:
        rows.append(("recompiles while serving", f"{s['recompiles']:.0f}",
                     "0 " + ("met" if s["recompiles"] == 0 else "**missed**")))  # fmt: skip
    if "cold_start_s" in s:
        rows.append((f"start s ({batching.start_name(s)})", f"{s['cold_start_s']:.0f}", ""))
    for pool in s.get("pools", []):
        rows.append(("pools", pool.split(": ", 1)[-1], ""))
    return "\n".join(lines + [f"| {a} | {b} | {c} |" for a, b, c in rows]) + "\n"


def main() -> None:
    parser = batching.service_parser(__doc__ or "", seconds=30)
    parser.set_defaults(max_batch=16, clients=32, warmup=10)
    parser.add_argument("--stages", default="service,diffusers")
    parser.add_argument("--requests", type=int, default=128, help="diffusers' request stream")
    args = parser.parse_args()
    work = prepare(args)
    model = Path(args.model)
    folder = work / f"loras-{model.name}"
    wrote = write_loras(model, folder)
    if wrote:
        print(f"wrote LoRAs: {wrote}", flush=True)
    results, save = batching.recorded(args.out, "loras", args.device)

    for stage in args.stages.split(","):
        if stage == "service":
            results["service"] = {}
            service_stage(args, work, folder, results["service"], save)
        elif stage == "diffusers":
            results["diffusers"] = diffusers_stage(args, folder, args.requests)
        save()
    (args.out / "loras.md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
