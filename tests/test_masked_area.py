"""Inpainting of the masked area only (`mask_crop`: A1111's "only masked", diffusers'
`padding_mask_crop`) and masked content "fill" (A1111's default): the box equals diffusers'
crop region; a job equals diffusers' inpainting pipeline with `padding_mask_crop` for its seed,
at the picture's own size; "fill" keeps the picture outside the mask and draws the inside from
around it; A1111's defaults (webuiapi's) are served through the service."""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline
from diffusers.image_processor import VaeImageProcessor
from PIL import Image, ImageDraw, ImageFilter

from app.controls import control_picture
from app.jobs.contract import ControlNetSettings, InpaintRequest
from app.jobs.masks import Cut, mask_box
from app.jobs.storage import DirectoryStorage, Storage, input_key, open_storage
from app.uploads import to_png
from tests.conftest import JobStore
from tests.test_image_jobs import b64, run_jobs
from tests.test_rows import max_diff, run
from worker.engine import BatchShape, Engine, ImageSpec
from worker.schedulers import make_scheduler
from worker.sources import filled
from worker.tasks import task


def rectangle_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def test_the_box_is_diffusers_crop_region() -> None:
    """Over random rectangles, margins and drawn sizes (wide, tall, square; boxes at the
    picture's edges), for a mask drawn in black and white."""
    draw = random.Random(7)
    for _ in range(300):
        width, height = draw.randrange(64, 400), draw.randrange(64, 400)
        left, top = draw.randrange(0, width - 1), draw.randrange(0, height - 1)
        right, bottom = draw.randrange(left + 1, width + 1), draw.randrange(top + 1, height + 1)
        mask = rectangle_mask((width, height), (left, top, right, bottom))
        pad = draw.choice([0, 0, 4, 32, 200])
        size = (draw.randrange(8, 129) * 8, draw.randrange(8, 129) * 8)
        theirs = VaeImageProcessor.get_crop_region(mask, size[0], size[1], pad=pad)
        assert mask_box(mask, pad, 0, size) == theirs, (mask.size, (left, top, right, bottom))
    blank = Image.new("L", (120, 80), 0)  # repaints nothing: the whole picture
    assert mask_box(blank, 16, 4, (64, 64)) == (0, 0, 120, 80)


def test_the_box_takes_in_the_blurred_edge() -> None:
    mask = rectangle_mask((200, 200), (90, 90, 110, 110))
    sharp, soft = mask_box(mask, 0, 0, (64, 64)), mask_box(mask, 0, 4, (64, 64))
    assert sharp == (90, 90, 110, 110)
    assert soft[0] < 90 and soft[2] > 110 and soft[2] - soft[0] == soft[3] - soft[1]


def test_a_cut_goes_back_where_it_came_from() -> None:
    """Cut and laid back unchanged (a cut drawn at its own size), the picture comes back; a
    changed cut shows only through the mask."""
    y, x = np.mgrid[0:90, 0:150]
    whole = Image.fromarray(np.stack([x, y, (x + y) % 256], -1).astype(np.uint8))
    mask = rectangle_mask(whole.size, (40, 30, 80, 60))
    box = mask_box(mask, 4, 0, (48, 38))
    cut = Cut(box, whole.size, (box[2] - box[0], box[3] - box[1]))
    assert np.array_equal(np.asarray(cut.back(cut.of(whole), whole, mask, 0)), np.asarray(whole))
    white = Image.new("RGB", cut.size, (255, 255, 255))
    laid = np.asarray(cut.back(white, whole, mask, 0))
    inside = np.asarray(mask) == 255
    assert (laid[inside] == 255).all() and np.array_equal(laid[~inside], np.asarray(whole)[~inside])


def test_fill_keeps_the_picture_and_fills_the_mask_from_around_it() -> None:
    picture = Image.new("RGB", (96, 96), (200, 40, 40))
    ImageDraw.Draw(picture).rectangle((32, 32, 63, 63), fill=(20, 20, 230))  # what is masked
    mask = rectangle_mask(picture.size, (28, 28, 68, 68))
    made = np.asarray(filled(picture, mask, 0)).astype(int)
    outside = np.asarray(mask) == 0
    assert np.array_equal(made[outside], np.asarray(picture)[outside])
    assert np.abs(made[~outside] - (200, 40, 40)).max() <= 8  # the blue (230) is gone


