"""The engine on the CPU with the tiny model: per-image parameters, seeds, samplers, NaN."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from app.jobs.contract import SCHEDULERS
from tests.conftest import diffusers_reference
from worker.engine import BatchShape, Engine, ImageSpec, Tuning
from worker.schedulers import SAMPLERS

SHAPE = BatchShape(width=64, height=96, steps=4, scheduler="dpmpp_2m")


def generate(engine: Engine, specs: list[ImageSpec], shape: BatchShape = SHAPE) -> list[np.ndarray]:
    images = engine.generate(specs, shape)
    assert images is not None and all(i is not None for i in images)
    return [i for i in images if i is not None]


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_every_api_scheduler_has_a_sampler() -> None:
    assert set(SAMPLERS) == set(SCHEDULERS)


@pytest.mark.parametrize("scheduler", ["dpmpp_2m", "euler_a", "ddim"])
def test_matches_the_diffusers_pipeline(engine: Engine, tiny_model: Path, scheduler: str) -> None:
    reference = diffusers_reference(engine, tiny_model, scheduler)
    ours = generate(
        engine,
        [ImageSpec("a cat", "", 6.0, 11), ImageSpec("a cow", "blurry", 6.0, 12)],
        BatchShape(64, 96, 5, scheduler),
    )
    for mine, theirs in zip(ours, reference, strict=True):
        assert max_diff(mine, theirs) <= 1


@pytest.mark.parametrize("scheduler", ["dpmpp_2m", "euler_a"])
def test_each_row_equals_its_request_run_alone(engine: Engine, scheduler: str) -> None:
    specs = [
        ImageSpec("a red fox", "", 7.5, 1),
        ImageSpec("a blue whale", "cartoon", 3.0, 2),
        ImageSpec("a red fox", "", 12.0, 1),  # same seed and prompt, other guidance
        ImageSpec("a green frog", "dark", 0.0, 4_000_000_000),
    ]
    shape = BatchShape(64, 96, 4, scheduler)
    together = generate(engine, specs, shape)
    for spec, image in zip(specs, together, strict=True):
        [alone] = generate(engine, [spec], shape)
        assert image.shape == (96, 64, 3)
        assert max_diff(image, alone) <= 1, spec  # fp32 CPU: ~1e-6 apart before rounding
    assert max_diff(together[0], together[2]) > 2  # guidance really is per image


def test_same_seed_same_image_other_seed_other_image(engine: Engine) -> None:
    [a] = generate(engine, [ImageSpec("a house", "", 7.5, 42)])
    [b] = generate(engine, [ImageSpec("a house", "", 7.5, 42)])
    [c] = generate(engine, [ImageSpec("a house", "", 7.5, 43)])
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 5


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("steps", [1, 2, 7])
def test_every_scheduler_runs_any_step_count_and_size(
    engine: Engine, scheduler: str, steps: int
) -> None:
    specs = [ImageSpec("x", "", 7.5, 1), ImageSpec("y", "z", 2.0, 2)]
    # 72x136 is a multiple of 8 but not of the UNet's 32: sizes in between must work.
    images = generate(engine, specs, BatchShape(72, 136, steps, scheduler))
    assert [i.shape for i in images] == [(136, 72, 3)] * 2
    assert all(np.isfinite(i).all() and i.std() > 0 for i in images)


def test_progress_callback_sees_every_step_and_can_abandon(engine: Engine) -> None:
    seen: list[int] = []

    def until(last: int) -> Callable[[int], bool]:
        def on_step(k: int) -> bool:
            seen.append(k)
            return k < last

        return on_step

    assert engine.generate([ImageSpec("x", "", 7.5, 1)], SHAPE, until(99)) is not None
    assert seen == [1, 2, 3, 4]
    seen.clear()
    assert engine.generate([ImageSpec("x", "", 7.5, 1)], SHAPE, until(2)) is None
    assert seen == [1, 2]


# Decoder calls: image 0, image 1, then image 0 again in fp32. Poisoned: image 0's first decode,
# then its fp32 decode too.
@pytest.mark.parametrize("poisoned", [{1}, {1, 3}])
def test_non_finite_pixels_are_decoded_again_then_reported_never_black(
    engine: Engine, poisoned: set[int]
) -> None:
    """NaN from the VAE: decoded once more in fp32; still NaN: None (the job then fails
    `numerical`), never a black PNG."""
    calls: list[int] = []

    def poison(_m: torch.nn.Module, _a: object, output: torch.Tensor) -> torch.Tensor:
        calls.append(len(output))
        return output * float("nan") if len(calls) in poisoned else output

    specs = [ImageSpec("x", "", 7.5, 1), ImageSpec("y", "", 7.5, 2)]
    [clean, _] = generate(engine, specs)
    hook = engine.vae.decoder.register_forward_hook(poison)
    try:
        images = engine.generate(specs, SHAPE)
    finally:
        hook.remove()
    assert images is not None and images[1] is not None
    if poisoned == {1}:  # the fp32 decode of image 0 came out clean
        assert len(calls) == 3 and images[0] is not None and max_diff(images[0], clean) <= 1
    else:
        assert images[0] is None


def test_prompt_embeddings_do_not_depend_on_their_company(engine: Engine) -> None:
    alone = engine.encode(["a lighthouse"]).clone()
    crowd = engine.encode([f"prompt {i}" for i in range(11)] + ["a lighthouse"])
    engine.family.encoder._cache.clear()
    fresh = engine.encode([f"other {i}" for i in range(5)] + ["a lighthouse"])
    assert torch.equal(crowd[-1], alone[0]) and torch.equal(fresh[-1], alone[0])


def test_buckets_are_powers_of_two_up_to_max_batch() -> None:
    assert Tuning(max_batch=8).buckets() == [1, 2, 4, 8]
    assert Tuning(max_batch=12).buckets() == [1, 2, 4, 8, 12]
    assert Tuning(max_batch=1).buckets() == [1]
    assert [Tuning(max_batch=12).bucket(n) for n in (1, 3, 5, 9, 12)] == [1, 4, 8, 12, 12]
    with pytest.raises(ValueError, match="exceeds max_batch"):
        Tuning(max_batch=4).bucket(5)


SPECS = [
    ImageSpec("a cat", "", 7.5, 1),
    ImageSpec("a dog", "ugly", 3.0, 2),
    ImageSpec("c", "", 9, 3),
]


def test_the_gpu_layout_changes_nothing_but_rounding(engine: Engine, tiny_model: Path) -> None:
    fused = Engine(str(tiny_model), torch.device("cpu"), Tuning(fuse=True))
    for a, b in zip(generate(fused, SPECS), generate(engine, SPECS), strict=True):
        assert max_diff(a, b) <= 1


def test_compiled_engine_matches_eager_without_recompiling_per_batch_size(
    engine: Engine, tiny_model: Path
) -> None:
    from torch._dynamo.utils import counters

    tuning = Tuning(max_batch=4, fuse=True, compile=True, compiled_sizes=((64, 96),))
    compiled = Engine(str(tiny_model), torch.device("cpu"), tuning)
    # Text lanes only: no encode to compile (inductor on a CPU: 15 s on CI's two cores; the
    # encoder's guards are tests/test_compiled.py's, under the eager backend).
    compiled.calls._fast_encode = None
    compiled.warm_up()  # every bucket: 1, 2, 4
    graphs = counters["stats"]["unique_graphs"]
    for count in (1, 2, 3):
        shape = BatchShape(64, 96, 3, "euler_a")  # another sampler: float timesteps
        fast, eager = (
            generate(compiled, SPECS[:count], shape),
            generate(engine, SPECS[:count], shape),
        )
        assert all(max_diff(a, b) <= 1 for a, b in zip(fast, eager, strict=True))
    assert counters["stats"]["unique_graphs"] == graphs  # no compilation after warm-up


def test_the_seed_contract_neighbours_never_matter(engine: Engine) -> None:
    """Same place, same bucket: bit-identical whoever the neighbours are. Another place or
    bucket: within one level of 8-bit colour (BENCHMARKS.md has the GPU figures)."""
    me = ImageSpec("the seed contract", "blurry", 6.0, 424242)
    shape = BatchShape(64, 96, 4, "euler_a")

    def image(company: list[ImageSpec], at: int) -> np.ndarray:
        return generate(engine, [*company[:at], me, *company[at:]], shape)[at]

    strangers = [ImageSpec(f"stranger {i}", "", 3.0 + i, i) for i in range(14)]
    first = image(strangers[:7], 2)
    assert np.array_equal(first, image(strangers[7:], 2))
    for other in (image(strangers[:7], 6), image([], 0), image(strangers[:3], 1)):
        assert max_diff(first, other) <= 1
