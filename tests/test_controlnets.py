"""ControlNet per row (issue 24, points 3-4): rows with and without ControlNets, with different
models, weights, start/end ranges and guess mode, step in one UNet call each step, and each
image equals diffusers' `StableDiffusionControlNetPipeline` (a list of ControlNets for several
units) for the same request, control image and seed; a row without control beside them equals
the model's own image. On the tiny SD model with tiny random ControlNets the tests write."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline
from PIL import Image

from tests.test_rows import max_diff, run, run_counting_calls
from worker.compiled import Tuning
from worker.controls import ControlRefused, ControlUse
from worker.engine import BatchShape, Engine, ImageSpec
from worker.schedulers import make_scheduler
from worker.tiny import build_tiny_model
from worker.tiny_addons import build_tiny_controlnet

CPU = torch.device("cpu")


def picture(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


EDGES, DEPTH = picture(1), picture(2)
ROWS: dict[str, tuple[ControlUse, ...]] = {
    "full": (ControlUse("edges", EDGES),),
    "none": (),
    "ranged": (ControlUse("edges", DEPTH, weight=0.7, start=0.25, end=0.75),),
    "guess": (ControlUse("edges", EDGES, guess=True),),
    "two": (ControlUse("edges", EDGES, weight=0.6), ControlUse("depth", DEPTH, weight=0.8)),
}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("controlnets")
    model = build_tiny_model(root / "tiny")
    nets = {name: build_tiny_controlnet(model, root / name, seed=k + 1)
            for k, name in enumerate(("edges", "depth"))}  # fmt: skip
    held = tuple((name, str(path)) for name, path in nets.items())
    tuning = Tuning(max_batch=8, rows=True, controlnets=held)
    return model, nets, Engine(str(model), CPU, tuning)


def pixels(images: np.ndarray) -> np.ndarray:
    out: np.ndarray = (np.asarray(images[0]) * 255).round().astype(np.uint8)
    return out


def diffusers_image(model: Any, nets: dict[str, Any], engine: Engine, uses: Any) -> np.ndarray:
    common = {"height": 64, "width": 64, "num_inference_steps": 4, "guidance_scale": 6.0,
              "negative_prompt": "blurry", "output_type": "np",
              "generator": [torch.Generator().manual_seed(5)]}  # fmt: skip
    pipe: Any
    if not uses:
        pipe = StableDiffusionPipeline.from_pretrained(str(model), safety_checker=None)
        pipe.scheduler = make_scheduler("euler", engine.scheduler_config)
        pipe.set_progress_bar_config(disable=True)
        return pixels(pipe("a red fox", **common).images)
    controlnets = [ControlNetModel.from_pretrained(str(nets[u.model])) for u in uses]
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        str(model), controlnet=controlnets if len(uses) > 1 else controlnets[0],
        safety_checker=None,
    )  # fmt: skip
    pipe.scheduler = make_scheduler("euler", engine.scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    several = len(uses) > 1

    def each(values: list[Any]) -> Any:
        return values if several else values[0]

    made = pipe("a red fox", image=each([u.image for u in uses]),
                controlnet_conditioning_scale=each([u.weight for u in uses]),
                control_guidance_start=each([u.start for u in uses]),
                control_guidance_end=each([u.end for u in uses]),
                guess_mode=uses[0].guess, **common).images  # fmt: skip
    return pixels(made)


def test_each_row_takes_its_controlnets_as_diffusers_does(served: Any) -> None:
    model, nets, engine = served
    shape = BatchShape(64, 64, 4, "euler")
    lanes = [engine.prepare(key, [ImageSpec("a red fox", "blurry", 6.0, 5, controls=uses)],
                            shape) for key, uses in ROWS.items()]  # fmt: skip
    ours, calls = run_counting_calls(engine, lanes)  # every row in one UNet call per step
    assert calls == 4
    theirs = {key: diffusers_image(model, nets, engine, uses) for key, uses in ROWS.items()}
    assert max_diff(theirs["full"], theirs["none"]) > 2, "the ControlNet shows"
    assert max_diff(theirs["ranged"], theirs["full"]) > 2
    assert max_diff(theirs["guess"], theirs["full"]) > 2
    for key in ROWS:
        assert max_diff(ours[key][0], theirs[key]) <= 1, key


def test_what_a_worker_refuses(served: Any, tmp_path: Any) -> None:
    """A ControlNet the worker does not hold: refused when the job's lane is made (the job
    fails, the worker goes on); one for another model's UNet is not loaded for it."""
    _model, nets, engine = served
    shape = BatchShape(64, 64, 4, "euler")
    with pytest.raises(ControlRefused, match="'sketch' is not a ControlNet"):
        unknown = (ControlUse("sketch", EDGES),)
        engine.prepare("k", [ImageSpec("x", "", 6.0, 1, controls=unknown)], shape)
    other = build_tiny_model(tmp_path / "xl", "tiny-sdxl")
    tuning = Tuning(max_batch=2, rows=True, controlnets=(("edges", str(nets["edges"])),))
    assert Engine(str(other), CPU, tuning).controls is None


def test_controlnet_rows_never_compile_and_equal_eager_ones(served: Any) -> None:
    """A compiled UNet (dynamo's guards, eager backend) warmed up without any control: rows
    with and without ControlNets, txt2img and img2img, in every bucket, compile nothing, and
    make the images the eager engine makes (residuals are the graph's inputs, not constants)."""
    import dataclasses

    from worker.inputs import Source

    model, _nets, eager = served
    tuning = dataclasses.replace(eager.tuning, max_batch=4, fuse=True, compile=True,
                                 compile_backend="eager", compiled_sizes=((64, 64),),
                                 prompt_chunks=2)  # fmt: skip
    engine = Engine(str(model), CPU, tuning)
    engine.warm_up()
    shape = BatchShape(64, 64, 3, "euler")
    source = Source(image=DEPTH, strength=0.7)
    images: dict[str, dict[str, Any]] = {}
    for name, which in (("compiled", engine), ("eager", eager)):
        lanes = []
        for k, (key, uses) in enumerate(ROWS.items()):
            spec = ImageSpec("a red fox " * (1 + 8 * (k == 1)), "blurry", 6.0, 7, controls=uses)
            lanes.append(which.prepare(key, [spec], shape, source if k % 2 else None))
        with torch.compiler.set_stance("fail_on_recompile"):
            images[name] = run(which, lanes)
    assert engine.calls.recompiles == 0
    for key in ROWS:
        assert max_diff(images["compiled"][key][0], images["eager"][key][0]) <= 1, key
