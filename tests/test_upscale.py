"""Upscaling in the row engine, on the CPU with the tiny model: the tiles' arithmetic, latent
upscaling equal to diffusers' img2img pipeline given the enlarged latents, and a picture
denoised in tiles without a visible seam, whatever else shares its UNet calls."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline
from PIL import Image

from app.tiles import starts, tile_count
from tests.test_rows import max_diff, run
from worker.engine import BatchShape, Engine, ImageSpec, Source, enlarged
from worker.schedulers import make_scheduler
from worker.tiles import tiling


@pytest.mark.parametrize(("length", "tile", "overlap"), [(16, 8, 2), (17, 8, 3), (8, 8, 2),
                                                         (256, 128, 16), (100, 64, 0)])  # fmt: skip
def test_tiles_cover_the_canvas_with_at_least_their_overlap(
    length: int, tile: int, overlap: int
) -> None:
    corners = starts(length, tile, overlap)
    assert corners[0] == 0 and min(corners[-1] + tile, length) == length
    for a, b in itertools.pairwise(corners):
        assert a + tile - b >= overlap  # neighbours overlap by at least `overlap`


def test_split_then_merge_gives_the_canvas_back_and_shares_sum_to_one() -> None:
    tiles = tiling((20, 28), 8, 2)
    assert tiles is not None and tiles.count == tile_count((28 * 8, 20 * 8), 64, 16)
    latents = torch.randn(3, 4, 20, 28)
    rows = tiles.split(latents)
    assert rows.shape == (3 * tiles.count, 4, 8, 8)
    torch.testing.assert_close(tiles.merge(rows), latents)
    assert tiling((8, 8), 8, 2) is None  # one tile holds it: no tiling


@pytest.mark.parametrize("overlap", [2, 3, 5])
def test_tiles_that_disagree_blend_without_a_step_across_their_borders(overlap: int) -> None:
    """The worst case for a seam: every tile predicts another constant. Merged, neighbouring
    positions never differ by more than the tiles' disagreement spread over the overlap (a
    hard cut would jump by all of it at the border)."""
    tiles = tiling((21, 37), 8, overlap)
    assert tiles is not None
    values = torch.randn(tiles.count) * 10
    rows = values.view(-1, 1, 1, 1).expand(tiles.count, 1, *tiles.tile)
    merged = tiles.merge(rows.contiguous())[0, 0]
    disagreement = float(values.max() - values.min())
    steps = max(float(merged.diff(dim=0).abs().max()), float(merged.diff(dim=1).abs().max()))
    assert steps <= disagreement / (overlap + 1) + 1e-4, (steps, disagreement)


def picture(width: int, height: int) -> Image.Image:
    """Smooth: gradients and a soft disc, so that a seam would stand out."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    disc = np.exp(-(((x - width / 2) ** 2 + (y - height / 2) ** 2) / (width * height / 8)))
    rgb = np.stack([255 * x / width, 255 * y / height, 255 * disc], -1)
    return Image.fromarray(rgb.round().astype(np.uint8))


