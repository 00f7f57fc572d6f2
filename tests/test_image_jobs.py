"""img2img and inpainting through the service: the routes over real HTTP (JSON with base64, and
multipart), a real Valkey, the worker on the CPU with the tiny model.
Each image equals the engine's run of that job alone; inpainting keeps the source's pixels
outside the (blurred) mask exactly; bad pictures are 4xx naming the field."""

from __future__ import annotations

import base64
import dataclasses
import io
import random
import threading
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from diffusers.image_processor import VaeImageProcessor
from PIL import Image, ImageFilter

from app.framing import framed
from app.jobs.contract import InpaintRequest, Txt2ImgRequest
from app.jobs.storage import input_key, open_storage
from tests.conftest import JobStore, wait_for
from tests.test_continuous import serve
from tests.test_sources import picture, square_mask
from tests.test_uploads import declared_png, encoded
from tests.test_worker import png, runner
from worker.engine import BatchShape, ImageSpec, Source
from worker.tasks import task

FIELDS = {"prompt": "a cat", "steps": 4, "seed": 3, "guidance_scale": 6.0}


def b64(image: Image.Image, fmt: str = "PNG") -> str:
    return base64.b64encode(encoded(image, fmt)).decode()


def run_jobs(store: JobStore, model: Path, redis_url: str, ids: list[str],
             **settings: Any) -> None:  # fmt: skip
    r = runner(store, model, redis_url, max_batch=4, **settings)
    r.open()
    done = threading.Event()
    worker = serve(r, done)
    try:
        wait_for(lambda: all(_ended(store, i) for i in ids), 180, "the jobs")
    finally:
        done.set()
        worker.join(60)
        r.close()


def _ended(store: JobStore, job_id: str) -> bool:
    view = store.view(job_id)
    return view is not None and view.status.value in ("succeeded", "failed")


def expected(model_engine: Any, view: Any, source: Source) -> np.ndarray:
    r = view.request
    spec = ImageSpec(r.prompt, r.negative_prompt, r.guidance_scale, view.seeds[0])
    shape = BatchShape(r.width, r.height, r.steps, r.scheduler)
    lane = model_engine.prepare("x", [spec], shape, source)
    while not lane.done:
        model_engine.step([lane])
    [image] = task(r).finished(model_engine.images(model_engine.finish(lane)), source, r)
    assert isinstance(image, np.ndarray)
    return image


def test_img2img_and_inpainting_beside_text_jobs(
    api: httpx.Client, store: JobStore, engine: Any, tiny_model: Path, redis_url: str,
) -> None:  # fmt: skip
    made = api.post("/v1/img2img", json={**FIELDS, "image": b64(picture()), "strength": 0.5})
    assert made.status_code == 202, made.text
    files = {"image": ("src.jpg", encoded(picture(), "PNG"), "image/png"),
             "mask": ("m.png", encoded(square_mask(), "PNG"), "image/png")}  # fmt: skip
    form = {k: str(v) for k, v in FIELDS.items()} | {"mask_blur": "3", "scheduler": "euler_a"}
    painted = api.post("/v1/inpaint", data=form, files=files)
    assert painted.status_code == 202, painted.text
    text = api.post("/v1/txt2img", json={**FIELDS, "width": 64, "height": 96})
    ids = [made.json()["id"], painted.json()["id"], text.json()["id"]]
    run_jobs(store, tiny_model, redis_url, ids)

    img2img, inpaint = store.view(ids[0]), store.view(ids[1])
    assert img2img is not None and inpaint is not None
    assert img2img.status.value == "succeeded" and inpaint.status.value == "succeeded"
    assert img2img.request.kind == "img2img" and img2img.request.strength == 0.5
    assert isinstance(inpaint.request, InpaintRequest) and inpaint.request.mask_blur == 3
    assert (img2img.request.width, img2img.request.height) == (64, 96)  # the source's size
    ours = np.asarray(png(store, ids[0], 0))
    assert np.abs(ours.astype(int) - expected(engine, img2img, Source(picture(), 0.5))).max() <= 1
    source = Source(picture(), 1.0, square_mask())
    result = np.asarray(png(store, ids[1], 0))
    assert np.abs(result.astype(int) - expected(engine, inpaint, source)).max() <= 1
    # Outside the blurred mask: the source, exactly.
    blurred = np.asarray(square_mask().filter(ImageFilter.GaussianBlur(3)))
    outside = blurred == 0
    assert outside.sum() > 1000 and (result[outside] == np.asarray(picture())[outside]).all()
    assert (result[~outside] != np.asarray(picture())[~outside]).any()  # and repainted inside
    made_png = Image.open(io.BytesIO(api.get(f"/jobs/{ids[1]}/images/0.png").content))
    infotext = made_png.info["parameters"]
    assert "Denoising strength: 1.0" in infotext and "Mask blur: 3" in infotext
    # The owner gets the pictures back as the job used them.
    mask = api.get(f"/jobs/{ids[1]}/inputs/mask.png")
    assert mask.status_code == 200 and Image.open(io.BytesIO(mask.content)).size == (64, 96)
    assert api.get(f"/jobs/{ids[0]}/inputs/mask.png").status_code == 404  # img2img has none
    assert api.get(f"/jobs/{ids[2]}/inputs/image.png").status_code == 404


