"""What a sampler does to a row at each step, as weights asked once of diffusers.

Every sampler a request may name is linear: the next sample is a weighted sum of the row's recent
samples, model outputs and (ancestral samplers) fresh noise, with weights that depend only on the
step. So instead of a diffusers scheduler object per row, stepping through tens of small kernels
and Python per row and step, a row keeps its last few tensors and takes one multiply-add per
weight. The weights come from diffusers' own scheduler, run once per (sampler, steps) on unit
vectors ("the probe"): a sample, output or noise tensor is a vector over the step's inputs, and
what the scheduler returns is the vector of weights. Its schedule, its lower-order first and last
steps, its corrector, whatever it does linearly, comes out as it is; `tests/test_plans.py` checks
every sampler against its scheduler on real tensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from dataclasses import dataclass
from typing import Any
from unittest import mock

import torch

from app.jobs.tasks import run_steps
from worker.schedulers import SAMPLERS, make_scheduler

# What a weight multiplies: a row's sample as it entered a step, the model's output (after
# guidance) at that step, or the noise drawn at that step.
SAMPLE, OUTPUT, NOISE = range(3)
SOURCES = 3


@dataclass(frozen=True)
class Term:
    age: int  # 0: this step, 1: the step before, ...
    source: int  # SAMPLE, OUTPUT or NOISE
    weight: float


# A source image's latents noised to a timestep: weights of (the image's latents, the noise).
Noising = tuple[float, float]


@dataclass(frozen=True)
class StepPlan:
    timestep: float
    input_scale: float  # the UNet sees sample * input_scale
    noise: bool  # the step draws fresh noise from each image's generator
    terms: tuple[Term, ...]  # the next sample: the sum of weight * tensor
    # The source noised to the next step's timestep (the source as it is after the last step):
    # what inpainting puts back outside the mask after each step.
    renoise: Noising = (1.0, 0.0)


@dataclass(frozen=True)
class Plan:
    sampler: str
    init_sigma: float  # txt2img's starting noise is scaled by this
    steps: tuple[StepPlan, ...]
    start: int = 0  # steps of the schedule skipped (img2img and inpainting below strength 1)
    noising: Noising = (0.0, 1.0)  # the source noised to the first step's timestep

    @property
    def window(self) -> int:
        """Steps of tensors a row keeps: the oldest any term reaches back to, plus this one."""
        return 1 + max((term.age for step in self.steps for term in step.terms), default=0)


# Scheduler settings that make a step depend on the values (a clamp, a quantile): with one of
# them on, a sampler has no plan.
NONLINEAR_SETTINGS = ("thresholding", "clip_sample")


class NotLinear(ValueError):
    """The sampler's step is not a fixed weighted sum of its inputs."""


def start_step(steps: int, strength: float) -> int:
    """Where a run from a source image starts in a schedule of `steps`: strength 1 starts at
    the top, lower strengths skip the noisiest steps (as diffusers' img2img pipelines do). How
    many run is the job contract's rule (`run_steps`, which the API's ETA and progress use
    too): at least one, as A1111 runs, where diffusers would run none and fail."""
    return steps - run_steps(steps, strength)


def cutoff(config: dict[str, Any], switch_at: float) -> int:
    """The timestep where a refiner takes over, `switch_at` of the way down the model's
    training schedule (diffusers' `discrete_timestep_cutoff`)."""
    train = int(config.get("num_train_timesteps", 1000))
    return round(train - switch_at * train)


def until_switch(plan: Plan, config: dict[str, Any], switch_at: float) -> Plan:
    """The base model's share of a plan before a refiner: its steps at timesteps at or above
    the switch (diffusers' `denoising_end`). Each step is as it was in the whole plan: a
    sampler's step never depends on the steps after it."""
    switch = cutoff(config, switch_at)
    kept = sum(step.timestep >= switch for step in plan.steps)
    return dataclasses.replace(plan, steps=plan.steps[:kept])


def refiner_start(sampler: str, steps: int, config: dict[str, Any], switch_at: float) -> int:
    """Where a refiner starts in its own schedule of `steps` (diffusers' `denoising_start`):
    its timesteps below the switch run, a second-order sampler's to the end of a step."""
    scheduler = make_scheduler(sampler, config)
    scheduler.set_timesteps(steps)
    below = int((scheduler.timesteps < cutoff(config, switch_at)).sum())
    if scheduler.order == 2 and below % 2 == 0:
        below += 1
    return len(scheduler.timesteps) - below


