"""The SDXL family in the row engine, on the CPU with the tiny SDXL the project builds: each image
equals what diffusers' own SDXL pipelines make for its seed (text to image with several samplers,
guidance 1 and above, a negative prompt and none; image to image; inpainting), SDXL lanes of
different sizes and prompts share UNet calls without changing each other, and the compiled
boundary warms and serves SDXL rows (added conditioning) without compiling again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)

from tests.test_rows import max_diff, run
from tests.test_sources import picture, square_mask
from worker.compiled import Tuning
from worker.engine import BatchShape, Engine, ImageSpec, Source
from worker.schedulers import make_scheduler
from worker.tiny import build_tiny_model

CPU = torch.device("cpu")
WIDTH, HEIGHT = 64, 96


@pytest.fixture(scope="module")
def xl_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("sdxl") / "base", "tiny-sdxl")


@pytest.fixture(scope="module")
def xl(xl_model: Path) -> Engine:
    return Engine(str(xl_model), CPU, Tuning(max_batch=4, rows=True))


def pipeline(kind: type[Any], model: Path, engine: Engine, sampler: str) -> Any:
    pipe = kind.from_pretrained(str(model))
    pipe.scheduler = make_scheduler(sampler, engine.scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixels(images: Any) -> list[np.ndarray]:
    return list((np.asarray(images) * 255).round().astype(np.uint8))


def test_an_sdxl_model_is_served_as_the_sdxl_family(xl: Engine) -> None:
    assert xl.family.name == "sdxl" and xl.parts.tokenizer_2 is not None
    assert xl.family.added_shapes() == {"text_embeds": 48, "time_ids": 6}


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "euler_a"])
def test_txt2img_matches_diffusers_sdxl_pipeline(xl: Engine, xl_model: Path, sampler: str) -> None:
    """A guided image with no negative prompt (zeros, as the base model's pipeline makes them)
    and one with a negative prompt, in one lane each, stepped together."""
    pipe = pipeline(StableDiffusionXLPipeline, xl_model, xl, sampler)
    common = {"height": HEIGHT, "width": WIDTH, "num_inference_steps": 5, "guidance_scale": 6.0,
              "output_type": "np"}  # fmt: skip
    plain = pipe("a cat", generator=torch.Generator().manual_seed(11), **common).images[0]
    negative = pipe("a cow", negative_prompt="blurry", generator=torch.Generator().manual_seed(12),
                    **common).images[0]  # fmt: skip
    shape = BatchShape(WIDTH, HEIGHT, 5, sampler)
    lanes = [xl.prepare("plain", [ImageSpec("a cat", "", 6.0, 11)], shape),
             xl.prepare("negative", [ImageSpec("a cow", "blurry", 6.0, 12)], shape)]  # fmt: skip
    ours = run(xl, lanes)
    assert max_diff(ours["plain"][0], pixels([plain])[0]) <= 1
    assert max_diff(ours["negative"][0], pixels([negative])[0]) <= 1


def test_unguided_and_long_prompts_match_diffusers(xl: Engine, xl_model: Path) -> None:
    """Guidance 1 runs no uncond row, as diffusers; a prompt of two chunks is encoded chunk by
    chunk (A1111's way), and its first chunk alone is diffusers' prompt."""
    pipe = pipeline(StableDiffusionXLPipeline, xl_model, xl, "euler")
    theirs = pipe("a cat", height=64, width=64, num_inference_steps=3, guidance_scale=1.0,
                  generator=torch.Generator().manual_seed(5), output_type="np").images  # fmt: skip
    lane = xl.prepare("j", [ImageSpec("a cat", "", 1.0, 5)], BatchShape(64, 64, 3, "euler"))
    assert lane.uncond is None and lane.unet_rows == 1
    assert max_diff(run(xl, [lane])["j"][0], pixels(theirs)[0]) <= 1
    long = "a red fox in deep snow, golden hour, " * 3
    lane = xl.prepare("long", [ImageSpec(long, "", 6.0, 5)], BatchShape(64, 64, 3, "euler"))
    assert lane.cond.shape[1] == 2 * 77 and lane.uncond is not None
    assert lane.cond_added is not None and lane.cond_added["time_ids"].tolist() == [
        [64.0, 64.0, 0.0, 0.0, 64.0, 64.0]
    ]
    assert len(run(xl, [lane])["long"]) == 1


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_a"])
def test_img2img_matches_diffusers_sdxl_img2img(xl: Engine, xl_model: Path, sampler: str) -> None:
    pipe = pipeline(StableDiffusionXLImg2ImgPipeline, xl_model, xl, sampler)
    seeded = [torch.Generator().manual_seed(21)]
    theirs = pipe("a cat", negative_prompt="blurry", image=picture(), strength=0.6,
                  num_inference_steps=6, guidance_scale=6.0, generator=seeded,
                  output_type="np").images  # fmt: skip
    lane = xl.prepare("j", [ImageSpec("a cat", "blurry", 6.0, 21)],
                      BatchShape(WIDTH, HEIGHT, 6, sampler), Source(picture(), 0.6))  # fmt: skip
    assert max_diff(run(xl, [lane])["j"][0], pixels(theirs)[0]) <= 1


def test_inpainting_matches_diffusers_sdxl_inpaint(xl: Engine, xl_model: Path) -> None:
    pipe = pipeline(StableDiffusionXLInpaintPipeline, xl_model, xl, "dpmpp_2m")
    theirs = pipe("a cat", negative_prompt="blurry", image=picture(), mask_image=square_mask(),
                  strength=0.8, height=HEIGHT, width=WIDTH, num_inference_steps=6,
                  guidance_scale=6.0, generator=[torch.Generator().manual_seed(31)],
                  output_type="np").images  # fmt: skip
    source = Source(picture(), 0.8, square_mask())
    lane = xl.prepare("j", [ImageSpec("a cat", "blurry", 6.0, 31)],
                      BatchShape(WIDTH, HEIGHT, 6, "dpmpp_2m"), source)  # fmt: skip
    assert max_diff(run(xl, [lane])["j"][0], pixels(theirs)[0]) <= 1


def test_sdxl_strangers_change_nothing(xl: Engine) -> None:
    """Lanes of other prompts, guidance, samplers and kinds in the same UNet calls: each image
    is what it is alone (the added conditioning goes row for row with its lane)."""
    shape = BatchShape(64, 64, 4, "euler_a")

    def lanes() -> list[Any]:
        return [xl.prepare("a", [ImageSpec("a dog", "", 7.0, 5)], shape),
                xl.prepare("b", [ImageSpec("a boat", "rain", 1.0, 6)], shape),
                xl.prepare("c", [ImageSpec("a cat", "", 4.0, 7)], BatchShape(64, 64, 4, "ddim"),
                           Source(picture().resize((64, 64)), 0.7))]  # fmt: skip

    together = run(xl, lanes())
    for lane in lanes():
        assert max_diff(run(xl, [lane])[lane.key][0], together[lane.key][0]) <= 1, lane.key


def test_compiled_sdxl_rows_do_not_compile_after_warm_up(xl_model: Path) -> None:
    """The boundary warms SDXL's calls with their added conditioning (dynamo's guards, backend
    eager) and then serves every mix of guided, unguided and long-prompt rows without a guard
    failing."""
    tuning = Tuning(max_batch=2, rows=True, compile=True, compile_backend="eager",
                    compiled_sizes=((64, 64),), prompt_chunks=2)  # fmt: skip
    engine = Engine(str(xl_model), CPU, tuning)
    engine.warm_up()
    shape = BatchShape(64, 64, 2, "dpmpp_2m")
    long = "a red fox in deep snow, golden hour, " * 3
    with torch.compiler.set_stance("fail_on_recompile"):
        lanes = [engine.prepare("a", [ImageSpec("a dog", "", 7.0, 5)], shape),
                 engine.prepare("b", [ImageSpec(long, "rain", 1.0, 6)], shape),
                 engine.prepare("c", [ImageSpec("a cat", "", 4.0, 7)], shape,
                                Source(picture().resize((64, 64)), 0.7))]  # fmt: skip
        assert len(run(engine, lanes)) == 3
    assert engine.calls.recompiles == 0


def test_a_static_batch_of_sdxl_matches_diffusers(xl_model: Path) -> None:
    """Static batching's loop (`generate`) gives SDXL rows their added conditioning too."""
    engine = Engine(str(xl_model), CPU, Tuning(max_batch=2))
    pipe = pipeline(StableDiffusionXLPipeline, xl_model, engine, "euler")
    # (diffusers zeroes the negative rows only when no negative prompt is given at all)
    theirs = pipe(["a cat", "a cow"], negative_prompt=["rain", "blurry"], height=64, width=64,
                  num_inference_steps=4, guidance_scale=6.0, output_type="np",
                  generator=[torch.Generator().manual_seed(s) for s in (3, 4)]).images  # fmt: skip
    specs = [ImageSpec("a cat", "rain", 6.0, 3), ImageSpec("a cow", "blurry", 6.0, 4)]
    ours = engine.generate(specs, BatchShape(64, 64, 4, "euler"))
    assert ours is not None
    for mine, expected in zip(ours, pixels(theirs), strict=True):
        assert mine is not None and max_diff(mine, expected) <= 1


@pytest.mark.parametrize("method", ["latent", "pixel"])
def test_a_hires_fix_on_sdxl_draws_at_the_larger_size_beside_strangers(
    xl: Engine, xl_model: Path, method: str
) -> None:
    """A hires fix's second pass (image to image of the first pass's picture, as the SD tests
    check against diffusers) runs on SDXL at the larger size, its time ids the larger size's;
    beside a stranger it changes nothing."""
    from app.jobs.contract import Hires

    spec = [ImageSpec("a cat", "", 6.0, 8)]
    hires = Hires(scale=2, strength=0.5, method=method)

    def second() -> Any:
        first = xl.prepare("h", spec, BatchShape(64, 64, 4, "euler"))
        while not first.done:
            xl.step([first])
        return xl.second_pass(first, spec, BatchShape(128, 128, 4, "euler"), hires)

    lane = second()
    assert lane.cond_added is not None
    assert lane.cond_added["time_ids"][0].tolist() == [128.0, 128.0, 0.0, 0.0, 128.0, 128.0]
    alone = run(xl, [lane])["h"][0]
    stranger = xl.prepare(
        "s", [ImageSpec("a dog", "rain", 3.0, 9)], BatchShape(128, 128, 4, "ddim")
    )
    together = run(xl, [second(), stranger])["h"][0]
    assert alone.shape == (128, 128, 3) and max_diff(alone, together) <= 1


@pytest.fixture(scope="module")
def refiner_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("sdxl") / "refiner", "tiny-sdxl-refiner")


