"""A1111's web API, spoken by the real `webuiapi` package from PyPI, unchanged, against the
service (API over HTTP with keys, a worker process, Valkey): its default txt2img payload,
samplers, progress while a job runs, interrupt, img2img and inpainting, auth, and the 422s for
what sdserve cannot honour."""

from __future__ import annotations

import io
import threading
from typing import Any

import httpx
import numpy as np
import pytest
import webuiapi
from PIL import Image

from tests.conftest import wait_for
from tests.test_clients import KEY, service  # noqa: F401  (the module's service)

SMALL = {"width": 64, "height": 64, "steps": 3}


def client(url: str, key: str = KEY) -> webuiapi.WebUIApi:
    api = webuiapi.WebUIApi(baseurl=f"{url}/sdapi/v1", sampler="DPM++ 2M", steps=3)
    api.set_auth("anyone", key)  # HTTP Basic, the key as the password
    return api


def test_txt2img_with_the_default_payload_equals_the_native_route(service: str) -> None:  # noqa: F811
    api = client(service)
    result = api.txt2img(prompt="a red fox", negative_prompt="blurry", seed=77, batch_size=2,
                         cfg_scale=6.5, **SMALL)  # fmt: skip
    assert len(result.images) == 2 and result.images[0].size == (64, 64)
    assert result.info["all_seeds"] == [77, 78] and result.info["sampler_name"] == "DPM++ 2M"
    assert "Seed: 77," in result.info["infotexts"][0] and result.parameters["seed"] == 77
    native = httpx.post(f"{service}/v1/txt2img", headers={"Authorization": f"Bearer {KEY}"},
                        json={"prompt": "a red fox", "negative_prompt": "blurry", "seed": 77,
                              "n": 2, "guidance_scale": 6.5, "scheduler": "dpmpp_2m",
                              **SMALL}).json()  # fmt: skip
    http = httpx.Client(base_url=service, headers={"Authorization": f"Bearer {KEY}"})
    wait_for(lambda: http.get(native["url"]).json()["status"] == "succeeded", 60, "the job")
    for k, image in enumerate(result.images):
        png = http.get(f"{native['url']}/images/{k}.png").content
        ours = Image.open(io.BytesIO(png))
        assert (np.asarray(ours) == np.asarray(image)).all()
        assert ours.info["parameters"] == image.info["parameters"]  # the same PNG, bit for bit


def test_what_a_client_asks_about_the_server(service: str) -> None:  # noqa: F811
    api = client(service)
    names = [s["name"] for s in api.get_samplers()]
    assert {"Euler a", "DPM++ 2M", "DDIM", "UniPC"} <= set(names)
    assert [s["name"] for s in api.get_schedulers()] == ["automatic", "karras"]
    [model] = api.get_sd_models()
    assert api.get_options()["sd_model_checkpoint"] == model["title"]
    # What clients ask at start-up: the hires fix's upscalers by kind, and empty lists of what
    # is not offered; the models and VAEs are the deployment's, refreshed as they are.
    assert [u["name"] for u in api.get_upscalers()] == ["Lanczos"]
    assert [m["name"] for m in api.get_latent_upscale_modes()] == ["Latent"]
    assert api.get_prompt_styles() == api.get_face_restorers() == api.get_hypernetworks() == []
    assert api.get_realesrgan_models() == []
    api.refresh_checkpoints()
    assert httpx.post(f"{service}/sdapi/v1/refresh-vae", auth=("u", KEY)).status_code == 200
    karras = api.txt2img(prompt="x", sampler_name="DPM++ 2M", scheduler="Karras", seed=1, **SMALL)
    assert karras.info["sampler_name"] == "DPM++ 2M Karras"
    sde = api.txt2img(prompt="x", sampler_name="DPM++ 2M SDE", scheduler="Karras", seed=1, **SMALL)
    assert sde.info["sampler_name"] == "DPM++ 2M SDE Karras"
    assert "Sampler: DPM++ 2M SDE Karras" in sde.info["infotexts"][0]