def test_the_size_comes_from_the_source_fitted(api: httpx.Client, store: JobStore) -> None:
    def size_of(image: Image.Image, **extra: Any) -> tuple[int, int]:
        answer = api.post("/v1/img2img", json={**FIELDS, "image": b64(image), **extra})
        assert answer.status_code == 202, answer.text
        view = store.view(answer.json()["id"])
        assert view is not None
        return view.request.width, view.request.height

    assert size_of(Image.new("RGB", (203, 150))) == (200, 144)  # rounded down to 8
    assert size_of(Image.new("RGB", (2000, 1000))) == (1448, 720)  # within 1024 x 1024 pixels
    assert size_of(Image.new("RGB", (90, 90)), width=128, height=64) == (128, 64)


def test_crop_and_fill_fit_a_picture_as_diffusers_and_a1111_do() -> None:
    """`resize_mode` crop and fill equal diffusers' image processor's (A1111's resize modes 1
    and 2), for pictures and masks of every shape against the frame."""
    processor = VaeImageProcessor()
    draw = random.Random(5)
    for k in range(60):
        size = (draw.randrange(20, 300), draw.randrange(20, 300))
        frame = (draw.randrange(8, 40) * 8, draw.randrange(8, 40) * 8)
        pixels = np.random.default_rng(k).integers(0, 255, (size[1], size[0], 3), np.uint8)
        for sent in (Image.fromarray(pixels), Image.fromarray(pixels[..., 0], "L")):
            for how in ("crop", "fill"):
                theirs = processor.resize(sent, frame[1], frame[0], resize_mode=how)
                mine = framed(sent, frame, how)
                assert mine.size == frame and mine.mode == sent.mode
                assert np.array_equal(np.asarray(mine), np.asarray(theirs.convert(mine.mode)))