def stored_job(storage: DirectoryStorage, job_id: str, picture: Image.Image, mask: Image.Image,
               size: tuple[int, int], pad: int, **fields: Any) -> InpaintRequest:  # fmt: skip
    """An inpainting job as the API queues one of the masked area: its pictures stored at their
    own size, its box found."""
    stored = {}
    for name, image in (("image", picture), ("mask", mask)):
        png = to_png(image)
        storage.put(input_key(job_id, name), png)
        stored[name] = {"sha256": "0" * 64, "width": image.width, "height": image.height}
    return InpaintRequest.model_validate({
        "prompt": "a cat", "negative_prompt": "blurry", "steps": 6, "guidance_scale": 6.0,
        "seed": 31, "width": size[0], "height": size[1], "mask_blur": 0, "mask_crop": pad,
        "crop_box": mask_box(mask, pad, 0, size), **stored, **fields})  # fmt: skip


def ours(engine: Engine, request: InpaintRequest, storage: Storage, job_id: str,
         seed: int = 31) -> np.ndarray:  # fmt: skip
    """The job alone in the engine, as the worker's task reads and finishes it."""
    work = task(request)
    source = work.source(storage, job_id, request)
    spec = ImageSpec(request.prompt, request.negative_prompt, request.guidance_scale, seed)
    shape = BatchShape(request.width, request.height, request.steps, request.scheduler)
    lane = engine.prepare("job", [spec], shape, source)
    [image] = work.finished(list(run(engine, [lane])["job"]), source, request)
    assert image is not None
    return image


def picture() -> Image.Image:
    y, x = np.mgrid[0:96, 0:160]
    rgb = np.stack([x * 3 % 256, y * 2 % 256, ((x - 110) ** 2 + (y - 40) ** 2 < 300) * 220], -1)
    return Image.fromarray(rgb.astype(np.uint8))