def test_the_refiner_is_an_sdxl_member_equal_to_diffusers_img2img(refiner_model: Path) -> None:
    """SDXL's refiner (the second text encoder only; time ids of size, crop and an aesthetic
    score, 6 for the prompt and 2.5 for the negative; "" encoded, not zeros) as a model of its
    own: image to image equals diffusers' StableDiffusionXLImg2ImgPipeline with it."""
    engine = Engine(str(refiner_model), CPU, Tuning(max_batch=2, rows=True))
    assert engine.family.name == "sdxl" and engine.parts.tokenizer is None
    assert engine.family.added_shapes() == {"text_embeds": 48, "time_ids": 5}
    pipe = pipeline(StableDiffusionXLImg2ImgPipeline, refiner_model, engine, "euler")
    theirs = pipe("a cat", image=picture(), strength=0.3, num_inference_steps=6,
                  guidance_scale=5.0, generator=[torch.Generator().manual_seed(41)],
                  output_type="np").images  # fmt: skip
    shape = BatchShape(WIDTH, HEIGHT, 6, "euler")
    lane = engine.prepare("r", [ImageSpec("a cat", "", 5.0, 41)], shape, Source(picture(), 0.3))
    assert lane.uncond_added is not None
    assert lane.uncond_added["time_ids"][0].tolist() == [HEIGHT, WIDTH, 0.0, 0.0, 2.5]
    assert max_diff(run(engine, [lane])["r"][0], pixels(theirs)[0]) <= 1


