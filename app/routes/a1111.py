"""AUTOMATIC1111's web API (`/sdapi/v1/...`) over the same queue, keys and batching: txt2img and
img2img wait for their job and answer A1111's `images`, `parameters` and `info`; progress and
interrupt are about the caller's latest job; samplers, schedulers, models and options describe
this server."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from functools import partial
from typing import Any

from fastapi import APIRouter, HTTPException
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from PIL import Image, ImageOps
from pydantic import ValidationError
from starlette.requests import Request

from app import a1111, a1111_controlnet
from app.auth import Caller
from app.controls import MODULES, ControlNetBody, at_processor_res, preprocessed
from app.jobs.contract import (
    ControlNetSettings,
    Img2ImgRequest,
    InpaintRequest,
    JobRequest,
    SourceRequest,
    Txt2ImgRequest,
)
from app.jobs.masks import Cut
from app.jobs.storage import result_key
from app.routes import sources
from app.routes.context import UNAUTHORIZED, Context, error
from app.routes.generations import finished_job
from app.routes.submit import Submitter
from app.uploads import UploadError, flatten, from_base64, read_image, to_png

PREFIX = "/sdapi/v1"


# Where the extension's units are (Forge's "ControlNet" key is read too).
UNITS_AT = ("alwayson_scripts", "controlnet", "args")


def native(make: Any, units: Sequence[str] = ()) -> Any:
    """What `make` reads of an A1111 payload, or queues; its refusal as a 422 naming the
    field the client sent (A1111's name, not the native request's). `units`: where each
    native ControlNet unit was among the extension's."""
    try:
        return make()
    except a1111.A1111Error as e:
        raise sources.invalid(e.field, e.message) from None
    except ValidationError as e:
        raise renamed(RequestValidationError(sources.located(e)), units) from None
    except RequestValidationError as e:
        raise renamed(e, units) from None
    except UploadError as e:
        raise renamed(sources.as_http_error(e), units) from None


def renamed(error: Exception, units: Sequence[str] = ()) -> Exception:
    """A 422 about the native request, located at the A1111 fields it was read from."""
    if not isinstance(error, RequestValidationError):
        return error
    return RequestValidationError([
        {**e, "loc": ("body", *sent_as(tuple(e["loc"][1:]), units))} for e in error.errors()
    ])  # fmt: skip


def sent_as(path: tuple[str | int, ...], units: Sequence[str]) -> tuple[str | int, ...]:
    """A native field's path as the A1111 field it was read from; a ControlNet unit's as the
    extension's unit it came from (its disabled units are skipped: the indices differ)."""
    if path[:1] != ("controlnets",):
        return a1111.sent_as(path)
    rest = path[1:]
    if not (rest and isinstance(rest[0], int) and rest[0] < len(units)):
        at = tuple(units[0].split(".")[:-1]) if units else UNITS_AT  # Forge's key, if sent
        return (*at, *rest)
    where = tuple(int(p) if p.isdigit() else p for p in units[rest[0]].split("."))
    field = rest[1:]
    if field:
        field = (a1111_controlnet.SENT_AS.get(str(field[0]), field[0]), *field[1:])
    return (*where, *field)