def test_a_callers_settings_hold_for_its_later_jobs(service: str) -> None:  # noqa: F811
    """`POST /sdapi/v1/options` (webuiapi's `set_options`, `util_set_model`) keeps the caller's
    model, VAE and clip skip for its later A1111 jobs, under `override_settings`; what cannot
    be honoured is a 422 naming it, and nothing of that call is kept."""
    api = client(service)
    options = f"{service}/sdapi/v1/options"
    try:
        api.util_set_model("default")
        api.set_options({"CLIP_stop_at_last_layers": 2, "sd_vae": "other",
                         "samples_format": "png"})  # fmt: skip
        kept = api.get_options()
        assert (kept["sd_model_checkpoint"], kept["sd_vae"]) == ("default", "other")
        assert api.util_get_current_model() == "default" and kept["CLIP_stop_at_last_layers"] == 2
        made = api.txt2img(prompt="x", seed=1, **SMALL).info["infotexts"][0]
        assert "Clip skip: 2" in made and "VAE: other" in made, made
        plain = api.txt2img(prompt="x", seed=1, **SMALL, override_settings={
            "CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic"}).info["infotexts"][0]  # fmt: skip
        assert "Clip skip" not in plain and "VAE" not in plain, plain
        for refused, field in (({"CLIP_stop_at_last_layers": 13}, "CLIP_stop_at_last_layers"),
                               ({"sd_vae": "nope", "CLIP_stop_at_last_layers": 1}, "sd_vae"),
                               ({"samples_format": "jpg"}, "samples_format")):  # fmt: skip
            answer = httpx.post(options, json=refused, auth=("u", KEY))
            assert answer.status_code == 422 and answer.json()["detail"][0]["loc"] == [
                "body", field]  # fmt: skip
        assert api.get_options()["CLIP_stop_at_last_layers"] == 2  # nothing of those kept
    finally:  # the module's other tests share this key
        api.set_options({"CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic",
                         "sd_model_checkpoint": ""})  # fmt: skip
    assert api.get_options()["sd_vae"] == "Automatic"


def test_png_info_reads_how_a_picture_was_made(service: str) -> None:  # noqa: F811
    """webuiapi's `png_info`: an image made here gives back its infotext, read into its
    settings as A1111 reads them; a picture without one gives an empty infotext; a picture
    that is not one is a 422 naming `image`."""
    api = client(service)
    made = api.txt2img(prompt="a red fox", negative_prompt="blurry, dark", seed=9, **SMALL)
    read = api.png_info(made.image)
    assert read.info == made.info["infotexts"][0]
    settings = read.parameters
    assert (settings["Prompt"], settings["Negative prompt"], settings["Seed"]) == (
        "a red fox", "blurry, dark", "9")  # fmt: skip
    assert settings["Size-1"] == str(SMALL["width"]) and settings["Sampler"] == made.info[
        "sampler_name"]  # fmt: skip
    bare = io.BytesIO()
    Image.new("RGB", (8, 8)).save(bare, "JPEG")
    empty = api.png_info(Image.open(bare))
    assert (empty.info, empty.parameters) == ("", {"Prompt": ""})
    refused = httpx.post(f"{service}/sdapi/v1/png-info", json={"image": "bm90IGEgcGljdHVyZQ=="},
                         auth=("u", KEY))  # fmt: skip
    assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "image"]


def test_progress_while_a_job_runs_and_interrupt(service: str) -> None:  # noqa: F811
    api = client(service)
    outcome: list[Any] = []

    def long_job() -> None:
        try:
            outcome.append(api.txt2img(prompt="slow", seed=5, width=256, height=256, steps=60))
        except RuntimeError as e:
            outcome.append(e)

    thread = threading.Thread(target=long_job)
    thread.start()
    wait_for(lambda: api.get_progress()["state"]["sampling_step"] >= 2, 60, "progress")
    progress = api.get_progress()
    assert 0 < progress["progress"] < 1 and progress["state"]["sampling_steps"] == 60
    api.interrupt()
    thread.join(60)
    assert isinstance(outcome[0], RuntimeError) and outcome[0].args[0] == 409
    assert api.get_progress()["state"]["interrupted"] is True


