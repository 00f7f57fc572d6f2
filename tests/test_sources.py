"""img2img and inpainting in the row engine, on the CPU with the tiny model: each image equals
what diffusers' own StableDiffusionImg2ImgPipeline and StableDiffusionInpaintPipeline make for
its seed, and such lanes share UNet calls with text-to-image lanes without changing them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
from PIL import Image

from tests.test_rows import max_diff, run
from worker.engine import BatchShape, Engine, ImageSpec, Source
from worker.schedulers import make_scheduler

WIDTH, HEIGHT = 64, 96


def picture() -> Image.Image:
    """A source image with structure: gradients and a disc."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    rgb = np.stack([x * 4 % 256, y * 2 % 256, ((x - 32) ** 2 + (y - 48) ** 2 < 400) * 200], -1)
    return Image.fromarray(rgb.astype(np.uint8))


def square_mask() -> Image.Image:
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[24:72, 16:48] = 255  # white: repaint
    return Image.fromarray(mask, "L")


def reference(pipeline: type[Any], model: Path, engine: Engine, sampler: str, seed: int,
              **inputs: Any) -> np.ndarray:  # fmt: skip
    pipe = pipeline.from_pretrained(str(model), safety_checker=None)
    pipe.scheduler = make_scheduler(sampler, engine.scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a cat", negative_prompt="blurry", num_inference_steps=6, guidance_scale=6.0,
                 generator=[torch.Generator().manual_seed(seed)], output_type="np",
                 **inputs).images[0]  # fmt: skip
    pixels: np.ndarray = (image * 255).round().astype(np.uint8)
    return pixels


def ours(engine: Engine, sampler: str, seeds: list[int], source: Source) -> list[np.ndarray]:
    specs = [ImageSpec("a cat", "blurry", 6.0, seed) for seed in seeds]
    lane = engine.prepare("job", specs, BatchShape(WIDTH, HEIGHT, 6, sampler), source)
    return run(engine, [lane])["job"]


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_a", "ddim", "unipc", "pndm",
                                     "dpmpp_2m_sde", "lcm"])  # fmt: skip
def test_img2img_matches_the_diffusers_pipeline(
    engine: Engine, tiny_model: Path, sampler: str
) -> None:
    source = Source(picture(), strength=0.6)
    images = ours(engine, sampler, [21, 22], source)
    for seed, mine in zip([21, 22], images, strict=True):
        theirs = reference(StableDiffusionImg2ImgPipeline, tiny_model, engine, sampler, seed,
                           image=picture(), strength=0.6)  # fmt: skip
        assert max_diff(mine, theirs) <= 1, seed


@pytest.mark.parametrize(
    ("sampler", "strength"), [("dpmpp_2m", 1.0), ("euler_a", 0.7), ("unipc", 0.8), ("ddim", 1.0)]
)
def test_inpainting_matches_the_diffusers_pipeline(
    engine: Engine, tiny_model: Path, sampler: str, strength: float
) -> None:  # fmt: skip
    [mine] = ours(engine, sampler, [31], Source(picture(), strength, square_mask()))
    theirs = reference(StableDiffusionInpaintPipeline, tiny_model, engine, sampler, 31,
                       image=picture(), mask_image=square_mask(), strength=strength,
                       height=HEIGHT, width=WIDTH)  # fmt: skip
    assert max_diff(mine, theirs) <= 1


def test_source_lanes_share_steps_with_text_lanes_and_change_nothing(engine: Engine) -> None:
    shape = BatchShape(WIDTH, HEIGHT, 6, "euler_a")
    text = [ImageSpec("a dog", "", 7.0, 5)]
    sources = {"img2img": Source(picture(), 0.5), "inpaint": Source(picture(), 0.9, square_mask())}

    def lanes() -> list[Any]:
        made = [engine.prepare("text", text, shape)]
        made += [engine.prepare(k, [ImageSpec("a cat", "", 6.0, 9)], shape, s)
                 for k, s in sources.items()]  # fmt: skip
        return made

    together = run(engine, lanes())
    for lane in lanes():
        alone = run(engine, [lane])[lane.key]
        assert max_diff(alone[0], together[lane.key][0]) <= 1, lane.key


@pytest.fixture(scope="module")
def inpainting_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from worker.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("inpaint") / "model", "sd15-inpaint")


@pytest.mark.parametrize(("sampler", "strength"), [("dpmpp_2m", 1.0), ("euler_a", 0.7)])
def test_an_inpainting_unet_matches_the_diffusers_pipeline(
    inpainting_model: Path, sampler: str, strength: float
) -> None:
    """A 9-channel UNet: the mask and the masked source go in beside the latents, every step."""
    engine = Engine(str(inpainting_model), torch.device("cpu"))
    assert engine.inpainting_unet
    [mine] = ours(engine, sampler, [41], Source(picture(), strength, square_mask()))
    theirs = reference(StableDiffusionInpaintPipeline, inpainting_model, engine, sampler, 41,
                       image=picture(), mask_image=square_mask(), strength=strength,
                       height=HEIGHT, width=WIDTH)  # fmt: skip
    assert max_diff(mine, theirs) <= 1


def test_an_inpainting_unet_also_makes_text_and_img2img_jobs(inpainting_model: Path) -> None:
    """Without a mask the UNet is told to repaint everything: rows of every kind share steps,
    and a static batch makes the same text-to-image picture."""
    engine = Engine(str(inpainting_model), torch.device("cpu"))
    shape = BatchShape(WIDTH, HEIGHT, 4, "dpmpp_2m")
    spec = ImageSpec("a dog", "", 7.0, 5)
    sources = {"text": None, "img2img": Source(picture(), 0.6),
               "inpaint": Source(picture(), 1.0, square_mask())}  # fmt: skip
    lanes = [engine.prepare(key, [spec], shape, source) for key, source in sources.items()]
    made = run(engine, lanes)
    assert all(images[0].shape == (HEIGHT, WIDTH, 3) for images in made.values())
    [static] = engine.generate([spec], shape) or [None]
    assert static is not None and max_diff(made["text"][0], static) <= 1