def diffusers_inpaint(model: Path, engine: Engine, **inputs: Any) -> list[Any]:
    """diffusers' inpainting pipeline on `stored_job`'s prompts, steps and seed."""
    pipe = StableDiffusionInpaintPipeline.from_pretrained(str(model), safety_checker=None)
    pipe.scheduler = make_scheduler("dpmpp_2m", engine.scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    images: list[Any] = pipe("a cat", negative_prompt="blurry", num_inference_steps=6,
                             guidance_scale=6.0, generator=[torch.Generator().manual_seed(31)],
                             **inputs).images  # fmt: skip
    return images


@pytest.mark.parametrize(
    ("box", "pad", "size"),
    [
        ((94, 14, 126, 46), 16, (64, 64)),  # the box is 64x64: drawn at its own size
        ((100, 20, 116, 52), 8, (64, 96)),  # 32x48, drawn at 64x96 and brought back
    ],
)
def test_a_masked_area_job_equals_diffusers_padding_mask_crop(
    engine: Engine, tiny_model: Path, tmp_path: Path, box: tuple[int, int, int, int], pad: int,
    size: tuple[int, int],
) -> None:  # fmt: skip
    storage = DirectoryStorage(tmp_path)
    mask = rectangle_mask((160, 96), box)
    request = stored_job(storage, "job", picture(), mask, size, pad)
    mine = ours(engine, request, storage, "job")
    assert mine.shape == (96, 160, 3)  # the picture's own size
    [theirs] = diffusers_inpaint(tiny_model, engine, image=picture(), mask_image=mask,
                                 width=size[0], height=size[1], padding_mask_crop=pad,
                                 strength=1.0, output_type="pil")  # fmt: skip
    assert max_diff(mine, np.asarray(theirs)) <= 1
    outside = np.asarray(mask) == 0
    assert np.array_equal(mine[outside], np.asarray(picture())[outside])


def test_fill_changes_what_the_vae_encodes_not_what_is_kept(
    engine: Engine, tiny_model: Path, tmp_path: Path
) -> None:
    """Below strength 1, "fill" starts from the filled picture: inside the mask the job equals
    diffusers' pipeline given the filled picture; outside, the picture as sent."""
    storage = DirectoryStorage(tmp_path)
    mask = rectangle_mask((160, 96), (96, 24, 128, 56))
    request = stored_job(storage, "job", picture(), mask, (64, 64), 16, strength=0.7,
                         masked_content="fill")  # fmt: skip
    mine = ours(engine, request, storage, "job")
    assert request.crop_box is not None
    cut = Cut(request.crop_box, (160, 96), (64, 64))
    start = filled(cut.of(picture()), cut.of(mask), 0)
    [theirs] = diffusers_inpaint(tiny_model, engine, image=start, mask_image=cut.of(mask),
                                 width=64, height=64, strength=0.7, output_type="np")  # fmt: skip
    theirs_pixels = (theirs * 255).round().astype(np.uint8)
    inside = np.asarray(cut.of(mask)) == 255
    drawn = np.asarray(cut.of(Image.fromarray(mine)))  # the box is 64x64: no resampling
    assert max_diff(drawn[inside], theirs_pixels[inside]) <= 1
    outside = np.asarray(mask) == 0
    assert np.array_equal(mine[outside], np.asarray(picture())[outside])
    plain = stored_job(storage, "plain", picture(), mask, (64, 64), 16, strength=0.7)
    assert max_diff(ours(engine, plain, storage, "plain"), mine) > 8  # fill did change it


def test_the_native_route_draws_the_masked_area_at_the_pictures_size(
    api: httpx.Client, store: JobStore, tiny_model: Path, redis_url: str, storage_dir: Path,
    engine: Engine,
) -> None:  # fmt: skip
    """The picture and mask are stored at their own size with the box; the result comes back
    at the picture's size, equal to the engine's run of the job, the picture's own pixels
    outside the blurred mask; the infotext says so as A1111 writes it."""
    mask = rectangle_mask((160, 96), (100, 20, 124, 44))
    body = {"prompt": "a cat", "steps": 4, "seed": 3, "guidance_scale": 6.0, "width": 64,
            "height": 64, "image": b64(picture()), "mask": b64(mask), "mask_crop": 12,
            "mask_blur": 2, "masked_content": "fill", "strength": 0.8}  # fmt: skip
    answer = api.post("/v1/inpaint", json=body)
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["id"]
    view = store.view(job_id)
    assert view is not None and isinstance(view.request, InpaintRequest)
    assert view.request.crop_box == mask_box(mask, 12, 2, (64, 64))
    assert (view.request.image.width, view.request.image.height) == (160, 96)
    run_jobs(store, tiny_model, redis_url, [job_id])
    made = api.get(f"/jobs/{job_id}/images/0.png")
    assert made.status_code == 200
    result = Image.open(io.BytesIO(made.content))
    assert result.size == (160, 96)
    storage = open_storage(storage_dir.as_uri())
    view = store.view(job_id)
    assert view is not None and view.status.value == "succeeded"
    assert isinstance(view.request, InpaintRequest)
    alone = ours(engine, view.request, storage, job_id, view.seeds[0])
    assert max_diff(np.asarray(result), alone) <= 1
    outside = np.asarray(mask.filter(ImageFilter.GaussianBlur(2))) == 0
    assert np.array_equal(np.asarray(result)[outside], np.asarray(picture())[outside])
    words = result.info["parameters"]
    for said in ("Masked content: fill", "Inpaint area: Only masked", "Masked area padding: 12"):
        assert said in words, words


def test_a_controlnet_picture_is_cut_as_the_source_is() -> None:
    unit = ControlNetSettings(model="cn", preprocess="none")
    y, x = np.mgrid[0:48, 0:80]
    sent = Image.fromarray(np.stack([x * 3, y * 5, x + y], -1).astype(np.uint8))
    cut = Cut((40, 0, 88, 48), (160, 96), (64, 64))  # a source twice the picture's size
    made = control_picture("c", to_png(sent), unit, (64, 64), cut)
    expected = cut.of(sent.resize((160, 96), Image.Resampling.LANCZOS))
    assert made.size == (64, 64) and np.array_equal(np.asarray(made), np.asarray(expected))


@pytest.mark.parametrize(
    ("fields", "field"),
    [({"mask_crop": -1}, "mask_crop"), ({"mask_crop": 5000}, "mask_crop"),
     ({"masked_content": "latent noise"}, "masked_content")],
)  # fmt: skip
def test_bad_masked_area_fields_are_422_naming_them(
    api: httpx.Client, fields: dict[str, Any], field: str
) -> None:
    mask = rectangle_mask((160, 96), (100, 20, 124, 44))
    body = {"prompt": "x", "image": b64(picture()), "mask": b64(mask), **fields}
    answer = api.post("/v1/inpaint", json=body)
    assert answer.status_code == 422 and answer.json()["detail"][0]["loc"][-1] == field