def test_img2img_and_inpainting(service: str) -> None:  # noqa: F811
    api = client(service)
    source = Image.new("RGB", (64, 64), (200, 30, 30))
    made = api.img2img(images=[source], prompt="a bird", denoising_strength=0.5, seed=3, **SMALL)
    assert made.images[0].size == (64, 64) and made.info["denoising_strength"] == 0.5
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    painted = api.img2img(images=[source], mask_image=mask, prompt="a bird", seed=3,
                          denoising_strength=1.0, inpaint_full_res=False, mask_blur=0,
                          **SMALL)  # fmt: skip
    pixels = np.asarray(painted.images[0])
    assert (pixels[:8, :8] == (200, 30, 30)).all()  # outside the mask: the source
    assert "Mask blur: 0" in painted.info["infotexts"][0]
    # A1111's defaults (webuiapi sends them): the mask's area alone, filled, then laid back
    # into the picture at its own size.
    wide = Image.new("RGB", (128, 96), (200, 30, 30))
    wide_mask = Image.new("L", wide.size, 0)
    wide_mask.paste(255, (80, 20, 100, 40))
    cropped = api.img2img(images=[wide], mask_image=wide_mask, prompt="a bird", seed=3,
                          alwayson_scripts={}, **SMALL)  # fmt: skip
    assert cropped.images[0].size == (128, 96)
    changed = (np.asarray(cropped.images[0]) != np.asarray(wide)).any(-1)
    rows, cols = np.nonzero(changed)
    assert changed.any() and cols.min() >= 80 - 12 and cols.max() < 100 + 12  # the blur's reach
    assert rows.min() >= 20 - 12 and rows.max() < 40 + 12
    words = cropped.info["infotexts"][0]
    assert "Inpaint area: Only masked, Masked area padding: 0" in words
    assert "Masked content: fill" in words
    inverted = api.img2img(images=[wide], mask_image=wide_mask, prompt="a bird", seed=3,
                           inpainting_mask_invert=1, inpaint_full_res=False, mask_blur=0,
                           alwayson_scripts={}, **SMALL)  # fmt: skip
    kept = np.asarray(inverted.images[0])[24:36, 84:96]  # inside the mask: kept, inverted
    assert (kept == (200, 30, 30)).all()
    # Crop and resize (1): the wide picture's middle, scaled to cover 64x64; latent upscale (3)
    # is not offered.
    cropped_middle = api.img2img(images=[wide], prompt="a bird", seed=3, resize_mode=1,
                                 denoising_strength=0.5, alwayson_scripts={}, **SMALL)  # fmt: skip
    assert cropped_middle.images[0].size == (64, 64)
    with pytest.raises(RuntimeError) as latent:
        api.img2img(images=[wide], prompt="x", resize_mode=3, alwayson_scripts={}, **SMALL)
    assert latent.value.args[0] == 422 and "latent upscale (3) is not offered" in (
        latent.value.args[1])  # fmt: skip
    with pytest.raises(RuntimeError) as noise:  # latent noise, below strength 1
        api.img2img(images=[source], mask_image=mask, prompt="x", inpainting_fill=2,
                    alwayson_scripts={}, **SMALL)  # fmt: skip
    assert noise.value.args[0] == 422 and "inpainting_fill" in noise.value.args[1]
    refused: list[tuple[dict[str, Any], str]] = [
        ({"denoising_strength": 1.5}, '["body","denoising_strength"]'),
        ({"init_images": [""]}, '["body","init_images",0]'),
    ]
    for sent, named in refused:
        body = {"prompt": "x", "init_images": [webuiapi.raw_b64_img(source)], **SMALL, **sent}
        answer = httpx.post(f"{service}/sdapi/v1/img2img", auth=("u", KEY), json=body)
        assert answer.status_code == 422 and named in answer.text, answer.text  # not strength


