"""Request kinds as tasks: every kind of request is a task on both sides, and the counts the API
and the worker share (steps, rows, the size drawn) come from the task."""

from __future__ import annotations

import typing

import pytest

from app.jobs.contract import (
    Hires,
    Img2ImgRequest,
    InpaintRequest,
    JobRequest,
    StoredImage,
    Txt2ImgRequest,
    UpscaleRequest,
)
from app.jobs.tasks import TASKS, denoising_steps, drawn_size, run_steps, task_name, unet_rows
from worker.tasks import WORK, task

PICTURE = StoredImage(sha256="0" * 64, width=64, height=48)
REQUESTS: list[JobRequest] = [
    Txt2ImgRequest(prompt="a", steps=20),
    Txt2ImgRequest(prompt="a", steps=20, hires=Hires(scale=2, strength=0.5, steps=10)),
    Img2ImgRequest(prompt="a", steps=20, strength=0.6, image=PICTURE),
    InpaintRequest(prompt="a", steps=20, image=PICTURE, mask=PICTURE),
    UpscaleRequest(image=PICTURE, width=128, height=96, steps=20, method="pixel"),
    UpscaleRequest(image=PICTURE, width=128, height=96, steps=20, method="latent"),
    UpscaleRequest(image=PICTURE, width=128, height=96, steps=20, method="x4"),
]


def test_every_request_kind_is_a_task_on_both_sides() -> None:
    union = typing.get_args(typing.get_args(JobRequest)[0])
    kinds = {typing.get_args(member)[0].model_fields["kind"].default for member in union}
    named = {task_name(request) for request in REQUESTS}
    assert kinds <= named  # every kind of the contract is in REQUESTS
    # Every task a request can name has its worker side; `hires` follows txt2img's first pass.
    assert named == set(WORK) == set(TASKS) - {"hires"}
    for request in REQUESTS:
        assert task(request).rule is TASKS[task_name(request)]


@pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: task_name(r) + "-" + str(r.steps))
def test_steps_rows_and_size_come_from_the_task(request_: JobRequest) -> None:
    name = task_name(request_)
    expected_steps = {
        "txt2img": 20 + (run_steps(10, 0.5) if getattr(request_, "hires", None) else 0),
        "img2img": run_steps(20, 0.6),
        "inpaint": run_steps(20, 1.0),
        "upscale": run_steps(20, 0.35),
        "x4": 20,  # the upscaler runs every step
    }[name]
    assert denoising_steps(request_) == expected_steps
    assert drawn_size(request_) == ((256, 192) if name == "x4" else (request_.width,
                                                                     request_.height))  # fmt: skip
    guided = 2 if request_.guidance_scale > 1 else 1
    assert unet_rows(request_) == request_.n * guided
    assert (
        unet_rows(request_, tile=64, overlap=16) > unet_rows(request_)
        or max(drawn_size(request_)) <= 64
    )


def test_the_worker_shape_is_the_shared_size() -> None:
    for request in REQUESTS:
        shape = task(request).shape(request)
        assert (shape.width, shape.height) == drawn_size(request)
        assert (shape.steps, shape.scheduler) == (request.steps, request.scheduler)
