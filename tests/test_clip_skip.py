"""Clip skip (issue 23, 5): a row's prompt read at an earlier layer of the text encoder, as
diffusers' `clip_skip` reads it (sdserve's `clip_skip` n is diffusers' n - 1 and A1111's
`CLIP_stop_at_last_layers` n; the prompt only, the negative prompt at the model's own layer, as
diffusers), per row: on the tiny SD and SDXL models each image equals diffusers' pipeline for
its seed, beside a row of another clip skip in the same UNet calls; A1111 maps it and writes it
in the infotext; deeper than the text encoder, the job fails, the worker stays."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from app.a1111 import A1111Error, Txt2ImgPayload
from app.jobs.contract import Status, Txt2ImgRequest
from tests.conftest import JobStore, wait_for
from tests.test_continuous import continuous, serve
from tests.test_rows import max_diff, run
from tests.test_worker import submit
from worker.compiled import Tuning
from worker.engine import BatchShape, Engine, ImageSpec
from worker.images import parameters
from worker.schedulers import make_scheduler
from worker.tiny import build_tiny_model

CPU = torch.device("cpu")


def pixels(images: np.ndarray) -> list[np.ndarray]:
    return list((np.asarray(images) * 255).round().astype(np.uint8))


@pytest.mark.parametrize("arch", ["tiny", "tiny-sdxl"])
def test_each_row_reads_at_its_clip_skip_as_diffusers_does(
    arch: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    model = build_tiny_model(tmp_path_factory.mktemp("clip") / arch, arch)
    engine = Engine(str(model), CPU, Tuning(max_batch=4, rows=True))
    kind = StableDiffusionXLPipeline if arch == "tiny-sdxl" else StableDiffusionPipeline
    options = {} if arch == "tiny-sdxl" else {"safety_checker": None}
    pipe = kind.from_pretrained(str(model), **options)
    if not hasattr(pipe.text_encoder, "text_model"):
        # diffusers 0.42 reaches the final layer norm through `text_model`, which transformers
        # 5 folded into the model itself: the same norm, where diffusers looks for it (set past
        # nn.Module, so it registers no submodule).
        norm = SimpleNamespace(final_layer_norm=pipe.text_encoder.final_layer_norm)
        object.__setattr__(pipe.text_encoder, "text_model", norm)
    pipe.scheduler = make_scheduler("euler", engine.scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    common = {"height": 64, "width": 64, "num_inference_steps": 4, "guidance_scale": 6.0,
              "negative_prompt": "blurry", "output_type": "np"}  # fmt: skip
    theirs = {
        skip: pixels(pipe("a red fox", clip_skip=skip - 1 if skip > 1 else None,
                          generator=[torch.Generator().manual_seed(7)], **common).images)[0]
        for skip in (1, 2)
    }  # fmt: skip
    assert max_diff(theirs[1], theirs[2]) > 2  # the layer shows
    shape = BatchShape(64, 64, 4, "euler")
    lanes = [engine.prepare(f"skip {skip}", [ImageSpec("a red fox", "blurry", 6.0, 7,
                                                       clip_skip=skip)], shape)
             for skip in (1, 2)]  # fmt: skip
    ours = run(engine, lanes)  # both clip skips in one UNet call each step
    for skip in (1, 2):
        assert max_diff(ours[f"skip {skip}"][0], theirs[skip]) <= 1, skip


def test_a1111_names_it_as_a1111_does_and_the_infotext_says_it() -> None:
    payload = Txt2ImgPayload(prompt="a", override_settings={"CLIP_stop_at_last_layers": 2})
    fields = payload.job_fields(["default"])
    assert fields["clip_skip"] == 2
    request = Txt2ImgRequest.model_validate(fields | {"seed": 1})
    assert "Clip skip: 2" in parameters(request, 1, "tiny")
    assert "Clip skip" not in parameters(request.model_copy(update={"clip_skip": 1}), 1, "tiny")
    with pytest.raises(A1111Error) as refused:
        Txt2ImgPayload(prompt="a", override_settings={"CLIP_stop_at_last_layers": 13}).job_fields(
            ["default"]
        )
    assert refused.value.field == "override_settings.CLIP_stop_at_last_layers"
    assert "a whole number from 1 to 12" in refused.value.message


def test_a1111_overrides_of_what_the_server_does_anyway_are_honoured() -> None:
    """Settings that never change here (those `GET /sdapi/v1/options` answers), asked at their
    value, change nothing; at another value they are a 422 naming the setting and what is
    honoured."""
    same = {"samples_format": "png", "eta_noise_seed_delta": 0, "enable_pnginfo": True,
            "CLIP_stop_at_last_layers": 1}  # fmt: skip
    plain = Txt2ImgPayload(prompt="a").job_fields(["default"])
    assert Txt2ImgPayload(prompt="a", override_settings=same).job_fields(["default"]) == plain
    for key, value in (("samples_format", "jpg"), ("eta_noise_seed_delta", 31337),
                       ("live_previews_enable", False)):  # fmt: skip
        with pytest.raises(A1111Error) as refused:
            Txt2ImgPayload(prompt="a", override_settings={key: value}).job_fields(["default"])
        assert refused.value.field == f"override_settings.{key}"
        assert "'samples_format': 'png'" in refused.value.message, refused.value.message


def test_deeper_than_the_text_encoder_fails_the_job_alone(
    store: JobStore, tiny_model: Path, redis_url: str
) -> None:
    """The tiny SD text encoder has 2 layers: clip skip 3 fails its job `invalid_request`, naming
    it, before any GPU work; a job of clip skip 2 beside it succeeds."""
    deep = submit(store, clip_skip=3, steps=2, seed=1)
    fine = submit(store, clip_skip=2, steps=2, seed=2)
    r = continuous(store, tiny_model, redis_url)
    r.open()
    done = threading.Event()
    worker = serve(r, done)
    try:

        def succeeded() -> bool:
            view = store.view(fine)
            return view is not None and view.status is Status.SUCCEEDED

        wait_for(succeeded, 120, "the fine job")
    finally:
        done.set()
        worker.join(60)
        r.close()
    view = store.view(deep)
    assert view is not None and view.status is Status.FAILED and view.error is not None
    assert view.error.code == "invalid_request" and "clip_skip: 3" in view.error.message
