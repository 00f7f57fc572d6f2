"""ControlNet per row on one GPU (issue 24, 5), side by side in one run: the service under
uniform ControlNet load, without it, and half and half; and plain diffusers' ControlNet pipeline
at its best batch.

SD1.5-sized (`--arch sd15`) or SDXL-sized (`--arch sdxl --side 1024 --max-batch 16`) random
weights, and two random ControlNets of the model's size (`worker/tiny_addons.py`, the real
control embedding's widths; two, as deployments serve several, whose compiled forwards share one
graph). Every request is (a)'s of the GPU check (25 steps DPM++ 2M, CFG 7.5), a controlled one
with one unit (weight 0.8, one ControlNet or the other by turns) on a picture of the image's
size. Stages, each writing OUT/controlnets.json as it goes:

  service    the whole service as processes with SDSERVE_CONTROLNETS: its start; every kind of
             the GPU check, then those a unit goes on (txt2img, img2img, inpainting, the hires
             fix) with one: none may compile; (n) the
             uniform closed loop without control, (c) every request controlled, (h) half of
             them controlled; one request alone without and with control; recompiles
  diffusers  `StableDiffusionControlNetPipeline` (or the SDXL one) at batches of --batches
             images a call; its best batch is the baseline

(h) is held against what (n) and (c) predict for half and half: an image costs 1/rate, so the
mix makes 1 / (0.5 / n + 0.5 / c) images a second (target ≥ 0.95 of that).

    python3 -m bench.controlnets --out DIR [--arch sd15] [--stages service,diffusers]
        [--seconds 15] [--batches 1,8,16]
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from bench import batching
from bench.batching import closed_loop, compile_cache, prepare, rate, service
from bench.bench import one_request, prompt
from bench.gpu_check import (
    cudagraph_skips,
    every_kind,
    kinds,
    picture,
    recompiles,
)
from bench.worker_metrics import GPU_SUMS, Window, fully_warm, gpu_share
from worker.tiny_addons import build_tiny_controlnet

NAMES = ("edges", "depth")
WEIGHT = 0.8
CONTROL_PICTURE: list[str] = []  # base64 PNG at the benchmark's side, made once


def unit(k: int = 0) -> dict[str, Any]:
    """A unit of the k-th turn's ControlNet."""
    if not CONTROL_PICTURE:  # after prepare() set the side
        CONTROL_PICTURE.append(picture(batching.SIDE))
    return {"model": NAMES[k % len(NAMES)], "image": CONTROL_PICTURE[0], "weight": WEIGHT}


def plain(i: int) -> dict[str, Any]:
    return batching.uniform(i)