@pytest.fixture(scope="module")
def refiner(refiner_model: Path) -> Engine:
    return Engine(str(refiner_model), CPU, Tuning(max_batch=2, rows=True))


def run_passes(
    base: Engine, refiner: Engine, lanes: dict[str, tuple[Any, Any]]
) -> dict[str, np.ndarray]:
    """Step lanes as the worker's loop does, each pass on its model's engine (a refiner's pass
    on the refiner's), a UNet call per engine and size; a finished pass hands over to the next
    (`next_pass`), a finished job is decoded by the engine that stepped it last. `lanes`: key
    -> (request, lane). Returns each job's image; asserts each job ran as many steps as its
    progress said."""
    from worker.tasks import task

    engines = {None: base, "refiner": refiner}
    active = dict(lanes)
    steps = {key: 0 for key in lanes}
    out: dict[str, np.ndarray] = {}
    while active:
        groups = dict.fromkeys((lane.model, lane.size) for _, lane in active.values())
        for model, size in groups:
            stepped = [
                lane for _, lane in active.values() if (lane.model, lane.size) == (model, size)
            ]
            engines[model].step(stepped)
            for lane in stepped:
                steps[lane.key] += 1
        for key, (request, lane) in list(active.items()):
            if not lane.done:
                continue
            then = task(request).next_pass(base, request, lane, refiner)
            if then is not None:
                active[key] = (request, then)
                continue
            assert lane.job_steps == steps[key] == lane.earlier_steps + lane.steps
            images = engines[lane.model].images(engines[lane.model].finish(lane))
            assert images[0] is not None
            out[key] = images[0]
            del active[key]
    return out


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "euler_a"])
def test_base_then_refiner_matches_diffusers_ensemble(
    xl: Engine, xl_model: Path, refiner: Engine, refiner_model: Path, sampler: str
) -> None:
    """A text-to-image job with a refiner: the base model denoises down to the switch and the
    refiner finishes, as diffusers' `denoising_end` / `denoising_start` ensemble does (the
    same generator going on into the refiner: an ancestral sampler's noise). Two jobs (no
    negative prompt: zeros for the base, "" encoded for the refiner; and one) step together,
    their refiner passes in one call."""
    from app.jobs.contract import Refiner, Txt2ImgRequest
    from worker.tasks import task

    base_pipe = pipeline(StableDiffusionXLPipeline, xl_model, xl, sampler)
    refiner_pipe = pipeline(StableDiffusionXLImg2ImgPipeline, refiner_model, refiner, sampler)
    common = {"num_inference_steps": 8, "guidance_scale": 6.0}
    theirs, lanes = {}, {}
    for key, negative, seed in (("plain", "", 51), ("negative", "blurry", 52)):
        generator = [torch.Generator().manual_seed(seed)]
        latents = base_pipe("a cat", negative_prompt=negative or None, height=HEIGHT, width=WIDTH,
                            denoising_end=0.7, generator=generator, output_type="latent",
                            **common).images  # fmt: skip
        theirs[key] = refiner_pipe("a cat", negative_prompt=negative or None, image=latents,
                                   denoising_start=0.7, generator=generator, output_type="np",
                                   **common).images  # fmt: skip
        refined = Refiner(model="refiner", switch_at=0.7)
        request = Txt2ImgRequest(prompt="a cat", negative_prompt=negative, width=WIDTH,
                                 height=HEIGHT, steps=8, guidance_scale=6.0, scheduler=sampler,
                                 seed=seed, refiner=refined)  # fmt: skip
        work = task(request)
        lane = work.begin(xl, key, work.shape(request), None, request, refiner)
        assert 0 < lane.steps < 8 and lane.job_steps == 8 and lane.model is None
        lanes[key] = (request, lane)
    ours = run_passes(xl, refiner, lanes)
    for key, image in ours.items():
        assert max_diff(image, pixels(theirs[key])[0]) <= 1, key