def test_latent_upscaling_matches_the_diffusers_img2img_pipeline_given_those_latents(
    engine: Engine, tiny_model: Path
) -> None:
    small = picture(48, 32)
    source = Source(small, strength=0.5, enlarge=True)
    lane = engine.prepare("up", [ImageSpec("a cat", "blurry", 6.0, 7)],
                          BatchShape(96, 64, 6, "euler_a"), source)  # fmt: skip
    [mine] = run(engine, [lane])["up"]
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(str(tiny_model), safety_checker=None)
    pipe.scheduler = make_scheduler("euler_a", engine.scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    pixels = pipe.image_processor.preprocess(small, height=32, width=48)
    latents = pipe.vae.encode(pixels).latent_dist.mode() * pipe.vae.config.scaling_factor
    theirs = pipe("a cat", image=enlarged(latents, (8, 12)), strength=0.5, negative_prompt="blurry",
                  num_inference_steps=6, guidance_scale=6.0, output_type="np",
                  generator=[torch.Generator().manual_seed(7)]).images[0]  # fmt: skip
    assert mine.shape == (64, 96, 3)
    assert max_diff(mine, (theirs * 255).round().astype(np.uint8)) <= 1


@pytest.fixture
def tiled(engine: Engine) -> Iterator[Engine]:
    """The engine with tiles of 64 pixels overlapping by 16: a 128x128 picture is 9 tiles."""
    before = engine.tuning
    engine.tuning = dataclasses.replace(before, tile=64, tile_overlap=16)
    yield engine
    engine.tuning = before


def seams(image: np.ndarray, borders: list[int]) -> tuple[float, float]:
    """The largest mean step between neighbouring columns at tile borders, and anywhere else."""
    steps = np.abs(np.diff(image.astype(float), axis=1)).mean(axis=(0, 2))
    at = [steps[b - 1] for b in borders]
    inside = [s for k, s in enumerate(steps) if k + 1 not in borders]
    return max(at), max(inside)


def test_a_tiled_picture_shows_no_seam_and_strangers_change_nothing(tiled: Engine) -> None:
    big = Source(picture(128, 128), strength=0.5)
    shape = BatchShape(128, 128, 6, "dpmpp_2m")
    spec = [ImageSpec("a cat", "", 6.0, 3)]
    lane = tiled.prepare("big", spec, shape, big)
    assert lane.tiling is not None and lane.tiling.count == 9 and lane.size == (64, 64)
    assert lane.unet_rows == 18
    [alone] = run(tiled, [lane])["big"]
    # The measure on the picture itself: the step between neighbouring columns (rows)
    # across a tile border is no larger than between neighbours inside a tile. Where each tile
    # starts and ends, in pixels, in either direction:
    borders = sorted({edge * 8 for corner in lane.tiling.corners for start in corner
                      for edge in (start, start + 8) if 0 < edge * 8 < 128})  # fmt: skip
    for image in (alone, alone.transpose(1, 0, 2)):
        at_border, inside = seams(image, borders)
        assert at_border <= inside, (at_border, inside)
    # A stranger of the tile's size shares every UNet call and changes nothing.
    stranger = tiled.prepare("small", [ImageSpec("a dog", "", 7.0, 4)],
                             BatchShape(64, 64, 6, "euler"))  # fmt: skip
    together = run(tiled, [tiled.prepare("big", spec, shape, big), stranger])
    assert max_diff(together["big"][0], alone) <= 1


@pytest.mark.parametrize(("method", "sampler"), [("latent", "dpmpp_2m"), ("pixel", "euler_a")])
def test_a_hires_fix_matches_diffusers_txt2img_then_img2img(
    engine: Engine, tiny_model: Path, method: str, sampler: str
) -> None:
    """The first pass is diffusers' txt2img; the second its img2img pipeline on the enlarged
    latents (latent) or the decoded picture resized with Lanczos (pixel), each image's
    generator going on from the first pass."""
    from diffusers import StableDiffusionPipeline

    from app.jobs.contract import Hires

    hires = Hires(scale=1.5, steps=5, strength=0.6, method=method)
    specs = [ImageSpec("a cat", "blurry", 6.0, 8), ImageSpec("a cow", "", 6.0, 9)]
    lane = engine.prepare("hr", specs, BatchShape(64, 48, 4, sampler))
    while not lane.done:
        engine.step([lane])
    second = engine.second_pass(lane, specs, BatchShape(96, 72, 5, sampler), hires)
    assert second.earlier_steps == 4 and second.steps == 3  # 5 steps at 0.6 run 3
    mine = run(engine, [second])["hr"]

    text = StableDiffusionPipeline.from_pretrained(str(tiny_model), safety_checker=None)
    text.scheduler = make_scheduler(sampler, engine.scheduler_config)
    text.set_progress_bar_config(disable=True)
    image = StableDiffusionImg2ImgPipeline(**text.components)
    image.set_progress_bar_config(disable=True)
    for spec, ours in zip(specs, mine, strict=True):
        generator = torch.Generator().manual_seed(spec.seed)
        common = {"negative_prompt": spec.negative_prompt, "guidance_scale": 6.0,
                  "generator": [generator]}  # fmt: skip
        kind = "latent" if method == "latent" else "pil"
        first = text(spec.prompt, height=48, width=64, num_inference_steps=4, output_type=kind,
                     **common).images  # fmt: skip
        picture = (enlarged(first, (9, 12)) if method == "latent"
                   else first[0].resize((96, 72), Image.Resampling.LANCZOS))  # fmt: skip
        theirs = image(spec.prompt, image=picture, strength=0.6, num_inference_steps=5,
                       output_type="np", **common).images[0]  # fmt: skip
        assert max_diff(ours, (theirs * 255).round().astype(np.uint8)) <= 1
