"""Rows on the CPU with the tiny model: lanes of any steps, schedulers, guidance and size step
together, and each image equals diffusers' own pipeline and its request run alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from app.jobs.contract import SCHEDULERS
from tests.conftest import diffusers_reference
from worker.engine import BatchShape, Engine, ImageSpec, Tuning
from worker.rows import Lane
from worker.schedulers import make_scheduler


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def run(engine: Engine, lanes: list[Lane]) -> dict[str, list[np.ndarray]]:
    """Step the lanes as the runner does (each size in turn), until all are done."""
    out: dict[str, list[np.ndarray]] = {}
    active = list(lanes)
    while active:
        for size in dict.fromkeys(lane.size for lane in active):
            engine.step([lane for lane in active if lane.size == size])
        for lane in [lane for lane in active if lane.done]:
            images = engine.images(engine.finish(lane))
            assert all(i is not None for i in images)
            out[lane.key] = [i for i in images if i is not None]
            active.remove(lane)
    return out


def run_counting_calls(
    engine: Engine, lanes: list[Lane]
) -> tuple[dict[str, list[np.ndarray]], int]:
    """`run`, and how many times the UNet was called."""
    calls = 0
    unet_forward = engine.unet.forward

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return unet_forward(*args, **kwargs)

    engine.unet.forward = counted
    try:
        return run(engine, lanes), calls
    finally:
        engine.unet.forward = unet_forward


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_a_lane_matches_the_diffusers_pipeline(
    engine: Engine, tiny_model: Path, scheduler: str
) -> None:
    reference = diffusers_reference(engine, tiny_model, scheduler)
    specs = [ImageSpec("a cat", "", 6.0, 11), ImageSpec("a cow", "blurry", 6.0, 12)]
    ours = run(engine, [engine.prepare("job", specs, BatchShape(64, 96, 5, scheduler))])["job"]
    for mine, theirs in zip(ours, reference, strict=True):
        assert max_diff(mine, theirs) <= 1


def test_guidance_of_one_or_less_uses_no_uncond_row_as_diffusers(
    engine: Engine, tiny_model: Path
) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model), safety_checker=None)
    pipe.scheduler = make_scheduler("euler", engine.scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(5)
    options = {"num_inference_steps": 3, "guidance_scale": 1.0, "output_type": "np"}
    reference = pipe("a cat", height=64, width=64, generator=generator, **options).images[0]
    lane = engine.prepare("j", [ImageSpec("a cat", "", 1.0, 5)], BatchShape(64, 64, 3, "euler"))
    assert lane.uncond is None and lane.unet_rows == 1
    [mine] = run(engine, [lane])["j"]
    assert max_diff(mine, (reference * 255).round().astype(np.uint8)) <= 1


def test_strangers_of_other_steps_schedulers_guidance_and_sizes_change_nothing(
    engine: Engine,
) -> None:
    jobs = {
        "a": ([ImageSpec("a red fox", "", 7.5, 1)], BatchShape(64, 96, 4, "dpmpp_2m")),
        "b": ([ImageSpec("a blue whale", "cartoon", 3.0, 2)] * 2, BatchShape(64, 96, 7, "euler_a")),
        "c": ([ImageSpec("a green frog", "", 1.0, 3)], BatchShape(64, 96, 2, "ddim")),
        "d": ([ImageSpec("a tower", "fog", 9.0, 4)], BatchShape(96, 64, 5, "unipc")),
    }
    together = run(engine, [engine.prepare(k, specs, shape) for k, (specs, shape) in jobs.items()])
    for key, (specs, shape) in jobs.items():
        alone = run(engine, [engine.prepare(key, specs, shape)])[key]
        for mine, single in zip(together[key], alone, strict=True):
            assert mine.shape == (shape.height, shape.width, 3)
            assert max_diff(mine, single) <= 1, key  # fp32 CPU: ~1e-6 apart before rounding
        static = engine.generate(specs, shape)
        assert static is not None
        if specs[0].guidance_scale > 1:  # the static batch computes uncond rows regardless
            assert all(max_diff(m, s) <= 1 for m, s in zip(together[key], static, strict=True))  # type: ignore[arg-type]


def test_a_lane_joins_while_another_is_half_way(engine: Engine) -> None:
    """Joining between steps: the late lane's images do not depend on when it joined."""
    shape = BatchShape(64, 64, 6, "dpmpp_2m")
    early = engine.prepare("early", [ImageSpec("a boat", "", 7.0, 1)], shape)
    for _ in range(3):
        engine.step([early])
    late = engine.prepare("late", [ImageSpec("a tree", "", 5.0, 2)], shape)
    together = run(engine, [early, late])
    alone = run(engine, [engine.prepare("late", [ImageSpec("a tree", "", 5.0, 2)], shape)])
    assert max_diff(together["late"][0], alone["late"][0]) <= 1
    assert engine.tuning.row_bucket(3) == 4 and engine.tuning.row_bucket(1) == 2
    every = [2, 4, 8, 12, 16, 20, 24, 32, 40, 48, 56, 62]
    assert Tuning(max_batch=32, rows=True).row_buckets() == every
    assert Tuning(max_batch=8, rows=True).row_buckets() == [2, 4, 8, 12, 16]
    assert Tuning(max_batch=4, rows=True).row_buckets() == [2, 4, 8]
    assert Tuning(max_batch=14, rows=True).row_buckets() == [2, 4, 8, 12, 16, 20, 24, 28]
    # Static batches' rows (twice a power of two, up to twice max_batch) are buckets too.
    assert Tuning(max_batch=32).row_buckets()[-1] == 64


@pytest.mark.timeout(900)  # compiling on a busy 2-core CPU
def test_compiled_rows_match_eager_without_compiling_after_warm_up(
    engine: Engine, tiny_model: Path
) -> None:
    """Warm-up compiles the row path (per-row timesteps, every row bucket); then any mix of
    lanes runs with no compilation, and equals the eager engine."""
    from torch._dynamo.utils import counters

    tuning = Tuning(max_batch=2, fuse=True, compile=True, compiled_sizes=((64, 96),), rows=True)
    compiled = Engine(str(tiny_model), torch.device("cpu"), tuning)
    # Text lanes only: no encode to compile (inductor on a CPU: 15 s on CI's two cores; the
    # encoder's guards are tests/test_compiled.py's, under the eager backend).
    compiled.calls._fast_encode = None
    compiled.warm_up()  # row buckets 2, 4
    graphs = counters["stats"]["unique_graphs"]
    mixes: list[list[tuple[str, float, str, int]]] = [
        [("a", 7.5, "euler_a", 3), ("b", 1.0, "ddim", 2)],  # 3 rows: bucket 4
        [("c", 0.5, "dpmpp_2m", 2)],  # 1 row
        [("d", 5.0, "unipc", 4), ("e", 6.0, "lms", 3)],  # 4 rows
    ]
    for mix in mixes:

        def lanes(e: Engine, mix: list[tuple[str, float, str, int]] = mix) -> list[Lane]:
            return [
                e.prepare(key, [ImageSpec(key, "", g, 3)], BatchShape(64, 96, steps, sampler))
                for key, g, sampler, steps in mix
            ]

        fast, eager = run(compiled, lanes(compiled)), run(engine, lanes(engine))
        for key, *_ in mix:
            assert max_diff(fast[key][0], eager[key][0]) <= 1, key
    assert counters["stats"]["unique_graphs"] == graphs  # no compilation after warm-up