@pytest.mark.parametrize(("switch_at", "base_steps"), [(0.9995, 2), (0.0001, 0)])
def test_a_switch_at_either_end_matches_diffusers_ensemble(
    xl: Engine,
    xl_model: Path,
    refiner: Engine,
    refiner_model: Path,
    switch_at: float,
    base_steps: int,
) -> None:
    """Two steps and a switch at 0.9995: every timestep is above it, so the base runs both and
    the refiner none (diffusers' `denoising_start` then runs no step and decodes); at 0.0001
    the base runs none and the refiner all. Neither fails the job."""
    from app.jobs.contract import Refiner, Txt2ImgRequest
    from worker.tasks import task

    base_pipe = pipeline(StableDiffusionXLPipeline, xl_model, xl, "euler")
    refiner_pipe = pipeline(StableDiffusionXLImg2ImgPipeline, refiner_model, refiner, "euler")
    common = {"num_inference_steps": 2, "guidance_scale": 6.0}
    generator = [torch.Generator().manual_seed(71)]
    latents = base_pipe("a cat", height=HEIGHT, width=WIDTH, denoising_end=switch_at,
                        generator=generator, output_type="latent", **common).images  # fmt: skip
    theirs = refiner_pipe("a cat", image=latents, denoising_start=switch_at, generator=generator,
                          output_type="np", **common).images  # fmt: skip
    request = Txt2ImgRequest(prompt="a cat", width=WIDTH, height=HEIGHT, steps=2,
                             guidance_scale=6.0, scheduler="euler", seed=71,
                             refiner=Refiner(model="refiner", switch_at=switch_at))  # fmt: skip
    work = task(request)
    lane = work.begin(xl, "j", work.shape(request), None, request, refiner)
    assert lane.job_steps == 2
    assert lane.steps == base_steps if lane.model is None else base_steps == 0
    ours = run_passes(xl, refiner, {"j": (request, lane)})["j"]
    assert max_diff(ours, pixels(theirs)[0]) <= 1