def test_the_resize_mode_fits_the_stored_pictures(api: httpx.Client) -> None:
    wide = picture().resize((128, 64))
    mask = Image.new("L", (128, 64), 0)
    mask.paste(255, (56, 16, 72, 48))
    for how in ("crop", "fill"):
        body = {**FIELDS, "image": b64(wide), "mask": b64(mask), "width": 64, "height": 64,
                "resize_mode": how}  # fmt: skip
        answer = api.post("/v1/inpaint", json=body)
        assert answer.status_code == 202, answer.text
        job = api.get(answer.json()["url"]).json()
        assert job["request"]["resize_mode"] == how
        for name, sent in (("image", wide), ("mask", mask)):
            stored = Image.open(
                io.BytesIO(api.get(f"{answer.json()['url']}/inputs/{name}.png").content)
            )
            assert np.array_equal(np.asarray(stored), np.asarray(framed(sent, (64, 64), how)))
    bad = api.post("/v1/img2img", json={**FIELDS, "image": b64(wide), "resize_mode": "pad"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"][-1] == "resize_mode"


def test_upscaling_pixel_and_latent_in_tiles_beside_text_jobs(
    api: httpx.Client, store: JobStore, engine: Any, tiny_model: Path, redis_url: str,
) -> None:  # fmt: skip
    """Tiles of 64 pixels: a 48x32 picture x4 (192x128) is 3x2 tiles, each a row beside the
    text job's 64x64 rows; each result equals the engine's run of that job alone."""
    small = picture().resize((48, 32))
    pixel = api.post("/v1/upscale", json={**FIELDS, "image": b64(small), "scale": 4})
    assert pixel.status_code == 202, pixel.text
    form = {"scale": "2", "method": "latent", "steps": "4", "seed": "5", "strength": "0.5"}
    latent = api.post("/v1/upscale", data=form,
                      files={"image": ("s.png", encoded(small, "PNG"), "image/png")})  # fmt: skip
    assert latent.status_code == 202, latent.text
    text = api.post("/v1/txt2img", json={**FIELDS, "width": 64, "height": 64})
    hires = {"scale": 2, "steps": 5, "strength": 0.6, "method": "pixel"}
    fixed = api.post("/v1/txt2img", json={**FIELDS, "width": 96, "height": 64, "hires": hires})
    ids = [pixel.json()["id"], latent.json()["id"], text.json()["id"], fixed.json()["id"]]
    run_jobs(store, tiny_model, redis_url, ids, tile=64, tile_overlap=16)
    tuning = engine.tuning
    engine.tuning = dataclasses.replace(tuning, tile=64, tile_overlap=16)
    try:
        for job_id, size, source in [
            (ids[0], (192, 128), Source(small.resize((192, 128), Image.Resampling.LANCZOS), 0.35)),
            (ids[1], (96, 64), Source(small, 0.5, enlarge=True)),
        ]:
            view = store.view(job_id)
            assert view is not None and view.status.value == "succeeded", view
            assert (
                view.request.kind == "upscale" and (view.request.width, view.request.height) == size
            )
            made = np.asarray(png(store, job_id, 0))
            assert made.shape == (size[1], size[0], 3)
            assert np.abs(made.astype(int) - expected(engine, view, source)).max() <= 1
        # The hires fix: 96x64, then 192x128 in tiles, as one job.
        view = store.view(ids[3])
        assert view is not None and view.status.value == "succeeded", view
        assert isinstance(view.request, Txt2ImgRequest) and view.request.hires is not None
        spec = [ImageSpec("a cat", "", 6.0, 3)]
        lane = engine.prepare("hr", spec, BatchShape(96, 64, 4, "dpmpp_2m"))
        while not lane.done:
            engine.step([lane])
        lane = engine.second_pass(lane, spec, BatchShape(192, 128, 5, "dpmpp_2m"),
                                  view.request.hires)  # fmt: skip
        assert lane.tiling is not None
        while not lane.done:
            engine.step([lane])
        [alone] = engine.images(engine.finish(lane))
        assert alone is not None
        assert np.abs(np.asarray(png(store, ids[3], 0)).astype(int) - alone).max() <= 1
    finally:
        engine.tuning = tuning
    stored = api.get(f"/jobs/{ids[1]}/inputs/image.png")  # latent: the picture at its own size
    assert Image.open(io.BytesIO(stored.content)).size == (48, 32)
    info = Image.open(io.BytesIO(api.get(f"/jobs/{ids[0]}/images/0.png").content)).info
    assert "Hires upscale: 4" in info["parameters"]


@pytest.mark.parametrize(
    ("route", "body", "status", "field"),
    [
        ("/v1/img2img", {"image": "@@@"}, 422, "image"),
        ("/v1/img2img", {"image": b64(picture(), "GIF")}, 422, "image"),
        ("/v1/img2img", {"image": base64.b64encode(declared_png(50000, 50000)).decode()}, 413,
         None),
        ("/v1/img2img", {"image": b64(Image.new("RGB", (40, 40)))}, 422, "image"),  # too small
        ("/v1/img2img", {}, 422, "image"),
        ("/v1/img2img", {"image": b64(picture()), "strength": 0}, 422, "strength"),
        ("/v1/inpaint", {"image": b64(picture()),
                         "mask": b64(Image.new("L", (32, 32)))}, 422, "mask"),
        ("/v1/inpaint", {"image": b64(picture())}, 422, "mask"),
        ("/v1/inpaint", {"image": b64(picture()), "mask": b64(square_mask()), "mask_blur": -1},
         422, "mask_blur"),
        ("/v1/upscale", {"image": b64(picture()), "scale": 3}, 422, "scale"),
        ("/v1/upscale", {"image": b64(picture()), "method": "bicubic"}, 422, "method"),
        ("/v1/upscale", {"image": b64(picture()), "width": 128}, 422, "width"),
        ("/v1/upscale", {"image": b64(Image.new("RGB", (1100, 64))), "scale": 2}, 422, "image"),
        ("/v1/upscale", {"image": b64(Image.new("RGB", (24, 24))), "scale": 2}, 422, "image"),
        ("/v1/upscale", {"image": b64(picture()), "strength": 1.5}, 422, "strength"),
    ],
)  # fmt: skip
def test_bad_pictures_and_fields_are_4xx_naming_the_field(
    api: httpx.Client, route: str, body: dict[str, Any], status: int, field: str | None
) -> None:
    answer = api.post(route, json={**FIELDS, **body})
    assert answer.status_code == status, answer.text
    if field is not None:
        assert any(field in [str(p) for p in e["loc"]] for e in answer.json()["detail"])


def test_an_upscale_too_small_once_rounded_says_so(api: httpx.Client) -> None:
    """A picture under 8 pixels a side upscales to nothing: the 422 says why (its sides are
    rounded down to multiples of 8 first), not only "x4 makes 0x0"."""
    answer = api.post("/v1/upscale", json={**FIELDS, "image": b64(Image.new("RGB", (3, 3))),
                                           "scale": 4})  # fmt: skip
    assert answer.status_code == 422, answer.text
    (error,) = answer.json()["detail"]
    assert "rounded down to multiples of 8: 0x0" in error["msg"] and "image" in error["loc"]


def test_bodies_multipart_files_and_limits(api: httpx.Client) -> None:
    # A text file in a file part, an empty part: 422 naming the field.
    empty = api.post("/v1/img2img", data={"prompt": "x"},
                     files={"image": ("a.png", b"", "image/png")})  # fmt: skip
    assert empty.status_code == 422 and "image" in empty.text
    text = api.post("/v1/img2img", data={"prompt": "x"},
                    files={"image": ("a.png", b"just some words", "image/png")})  # fmt: skip
    assert text.status_code == 422 and "not a PNG, JPEG or WebP" in text.text
    assert api.post("/v1/img2img", content=b"x", headers={"content-type": "text/plain"}
                    ).status_code == 415  # fmt: skip
    # Images may be large here (up to SDSERVE_MAX_UPLOAD_BYTES), not on other routes.
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 400, 3), np.uint8))
    big = api.post("/v1/img2img", json={**FIELDS, "image": b64(noisy)})
    assert len(b64(noisy)) > 64 * 1024 and big.status_code == 202, big.text
    assert api.post("/v1/txt2img", json={**FIELDS, "prompt": "x" * 70_000}).status_code == 413


