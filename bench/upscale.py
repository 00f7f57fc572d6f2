"""Upscaling and several models, each beside diffusers' own pipeline or the model alone, in one
run on one GPU (random weights at the real models' sizes). `--side` S (512):

  hires    a x2 hires fix, SxS to 2Sx2S: 25 steps, then 25 at strength 0.5 (12 run) from the
           latents enlarged. diffusers: StableDiffusionPipeline (latents out), then
           StableDiffusionImg2ImgPipeline; sdserve: `hires` on /v1/txt2img, over HTTP.
  x4       x4 upscaling of an S/2 x S/2 picture to 2Sx2S, 25 steps, noise level 20: diffusers'
           StableDiffusionUpscalePipeline against /v1/upscale `method: x4`.
  models   two SD 1.5-sized models on one worker (SDSERVE_MODELS), half the requests each:
           each model's throughput against that model alone on the same worker.

For each side: one request at a time (latency, median of 3 after a warm-up) and a full load
(diffusers: a batch of `--batch`; sdserve: `--clients` closed-loop clients for `--seconds`).
Both run eagerly (SDSERVE_COMPILE=off; `--compile on` compiles sdserve's 512x512 for the hires
stage, as a deployment would): a compilation costs minutes of the GPU's time, and diffusers runs
eagerly. Results go to OUT/upscale.json after every
stage, the table to OUT/upscale.md.

    python -m bench.upscale --out DIR [--stages hires,x4,models] [--seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench.batching import closed_loop, prepare, service, service_parser
from bench.bench import one_request, prompt
from worker.tiny import build_tiny_model

STEPS, STRENGTH, NOISE_LEVEL = 25, 0.5, 20


def picture(side: int) -> Image.Image:
    y, x = np.mgrid[0:side, 0:side]
    rgb = np.stack([x * 255 // side, y * 255 // side, (x + y) * 127 // side], -1)
    return Image.fromarray(rgb.astype(np.uint8))


def as_base64(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def timed(run: Callable[[], Any]) -> float:
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    run()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - started


def placed(pipe: Any, args: argparse.Namespace) -> Any:
    """A diffusers pipeline on the device, without its progress bar."""
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(args.device)


def dtype(args: argparse.Namespace) -> Any:
    import torch

    return torch.float16 if args.device == "cuda" else torch.float32


def free(args: argparse.Namespace) -> None:
    import torch

    if args.device == "cuda":
        torch.cuda.empty_cache()


def built(work: Path, name: str, arch: str, seed: int = 0) -> str:
    """A random-weight model in the work folder, built once."""
    path = work / name
    if not (path / "model_index.json").exists():
        build_tiny_model(path, arch, seed)
    return str(path)


def diffusers_side(run: Callable[[int, int], Any], batch: int) -> dict[str, Any]:
    """`run(count, offset)` makes `count` images: its latency alone and its img/s in a batch."""
    run(1, 0)  # warm-up
    singles = [timed(partial(run, 1, 1 + k)) for k in range(3)]
    run(batch, 10)
    batched = timed(lambda: run(batch, 100))
    return {"single_latency_s": statistics.median(singles), "batch": batch,
            "batch_img_s": batch / batched}  # fmt: skip


def sdserve_side(url: str, body: Callable[[int], dict[str, Any]],
                 args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    """One request at a time (median latency of 3 after a warm-up), then closed-loop load."""

    async def alone() -> list[float]:
        import httpx

        async with httpx.AsyncClient(base_url=url, timeout=600) as http:
            await one_request(http, body(0), poll_s=0.01)
            done = [await one_request(http, body(1 + k), poll_s=0.01) for k in range(3)]
        return [d.finished - d.submitted for d in done]

    latencies = asyncio.run(alone())
    loaded = asyncio.run(closed_loop(url, args.clients, body, args.warmup, args.seconds))
    return {"single_latency_s": statistics.median(latencies), **loaded}


def hires_diffusers(args: argparse.Namespace) -> dict[str, Any]:
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    from worker.engine import enlarged
    from worker.schedulers import make_scheduler

    text = placed(StableDiffusionPipeline.from_pretrained(
        args.model, torch_dtype=dtype(args), safety_checker=None), args)  # fmt: skip
    text.scheduler = make_scheduler("dpmpp_2m", dict(text.scheduler.config))
    image = placed(StableDiffusionImg2ImgPipeline(**text.components), args)

    def run(count: int, offset: int) -> None:
        prompts = [prompt(offset + k) for k in range(count)]
        first = text(prompts, height=args.side, width=args.side, num_inference_steps=STEPS,
                     output_type="latent").images  # fmt: skip
        side = args.side * 2 // 8  # the enlarged latents
        image(prompts, image=enlarged(first, (side, side)), strength=STRENGTH,
              num_inference_steps=STEPS, output_type="np")  # fmt: skip

    return diffusers_side(run, args.batch)


def hires(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    theirs = hires_diffusers(args)
    free(args)

    def body(i: int) -> dict[str, Any]:
        return {"prompt": prompt(i), "seed": i, "steps": STEPS, "scheduler": "dpmpp_2m",
                "width": args.side, "height": args.side,
                "hires": {"scale": 2, "strength": STRENGTH, "method": "latent"}}  # fmt: skip

    with service(args.model, "continuous", args, work, work / "inductor-upscale",
                 {"SDSERVE_COMPILE": args.compile}) as (url, _startup, _log):  # fmt: skip
        ours = sdserve_side(url, body, args)
    return {"diffusers": theirs, "sdserve": ours}


def x4_diffusers(args: argparse.Namespace, upscaler: str, small: Image.Image) -> dict[str, Any]:
    from diffusers import StableDiffusionUpscalePipeline

    from worker.schedulers import make_scheduler

    pipe = placed(StableDiffusionUpscalePipeline.from_pretrained(
        upscaler, torch_dtype=dtype(args)), args)  # fmt: skip
    pipe.scheduler = make_scheduler("ddim", dict(pipe.scheduler.config))

    def run(count: int, offset: int) -> None:
        pipe([prompt(offset + k) for k in range(count)], image=[small] * count,
             num_inference_steps=STEPS, noise_level=NOISE_LEVEL, output_type="np")  # fmt: skip

    return diffusers_side(run, args.batch)


def x4(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    arch = "sd-x4-upscaler" if args.device == "cuda" else "x4-upscaler"  # a CPU: smoke only
    upscaler = built(work, arch, arch)
    small = picture(args.side // 2)
    theirs = x4_diffusers(args, upscaler, small)
    free(args)
    source = as_base64(small)

    def body(i: int) -> dict[str, Any]:
        return {"prompt": prompt(i), "seed": i, "steps": STEPS, "scheduler": "ddim",
                "image": source, "scale": 4, "method": "x4",
                "noise_level": NOISE_LEVEL}  # fmt: skip

    extra = {"SDSERVE_COMPILE": "off", "SDSERVE_UPSCALER": upscaler}
    with service(args.model, "continuous", args, work, work / "inductor-upscale",
                 extra) as (url, _startup, _log):  # fmt: skip
        ours = sdserve_side(url, body, args)
    return {"diffusers": theirs, "sdserve": ours}


def models(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    other = built(work, "other-model", "sd15" if args.device == "cuda" else "tiny", seed=1)
    extra = {"SDSERVE_COMPILE": "off", "SDSERVE_MODELS": f"one={args.model},two={other}"}

    def of(model: str) -> Callable[[int], dict[str, Any]]:
        def body(i: int) -> dict[str, Any]:
            return {"prompt": prompt(i), "seed": i, "steps": STEPS, "width": args.side,
                    "height": args.side, "model": model}  # fmt: skip

        return body

    async def both(url: str) -> list[Any]:
        half = max(1, args.clients // 2)
        return list(await asyncio.gather(
            *(closed_loop(url, half, of(m), args.warmup, args.seconds) for m in ("one", "two"))
        ))  # fmt: skip

    out: dict[str, Any] = {}
    with service(args.model, "continuous", args, work, work / "inductor-upscale",
                 extra) as (url, _startup, _log):  # fmt: skip
        for model in ("one", "two"):
            out[f"{model} alone"] = asyncio.run(
                closed_loop(url, args.clients, of(model), args.warmup, args.seconds))  # fmt: skip
            print(f"models: {model} alone: {out[f'{model} alone']}", flush=True)
        out["one, mixed"], out["two, mixed"] = asyncio.run(both(url))
        print(f"models: mixed: {out['one, mixed']} {out['two, mixed']}", flush=True)
    return out


def table(results: dict[str, Any]) -> str:
    lines = [f"GPU: {results['gpu']}; {results['date']}; `{results['command']}`", "",
             "| stage | side | one request (s) | full load (img/s) | ratio |",
             "|---|---|---|---|---|"]  # fmt: skip
    for stage in ("hires", "x4"):
        if stage not in results:
            continue
        theirs, ours = results[stage]["diffusers"], results[stage]["sdserve"]
        ratio = ours["img_s"] / theirs["batch_img_s"]
        lines.append(
            f"| {stage} | diffusers (batch {theirs['batch']}) | "
            f"{theirs['single_latency_s']:.2f} | {theirs['batch_img_s']:.2f} | 1.00 |"
        )
        lines.append(
            f"| {stage} | sdserve ({ours['clients']} clients) | "
            f"{ours['single_latency_s']:.2f} | {ours['img_s']:.2f} | {ratio:.2f} |"
        )
    if "models" in results:
        m = results["models"]
        lines += ["", "| two models, one worker | img/s | p50 latency (s) | of alone |",
                  "|---|---|---|---|"]  # fmt: skip
        for name, row in m.items():
            alone = m[f"{name.split()[0].rstrip(',')} alone"]["img_s"]
            lines.append(
                f"| {name} | {row['img_s']:.2f} | {row['latency_p50_s']:.2f} | "
                f"{row['img_s'] / alone:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = service_parser(__doc__ or "", seconds=30)
    parser.add_argument("--stages", default="hires,x4,models")
    parser.add_argument("--batch", type=int, default=8, help="diffusers' batch at full load")
    parser.add_argument("--compile", default="off", choices=["on", "off"],
                        help="hires: sdserve's SDSERVE_COMPILE (on: 512x512 compiled)")  # fmt: skip
    parser.set_defaults(clients=16, max_batch=32)
    args = parser.parse_args()
    work = prepare(args)
    path = args.out / "upscale.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    import torch

    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    results |= {"gpu": gpu, "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
    stages = {"hires": hires, "x4": x4, "models": models}
    for stage in args.stages.split(","):
        results[stage] = stages[stage](args, work)
        print(f"{stage}: {results[stage]}", flush=True)
        path.write_text(json.dumps(results, indent=2))
        (args.out / "upscale.md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
