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
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
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
    """A compiled UNet and compiled ControlNets (dynamo's guards, eager backend) warmed up
    without any control: rows with and without ControlNets, txt2img and img2img, prompts of one
    and two chunks, in every bucket, compile nothing, and make the images the eager engine makes
    (residuals are the graph's inputs, not constants)."""
    import dataclasses

    from worker.inputs import Source

    model, _nets, eager = served
    tuning = dataclasses.replace(eager.tuning, max_batch=4, fuse=True, compile=True,
                                 compile_backend="eager", compiled_sizes=((64, 64),),
                                 prompt_chunks=2)  # fmt: skip
    engine = Engine(str(model), CPU, tuning)
    engine.warm_up()
    assert engine.calls.compiled_controls() == ["depth", "edges"]
    shape = BatchShape(64, 64, 3, "euler")
    source = Source(image=DEPTH, strength=0.7)
    images: dict[str, dict[str, Any]] = {}
    for name, which in (("compiled", engine), ("eager", eager)):
        lanes = []
        for k, (key, uses) in enumerate(ROWS.items()):
            words = "a red fox " * (1 + 8 * (k in (1, 4)))  # two chunks, with and without
            spec = ImageSpec(words, "blurry", 6.0, 7, controls=uses)
            lanes.append(which.prepare(key, [spec], shape, source if k % 2 else None))
        with torch.compiler.set_stance("fail_on_recompile"):
            images[name] = run(which, lanes)
    assert engine.calls.recompiles == 0
    for key in ROWS:
        assert max_diff(images["compiled"][key][0], images["eager"][key][0]) <= 1, key


