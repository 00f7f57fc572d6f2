"""VAE choice (issue 23, 6): a request may choose one of SDSERVE_VAES (native `vae`, A1111's
`override_settings.sd_vae`, listed by `/sdapi/v1/sd-vae`); its pictures are encoded and decoded
by that VAE, as diffusers' pipelines given it as `vae` make them, while its rows share UNet
calls with rows of the model's own VAE. An unknown VAE is a 422 naming `vae`."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image

from app.a1111 import A1111Error, Txt2ImgPayload
from app.api import create_app
from app.jobs.contract import Txt2ImgRequest
from app.settings import ApiSettings
from tests.conftest import JobStore, serving
from tests.test_rows import max_diff, run
from worker.engine import BatchShape, Engine, ImageSpec, Source, Tuning
from worker.images import parameters
from worker.original_layout import write_single_file_vae
from worker.schedulers import make_scheduler
from worker.settings import WorkerSettings, split_source
from worker.tiny import build_tiny_model

CPU = torch.device("cpu")


def pixels(images: np.ndarray) -> list[np.ndarray]:
    return list((np.asarray(images) * 255).round().astype(np.uint8))


def picture() -> Image.Image:
    y, x = np.mgrid[0:64, 0:64]
    return Image.fromarray(np.stack([x * 4, y * 4, (x + y) * 2], -1).astype(np.uint8))


def test_a_row_is_encoded_and_decoded_by_its_vae_as_diffusers_does(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    other = build_tiny_model(tmp_path_factory.mktemp("vae") / "other", "tiny", seed=3)
    engine = Engine(str(tiny_model), CPU,
                    Tuning(max_batch=4, rows=True, vaes=(("other", str(other)),)))  # fmt: skip
    vae = AutoencoderKL.from_pretrained(str(other), subfolder="vae")
    common = {"height": 64, "width": 64, "num_inference_steps": 4, "guidance_scale": 6.0,
              "negative_prompt": "blurry", "output_type": "np"}  # fmt: skip
    theirs = {}
    for name, kind, extra in [("text", StableDiffusionPipeline, {}),
                              ("picture", StableDiffusionImg2ImgPipeline,
                               {"image": picture(), "strength": 0.6})]:  # fmt: skip
        for chosen in ("other", None):
            options = {"vae": vae} if chosen else {}
            pipe = kind.from_pretrained(str(tiny_model), safety_checker=None, **options)
            pipe.scheduler = make_scheduler("euler", engine.scheduler_config)
            pipe.set_progress_bar_config(disable=True)
            made = pipe("a red fox", generator=[torch.Generator().manual_seed(4)], **common,
                        **extra).images  # fmt: skip
            theirs[name, chosen] = pixels(made)[0]
    assert max_diff(theirs["text", "other"], theirs["text", None]) > 2  # the VAE shows
    shape = BatchShape(64, 64, 4, "euler")
    source = Source(picture(), 0.6)
    lanes = []
    for chosen in ("other", None):
        spec = ImageSpec("a red fox", "blurry", 6.0, 4, vae=chosen)
        lanes.append(engine.prepare(f"text {chosen}", [spec], shape))
        lanes.append(engine.prepare(f"picture {chosen}", [spec], shape, source))
    ours = run(engine, lanes)  # both VAEs' rows in each UNet call
    for name in ("text", "picture"):
        for chosen in ("other", None):
            assert max_diff(ours[f"{name} {chosen}"][0], theirs[name, chosen]) <= 1, (name, chosen)


def test_the_api_offers_the_vaes_and_refuses_others(
    redis_url: str, store: JobStore, tiny_model: Path
) -> None:
    settings = ApiSettings(redis_url=redis_url, auth="off", vaes={"other": str(tiny_model)})
    with serving(create_app(store, settings)) as url, httpx.Client(base_url=url) as http:
        assert http.get("/sdapi/v1/sd-vae").json() == [{"model_name": "other",
                                                        "filename": "other"}]  # fmt: skip
        refused = http.post("/v1/txt2img", json={"prompt": "a", "vae": "nope"})
        assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "vae"]
        accepted = http.post("/v1/txt2img", json={"prompt": "a", "vae": "other"})
        assert accepted.status_code == 202, accepted.text
        job = http.get(f"/jobs/{accepted.json()['id']}").json()
        assert job["request"]["vae"] == "other"
    fields = Txt2ImgPayload(prompt="a", override_settings={"sd_vae": "other"}).job_fields(
        ["default"], ["other"]
    )
    assert fields["vae"] == "other"
    automatic = Txt2ImgPayload(prompt="a", override_settings={"sd_vae": "Automatic"})
    assert automatic.job_fields(["default"], ["other"])["vae"] is None
    with pytest.raises(A1111Error) as unknown:
        Txt2ImgPayload(prompt="a", override_settings={"sd_vae": "nope"}).job_fields(["default"])
    assert unknown.value.field == "override_settings.sd_vae"
    request = Txt2ImgRequest(prompt="a", vae="other", seed=1)
    assert "VAE: other" in parameters(request, 1, "tiny")


def test_a_model_runs_with_the_vae_sdserve_models_names(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory, redis_url: str
) -> None:
    """`SDSERVE_MODELS=sd=/models/x;vae=/vaes/y`: the model's pictures go through that VAE,
    as diffusers' pipeline given it as `vae` makes them; a wrong option stops the settings."""
    other = build_tiny_model(tmp_path_factory.mktemp("vae") / "other", "tiny", seed=3)
    settings = WorkerSettings(redis_url=redis_url, models={"sd": f"{tiny_model};vae={other}"})
    assert split_source(settings.held_models()["sd"]) == (str(tiny_model), str(other), None)
    for wrong in (f"{tiny_model};vea={other}", f"{tiny_model};vae={other}/nope"):
        with pytest.raises(ValueError, match="vae"):
            WorkerSettings(redis_url=redis_url, models={"sd": wrong})
    engine = Engine(str(tiny_model), CPU, Tuning(max_batch=4, rows=True), vae=str(other))
    pipe = StableDiffusionPipeline.from_pretrained(
        str(tiny_model), safety_checker=None,
        vae=AutoencoderKL.from_pretrained(str(other), subfolder="vae"),
    )  # fmt: skip
    pipe.scheduler = make_scheduler("euler", engine.scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    theirs = pixels(pipe("a red fox", height=64, width=64, num_inference_steps=4,
                         generator=[torch.Generator().manual_seed(4)],
                         output_type="np").images)[0]  # fmt: skip
    lane = engine.prepare("k", [ImageSpec("a red fox", "", 7.5, 4)], BatchShape(64, 64, 4, "euler"))
    assert max_diff(run(engine, [lane])["k"][0], theirs) <= 1


def test_a_single_file_vae_reads_as_its_folder(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A VAE in one file of the original layout (as A1111 users hold one), written from a
    diffusers VAE: read offline with the model's VAE configuration, it is that VAE, weight for
    weight, whether a request chooses it (SDSERVE_VAES) or the model runs with it (`;vae=`)."""
    root = tmp_path_factory.mktemp("vae-file")
    other = build_tiny_model(root / "other", "tiny", seed=3)
    folder_vae = AutoencoderKL.from_pretrained(str(other), subfolder="vae")
    file = write_single_file_vae(folder_vae, root / "other-vae.safetensors")
    engine = Engine(str(tiny_model), CPU,
                    Tuning(max_batch=4, vaes=(("file", str(file)),)), vae=str(file))  # fmt: skip
    expected = folder_vae.state_dict()
    for read in (engine.vae, engine.latents.vaes["file"].module):
        weights = read.state_dict()
        assert set(weights) == set(expected)
        assert all(torch.equal(weights[k], expected[k]) for k in expected)


def test_a_vae_that_overflows_in_fp16_runs_in_the_upcast_asked(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """SDSERVE_VAE_UPCAST: a VAE whose config says `force_upcast` runs beside fp16 parts (a
    GPU's) in float32, as diffusers runs it, or in bfloat16 where asked; beside fp32 parts (the
    CPU's), and without `force_upcast`, in the parts' dtype. A bfloat16 VAE decodes and encodes
    (img2img) the tiny SDXL's pictures close to float32's, and never to a black picture."""
    from worker.components import vae_dtype_of

    assert vae_dtype_of(True, torch.float16, "float32") == torch.float32
    assert vae_dtype_of(True, torch.float16, "bfloat16") == torch.bfloat16
    assert vae_dtype_of(False, torch.float16, "bfloat16") == torch.float16
    assert vae_dtype_of(True, torch.float32, "bfloat16") == torch.float32
    assert WorkerSettings(vae_upcast="bfloat16").vae_upcast == "bfloat16"
    with pytest.raises(ValueError, match="vae_upcast"):
        WorkerSettings(vae_upcast="float16")

    xl = build_tiny_model(tmp_path_factory.mktemp("xl") / "tiny-sdxl", "tiny-sdxl")
    engine = Engine(str(xl), CPU, Tuning(max_batch=4, rows=True))
    spec = ImageSpec("a red fox", "blurry", 5.0, 3)
    shape = BatchShape(64, 64, 4, "euler")

    def made() -> dict[str, np.ndarray]:
        lanes = [engine.prepare("text", [spec], shape),
                 engine.prepare("picture", [spec], shape, Source(picture(), 0.6))]  # fmt: skip
        return {key: images[0] for key, images in run(engine, lanes).items()}

    full = made()
    engine.parts.vae.to(torch.bfloat16)  # what a GPU worker loads with SDSERVE_VAE_UPCAST
    half = made()
    for key in ("text", "picture"):
        assert half[key].max() > 0, key
        apart = np.abs(half[key].astype(int) - full[key].astype(int))
        # Seen: at most 5 (text) and 9 (img2img: encoded and decoded) levels, 0.5 on average.
        assert apart.max() <= 12 and apart.mean() <= 1.0, (key, apart.max(), apart.mean())