def test_malformed_multipart_and_repeated_fields_are_named(api: httpx.Client) -> None:
    """A bad boundary, too many files: said as multipart, not "not valid UTF-8 JSON" (issue 21,
    14); a field given twice is refused on /v1/images/edits as on /v1/img2img (15); a body
    over the limit on /v1/images/* comes back in OpenAI's error shape (17)."""
    png = encoded(Image.new("RGB", (64, 64)), "PNG")
    bad = api.post("/v1/img2img", content=b"--x\r\nnonsense",
                   headers={"content-type": "multipart/form-data; boundary=y"})  # fmt: skip
    assert bad.status_code == 422 and "multipart/form-data" in bad.text, bad.text
    files = [("image", ("a.png", png, "image/png"))] * 3
    many = api.post("/v1/img2img", data={"prompt": "x"}, files=files)
    assert many.status_code == 422 and "multipart/form-data" in many.text, many.text
    parts: list[tuple[str, tuple[str | None, bytes, str | None]]] = [
        ("image", ("a.png", png, "image/png")), ("prompt", (None, b"a", None)),
        ("prompt", (None, b"b", None)),
    ]  # fmt: skip
    twice = api.post("/v1/images/edits", files=parts)
    assert twice.status_code == 422 and "given twice" in twice.text, twice.text
    # A file part under a text field's name, or a name the route lacks: named, with why.
    for route, name, said in (("/v1/img2img", "prompt", "is a text field"),
                              ("/v1/img2img", "mask", "no field of this route"),
                              ("/v1/images/edits", "prompt", "is a text field"),
                              ("/v1/images/edits", "bogus", "no field of this route")):  # fmt: skip
        stray = api.post(route, files=[("image", ("a.png", png, "image/png")),
                                       (name, ("p.txt", b"a fox", "text/plain"))])  # fmt: skip
        assert stray.status_code == 422 and said in stray.text and name in stray.text, stray.text
    # Webhook events without an address, on a picture route too (its body is read apart).
    alone = api.post("/v1/img2img", data={"prompt": "x", "webhook_events": "failed"},
                     files=files[:1])  # fmt: skip
    assert alone.status_code == 422 and "webhook_url" in alone.text, alone.text
    two = api.post("/v1/img2img", data={"prompt": "x"}, files=files[:2])
    assert two.status_code == 422 and "takes one picture" in two.text, two.text
    huge = api.post("/v1/images/generations", content=b"{" + b" " * 70_000 + b"}",
                    headers={"content-type": "application/json"})  # fmt: skip
    assert huge.status_code == 413
    assert huge.json()["error"]["message"].startswith("request body is larger than")