def test_a_controlnet_that_fails_to_compile_is_served_eagerly(
    served: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A compiler failure at a ControlNet's warm-up is said, and the worker serves that
    ControlNet eagerly (the same images) rather than not start."""
    import dataclasses

    from worker import compiled

    model, _nets, eager = served
    tuning = dataclasses.replace(eager.tuning, max_batch=2, compile=True, compile_backend="eager",
                                 compiled_sizes=((64, 64),), prompt_chunks=1)  # fmt: skip
    engine = Engine(str(model), CPU, tuning)
    made = compiled.CompiledCalls._compiled

    def broken(self: Any, module: Any) -> Any:
        fast = made(self, module)
        if module is not engine.controls.models.get("edges"):  # type: ignore[union-attr]
            return fast

        def fails(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("an inductor failure")

        return fails

    monkeypatch.setattr(compiled.CompiledCalls, "_compiled", broken)
    engine.calls.serve_controls(engine.controls)  # type: ignore[arg-type]
    with caplog.at_level("ERROR", "sdserve.compiled"):
        engine.warm_up()
    assert "ControlNet edges did not compile (it runs eagerly): an inductor failure" in caplog.text
    assert engine.calls.compiled_controls() == ["depth"]
    shape = BatchShape(64, 64, 3, "euler")
    spec = ImageSpec("a red fox", "blurry", 6.0, 7, controls=ROWS["two"])
    ours = run(engine, [engine.prepare("k", [spec], shape)])
    theirs = run(eager, [eager.prepare("k", [spec], shape)])
    assert max_diff(ours["k"][0], theirs["k"][0]) <= 1


def test_img2img_rows_equal_diffusers_controlnet_img2img(served: Any) -> None:
    """A picture's job with a ControlNet equals `StableDiffusionControlNetImg2ImgPipeline`."""
    from diffusers import StableDiffusionControlNetImg2ImgPipeline

    from worker.inputs import Source

    model, nets, engine = served
    use = ControlUse("edges", EDGES, weight=0.9, end=0.8)
    spec = ImageSpec("a red fox", "blurry", 6.0, 5, controls=(use,))
    lane = engine.prepare("k", [spec], BatchShape(64, 64, 5, "euler"), Source(DEPTH, 0.6))
    ours = run(engine, [lane])["k"][0]
    pipe = StableDiffusionControlNetImg2ImgPipeline.from_pretrained(
        str(model), controlnet=ControlNetModel.from_pretrained(str(nets["edges"])),
        safety_checker=None,
    )  # fmt: skip
    pipe.scheduler = make_scheduler("euler", engine.scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe("a red fox", image=DEPTH, control_image=EDGES, strength=0.6, height=64,
                  width=64, num_inference_steps=5, guidance_scale=6.0, negative_prompt="blurry",
                  controlnet_conditioning_scale=0.9, control_guidance_end=0.8, output_type="np",
                  generator=[torch.Generator().manual_seed(5)]).images  # fmt: skip
    assert max_diff(ours, pixels(theirs)) <= 1


def test_sdxl_rows_equal_diffusers_sdxl_controlnet(tmp_path: Any) -> None:
    """SDXL: a ControlNet made for the tiny SDXL (its added conditioning goes to the ControlNet
    too) beside a row without, equal to `StableDiffusionXLControlNetPipeline`."""
    from diffusers import StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline

    model = build_tiny_model(tmp_path / "xl", "tiny-sdxl")
    net = build_tiny_controlnet(model, tmp_path / "xl-edges", seed=3)
    engine = Engine(str(model), CPU, Tuning(max_batch=4, rows=True,
                                            controlnets=(("edges", str(net)),)))  # fmt: skip
    shape = BatchShape(64, 64, 4, "euler")
    use = ControlUse("edges", EDGES, weight=0.7)
    rows = (("with", (use,)), ("without", ()))
    lanes = [engine.prepare(key, [ImageSpec("a red fox", "blurry", 6.0, 5, controls=uses)],
                            shape) for key, uses in rows]  # fmt: skip
    ours = run(engine, lanes)
    common = {"height": 64, "width": 64, "num_inference_steps": 4, "guidance_scale": 6.0,
              "negative_prompt": "blurry", "output_type": "np"}  # fmt: skip
    pipe: Any = StableDiffusionXLControlNetPipeline.from_pretrained(
        str(model), controlnet=ControlNetModel.from_pretrained(str(net))
    )
    pipe.scheduler = make_scheduler("euler", engine.scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    controlled = pipe("a red fox", image=EDGES, controlnet_conditioning_scale=0.7,
                      generator=[torch.Generator().manual_seed(5)], **common).images  # fmt: skip
    plain: Any = StableDiffusionXLPipeline.from_pretrained(str(model))
    plain.scheduler = make_scheduler("euler", engine.scheduler_config)
    plain.set_progress_bar_config(disable=True)
    alone = plain("a red fox", generator=[torch.Generator().manual_seed(5)], **common).images
    assert max_diff(pixels(controlled), pixels(alone)) > 2, "the ControlNet shows"
    assert max_diff(ours["with"][0], pixels(controlled)) <= 1
    assert max_diff(ours["without"][0], pixels(alone)) <= 1


def test_inpaint_rows_equal_diffusers_controlnet_inpaint(served: Any) -> None:
    """Inpainting with a ControlNet equals `StableDiffusionControlNetInpaintPipeline` (the
    4-channel UNet's blend after every step, as our inpainting does)."""
    from worker.inputs import Source

    model, nets, engine = served
    use = ControlUse("depth", EDGES, weight=1.1)
    spec = ImageSpec("a red fox", "blurry", 6.0, 5, controls=(use,))
    lane = engine.prepare("k", [spec], BatchShape(64, 64, 4, "euler"), Source(DEPTH, 1.0, HOLE))
    ours = run(engine, [lane])["k"][0]
    assert max_diff(ours, controlnet_inpainted(model, nets["depth"], engine)) <= 1


HOLE = Image.fromarray(np.pad(np.full((48, 44), 255, np.uint8), ((16, 0), (20, 0))), "L")


def controlnet_inpainted(model: Any, net: Any, engine: Engine) -> np.ndarray:
    """`StableDiffusionControlNetInpaintPipeline`'s image for the inpainting tests' request:
    DEPTH repainted in HOLE, EDGES the control image at weight 1.1."""
    from diffusers import StableDiffusionControlNetInpaintPipeline

    pipe = StableDiffusionControlNetInpaintPipeline.from_pretrained(
        str(model), controlnet=ControlNetModel.from_pretrained(str(net)), safety_checker=None
    )
    pipe.scheduler = make_scheduler("euler", engine.scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe("a red fox", image=DEPTH, mask_image=HOLE, control_image=EDGES, height=64,
                  width=64, num_inference_steps=4, guidance_scale=6.0, negative_prompt="blurry",
                  controlnet_conditioning_scale=1.1, output_type="np", strength=1.0,
                  generator=[torch.Generator().manual_seed(5)]).images  # fmt: skip
    return pixels(theirs)


def test_make_tiny_model_writes_controlnets_for_each_family(served: Any, tmp_path: Any) -> None:
    """`sdserve make-tiny-model --arch tiny-controlnet` (and `tiny-sdxl-controlnet`) writes a
    ControlNet that fits the tiny model of its family, and not the other's."""
    from app.cli import main
    from worker.controls import ControlNets

    _model, _nets, engine = served
    xl = build_tiny_model(tmp_path / "xl", "tiny-sdxl")
    xl_unet = UNet2DConditionModel.from_pretrained(str(xl / "unet"))
    for arch in ("tiny-controlnet", "tiny-sdxl-controlnet"):
        main(["make-tiny-model", str(tmp_path / arch), "--arch", arch])
        made = ControlNetModel.from_pretrained(str(tmp_path / arch))
        fits_sd = ControlNets.fits(made, engine.unet) is None
        fits_xl = ControlNets.fits(made, xl_unet) is None
        assert (fits_sd, fits_xl) == ((True, False) if arch == "tiny-controlnet" else (False, True))


def test_a_single_file_controlnet_steers_as_its_folder(served: Any, tmp_path: Any) -> None:
    """A ControlNet as one `.safetensors` file of the original layout (as A1111's are
    distributed), given with its configuration folder, makes the folder's images; a file
    without `;config=` stops the settings, naming why."""
    from worker.original_layout import write_single_file_controlnet
    from worker.settings import WorkerSettings

    model, nets, engine = served
    file = write_single_file_controlnet(nets["edges"], tmp_path / "edges.safetensors")
    entry = f"{file};config={nets['edges']}"
    with pytest.raises(ValueError, match="needs ;config=FOLDER"):
        WorkerSettings(controlnets={"edges": str(file)})
    assert WorkerSettings(controlnets={"edges": entry}).controlnets == {"edges": entry}
    tuning = Tuning(max_batch=4, rows=True, controlnets=(("edges", entry),))
    single = Engine(str(model), CPU, tuning)
    assert single.controls is not None
    mine, theirs = single.controls.models["edges"], engine.controls.models["edges"]
    want = theirs.state_dict()
    assert mine.state_dict().keys() == want.keys()
    assert all(torch.equal(t, want[k]) for k, t in mine.state_dict().items())
    shape = BatchShape(64, 64, 3, "euler")
    spec = ImageSpec("a red fox", "blurry", 6.0, 5, controls=(ControlUse("edges", EDGES),))
    images = [run(e, [e.prepare("k", [spec], shape)])["k"][0] for e in (single, engine)]
    assert np.array_equal(images[0], images[1])


def test_a_9_channel_inpainting_unet_takes_a_controlnet_as_diffusers_does(
    served: Any, tmp_path: Any
) -> None:
    """An SD 1.x ControlNet on an inpainting UNet (9 input channels: the latents, the mask and
    the masked picture's latents): the ControlNet reads the 4 latent channels only, as
    `StableDiffusionControlNetInpaintPipeline` gives it; a text-to-image row (the whole
    picture masked) beside it takes none."""
    from worker.inputs import Source

    _, nets, _ = served
    model = build_tiny_model(tmp_path / "inpaint", "sd15-inpaint")
    tuning = Tuning(max_batch=8, rows=True, controlnets=(("depth", str(nets["depth"])),))
    engine = Engine(str(model), CPU, tuning)
    use = ControlUse("depth", EDGES, weight=1.1)
    shape = BatchShape(64, 64, 4, "euler")
    lane = engine.prepare("k", [ImageSpec("a red fox", "blurry", 6.0, 5, controls=(use,))],
                          shape, Source(DEPTH, 1.0, HOLE))  # fmt: skip
    plain = engine.prepare("plain", [ImageSpec("a red fox", "blurry", 6.0, 5)], shape)
    ours = run(engine, [lane, plain])
    assert max_diff(ours["k"][0], controlnet_inpainted(model, nets["depth"], engine)) <= 1
    alone = run(engine, [engine.prepare("plain", [ImageSpec("a red fox", "blurry", 6.0, 5)],
                                        shape)])  # fmt: skip
    assert max_diff(ours["plain"][0], alone["plain"][0]) <= 1
    # Compiled as on a GPU (dynamo's guards, eager backend), warmed without control: the
    # ControlNet's 4 of the UNet's 9 channels compile nothing, and make the same images.
    import dataclasses

    compiled = Engine(str(model), CPU, dataclasses.replace(
        tuning, max_batch=4, fuse=True, compile=True, compile_backend="eager",
        compiled_sizes=((64, 64),)))  # fmt: skip
    compiled.warm_up()
    controlled = ImageSpec("a red fox", "blurry", 6.0, 5, controls=(use,))
    uncontrolled = ImageSpec("a red fox", "blurry", 6.0, 5)
    lanes = [compiled.prepare("k", [controlled], shape, Source(DEPTH, 1.0, HOLE)),
             compiled.prepare("plain", [uncontrolled], shape)]  # fmt: skip
    with torch.compiler.set_stance("fail_on_recompile"):
        fast = run(compiled, lanes)
    assert compiled.calls.recompiles == 0
    assert max_diff(fast["k"][0], ours["k"][0]) <= 1