@pytest.mark.parametrize("strength", [0.9, 0.2])
def test_img2img_then_refiner_matches_diffusers_ensemble(
    xl: Engine, xl_model: Path, refiner: Engine, refiner_model: Path, strength: float
) -> None:
    """Image to image with a refiner: the base runs its strength's steps down to the switch;
    at a strength below the switch it runs none and the refiner takes the noised picture, as
    diffusers' img2img pipelines do with `denoising_end` / `denoising_start`."""
    from app.jobs.contract import Img2ImgRequest, Refiner, StoredImage
    from worker.tasks import task

    base_pipe = pipeline(StableDiffusionXLImg2ImgPipeline, xl_model, xl, "dpmpp_2m")
    refiner_pipe = pipeline(StableDiffusionXLImg2ImgPipeline, refiner_model, refiner, "dpmpp_2m")
    generator = [torch.Generator().manual_seed(61)]
    common = {"num_inference_steps": 8, "guidance_scale": 6.0, "negative_prompt": "blurry"}
    latents = base_pipe("a cat", image=picture(), strength=strength, denoising_end=0.7,
                        generator=generator, output_type="latent", **common).images  # fmt: skip
    theirs = refiner_pipe("a cat", image=latents, denoising_start=0.7, generator=generator,
                          output_type="np", **common).images  # fmt: skip
    stored = StoredImage(sha256="0" * 64, width=WIDTH, height=HEIGHT)
    request = Img2ImgRequest(prompt="a cat", negative_prompt="blurry", width=WIDTH, height=HEIGHT,
                             steps=8, guidance_scale=6.0, scheduler="dpmpp_2m", seed=61,
                             strength=strength, image=stored,
                             refiner=Refiner(model="refiner", switch_at=0.7))  # fmt: skip
    work = task(request)
    source = xl.ready(Source(picture(), strength), work.shape(request))
    lane = work.begin(xl, "j", work.shape(request), source, request, refiner)
    assert (lane.model is None) == (strength > 0.7)
    ours = run_passes(xl, refiner, {"j": (request, lane)})["j"]
    assert max_diff(ours, pixels(theirs)[0]) <= 1
