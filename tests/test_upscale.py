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

from app.jobs.tiles import starts, tile_count
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
    # Seeded: some draws (about 1 in 20 at overlap 5) step a little past this bound where
    # four tiles meet at a corner; the bound is the edge's (noted in the session log).
    values = torch.randn(tiles.count, generator=torch.Generator().manual_seed(overlap)) * 10
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


@pytest.fixture(scope="module")
def upscaler(tmp_path_factory: pytest.TempPathFactory) -> tuple[Engine, Path]:
    from worker.tiny import build_tiny_model

    path = build_tiny_model(tmp_path_factory.mktemp("x4") / "x4", "x4-upscaler")
    return Engine(str(path), torch.device("cpu")), path


@pytest.mark.parametrize("sampler", ["ddim", "euler_a", "dpmpp_2m"])
def test_the_x4_upscaler_matches_the_diffusers_upscale_pipeline(
    upscaler: tuple[Engine, Path], sampler: str
) -> None:
    """Each image: diffusers' StableDiffusionUpscalePipeline for its seed (the picture noised
    to the level, then the whole schedule beside it), four times the picture's size."""
    from diffusers import StableDiffusionUpscalePipeline

    engine, path = upscaler
    assert engine.latent_scale == 4 and engine.low_res_scheduler is not None
    small = picture(32, 24)
    specs = [ImageSpec("a cat", "blurry", 6.0, 5), ImageSpec("a cow", "", 6.0, 6)]
    lane = engine.prepare("x4", specs, BatchShape(128, 96, 5, sampler),
                          Source(small, 1.0, noise_level=30))  # fmt: skip
    assert lane.class_labels is not None and lane.conditioning is not None
    mine = run(engine, [lane])["x4"]
    pipe = StableDiffusionUpscalePipeline.from_pretrained(str(path))
    pipe.scheduler = make_scheduler(sampler, engine.scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    for spec, ours in zip(specs, mine, strict=True):
        theirs = pipe(spec.prompt, image=small, negative_prompt=spec.negative_prompt,
                      num_inference_steps=5, guidance_scale=6.0, noise_level=30,
                      generator=torch.Generator().manual_seed(spec.seed),
                      output_type="np").images[0]  # fmt: skip
        assert ours.shape == (96, 128, 3)
        assert max_diff(ours, (theirs * 255).round().astype(np.uint8)) <= 1


def test_x4_upscaling_through_the_service(
    upscaler: tuple[Engine, Path], tiny_model: Path, redis_url: str
) -> None:
    """`method: x4` over HTTP: the picture stored at its own size, the upscaler's rows stepped
    apart from the model's, x4 as drawn and x2 halved from it; a server without the upscaler
    refuses the method (422)."""
    import base64
    import io
    import threading

    import httpx

    from app.api import create_app
    from app.jobs.storage import open_storage
    from app.settings import ApiSettings
    from tests.conftest import JobStore, serving, wait_for
    from tests.test_continuous import serve
    from worker.runner import Runner
    from worker.settings import WorkerSettings

    engine, path = upscaler
    small = picture(32, 32)
    buffer = io.BytesIO()
    small.save(buffer, format="PNG")
    body = {"image": base64.b64encode(buffer.getvalue()).decode(), "method": "x4",
            "steps": 4, "seed": 9, "noise_level": 40, "scheduler": "ddim"}  # fmt: skip
    store = JobStore.connect(redis_url, 3600, 5)
    plain = ApiSettings(redis_url=redis_url, auth="off")
    with serving(create_app(store, plain)) as url:
        refused = httpx.post(f"{url}/v1/upscale", json={**body, "scale": 4})
        assert refused.status_code == 422 and "SDSERVE_UPSCALER" in refused.text
    settings = ApiSettings(redis_url=redis_url, auth="off", upscaler=str(path))
    with serving(create_app(store, settings)) as url, httpx.Client(base_url=url) as http:
        ids = [http.post("/v1/upscale", json={**body, "scale": scale}).json()["id"]
               for scale in (4, 2)]  # fmt: skip
        text = http.post("/v1/txt2img", json={"prompt": "x", "width": 64, "height": 64,
                                              "steps": 3}).json()["id"]  # fmt: skip
        worker_settings = WorkerSettings(redis_url=redis_url, upscaler=str(path),
                                         model=str(tiny_model), worker_name="x4")  # fmt: skip
        model = Engine(str(tiny_model), torch.device("cpu"))
        runner = Runner(worker_settings, JobStore.connect(redis_url, 3600, 5), model,
                        open_storage(worker_settings.storage), upscaler=engine)  # fmt: skip
        runner.open()
        done = threading.Event()
        thread = serve(runner, done)
        try:
            wait_for(lambda: all(http.get(f"/jobs/{i}").json()["status"] == "succeeded"
                                 for i in [*ids, text]), 120, "the jobs")  # fmt: skip
        finally:
            done.set()
            thread.join(60)
            runner.close()
        lane = engine.prepare("alone", [ImageSpec("", "", 7.5, 9)], BatchShape(128, 128, 4, "ddim"),
                              Source(small, 1.0, noise_level=40))  # fmt: skip
        [alone] = run(engine, [lane])["alone"]
        made = [np.asarray(Image.open(io.BytesIO(http.get(f"/jobs/{i}/images/0.png").content)))
                for i in ids]  # fmt: skip
    assert made[0].shape == (128, 128, 3) and max_diff(made[0], alone) <= 1
    halved = np.asarray(Image.fromarray(alone).resize((64, 64), Image.Resampling.LANCZOS))
    assert made[1].shape == (64, 64, 3) and max_diff(made[1], halved) <= 1


def test_a_worker_without_the_upscaler_fails_an_x4_job_and_lives_on(
    upscaler: tuple[Engine, Path], tiny_model: Path, redis_url: str
) -> None:
    """An API with the upscaler, a worker without it (issue 21, 1: the worker died at the
    job's prompt check, three restarts in a row): the job fails `invalid_request`, naming the
    setting, and the worker runs the next job."""
    import base64
    import io
    import threading

    import httpx

    from app.api import create_app
    from app.jobs.storage import open_storage
    from app.settings import ApiSettings
    from tests.conftest import JobStore, serving, wait_for
    from tests.test_continuous import serve
    from worker.runner import Runner
    from worker.settings import WorkerSettings

    _engine, path = upscaler
    buffer = io.BytesIO()
    picture(32, 32).save(buffer, format="PNG")
    body = {"image": base64.b64encode(buffer.getvalue()).decode(), "method": "x4", "scale": 4,
            "steps": 4, "seed": 9}  # fmt: skip
    store = JobStore.connect(redis_url, 3600, 5)
    settings = ApiSettings(redis_url=redis_url, auth="off", upscaler=str(path))
    with serving(create_app(store, settings)) as url, httpx.Client(base_url=url) as http:
        x4 = http.post("/v1/upscale", json=body).json()["id"]
        text = http.post("/v1/txt2img", json={"prompt": "x", "width": 64, "height": 64,
                                              "steps": 3}).json()["id"]  # fmt: skip
        worker_settings = WorkerSettings(redis_url=redis_url, model=str(tiny_model),
                                         worker_name="no-x4")  # fmt: skip
        model = Engine(str(tiny_model), torch.device("cpu"))
        runner = Runner(worker_settings, JobStore.connect(redis_url, 3600, 5), model,
                        open_storage(worker_settings.storage))  # fmt: skip
        runner.open()
        done = threading.Event()
        thread = serve(runner, done)
        try:
            wait_for(lambda: http.get(f"/jobs/{text}").json()["status"] == "succeeded", 120,
                     "the next job")  # fmt: skip

            # Now a live worker of the model says it has no upscaler: refused up front.
            def refusal() -> httpx.Response | None:
                answer = http.post("/v1/upscale", json=body)
                return answer if answer.status_code == 422 else None

            refused = wait_for(refusal, 10, "the API to read the heartbeat")
            assert "no live worker of model default has the x4 upscaler" in refused.text
        finally:
            done.set()
            thread.join(60)
            runner.close()
        failed = http.get(f"/jobs/{x4}").json()
    assert runner.fatal is None
    assert failed["status"] == "failed" and failed["error"]["code"] == "invalid_request"
    assert "SDSERVE_UPSCALER" in failed["error"]["message"]


def test_x4_at_scale_2_is_held_to_the_side_limit_it_draws(redis_url: str) -> None:
    """x4 draws four times the picture whatever the scale: a 640 picture at scale 2 (1280 out)
    is drawn at 2560, past the 2048 limit (issue 21, 4): a 422 naming `image`; the same
    picture by pixel upscaling (drawn at 1280) is accepted. Its rows count what it draws."""
    import base64
    import io

    import httpx

    from app.api import create_app
    from app.jobs.contract import StoredImage, UpscaleRequest
    from app.jobs.tasks import unet_rows
    from app.settings import ApiSettings
    from tests.conftest import JobStore, serving

    buffer = io.BytesIO()
    picture(640, 640).save(buffer, format="PNG")
    body = {"image": base64.b64encode(buffer.getvalue()).decode(), "scale": 2, "steps": 4}
    store = JobStore.connect(redis_url, 3600, 5)
    settings = ApiSettings(redis_url=redis_url, auth="off", upscaler="x4-model")
    with serving(create_app(store, settings)) as url:
        refused = httpx.post(f"{url}/v1/upscale", json=body | {"method": "x4"})
        accepted = httpx.post(f"{url}/v1/upscale", json=body | {"method": "pixel"})
    assert refused.status_code == 422, refused.text
    (problem,) = refused.json()["detail"]
    assert problem["loc"][-1] == "image" and "draws 2560x2560" in problem["msg"]
    assert accepted.status_code == 202, accepted.text
    image = StoredImage(sha256="0" * 64, width=320, height=320)
    x4 = UpscaleRequest(image=image, width=640, height=640, method="x4", scale=2, seed=1)
    pixel = UpscaleRequest(image=image, width=640, height=640, method="pixel", seed=1)
    assert unet_rows(x4) > unet_rows(pixel)  # 1280 drawn: tiles; 640: one piece


def test_x4_takes_no_loras_and_no_vae_choice(redis_url: str, upscaler: tuple[Engine, Path]) -> None:
    """The x4 upscaler is a model of its own: the job's model's LoRAs and VAEs do not fit it.
    The API refuses either with a 422 naming the field (pixel upscaling takes the VAE); a worker
    given such a job anyway refuses it when it joins (`invalid_request`), not at the decode."""
    import base64
    import io

    import httpx

    from app.api import create_app
    from app.jobs.contract import StoredImage, UpscaleRequest
    from app.settings import ApiSettings
    from tests.conftest import JobStore, serving
    from worker.inputs import NoVae
    from worker.tasks import task

    buffer = io.BytesIO()
    picture(64, 64).save(buffer, format="PNG")
    body = {"image": base64.b64encode(buffer.getvalue()).decode(), "scale": 2, "steps": 2}
    store = JobStore.connect(redis_url, 3600, 5)
    settings = ApiSettings(redis_url=redis_url, auth="off", upscaler="x4-model",
                           vaes={"ft": "/vaes/ft"})  # fmt: skip
    with serving(create_app(store, settings)) as url:
        for field, value in (("loras", [{"name": "style"}]), ("vae", "ft")):
            refused = httpx.post(f"{url}/v1/upscale", json=body | {"method": "x4", field: value})
            assert refused.status_code == 422, refused.text
            (problem,) = refused.json()["detail"]
            assert problem["loc"] == ["body", field] and "x4 upscaler takes no" in problem["msg"]
        taken = httpx.post(f"{url}/v1/upscale", json=body | {"method": "pixel", "vae": "ft"})
        assert taken.status_code == 202, taken.text
    engine, _ = upscaler
    image = StoredImage(sha256="0" * 64, width=32, height=24)
    request = UpscaleRequest(image=image, width=128, height=96, method="x4", scale=4, seed=1,
                             steps=2, vae="ft")  # fmt: skip
    work = task(request)
    with pytest.raises(NoVae, match="'ft' is not a VAE"):
        work.prepare(engine, "j", work.shape(request), Source(picture(32, 24), 1.0), request)


def test_a_picture_of_one_tiles_pixels_in_any_shape_is_drawn_whole() -> None:
    """SDXL's wide sizes (1344x768, 1536x640: no more pixels than 1024x1024) are one piece, as
    diffusers draws them; past 1024x1024 pixels, tiles (the API counts the same rows)."""
    for width, height in ((1344, 768), (1536, 640), (2048, 512), (1024, 1024)):
        assert tile_count((width, height), 1024, 128) == 1
        assert tiling((height // 8, width // 8), 128, 16) is None
    assert tile_count((1536, 1024), 1024, 128) == 2
    tiles = tiling((1024 // 8, 1536 // 8), 128, 16)
    assert tiles is not None and tiles.count == 2