@pytest.mark.parametrize(
    "upscaler", [webuiapi.HiResUpscaler.Latent, webuiapi.HiResUpscaler.Lanczos]
)
def test_a_hires_fix_is_one_job_of_two_passes(service: str, upscaler: Any) -> None:  # noqa: F811
    api = client(service)
    result = api.txt2img(prompt="a red fox", seed=5, enable_hr=True, hr_scale=1.5,
                         hr_upscaler=upscaler, hr_second_pass_steps=4, denoising_strength=0.5,
                         **SMALL)  # fmt: skip
    assert result.images[0].size == (96, 96)
    method = "latent" if upscaler == webuiapi.HiResUpscaler.Latent else "pixel"
    hires = {"scale": 1.5, "steps": 4, "strength": 0.5, "method": method}
    native = httpx.post(f"{service}/v1/txt2img", headers={"Authorization": f"Bearer {KEY}"},
                        json={"prompt": "a red fox", "seed": 5, "guidance_scale": 7.0,
                              "scheduler": "dpmpp_2m", "prompt_syntax": "a1111",
                              "hires": hires, **SMALL}).json()  # fmt: skip
    http = httpx.Client(base_url=service, headers={"Authorization": f"Bearer {KEY}"})
    wait_for(lambda: http.get(native["url"]).json()["status"] == "succeeded", 60, "the job")
    ours = Image.open(io.BytesIO(http.get(f"{native['url']}/images/0.png").content))
    assert (np.asarray(ours) == np.asarray(result.images[0])).all()


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"restore_faces": True}, "restore_faces"),
        ({"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler"),
        ({"enable_hr": True, "hr_resize_x": 1000}, "hr_resize_x"),
        # Refusals of the native request named its fields (hires.scale, guidance_scale, n),
        # not the ones sent.
        ({"enable_hr": True, "hr_scale": 4.5}, "hr_scale"),
        ({"enable_hr": True, "hr_scale": 2.5, "width": 1024}, "hr_scale"),  # over 2048
        ({"enable_hr": True, "hr_scale": 2, "hr_second_pass_steps": 500}, "hr_second_pass_steps"),
        ({"enable_hr": True, "hr_scale": 2, "denoising_strength": 0}, "denoising_strength"),
        ({"cfg_scale": 100}, "cfg_scale"),
        ({"batch_size": 5, "n_iter": 5}, "n_iter"),
        ({"batch_size": 9, "n_iter": 2}, "batch_size"),
        ({"sampler_name": "Heun++ 9"}, "sampler_name"),
        ({"scheduler": "Karras", "sampler_name": "Euler a"}, "scheduler"),
        ({"override_settings": {"sd_model_checkpoint": "another.safetensors"}},
         "override_settings.sd_model_checkpoint"),
        ({"subseed_strength": 0.3}, "subseed_strength"),
        # Silently wrong before (issue 21, 16): -2 x -2 made 4 images; resized seeds and a
        # second pass's sampler schedule were dropped.
        ({"batch_size": -2, "n_iter": -2}, "batch_size"),
        ({"seed_resize_from_w": 256, "seed_resize_from_h": 256}, "seed_resize_from_w"),
        ({"enable_hr": True, "hr_scheduler": "Karras"}, "hr_scheduler"),
        ({"steps": 0}, "steps"),
        ({"negative_prompt": "(e:1.1) " * 301}, "negative_prompt"),  # 5 chunks, the limit 4
    ],
)  # fmt: skip
def test_what_cannot_be_honoured_is_a_422_naming_the_field(
    service: str,  # noqa: F811
    fields: dict[str, Any],
    named: str,
) -> None:
    answer = httpx.post(f"{service}/sdapi/v1/txt2img", auth=("u", KEY),
                        json={"prompt": "x", **SMALL, **fields})  # fmt: skip
    assert answer.status_code == 422, answer.text
    assert any(named == ".".join(str(p) for p in e["loc"][1:]) for e in answer.json()["detail"])