def router(ctx: Context, submit: Submitter) -> APIRouter:
    routes = APIRouter(prefix=PREFIX, tags=["A1111-compatible"], responses=UNAUTHORIZED)
    authenticated, store, storage = ctx.authenticated, ctx.store, ctx.storage

    def model() -> str:
        return store.models[0]

    async def run(http: Request, caller: Caller, payload: a1111.Txt2ImgPayload,
                  request: JobRequest, pngs: dict[str, bytes],
                  units: Sequence[str]) -> dict[str, Any]:  # fmt: skip
        """Queue the job, remember it as the caller's latest, wait, answer A1111's shape."""
        if pngs:
            work = partial(sources.queue_with_pictures, ctx, submit, request, pngs, http,
                           caller, None)  # fmt: skip
        else:
            work = partial(submit, request, http, caller, None)
        job_id, _status, _replayed = await run_in_threadpool(native, work, units)
        await run_in_threadpool(store.remember_latest, caller.key_id, job_id)
        view = await finished_job(ctx, job_id, http, caller)
        images, infotexts = [], []
        for k in range(len(view.images)):
            png = await run_in_threadpool(storage.get, result_key(job_id, k))
            if png is None:
                raise HTTPException(410, "the images of this job have expired")
            infotexts.append(Image.open(io.BytesIO(png)).info.get("parameters", ""))
            if payload.send_images:
                images.append(base64.b64encode(png).decode())
        parameters = payload.model_dump(exclude={"init_images", "mask"})
        return {"images": images, "parameters": parameters,
                "info": a1111.info(view, await run_in_threadpool(model), infotexts)}  # fmt: skip

    waits = {
        **UNAUTHORIZED,
        **error(409, "The job was canceled (an interrupt)."),
        **error(413, "Body over the limit (pictures: SDSERVE_MAX_UPLOAD_BYTES)."),
        422: {
            "description": "A field sdserve cannot honour, or an invalid one (named); or a"
            " job its worker refused (`invalid_request`)."
        },
        **error(429, "The queue is full, or this key is at its limit; see `Retry-After`."),
        **error(500, "The job failed."),
        **error(504, "Not done within SDSERVE_SYNC_TIMEOUT_S; the job goes on."),
    }

    async def controls(
        http: Request, caller: Caller, payload: a1111.Txt2ImgPayload, size: tuple[int, int],
        source: str | None = None, cut: Cut | None = None,
    ) -> tuple[list[dict[str, Any]], dict[str, bytes], list[str]]:  # fmt: skip
        """The payload's ControlNet units as queued, their control images to store, and where
        each was among the extension's units. `source`: img2img's picture, a unit's that has
        none of its own; `cut`: the part of it a masked-area job draws."""
        served = list(ctx.settings.controlnets)
        found = native(lambda: a1111_controlnet.units(payload.alwayson_scripts, served,
                                                      source))[0]  # fmt: skip
        if not found:
            return [], {}, []
        wheres = [where for where, _ in found]
        bodies = []
        for k, (_, fields) in enumerate(found):
            try:
                bodies.append(ControlNetBody.model_validate(fields, strict=False))
            except ValidationError as e:
                first = e.errors()[0]
                path = sent_as(("controlnets", k, *first["loc"]), wheres)
                message = first["msg"]
                if not first["loc"]:  # a check across the unit's fields, in the names sent
                    message = a1111_controlnet.in_sent_names(message)
                raise sources.invalid(".".join(map(str, path)), message) from None
        try:
            work = partial(sources.control_pictures, bodies, size, cut)
            units, pngs = await sources.decoded(ctx, submit, http, caller, None, work)
        except UploadError as e:
            raise sources.as_http_error(e) from None
        return units, pngs, wheres

    @routes.post("/txt2img", summary="A1111-compatible text to image (waits)", responses=waits)
    async def txt2img(payload: a1111.Txt2ImgPayload, http: Request,
                      caller: Caller = authenticated) -> dict[str, Any]:  # fmt: skip
        chosen = await run_in_threadpool(store.options, caller.key_id)
        fields = native(lambda: payload.job_fields(store.models, list(ctx.settings.vaes), chosen))
        if len(await http.body()) > sources.TEXT_BODY_BYTES and not payload.alwayson_scripts:
            raise HTTPException(413, f"body over {sources.TEXT_BODY_BYTES} bytes")
        units, pngs, wheres = await controls(http, caller, payload,
                                             (payload.width, payload.height))  # fmt: skip
        request = native(lambda: Txt2ImgRequest.model_validate(fields | {"controlnets": units},
                                                               strict=False), wheres)  # fmt: skip
        return await run(http, caller, payload, request, pngs, wheres)

    @routes.post("/img2img", summary="A1111-compatible image to image and inpainting (waits)",
                 responses=waits)  # fmt: skip
    async def img2img(payload: a1111.Img2ImgPayload, http: Request,
                      caller: Caller = authenticated) -> dict[str, Any]:  # fmt: skip
        chosen = await run_in_threadpool(store.options, caller.key_id)
        fields = native(lambda: payload.job_fields(store.models, list(ctx.settings.vaes), chosen))
        try:
            data = {"image": from_base64("init_images", payload.init_images[0])}
            if payload.mask is not None:
                data["mask"] = from_base64("mask", payload.mask)
            pictures = await sources.decoded(ctx, submit, http, caller, None,
                                             partial(sources.read_pictures, data))  # fmt: skip
            masking = payload.inpainting()
            if "mask" in pictures and payload.inpainting_mask_invert:
                pictures["mask"] = ImageOps.invert(pictures["mask"])
            stored, pngs = await run_in_threadpool(
                sources.fit, pictures, payload.width, payload.height,
                masking["mask_crop"], masking["mask_blur"], payload.resizing(),
            )  # fmt: skip
        except UploadError as e:
            raise renamed(sources.as_http_error(e)) from None
        except RequestValidationError as e:
            raise renamed(e) from None
        strength = payload.denoising_strength if payload.denoising_strength is not None else 0.75
        units, controls_pngs, wheres = await controls(
            http,
            caller,
            payload,
            (stored["width"], stored["height"]),
            payload.init_images[0],
            sources.cut_of(stored),
        )
        pngs |= controls_pngs
        known = {**fields, **stored, "strength": strength, "controlnets": units,
                 "resize_mode": payload.resizing()}  # fmt: skip
        if "mask" in stored:
            make: Any = lambda: InpaintRequest.model_validate({**known, **masking},  # noqa: E731
                                                              strict=False)  # fmt: skip
        else:
            make = lambda: Img2ImgRequest.model_validate(known, strict=False)  # noqa: E731
        request: SourceRequest = native(make, wheres)
        return await run(http, caller, payload, request, pngs, wheres)

    @routes.get("/progress", summary="A1111-compatible progress of the caller's latest job")
    def progress(
        skip_current_image: bool = False, caller: Caller = authenticated
    ) -> dict[str, Any]:
        job_id = store.latest(caller.key_id)
        view = store.view(job_id, caller.key_id) if job_id else None
        preview = None
        if view is not None and view.preview_url and not skip_current_image:
            preview = store.preview(view.id)
        return a1111.progress(view, preview)

    @routes.post("/interrupt", summary="A1111-compatible: cancel the caller's latest job")
    def interrupt(caller: Caller = authenticated) -> dict[str, Any]:
        job_id = store.latest(caller.key_id)
        if job_id:
            store.cancel(job_id, caller.key_id)
        return {}

    @routes.post("/skip", summary="A1111-compatible: as interrupt (one job is one run here)")
    def skip(caller: Caller = authenticated) -> dict[str, Any]:
        return interrupt(caller)

    @routes.get("/samplers", summary="A1111-compatible: the samplers offered")
    def samplers(_caller: Caller = authenticated) -> list[dict[str, Any]]:
        aliases = {label: [alias for alias, name in a1111.ALIASES.items() if name == label]
                   for label in a1111.SAMPLERS}  # fmt: skip
        return [{"name": label, "aliases": aliases[label], "options": {}}
                for label in a1111.SAMPLERS]  # fmt: skip

    @routes.get("/schedulers", summary="A1111-compatible: the schedules offered")
    def schedulers(_caller: Caller = authenticated) -> list[dict[str, Any]]:
        return [{"name": name, "label": label, "aliases": None, "default_rho": -1,
                 "need_inner_model": False} for name, label in a1111.SCHEDULES.items()]  # fmt: skip

    @routes.get("/scripts", summary="A1111-compatible: no scripts are offered")
    def scripts(_caller: Caller = authenticated) -> dict[str, list[str]]:
        return {"txt2img": [], "img2img": []}

    @routes.get("/upscalers", summary="A1111-compatible: the hires fix's picture upscalers")
    def upscalers(_caller: Caller = authenticated) -> list[dict[str, Any]]:
        return [{"name": name, "model_name": None, "model_path": None, "model_url": None,
                 "scale": None} for name, method in a1111.HIRES_UPSCALERS.items()
                if method == "pixel"]  # fmt: skip

    @routes.get("/latent-upscale-modes",
                summary="A1111-compatible: the hires fix's latent upscalers")  # fmt: skip
    def latent_upscale_modes(_caller: Caller = authenticated) -> list[dict[str, Any]]:
        return [{"name": name} for name, method in a1111.HIRES_UPSCALERS.items()
                if method == "latent"]  # fmt: skip

    # What A1111 lists that sdserve does not offer (styles, face restoration, hypernetworks,
    # ESRGAN models): empty lists, so that a client's start-up questions are answered.
    def none_offered(_caller: Caller = authenticated) -> list[dict[str, Any]]:
        return []

    for path in ("prompt-styles", "face-restorers", "hypernetworks", "realesrgan-models"):
        routes.add_api_route(f"/{path}", none_offered, methods=["GET"],
                             summary="A1111-compatible: none are offered here")  # fmt: skip

    @routes.post(
        "/refresh-checkpoints",
        summary="A1111-compatible: the models are the deployment's (SDSERVE_MODELS)",
    )
    @routes.post(
        "/refresh-vae", summary="A1111-compatible: the VAEs are the deployment's (SDSERVE_VAES)"
    )
    def refresh_fixed(_caller: Caller = authenticated) -> None:
        return None

    @routes.post("/png-info", summary="A1111-compatible: how a PNG was made (its infotext)")
    async def png_info(body: dict[str, Any], http: Request,
                       caller: Caller = authenticated) -> dict[str, Any]:  # fmt: skip
        """A picture's `parameters` text chunk as `info`, its other text chunks as `items`,
        and the infotext read into its settings as `parameters`."""
        sent = body.get("image")
        if not isinstance(sent, str) or not sent:
            raise sources.invalid("image", "a base64 picture")

        def read() -> dict[str, Any]:
            picture = read_image("image", from_base64("image", sent)).image
            items = {key: value for key, value in picture.info.items()
                     if isinstance(value, str | int | float)}  # fmt: skip
            info = str(items.pop("parameters", ""))
            return {"info": info, "items": items, "parameters": a1111.parse_infotext(info)}

        try:
            return await sources.decoded(ctx, submit, http, caller, None, read)
        except UploadError as e:
            raise sources.as_http_error(e) from None

    @routes.get("/sd-models", summary="A1111-compatible: the models served")
    def sd_models(_caller: Caller = authenticated) -> list[dict[str, Any]]:
        return [{"title": name, "model_name": name, "hash": None, "sha256": None,
                 "filename": name, "config": None} for name in store.models]  # fmt: skip

    @routes.get("/sd-vae", summary="A1111-compatible: the VAEs a request may choose")
    def sd_vae(_caller: Caller = authenticated) -> list[dict[str, Any]]:
        return [{"model_name": name, "filename": name} for name in ctx.settings.vaes]

    @routes.get("/loras", summary="A1111-compatible: the LoRAs served (names; no server paths)")
    def loras(_caller: Caller = authenticated) -> list[dict[str, Any]]:
        return [{"name": name, "alias": name, "path": None, "metadata": {}}
                for name in store.lora_models()]  # fmt: skip

    @routes.post(
        "/refresh-loras", summary="A1111-compatible: workers read their LoRA folders again"
    )
    def refresh_loras(_caller: Caller = authenticated) -> None:
        store.refresh("loras")

    @routes.get("/embeddings",
                summary="A1111-compatible: the embeddings, loaded and skipped")  # fmt: skip
    def embeddings(_caller: Caller = authenticated) -> dict[str, Any]:
        return store.embeddings(model())

    @routes.post("/refresh-embeddings",
                 summary="A1111-compatible: workers read their embeddings again")  # fmt: skip
    def refresh_embeddings(_caller: Caller = authenticated) -> None:
        store.refresh("embeddings")

    @routes.get("/options", summary="A1111-compatible: the caller's settings, as A1111 names them")
    def options(caller: Caller = authenticated) -> dict[str, Any]:
        kept = store.options(caller.key_id)
        return {"sd_model_checkpoint": kept.get("sd_model_checkpoint") or model(),
                "sd_vae": kept.get("sd_vae") or "Automatic",
                "CLIP_stop_at_last_layers": kept.get("CLIP_stop_at_last_layers", 1),
                **a1111.FIXED_OPTIONS}  # fmt: skip

    @routes.post("/options", summary="A1111-compatible: the caller's model, VAE and clip skip")
    def set_options(body: dict[str, Any], caller: Caller = authenticated) -> dict[str, Any]:
        """A1111 clients choose the model (webuiapi's `util_set_model`), the VAE and clip skip
        here for the jobs that follow. A1111 keeps them for its one user; here each API key
        keeps its own (its later A1111 jobs take them where `override_settings` is silent).
        The settings that never change pass at their value; others are a 422 naming them."""
        native(lambda: a1111.read_settings(body, store.models, list(ctx.settings.vaes), ""))
        store.set_options(caller.key_id, {key: value for key, value in body.items()
                                          if key in a1111.CHOSEN})  # fmt: skip
        return {}

    return routes


