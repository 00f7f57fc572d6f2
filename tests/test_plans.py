"""Plans (worker/plans.py): stepping a row by its plan gives what diffusers' own scheduler gives,
for every sampler a request may name, on real tensors, with a model that is not linear."""

from __future__ import annotations

import pytest
import torch

from app.jobs.contract import SCHEDULERS
from worker.engine import Engine
from worker.plans import NotLinear, probe
from worker.rows import Lane
from worker.schedulers import SAMPLERS, make_scheduler

CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
          "beta_schedule": "scaled_linear", "steps_offset": 1, "clip_sample": False,
          "set_alpha_to_one": False}  # fmt: skip


def model(sample: torch.Tensor, t: float) -> torch.Tensor:
    """Stands in for the UNet: any function of the input will do, linear or not."""
    return torch.tanh(0.4 * sample + t / 1000)


def generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize("steps", [1, 2, 3, 6, 25])
@pytest.mark.parametrize("sampler", SCHEDULERS)
def test_a_plan_steps_as_the_scheduler_does(sampler: str, steps: int) -> None:
    start = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(steps))
    theirs = make_scheduler(sampler, CONFIG)
    theirs.set_timesteps(steps)
    latents = start * theirs.init_noise_sigma
    options = {"generator": generators([1, 2])} if SAMPLERS[sampler].ancestral else {}
    inputs = []
    for t in theirs.timesteps:
        scaled = theirs.scale_model_input(latents, t)
        inputs.append(scaled)
        latents = theirs.step(model(scaled, float(t)), t, latents, **options).prev_sample

    plan = probe(sampler, steps, CONFIG)
    assert plan.window <= 5  # samplers reach back a few steps, not the whole run
    lane = Lane("job", (64, 64), plan, start * plan.init_sigma, generators([1, 2]),
                torch.ones(2, 1, 1, 1), torch.zeros(2, 77, 8), None)  # fmt: skip
    assert lane.steps == len(theirs.timesteps)
    for expected in inputs:
        scaled = lane.model_input()
        torch.testing.assert_close(scaled, expected, rtol=1e-4, atol=1e-4)
        lane.advance(model(scaled, lane.timestep()))
    assert lane.done
    # float32, summed in another order than the scheduler's
    torch.testing.assert_close(lane.latents, latents, rtol=1e-4, atol=1e-4)


def test_a_plan_keeps_only_the_steps_its_sampler_reaches_back_to() -> None:
    assert probe("ddim", 10, CONFIG).window == 1  # the sample and output of this step
    assert probe("euler_a", 10, CONFIG).window == 1
    assert probe("dpmpp_2m", 10, CONFIG).window == 2  # and the step before
    ancestral = probe("euler_a", 4, CONFIG)
    assert all(step.noise for step in ancestral.steps[:-1])
    assert not any(step.noise for step in probe("dpmpp_2m", 4, CONFIG).steps)


def test_a_sampler_that_depends_on_the_values_is_refused() -> None:
    with pytest.raises(NotLinear):
        probe("ddim", 5, {**CONFIG, "thresholding": True})


def test_a_pass_from_a_picture_runs_at_least_one_step_by_the_one_rule(engine: Engine) -> None:
    """`int(steps x strength) == 0` (2 steps at 0.4, the upscale default 0.35 at 2 steps)
    ran no step and failed inside the worker (issue 21, 2): it runs one, as A1111 does, and
    the worker's plan, the job's progress and its ETA count the same (one rule)."""
    from PIL import Image

    from app.jobs.contract import StoredImage, UpscaleRequest
    from app.jobs.tasks import denoising_steps, run_steps
    from worker.engine import BatchShape, ImageSpec, Source
    from worker.plans import start_step

    assert [run_steps(2, s) for s in (0.01, 0.4, 0.5, 1.0)] == [1, 1, 1, 2]
    assert all(start_step(steps, s) == steps - run_steps(steps, s)
               for steps in (1, 2, 25, 100) for s in (0.01, 0.35, 0.75, 1.0))  # fmt: skip
    lane = engine.prepare("low", [ImageSpec("a", "", 7.5, 1)], BatchShape(64, 64, 2, "euler_a"),
                          Source(Image.new("RGB", (64, 64), "grey"), 0.4))  # fmt: skip
    assert lane.steps == 1
    while not lane.done:
        engine.step([lane])
    assert engine.images(engine.finish(lane))[0] is not None
    image = StoredImage(sha256="0" * 64, width=32, height=32)
    x4 = UpscaleRequest(image=image, width=128, height=128, method="x4", steps=30, seed=1)
    assert denoising_steps(x4) == 30  # x4 runs every step: its strength is not used