def probe(
    sampler: str, steps: int, config: dict[str, Any], start: int = 0, fresh: bool = False
) -> Plan:
    """The plan of `sampler` over `steps` steps from step `start`, on the model's scheduler
    `config`.

    The scheduler runs as in a real run, on vectors over the run's inputs: each step's sample
    as it enters, model output and noise. What it returns each step is the next sample in those
    inputs; the plan writes it over the fewest recent steps' tensors that give it exactly. A
    sample entering a step is the last step's result, unless `fresh`: inpainting changes it
    between steps, so then every entering sample is an input of its own (a sampler with a
    corrector keeps a sample of its own that reaches back to the start: its plan reaches back
    as far; without `fresh` that sample is always a few recent inputs away from the one it
    returns).
    """
    scheduler = make_scheduler(sampler, config)
    if on := [name for name in NONLINEAR_SETTINGS if scheduler.config.get(name)]:
        raise NotLinear(f"{sampler}: the model's scheduler config sets {', '.join(on)}")
    scheduler.set_timesteps(steps)
    if start and hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    timesteps = scheduler.timesteps[start:]
    size = SOURCES * len(timesteps)

    def unit(index: int) -> torch.Tensor:
        # Shaped (batch 1, channels): some samplers take the batch and channel axes apart.
        vector = torch.zeros(1, size, dtype=torch.float64)
        vector[0, index] = 1
        return vector

    def noising(t: torch.Tensor) -> Noising:
        source_and_noise = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
        weights = scheduler.add_noise(*source_and_noise, t.reshape(1)).flatten()
        return float(weights[0]), float(weights[1])

    drawn: set[int] = set()
    at = 0

    def noise(shape: Any, **_: Any) -> torch.Tensor:
        # The scheduler asks diffusers' randn_tensor for its noise; the probe hands it a unit
        # vector instead, and so learns the noise's weight (and that this step draws noise).
        drawn.add(at)
        return unit(SOURCES * at + NOISE).reshape(shape)

    module = sys.modules[type(scheduler).__module__]
    draws = hasattr(module, "randn_tensor")  # a module without it draws no noise
    options = {"generator": None} if SAMPLERS[sampler].ancestral else {}
    start_noising = noising(timesteps[0]) if start else (0.0, 1.0)
    samples: list[torch.Tensor] = []
    plans = []
    sample = unit(SAMPLE)
    with mock.patch.object(module, "randn_tensor", noise) if draws else contextlib.nullcontext():
        for at, t in enumerate(timesteps):
            if fresh:
                sample = unit(SOURCES * at + SAMPLE)
            samples.append(sample.flatten())
            scaled = scheduler.scale_model_input(sample, t).to(torch.float64).flatten()
            scale = float(scaled @ samples[at] / (samples[at] @ samples[at]))
            if not torch.allclose(scaled, samples[at] * scale, rtol=1e-6, atol=1e-9):
                raise NotLinear(f"{sampler}: the UNet's input is not a multiple of the sample")
            output = unit(SOURCES * at + OUTPUT)
            sample = scheduler.step(output, t, sample, **options).prev_sample.to(torch.float64)
            terms = _fit(sample.flatten(), samples, drawn, at)
            if terms is None:
                raise NotLinear(f"{sampler}: step {at} is no weighted sum of its inputs")
            last = at == len(timesteps) - 1
            renoise = (1.0, 0.0) if last else noising(timesteps[at + 1])
            plans.append(StepPlan(float(t), scale, at in drawn, terms, renoise))
    return Plan(sampler, float(scheduler.init_noise_sigma), tuple(plans), start, start_noising)


def _fit(
    target: torch.Tensor, samples: list[torch.Tensor], drawn: set[int], at: int
) -> tuple[Term, ...] | None:
    """`target` as weights over the fewest recent steps' tensors; None if no window gives it."""
    size = len(target)
    tolerance = 1e-5 * max(float(target.abs().max()), 1.0)  # the schedulers work in float32
    for window in range(1, at + 2):
        columns: list[tuple[Term, torch.Tensor]] = []
        for step in range(at - window + 1, at + 1):
            age = at - step
            columns.append((Term(age, SAMPLE, 0.0), samples[step]))
            columns.append((Term(age, OUTPUT, 0.0), _unit(size, SOURCES * step + OUTPUT)))
            if step in drawn:
                columns.append((Term(age, NOISE, 0.0), _unit(size, SOURCES * step + NOISE)))
        matrix = torch.stack([vector for _, vector in columns], dim=1)
        weights = torch.linalg.lstsq(matrix, target[:, None], driver="gelsd").solution[:, 0]
        if float((matrix @ weights - target).abs().max()) <= tolerance:
            return tuple(
                Term(term.age, term.source, float(weight))
                for (term, _), weight in zip(columns, weights, strict=True)
                if float(weight) != 0.0
            )
    return None


def _unit(size: int, index: int) -> torch.Tensor:
    vector = torch.zeros(size, dtype=torch.float64)
    vector[index] = 1
    return vector