@pytest.mark.parametrize("side", [2**40, 2**31, 30000, -64, 8])
def test_a_size_out_of_range_is_named_before_a_picture_is_resized(
    service: str,  # noqa: F811
    side: int,
) -> None:
    """img2img resized its picture (and txt2img its ControlNet pictures) to the payload's
    width before the job's own model bounded it: 2**40 was Pillow's OverflowError, a 500, and
    30000 a resize to 30000 pixels for nothing (a QA pass, thirty-eighth session)."""
    from app.a1111 import Img2ImgPayload, Txt2ImgPayload

    sent = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 30, 200)).save(sent, "PNG")
    picture = webuiapi.b64_img(Image.open(sent))
    answer = httpx.post(f"{service}/sdapi/v1/img2img", auth=("u", KEY),
                        json={"prompt": "x", "init_images": [picture], "steps": 3,
                              "width": side, "height": 64})  # fmt: skip
    assert answer.status_code == 422, answer.text
    assert [e["loc"] for e in answer.json()["detail"]] == [["body", "width"]]
    # The payloads' own bounds, which run before any picture is read: 0 is img2img's "the
    # picture's own size"; a generated picture's sides are 64 to 2048.
    for payload, least in ((Txt2ImgPayload, 64), (Img2ImgPayload, 0)):
        for value, ok in ((side, False), (least, True), (2048, True), (2049, False)):
            if least == 0 and value == 8:
                continue  # in the payload's range; `sources.fit` names it (above)
            for name in ("width", "height"):
                try:
                    payload.model_validate({name: value})
                except ValueError:
                    assert not ok, (payload, name, value)
                else:
                    assert ok, (payload, name, value)
    assert Img2ImgPayload.model_validate({"width": None}).width == 512


def test_keys_bearer_or_basic(service: str) -> None:  # noqa: F811
    assert httpx.get(f"{service}/sdapi/v1/samplers").status_code == 401
    assert httpx.get(f"{service}/sdapi/v1/samplers", auth=("u", "sds_wrong")).status_code == 401
    bearer = httpx.get(f"{service}/sdapi/v1/samplers", headers={"Authorization": f"Bearer {KEY}"})
    assert bearer.status_code == 200
    with pytest.raises(RuntimeError) as refused:
        client(service, "sds_wrong").txt2img(prompt="x", **SMALL)
    assert refused.value.args[0] == 401


def test_a_refusal_names_the_field_without_echoing_the_value(service: str) -> None:  # noqa: F811
    """Two 4 MB init_images made an 8 MB error body (issue 21, 9): the message says what was
    sent, not the value; A1111's own "no script" (`script_name: ""`) is accepted."""
    big = "A" * 4_000_000
    answer = httpx.post(f"{service}/sdapi/v1/img2img", auth=("u", KEY),
                        json={"prompt": "x", "init_images": [big, big], **SMALL})  # fmt: skip
    assert answer.status_code == 422
    assert len(answer.content) < 2000 and "init_images" in answer.text
    assert "a list of 2 items" in answer.text
    made = client(service).txt2img(prompt="x", script_name="", **SMALL)
    assert len(made.images) == 1


def test_an_empty_prompt_is_taken_as_a1111_takes_it(service: str) -> None:  # noqa: F811
    """A1111's default prompt is empty; here it was a 422."""
    made = client(service).txt2img(prompt="", **SMALL)
    assert len(made.images) == 1 and made.info["prompt"] == ""
    assert made.info["infotexts"][0].startswith("\nSteps: ")