def test_storage_that_cannot_be_written_is_a_503_to_retry(
    store: JobStore, redis_url: str, tmp_path: Path
) -> None:
    """Every picture route answered 500, without nosniff, and dropped the keep-alive
    connection (issue 21, 13): a 503 with Retry-After, as for Redis away, and the connection
    serves the next request."""
    import shutil

    from app.api import create_app
    from app.settings import ApiSettings
    from tests.conftest import serving

    folder = tmp_path / "images"
    folder.mkdir()
    settings = ApiSettings(redis_url=redis_url, auth="off", storage=folder.as_uri())
    with serving(create_app(store, settings)) as url, httpx.Client(base_url=url) as http:
        shutil.rmtree(folder)
        folder.write_text("a file where the folder was: nothing can be written under it")
        picture = b64(Image.new("RGB", (64, 64), "grey"))
        for route in ("/v1/img2img", "/v1/upscale"):
            answer = http.post(route, json={"prompt": "x", "image": picture, "seed": 1})
            assert answer.status_code == 503, answer.text
            assert answer.headers["retry-after"] and "storage" in answer.text
            assert answer.headers["x-content-type-options"] == "nosniff"
        assert http.get("/healthz").status_code == 200  # the same connection goes on


def test_a_replay_lands_on_the_first_job_and_keeps_no_second_copy(
    api: httpx.Client, storage_dir: Path
) -> None:
    def with_inputs() -> set[str]:
        results = storage_dir / "results"
        return {p.name for p in results.iterdir() if (p / "image.png").exists()}

    before = with_inputs()
    body = {**FIELDS, "image": b64(picture())}
    first = api.post("/v1/img2img", json=body, headers={"Idempotency-Key": "pic-1"})
    again = api.post("/v1/img2img", json=body, headers={"Idempotency-Key": "pic-1"})
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    other = api.post("/v1/img2img", json={**body, "image": b64(square_mask().convert("RGB"))},
                     headers={"Idempotency-Key": "pic-1"})  # fmt: skip
    assert other.status_code == 409  # another picture is another request
    # The replay and the refusal stored their pictures, then removed them: one job, one copy.
    assert with_inputs() - before == {first.json()["id"]}
    stored = open_storage(storage_dir.as_uri()).get(input_key(first.json()["id"], "image"))
    assert stored is not None and Image.open(io.BytesIO(stored)).size == (64, 96)


def test_openapi_documents_the_picture_routes(api: httpx.Client) -> None:
    schema = api.get("/openapi.json").json()
    paths = schema["paths"]
    for route, files in [("/v1/img2img", {"image"}), ("/v1/inpaint", {"image", "mask"}),
                         ("/v1/upscale", {"image"})]:  # fmt: skip
        content = paths[route]["post"]["requestBody"]["content"]
        assert set(content) == {"application/json", "multipart/form-data"}
        form = content["multipart/form-data"]["schema"]["properties"]
        assert {name for name, p in form.items() if p.get("format") == "binary"} == files
        assert "strength" in content["application/json"]["schema"]["properties"]
    edits = paths["/v1/images/edits"]["post"]["requestBody"]["content"]
    assert set(edits) == {"multipart/form-data"}
    assert "/jobs/{job_id}/inputs/{name}.png" in paths
    kinds = schema["components"]["schemas"]["JobView"]["properties"]["request"]
    assert {ref["$ref"].rsplit("/", 1)[1] for ref in kinds["oneOf"]} == {
        "Txt2ImgRequest", "Img2ImgRequest", "InpaintRequest", "UpscaleRequest"}  # fmt: skip