def controlled(i: int) -> dict[str, Any]:
    return batching.uniform(i) | {"controlnets": [unit(i // 2)]}  # (h)'s odd i by turns too


def half(i: int) -> dict[str, Any]:
    return controlled(i) if i % 2 else plain(i)


def predicted(n: float, c: float) -> float:
    """Images a second of a half-and-half load, from the two uniform loads' rates."""
    return 1.0 / (0.5 / n + 0.5 / c)


def write_controlnet(model: Path, work: Path, k: int = 0) -> Path:
    """The k-th random ControlNet for the model, written once (the real control embedding's
    widths)."""
    folder = work / f"controlnet-{model.name}-{NAMES[k]}"
    if not (folder / "config.json").exists():
        started = time.monotonic()
        build_tiny_controlnet(model, folder, seed=1 + k, embedding=(16, 32, 96, 256))
        print(f"wrote ControlNet {NAMES[k]} in {time.monotonic() - started:.0f}s", flush=True)
    return folder


def setting(model: Path, work: Path) -> dict[str, str]:
    """The worker's settings that serve the ControlNets."""
    held = [f"{name}={write_controlnet(model, work, k)}" for k, name in enumerate(NAMES)]
    return {"SDSERVE_CONTROLNETS": ",".join(held)}


def control_kinds(side: int) -> dict[str, tuple[str, dict[str, Any]]]:
    """The kinds a ControlNet unit goes on, each with one."""
    served = ("txt2img", "img2img", "inpaint", "hires latent")
    chosen = [(name, case) for name, case in kinds(side).items() if name in served]
    return {f"{name} + ControlNet {NAMES[k % 2]}": (route, body | {"controlnets": [unit(k)]})
            for k, (name, (route, body)) in enumerate(chosen)}  # fmt: skip


async def alone(url: str, requests: int) -> dict[str, float]:
    """One request at a time, p50: without control and with it."""
    out = {}
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        for name, body in (("plain", plain), ("controlled", controlled)):
            times = []
            for k in range(requests):
                done = await one_request(http, body(70_000 + k), poll_s=0.005)
                times.append(done.finished - done.submitted)
                await asyncio.sleep(0.2)
            out[f"{name}_p50_s"] = statistics.median(times)
    return out


def service_stage(args: Any, work: Path, result: dict[str, Any], save: Any) -> None:
    cache = compile_cache(work, "controlnets", args)
    result["cache_kept"] = args.keep_cache  # then its start is no cold start
    extra = setting(Path(args.model), work)
    if args.torch_logs:  # e.g. cudagraphs: why a compiled call ran without CUDA graphs
        extra["TORCH_LOGS"] = args.torch_logs
    with service(args.model, "continuous", args, work, cache, extra) as (url, startup, log):
        result["cold_start_s"] = startup
        print(f"ready in {startup:.0f}s", flush=True)
        result["fully_warm_s"] = fully_warm(startup, time.monotonic())  # loads on a warm worker
        if not args.no_kinds:
            result["kinds"] = asyncio.run(every_kind(url, args.side, controls=True))
            save()
        bodies = {"n": plain, "c": controlled, "h": half}
        for name in args.loads.split(","):
            window = Window(args.warmup, args.seconds, GPU_SUMS)  # the worker's GPU timers
            result[name] = asyncio.run(closed_loop(url, args.clients, bodies[name], args.warmup,
                                                   args.seconds, window))  # fmt: skip
            ends = window.ends()
            result[name]["gpu"] = gpu_share(*ends) if ends else None
            print(f"({name}): {result[name]}", flush=True)
            save()
        result["alone"] = asyncio.run(alone(url, 5))
        print(f"alone: {result['alone']}", flush=True)
        result["recompiles"] = recompiles()
        result["cudagraph_skips"] = cudagraph_skips()
        said = ("ControlNet", "warmed up", "compiled while", "cudagraph", "CUDAGraph", "CUDA gr")
        result["worker_log"] = [line for line in log.read_text().splitlines()
                                if any(word in line for word in said)]  # fmt: skip
        save()


# -- diffusers ------------------------------------------------------------------------------


def diffusers_stage(args: Any, controlnet: Path, batches: list[int]) -> dict[str, Any]:
    import torch
    from diffusers import (
        ControlNetModel,
        StableDiffusionControlNetPipeline,
        StableDiffusionXLControlNetPipeline,
    )
    from PIL import Image

    device = args.device
    dtype = torch.float16 if device == "cuda" else torch.float32
    xl = "text_encoder_2" in json.loads(Path(args.model, "model_index.json").read_text())
    kind = StableDiffusionXLControlNetPipeline if xl else StableDiffusionControlNetPipeline
    net = ControlNetModel.from_pretrained(str(controlnet), torch_dtype=dtype)
    pipe = kind.from_pretrained(args.model, controlnet=net, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    image = Image.open(io.BytesIO(base64.b64decode(picture(args.side)))).convert("RGB")

    def call(count: int, seed: int) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        seeds = [torch.Generator(device).manual_seed(seed + k) for k in range(count)]
        pipe([prompt(seed + k) for k in range(count)], image=image, num_inference_steps=25,
             guidance_scale=7.5, controlnet_conditioning_scale=WEIGHT, height=args.side,
             width=args.side, output_type="np", generator=seeds)  # fmt: skip
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    call(1, 0)  # the first call's kernel choices
    rates = {}
    for count in batches:
        call(count, 100)
        rates[count] = count / statistics.median(call(count, 200 + k) for k in range(2))
        print(f"diffusers ControlNet batch {count}: {rates[count]:.3f} img/s", flush=True)
    best = max(rates, key=lambda k: rates[k])
    return {"batches_img_s": rates, "best_batch": best, "best_img_s": rates[best],
            "alone_s": 1.0 / rates[1] if 1 in rates else None}  # fmt: skip


# -- the table ------------------------------------------------------------------------------


def table(r: dict[str, Any]) -> str:
    lines = [f"ControlNet per row, {r['gpu']}, {r['date']}, commit {r['commit']},"
             f" `{r['command']}`", "", "| figure | measured | target |",
             "|---|---|---|"]  # fmt: skip
    s, d = r.get("service", {}), r.get("diffusers")
    rows: list[tuple[str, str, str]] = []
    for k in s.get("kinds", []):
        rows.append((f"kind: {k['kind']}", f"{k['status']}, {k['seconds']:.2f} s", "succeeded"))
    for key, name in (("n", "(n) no control"), ("c", "(c) every request controlled")):
        if key in s:
            rows.append((f"sdserve {name} img/s", f"{rate(s[key], 'img_s'):.2f}", ""))
    if all(key in s for key in "nch"):
        expected = predicted(rate(s["n"], "img_s"), rate(s["c"], "img_s"))
        share = rate(s["h"], "img_s") / expected
        verdict = "met" if share >= 0.95 else "**missed**"
        rows.append(("sdserve (h) half controlled img/s, / (n)+(c)'s prediction",
                     f"{rate(s['h'], 'img_s'):.2f} / {expected:.2f} = {share:.2f}",
                     f"≥ 0.95 {verdict}"))  # fmt: skip
    if d:
        rows.append((f"diffusers ControlNet pipeline, best batch ({d['best_batch']}) img/s",
                     f"{d['best_img_s']:.2f}", ""))  # fmt: skip
        for key in ("c", "h"):
            if key in s:
                rows.append((f"sdserve ({key}) / diffusers' best batch",
                             f"{rate(s[key], 'img_s') / d['best_img_s']:.2f}", ""))  # fmt: skip
    if "alone" in s:
        a = s["alone"]
        rows.append(("alone p50 s: no control / controlled",
                     f"{a['plain_p50_s']:.3f} / {a['controlled_p50_s']:.3f}", ""))  # fmt: skip
        if d and d.get("alone_s"):
            rows.append(("diffusers ControlNet alone s (eager)", f"{d['alone_s']:.3f}", ""))
    if "recompiles" in s:
        rows.append(("recompiles while serving", f"{s['recompiles']:.0f}",
                     "0 " + ("met" if s["recompiles"] == 0 else "**missed**")))  # fmt: skip
    if "cudagraph_skips" in s:
        rows.append(("compiled calls CUDA graphs skipped", f"{s['cudagraph_skips']:.0f}",
                     "0 " + ("met" if s["cudagraph_skips"] == 0 else "**missed**")))  # fmt: skip
    if "cold_start_s" in s:
        rows.append((f"start s ({batching.start_name(s)})", f"{s['cold_start_s']:.0f}", ""))
    out = lines + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    timed = [(key, s[key]["gpu"]) for key in "nch" if s.get(key, {}).get("gpu")]
    if timed:  # where (h)'s time goes against (n)'s and (c)'s
        out += ["", "| load | GPU in steps / decodes / encodes | step ms | rows a step |",
                "|---|---|---|---|"]  # fmt: skip
        out += [f"| ({key}) | {g['step_share']:.0%} / {g['decode_share']:.0%} /"
                f" {g['encode_share']:.0%} | {g['step_ms']:.1f} | {g['rows_per_step']:.1f} |"
                for key, g in timed]  # fmt: skip
    return "\n".join(out) + "\n"


def main() -> None:
    parser = batching.service_parser(__doc__ or "", seconds=15)
    parser.set_defaults(warmup=5)
    parser.add_argument("--stages", default="service,diffusers")
    parser.add_argument("--batches", default="1,8,16", help="diffusers' images a call")
    parser.add_argument("--loads", default="n,c,h", help="the service's closed loops")
    parser.add_argument("--no-kinds", action="store_true", help="skip the kinds' requests")
    parser.add_argument("--torch-logs", default="", help="TORCH_LOGS for the worker")
    args = parser.parse_args()
    work = prepare(args)
    batching.SOURCE_PICTURE.append(batching.source_picture())
    results, save = batching.recorded(args.out, "controlnets", args.device)
    for stage in args.stages.split(","):
        if stage == "service":
            results["service"] = {}
            service_stage(args, work, results["service"], save)
        elif stage == "diffusers":
            folder = write_controlnet(Path(args.model), work)
            batches = [int(b) for b in args.batches.split(",")]
            results["diffusers"] = diffusers_stage(args, folder, batches)
        save()
    (args.out / "controlnets.md").write_text(table(results))
    print(table(results))
    for line in results.get("service", {}).get("worker_log", []):  # compiles, CUDA graphs
        print(line)


if __name__ == "__main__":
    main()