def controlnet_router(ctx: Context, submit: Submitter) -> APIRouter:
    """The A1111 ControlNet extension's own routes: its models, modules, version, detect."""
    routes = APIRouter(prefix="/controlnet", tags=["A1111-compatible"], responses=UNAUTHORIZED)
    authenticated = ctx.authenticated

    @routes.get("/model_list", summary="A1111 ControlNet: the ControlNets served")
    def model_list(_caller: Caller = authenticated) -> dict[str, Any]:
        return {"model_list": list(ctx.settings.controlnets)}

    @routes.get("/module_list", summary="A1111 ControlNet: the preprocessors offered")
    def module_list(_caller: Caller = authenticated) -> dict[str, Any]:
        return {"module_list": list(MODULES.values()), "module_detail": {}}

    @routes.get("/version", summary="A1111 ControlNet: the extension API's version answered")
    def version(_caller: Caller = authenticated) -> dict[str, Any]:
        return {"version": 2}

    @routes.post("/detect", summary="A1111 ControlNet: a preprocessor's map of pictures")
    async def detect(body: dict[str, Any], http: Request,
                     caller: Caller = authenticated) -> dict[str, Any]:  # fmt: skip
        images = body.get("controlnet_input_images") or []
        if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
            raise sources.invalid("controlnet_input_images", "a list of base64 pictures")

        def sent(field: str) -> str:
            """A native unit's field by the name detect's body gives it."""
            return f"controlnet_{a1111_controlnet.SENT_AS.get(field, field)}"

        settings = native(lambda: {
            "model": "detect",
            "preprocess": a1111_controlnet.preprocessor(body.get(sent("preprocess"), "none"),
                                                        sent("preprocess")),
            "low_threshold": a1111_controlnet.threshold(body.get(sent("low_threshold")), 100,
                                                        sent("low_threshold")),
            "high_threshold": a1111_controlnet.threshold(body.get(sent("high_threshold")), 200,
                                                         sent("high_threshold")),
        })  # fmt: skip
        resolution = body.get(sent("processor_res"), -1)
        settings["processor_res"] = None if resolution in (-1, None) else resolution
        try:
            unit = ControlNetSettings.model_validate(settings, strict=False)
        except ValidationError as e:
            first = e.errors()[0]
            # A check across fields has no field of its own; the only one detect can fail is
            # the thresholds' order, named by the upper one, as the body names both.
            if first["loc"]:
                raise sources.invalid(sent(str(first["loc"][0])), first["msg"]) from None
            message = a1111_controlnet.in_sent_names(first["msg"], "controlnet_")
            raise sources.invalid(sent("high_threshold"), message) from None

        def detected() -> list[str]:
            out = []
            for k, text in enumerate(images):
                field = f"controlnet_input_images.{k}"
                picture = flatten(read_image(field, from_base64(field, text)).image)
                made = preprocessed(at_processor_res(picture, unit), unit)
                out.append(base64.b64encode(to_png(made)).decode())
            return out

        try:
            made = await sources.decoded(ctx, submit, http, caller, None, detected)
        except UploadError as e:
            raise sources.as_http_error(e) from None
        return {"images": made, "info": "Success"}

    return routes