def test_info_names_the_jobs_model_and_a_hires_strength() -> None:
    """`sd_model_name` named the default model when `override_settings` chose another, and a
    hires fix's `denoising_strength` was null (issue 21, 10)."""
    import json
    import time

    from app.a1111 import info
    from app.jobs.contract import Hires, Txt2ImgRequest
    from app.jobs.views import job_view

    request = Txt2ImgRequest(prompt="a", seed=1, model="anime", hires=Hires(strength=0.45))
    record = {"request": json.dumps(request.model_dump(mode="json")), "status": "succeeded",
              "created_at": str(time.time()), "images": "1"}  # fmt: skip
    said = json.loads(info(job_view("j", record, None, time.time()), "default", [""]))
    assert said["sd_model_name"] == "anime" and said["denoising_strength"] == 0.45


def test_controlnet_units_read_the_extensions_bools_and_thresholds() -> None:
    """A unit's `enabled` and `pixel_perfect` as the extension's model reads them ("false",
    0, null: its default), its canny thresholds as numbers; anything else names the field."""
    from app import a1111_controlnet
    from app.a1111 import A1111Error

    unit = {"module": "canny", "model": "edges", "image": "aGk=", "processor_res": 256}

    def read(**change: Any) -> list[dict[str, Any]]:
        found, _others = a1111_controlnet.units({"controlnet": {"args": [unit | change]}},
                                                ["edges"])  # fmt: skip
        return [fields for _where, fields in found]

    assert read(enabled="false") == [] and read(enabled=0) == []
    assert len(read(enabled=None)) == len(read(enabled="true")) == 1
    assert read()[0]["processor_res"] == 256
    assert "processor_res" not in read(pixel_perfect="True")[0]  # detected at the job's size
    assert read(pixel_perfect=None)[0]["processor_res"] == 256
    assert read(threshold_a=50.4, threshold_b=-1)[0] | {"image": ""} == read()[0] | {
        "image": "", "low_threshold": 50}  # fmt: skip
    assert read(threshold_a="50")[0]["low_threshold"] == 50
    for change, field in (({"enabled": "maybe"}, "enabled"), ({"threshold_a": "ab"}, "threshold_a"),
                          ({"threshold_b": float("nan")}, "threshold_b"),
                          ({"module": {"canny": 1}}, "module"),
                          ({"resize_mode": [1]}, "resize_mode"),
                          ({"pixel_perfect": 2}, "pixel_perfect")):  # fmt: skip
        with pytest.raises(A1111Error) as refused:
            read(**change)
        assert refused.value.field == f"alwayson_scripts.controlnet.args.0.{field}"


def test_a_null_is_the_fields_default_as_in_a1111s_models() -> None:
    """A1111's API models make every field optional: clients send null for what they leave
    alone. A null is the default here too; an unknown field is refused, null or not, and so is
    an optimization that changes the picture."""
    from pydantic import ValidationError

    from app import a1111_controlnet
    from app.a1111 import A1111Error, Img2ImgPayload, Txt2ImgPayload

    nulls = Txt2ImgPayload.model_validate({"prompt": "a", "negative_prompt": None,
                                           "steps": None, "cfg_scale": None, "seed": None,
                                           "send_images": None, "enable_hr": None})  # fmt: skip
    assert nulls == Txt2ImgPayload(prompt="a")
    assert Img2ImgPayload.model_validate({"denoising_strength": None}).denoising_strength == 0.75
    with pytest.raises(ValidationError):
        Txt2ImgPayload.model_validate({"prompt": "a", "sampler": None})
    with pytest.raises(A1111Error) as refused:
        Txt2ImgPayload(prompt="a", s_min_uncond=1.0).job_fields(["default"])
    assert refused.value.field == "s_min_uncond"
    unit = {"model": "edges", "image": "aGk=", "weight": None, "guidance_end": None,
            "resize_mode": None, "lowvram": None}  # fmt: skip
    found, _others = a1111_controlnet.units({"controlnet": {"args": [unit]}}, ["edges"])
    fields = found[0][1]
    assert (fields["weight"], fields["end"], fields["resize"]) == (1.0, 1.0, "crop")
    with pytest.raises(A1111Error) as refused:
        a1111_controlnet.units({"controlnet": {"args": [unit | {"foo": None}]}}, ["edges"])
    assert refused.value.field == "alwayson_scripts.controlnet.args.0.foo"


