"""The samplers a request may name: diffusers scheduler, its options, and A1111's name for it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin


@dataclass(frozen=True)
class Sampler:
    scheduler: type[SchedulerMixin]
    a1111_name: str
    # Ancestral samplers draw fresh noise every step: they take the per-image generators.
    ancestral: bool = False
    options: dict[str, Any] = field(default_factory=dict)


_DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}
# Its SDE form: the same multistep update, with fresh noise each step (A1111's "DPM++ 2M SDE").
_DPMPP_2M_SDE = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}

SAMPLERS: dict[str, Sampler] = {
    "ddim": Sampler(DDIMScheduler, "DDIM"),
    "euler": Sampler(EulerDiscreteScheduler, "Euler"),
    "euler_a": Sampler(EulerAncestralDiscreteScheduler, "Euler a", ancestral=True),
    "dpmpp_2m": Sampler(DPMSolverMultistepScheduler, "DPM++ 2M", options=_DPMPP_2M),
    "dpmpp_2m_karras": Sampler(
        DPMSolverMultistepScheduler,
        "DPM++ 2M Karras",
        options={**_DPMPP_2M, "use_karras_sigmas": True},
    ),
    "dpmpp_2m_sde": Sampler(
        DPMSolverMultistepScheduler, "DPM++ 2M SDE", ancestral=True, options=_DPMPP_2M_SDE
    ),
    "dpmpp_2m_sde_karras": Sampler(
        DPMSolverMultistepScheduler,
        "DPM++ 2M SDE Karras",
        ancestral=True,
        options={**_DPMPP_2M_SDE, "use_karras_sigmas": True},
    ),
    "lms": Sampler(LMSDiscreteScheduler, "LMS"),
    "pndm": Sampler(PNDMScheduler, "PLMS", options={"skip_prk_steps": True}),
    "unipc": Sampler(UniPCMultistepScheduler, "UniPC"),
    # Latent consistency: a few steps (4-8) and guidance near 1, with an LCM LoRA or model;
    # each step predicts the image and noises it again to the next, from each image's seed.
    "lcm": Sampler(LCMScheduler, "LCM", ancestral=True),
}


def load_schedule(model: str) -> dict[str, Any]:
    """The model's own scheduler config (its betas and timestep spacing)."""
    config: dict[str, Any] = dict(DDIMScheduler.load_config(model, subfolder="scheduler"))
    return config


def make_scheduler(name: str, model_config: dict[str, Any]) -> SchedulerMixin:
    """A fresh scheduler for one batch (schedulers keep per-run state), on the model's betas."""
    sampler = SAMPLERS[name]
    scheduler: SchedulerMixin = sampler.scheduler.from_config(model_config, **sampler.options)
    return scheduler