def test_an_infotext_is_read_as_a1111_reads_it() -> None:
    """Quoted settings keep their commas; a prompt of several lines stays whole; a last line
    with fewer than three settings is the prompt's."""
    from app.a1111 import parse_infotext

    text = ('a fox\nin snow\nNegative prompt: blurry, dark\nSteps: 3, Seed: 9, Size: 64x96, '
            'Lora hashes: "style: ab12, soft: cd34", Model: tiny')  # fmt: skip
    assert parse_infotext(text) == {
        "Prompt": "a fox\nin snow", "Negative prompt": "blurry, dark", "Steps": "3",
        "Seed": "9", "Size": "64x96", "Lora hashes": "style: ab12, soft: cd34", "Model": "tiny",
        "Size-1": "64", "Size-2": "96"}  # fmt: skip
    assert parse_infotext("a fox\nnote: one") == {"Prompt": "a fox\nnote: one"}


def test_a_refusal_whose_reason_is_not_plain_says_it() -> None:
    """A field refused for a reason its name does not tell (a refiner on an inpainting job,
    A1111's inpainting options) says the reason beside the field."""
    from app.a1111 import A1111Error, Img2ImgPayload

    base = {"init_images": ["x"], "mask": "m", "denoising_strength": 0.5}
    for change, field, reason in (
        ({"refiner_checkpoint": "xlr"}, "refiner_checkpoint", "not inpainting"),
        ({"inpainting_fill": 2}, "inpainting_fill", "latent noise"),
        ({"inpainting_mask_invert": 2}, "inpainting_mask_invert", "where it is black"),
        ({"mask_blur_x": 4, "mask_blur_y": 8}, "mask_blur_y", "alike across and down"),
    ):
        with pytest.raises(A1111Error) as refused:
            Img2ImgPayload.model_validate(base | change).job_fields(["sd", "xl", "xlr"])
        assert refused.value.field == field and reason in str(refused.value)
    # One blur both ways is served: `mask_blur` (it sets both), or x and y alike.
    for same in ({"mask_blur": 8, "mask_blur_y": 2}, {"mask_blur_x": 6, "mask_blur_y": 6}):
        Img2ImgPayload.model_validate(base | same).job_fields(["sd"])


def test_an_infotext_and_too_many_iterations_are_named() -> None:
    """A1111 fills a request's unset fields from `infotext`: not read here, so a non-empty one
    is refused (an empty one is A1111's "none"). `n_iter` past the images a request makes
    is named as sent, not as the `batch_size` the native count is read from."""
    from app.a1111 import A1111Error, Txt2ImgPayload

    base = {"prompt": "a fox", "steps": 2}
    with pytest.raises(A1111Error) as refused:
        Txt2ImgPayload.model_validate(base | {"infotext": "a fox\nSteps: 3, Seed: 9, Size: 64x64"}
                                      ).job_fields(["sd"])  # fmt: skip
    assert refused.value.field == "infotext" and "png-info" in str(refused.value)
    assert Txt2ImgPayload.model_validate(base | {"infotext": " "}).job_fields(["sd"])["n"] == 1
    with pytest.raises(A1111Error) as refused:
        Txt2ImgPayload.model_validate(base | {"n_iter": 100}).job_fields(["sd"])
    assert refused.value.field == "n_iter" and "100 images" in str(refused.value)
    fields = Txt2ImgPayload.model_validate(base | {"batch_size": 2, "n_iter": 4}).job_fields(["sd"])
    assert fields["n"] == 8
