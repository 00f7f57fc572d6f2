"""AUTOMATIC1111's web API shape (`/sdapi/v1/...`), mapped onto sdserve jobs.

A1111's clients (the `webuiapi` package, chat front ends, bots) send its whole payload, most of
it at defaults. Fields at A1111's defaults are accepted; a field sdserve means to honour is
mapped; a value it cannot honour (face restoration, an ESRGAN upscaler, scripts, a subseed,
another model...) is a 422 naming the field, never dropped in silence. The mapping, field by
field, is in docs/api.md.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.jobs.contract import (
    COUNT_MAX,
    SEED_MAX,
    SIDE_MAX,
    SIDE_MIN,
    JobView,
    SourceResize,
    Txt2ImgRequest,
)

# A1111's sampler names (and the older names with the schedule in them) to sdserve's schedulers.
# With `scheduler: "Karras"`, DPM++ 2M (and its SDE form) is its Karras variant; other samplers
# take only the automatic schedule. worker/schedulers.py writes the same names into the PNGs'
# infotext.
SAMPLERS = {
    "DPM++ 2M": "dpmpp_2m",
    "DPM++ 2M Karras": "dpmpp_2m_karras",
    "DPM++ 2M SDE": "dpmpp_2m_sde",
    "DPM++ 2M SDE Karras": "dpmpp_2m_sde_karras",
    "Euler a": "euler_a",
    "Euler": "euler",
    "DDIM": "ddim",
    "LMS": "lms",
    "PLMS": "pndm",
    "UniPC": "unipc",
    "LCM": "lcm",
}
# A1111's img2img resize modes: just resize, crop and resize, resize and fill.
RESIZE_MODES: dict[int, SourceResize] = {0: "resize", 1: "crop", 2: "fill"}
# A sampler named with A1111's Karras schedule: its Karras variant.
KARRAS = {"DPM++ 2M": "DPM++ 2M Karras", "DPM++ 2M SDE": "DPM++ 2M SDE Karras"}
KARRAS |= {variant: variant for variant in KARRAS.values()}
ALIASES = {
    "k_dpmpp_2m": "DPM++ 2M",
    "k_dpmpp_2m_ka": "DPM++ 2M Karras",
    "k_dpmpp_2m_sde": "DPM++ 2M SDE",
    "k_dpmpp_2m_sde_ka": "DPM++ 2M SDE Karras",
    "k_euler_a": "Euler a",
    "k_euler": "Euler",
    "ddim": "DDIM",
    "k_lms": "LMS",
    "plms": "PLMS",
    "unipc": "UniPC",
    "lcm": "LCM",
}
SCHEDULES = {"automatic": "Automatic", "karras": "Karras"}
# The hires fix's upscalers: A1111's "Latent" enlarges the latents, "Lanczos" the decoded
# picture; its others (ESRGAN and kin) are not offered.
HIRES_UPSCALERS = {"Latent": "latent", "Lanczos": "pixel"}
# A1111 settings whose value here never changes (`GET /sdapi/v1/options` answers them): an
# `override_settings` entry that asks for that value is honoured as it is.
FIXED_OPTIONS: dict[str, Any] = {"samples_format": "png", "sd_checkpoint_hash": None,
                                 "eta_ancestral": 1.0, "eta_ddim": 0.0,
                                 "eta_noise_seed_delta": 0, "enable_pnginfo": True}  # fmt: skip


# The A1111 field each native field is read from: a refusal of the native request names what
# the client sent (`hr_scale`, not `hires.scale`). Paths as pydantic locates them.
SENT_AS: dict[tuple[str, ...], tuple[str | int, ...]] = {
    ("guidance_scale",): ("cfg_scale",),
    ("n",): ("batch_size",),
    ("scheduler",): ("sampler_name",),
    ("strength",): ("denoising_strength",),
    ("hires", "scale"): ("hr_scale",),
    ("hires", "steps"): ("hr_second_pass_steps",),
    ("hires", "strength"): ("denoising_strength",),
    ("hires", "method"): ("hr_upscaler",),
    ("clip_skip",): ("override_settings", "CLIP_stop_at_last_layers"),
    ("model",): ("override_settings", "sd_model_checkpoint"),
    ("vae",): ("override_settings", "sd_vae"),
    ("refiner", "model"): ("refiner_checkpoint",),
    ("refiner", "switch_at"): ("refiner_switch_at",),
    ("image",): ("init_images", 0),
    ("mask_crop",): ("inpaint_full_res_padding",),
    ("masked_content",): ("inpainting_fill",),
}


# Native fields an A1111 payload gives only inside a text: its LoRAs are the prompt's
# `<lora:name:weight>` tags, so a refused LoRA is the prompt's (no index into a list it lacks).
IN_TEXT: dict[tuple[str, ...], tuple[str, ...]] = {("loras",): ("prompt",)}


def sent_as(path: tuple[str | int, ...]) -> tuple[str | int, ...]:
    """A native field's path as the A1111 field it came from (others as they are)."""
    for native, text in IN_TEXT.items():
        if path[: len(native)] == native:
            return text
    for native in sorted(SENT_AS, key=len, reverse=True):
        if path[: len(native)] == native:
            return SENT_AS[native] + path[len(native) :]
    return path


class A1111Error(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class Txt2ImgPayload(BaseModel):
    """A1111's `StableDiffusionProcessingTxt2Img` API model: every field its clients send."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    distilled_cfg_scale: float | None = None
    # Bounded here, not only by the job's own model: a ControlNet's picture (and img2img's) is
    # resized to this size before that model reads it (2**40 was Pillow's OverflowError, a 500).
    width: int = Field(512, ge=SIDE_MIN, le=SIDE_MAX)
    height: int = Field(512, ge=SIDE_MIN, le=SIDE_MAX)
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    denoising_strength: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    firstpass_image: str | None = None
    comments: dict[str, Any] | None = None
    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    force_task_id: str | None = None
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    infotext: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        """A1111's API models make every field optional: a client's null is the field's default
        (`"negative_prompt": null` is the empty negative prompt). An unknown field stays, null
        or not, to be refused."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields}
        return data

    def refusals(self) -> dict[str, bool]:
        """Fields set to what sdserve cannot honour."""
        return {
            "restore_faces": bool(self.restore_faces),
            "tiling": bool(self.tiling),
            "hr_resize_x": self.enable_hr and self.hr_resize_x != 0,
            "hr_resize_y": self.enable_hr and self.hr_resize_y != 0,
            "hr_checkpoint_name": self.enable_hr
            and self.hr_checkpoint_name not in (None, "", "Use same checkpoint"),
            "hr_sampler_name": self.enable_hr
            and self.hr_sampler_name not in (None, "", "Use same sampler"),
            "hr_prompt": self.enable_hr and self.hr_prompt not in ("", self.prompt),
            "hr_negative_prompt": self.enable_hr
            and self.hr_negative_prompt not in ("", self.negative_prompt),
            "styles": bool(self.styles),
            "subseed_strength": self.subseed_strength != 0,
            "seed_resize_from_w": self.seed_resize_from_w not in (-1, 0),
            "seed_resize_from_h": self.seed_resize_from_h not in (-1, 0),
            "batch_size": self.batch_size < 1,
            "n_iter": self.n_iter < 1,
            "hr_scheduler": self.enable_hr
            and self.hr_scheduler not in (None, "", "Use same scheduler"),
            # A1111's own "no script" is the empty name.
            "script_name": self.script_name not in (None, ""),
            "script_args": bool(self.script_args),
            # ControlNet's units are read apart (app/a1111_controlnet.py); nothing else is run.
            "alwayson_scripts": any(
                k not in ("controlnet", "ControlNet") for k in self.alwayson_scripts
            ),
            "firstpass_image": self.firstpass_image is not None,
            "s_churn": self.s_churn not in (None, 0),
            "s_noise": self.s_noise not in (None, 1),
            # Skipping the unconditional row below a sigma changes the picture (A1111's
            # default, 0, skips nothing). s_tmin and s_tmax act only with s_churn.
            "s_min_uncond": self.s_min_uncond not in (None, 0),
            "distilled_cfg_scale": self.distilled_cfg_scale not in (None, 3.5),
            # A1111 fills the fields a request leaves unset from the infotext's settings:
            # ignored, the picture would be another than A1111's.
            "infotext": bool(self.infotext and self.infotext.strip()),
        }

    def scheduler_name(self) -> str:
        """sdserve's scheduler for A1111's sampler and schedule names (422 otherwise)."""
        name = self.sampler_name or self.sampler_index or "Euler a"
        name = ALIASES.get(name, name)
        if name not in SAMPLERS:
            raise A1111Error("sampler_name", f"unknown sampler {name!r}; see /sdapi/v1/samplers")
        schedule = (self.scheduler or "automatic").lower()
        if schedule not in SCHEDULES:
            raise A1111Error("scheduler", f"unknown schedule {self.scheduler!r}; see "
                             "/sdapi/v1/schedulers")  # fmt: skip
        if schedule == "karras":
            if name not in KARRAS:
                raise A1111Error("scheduler", f"Karras is offered with {' and '.join(KARRAS)},"
                                 f" not {name}")  # fmt: skip
            name = KARRAS[name]
        return SAMPLERS[name]

    def job_fields(
        self, models: list[str], vaes: Sequence[str] = (), defaults: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The native request's fields (validated by its model afterwards); `models`: the
        names served, the default first; `vaes`: the VAEs a request may choose; `defaults`: the
        caller's settings (`POST /sdapi/v1/options`), which `override_settings` override."""
        for field, refused in self.refusals().items():
            if refused:
                why = f": {WHY[field]}" if field in WHY else ""
                raise A1111Error(field, f"sdserve cannot honour {shown(getattr(self, field))}{why}")
        chosen = read_settings(defaults or {}, models, vaes, "options.") | read_settings(
            self.override_settings or {}, models, vaes, "override_settings."
        )
        images = self.batch_size * self.n_iter
        # Over by n_iter: named so (else the native `n`'s refusal names batch_size).
        if self.n_iter > 1 and self.batch_size <= COUNT_MAX < images:
            raise A1111Error("n_iter", f"batch_size x n_iter makes {images} images; a request"
                             f" makes at most {COUNT_MAX}")  # fmt: skip
        model, vae = chosen.get("model") or models[0], chosen.get("vae")
        clip_skip = chosen.get("clip_skip", 1)
        scheduler = self.scheduler_name()
        if self.eta not in (None, 0, 1):
            raise A1111Error("eta", "only the samplers' own noise is offered (eta 0 or 1)")
        seed = None if self.seed == -1 else self.seed % (SEED_MAX + 1)
        fields = {
            "prompt": self.prompt, "negative_prompt": self.negative_prompt,
            "prompt_syntax": "a1111",
            "width": self.width, "height": self.height, "steps": self.steps,
            "guidance_scale": self.cfg_scale, "scheduler": scheduler, "seed": seed,
            "n": self.batch_size * self.n_iter, "model": model, "clip_skip": clip_skip,
            "vae": vae,
        }  # fmt: skip
        if self.enable_hr:
            fields["hires"] = self.hires()
        if self.refiner_checkpoint not in (None, "", "None"):
            fields["refiner"] = self.refiner(models)
        return fields

    def refiner(self, models: list[str]) -> dict[str, Any]:
        """The refiner's fields: a model served here (by its name, which is its title in
        `/sdapi/v1/sd-models`), switching where diffusers' ensemble does (a share of the noise
        schedule, 0.8 when absent)."""
        if self.refiner_checkpoint not in models:
            raise A1111Error("refiner_checkpoint", f"unknown model {shown(self.refiner_checkpoint)}"
                             f"; it serves {', '.join(models)}")  # fmt: skip
        switch = 0.8 if self.refiner_switch_at is None else self.refiner_switch_at
        if not 0 < switch < 1:
            raise A1111Error("refiner_switch_at", f"{switch!r}: between 0 and 1, both excluded")
        return {"model": self.refiner_checkpoint, "switch_at": switch}

    def hires(self) -> dict[str, Any]:
        """The hires fix's fields (its upscaler one of HIRES_UPSCALERS)."""
        upscaler = self.hr_upscaler or "Latent"
        methods = HIRES_UPSCALERS
        if upscaler not in methods:
            raise A1111Error("hr_upscaler", f"sdserve offers {' and '.join(methods)}, not "
                             f"{upscaler!r}")  # fmt: skip
        strength = 0.7 if self.denoising_strength is None else self.denoising_strength
        return {"scale": self.hr_scale, "steps": self.hr_second_pass_steps or None,
                "strength": strength, "method": methods[upscaler]}  # fmt: skip


class Img2ImgPayload(Txt2ImgPayload):
    """A1111's img2img API model: the txt2img fields and the picture's."""

    init_images: list[str] = Field(default_factory=list)
    # 0: the picture's own size, fitted (`sources.fit`).
    width: int = Field(512, ge=0, le=SIDE_MAX)
    height: int = Field(512, ge=0, le=SIDE_MAX)
    resize_mode: int = 0
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    # A1111's defaults: a mask's area alone is drawn (padding 0), filled before it is noised.
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = Field(0, ge=0, le=SIDE_MAX)
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False
    denoising_strength: float | None = 0.75

    def resizing(self) -> SourceResize:
        """The native `resize_mode` of A1111's."""
        return RESIZE_MODES[self.resize_mode]

    def inpainting(self) -> dict[str, Any]:
        """The native inpainting fields this payload's mask settings make."""
        return {"mask_blur": self.mask_blur if self.mask_blur is not None else self.mask_blur_x,
                "mask_crop": self.inpaint_full_res_padding if self.inpaint_full_res else None,
                "masked_content": "fill" if self.inpainting_fill == 0 else "original"}  # fmt: skip

    def refusals(self) -> dict[str, bool]:
        return super().refusals() | {
            "init_images": len(self.init_images) != 1,
            "enable_hr": self.enable_hr,  # A1111's img2img has no hires fix either
            "resize_mode": self.resize_mode not in RESIZE_MODES,
            # Under the mask the source is filled (0) or noised as it is (1); A1111's latent
            # noise and latent nothing change nothing only when everything is redrawn.
            "inpainting_fill": self.mask is not None and self.inpainting_fill not in (0, 1)
            and self.denoising_strength not in (None, 1),
            "inpainting_mask_invert": self.inpainting_mask_invert not in (0, 1),
            # One blur both ways: A1111's `mask_blur` sets x and y alike.
            "mask_blur_y": self.mask is not None and self.mask_blur is None
            and self.mask_blur_y != self.mask_blur_x,
            "latent_mask": self.latent_mask is not None,
            "initial_noise_multiplier": self.initial_noise_multiplier not in (None, 1),
            # A refiner finishes text-to-image and image-to-image jobs, not inpainting.
            "refiner_checkpoint": self.mask is not None
            and self.refiner_checkpoint not in (None, "", "None"),
        }  # fmt: skip


# Why a refusal whose reason is not plain from its field's name is one (said in its 422).
WHY = {
    "refiner_checkpoint": "a refiner finishes text-to-image and image-to-image jobs, not"
    " inpainting",
    "inpainting_fill": "under the mask the picture is filled (0) or noised as it is (1); A1111's"
    " latent noise and latent nothing only where it is redrawn whole (denoising_strength 1)",
    "inpainting_mask_invert": "0 repaints where the mask is white, 1 where it is black",
    "enable_hr": "img2img has no hires fix (A1111's has none either)",
    "resize_mode": "0 (just resize), 1 (crop and resize) or 2 (resize and fill); A1111's latent"
    " upscale (3) is not offered",
    "init_images": "one picture a request",
    "mask_blur_y": "the mask's edge is blurred alike across and down (mask_blur, or mask_blur_x"
    " equal to mask_blur_y)",
    "infotext": "its settings are not read into the request; send them as the request's fields"
    " (POST /sdapi/v1/png-info parses an infotext)",
}


def shown(value: Any) -> str:
    """A refused value as a message names it: short ones as they are, long ones (a picture's
    base64, a list of them) by what they are, never echoed whole."""
    text = repr(value)
    if len(text) <= 80:
        return text
    if isinstance(value, list | tuple | dict):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"a {type(value).__name__} of {len(text)} characters"


def info(view: JobView, model: str, infotexts: list[str]) -> str:
    """A1111's `info`: a JSON string describing what was made (by the job's own model, which
    the API writes into every request; `model` where an old record has none)."""
    r = view.request
    model = r.model or model
    strength = getattr(r, "strength", None)
    if isinstance(r, Txt2ImgRequest) and r.hires is not None:
        strength = r.hires.strength  # A1111's denoising strength of a hires fix's second pass
    stamp = (view.finished_at or datetime.now(UTC)).strftime("%Y%m%d%H%M%S")
    fields: dict[str, Any] = {
        "prompt": r.prompt, "all_prompts": [r.prompt] * len(view.seeds),
        "negative_prompt": r.negative_prompt,
        "all_negative_prompts": [r.negative_prompt] * len(view.seeds),
        "seed": view.seeds[0], "all_seeds": view.seeds, "subseed": -1,
        "all_subseeds": [-1] * len(view.seeds), "subseed_strength": 0,
        "width": r.width, "height": r.height, "sampler_name": sampler_label(r.scheduler),
        "cfg_scale": r.guidance_scale, "steps": r.steps, "batch_size": len(view.seeds),
        "restore_faces": False, "face_restoration_model": None, "sd_model_name": model,
        "sd_model_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": strength, "extra_generation_params": {},
        "index_of_first_image": 0, "infotexts": infotexts, "styles": [],
        "job_timestamp": stamp, "clip_skip": r.clip_skip, "is_using_inpainting_conditioning": False,
        "version": "sdserve",
    }  # fmt: skip
    return json.dumps(fields)


def sampler_label(scheduler: str) -> str:
    return next(label for label, name in SAMPLERS.items() if name == scheduler)


def progress(view: JobView | None, preview: bytes | None = None) -> dict[str, Any]:
    """A1111's `/sdapi/v1/progress` for the caller's latest job: `current_image` is its live
    preview (base64 JPEG), `eta_relative` its ETA in seconds."""
    state: dict[str, Any] = {
        "skipped": False, "interrupted": False, "job": "", "job_count": 0,
        "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0,
    }  # fmt: skip
    done = 0.0
    if view is not None:
        state["interrupted"] = view.status.value == "canceled"
        if view.status.value in ("queued", "running"):
            state |= {"job": view.id, "job_count": 1}
        if view.progress is not None:
            state |= {"sampling_step": view.progress.step, "sampling_steps": view.progress.steps}
            done = view.progress.step / max(view.progress.steps, 1)
        elif view.status.value == "succeeded":
            done = 1.0
    eta = view.eta_s if view is not None and view.eta_s is not None else 0.0
    image = base64.b64encode(preview).decode() if preview else None
    return {"progress": done if state["job_count"] else 0.0, "eta_relative": eta,
            "state": state, "current_image": image, "textinfo": None}  # fmt: skip


# The A1111 settings a caller may choose (`override_settings`, or `POST /sdapi/v1/options` for
# its later jobs), each as the native field it sets.
CHOSEN = {"sd_model_checkpoint": "model", "sd_vae": "vae", "CLIP_stop_at_last_layers": "clip_skip"}


def read_settings(
    settings: dict[str, Any], models: Sequence[str], vaes: Sequence[str], where: str
) -> dict[str, Any]:
    """A1111 settings as native fields (`model`, `vae`, `clip_skip`; absent where the setting
    asks for the default). Settings that never change here pass at their value (FIXED_OPTIONS);
    anything else is an A1111Error naming `where` + the setting, and what is honoured."""
    chosen: dict[str, Any] = {}
    for key, value in settings.items():
        if key == "sd_vae" and value in (*vaes, None, "", "Automatic", "None"):
            chosen["vae"] = value if value in vaes else None  # A1111's Automatic: the model's
            continue
        if key == "sd_model_checkpoint" and value in (*models, None, ""):
            chosen["model"] = value or None
            continue
        if key == "CLIP_stop_at_last_layers" and type(value) is int and 1 <= value <= 12:
            chosen["clip_skip"] = value
            continue
        if key in FIXED_OPTIONS and value == FIXED_OPTIONS[key]:
            continue
        named = ", ".join(vaes) or "none but each model's own"
        offered = {"sd_model_checkpoint": f"it serves {', '.join(models)}",
                   "sd_vae": f"its VAEs: {named}",
                   "CLIP_stop_at_last_layers": "a whole number from 1 to 12"}  # fmt: skip
        fixed = {k: v for k, v in FIXED_OPTIONS.items() if v is not None}
        choices = offered.get(key, f"it honours {', '.join(offered)}, and {fixed}")
        raise A1111Error(f"{where}{key}", f"sdserve cannot honour {shown(value)} ({choices})")
    return chosen


# One setting of an infotext's last line: `Name: value`, the value quoted where it holds commas
# (`Lora hashes: "a: 1, b: 2"`), as A1111 writes and reads them.
_SETTING = re.compile(r'\s*([\w][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"(\d+)x(\d+)")


def parse_infotext(text: str) -> dict[str, str]:
    """An infotext (the PNG `parameters` chunk) as A1111's png-info gives it: `Prompt`,
    `Negative prompt` where there is one, then each setting of the last line (quotes taken off;
    `Size` also as `Size-1` and `Size-2`)."""
    *lines, last = text.strip().split("\n")
    found = _SETTING.findall(last)
    if len(found) < 3:  # not a line of settings (as A1111 tells): the prompt's
        lines, found = [*lines, last], []
    settings: dict[str, str] = {}
    for name, value in found:
        if value.startswith('"') and value.endswith('"') and len(value) > 1:
            value = json.loads(value) if "\\" in value else value[1:-1]
        settings[name.strip()] = value.strip()
    prompt: list[str] = []
    negative: list[str] = []
    into_negative = False
    for line in lines:
        if line.startswith("Negative prompt:"):
            into_negative, line = True, line.removeprefix("Negative prompt:").strip()
        (negative if into_negative else prompt).append(line)
    parsed = {"Prompt": "\n".join(prompt)}
    if into_negative:
        parsed["Negative prompt"] = "\n".join(negative)
    size = _SIZE.fullmatch(settings.get("Size", ""))
    if size is not None:
        settings |= {"Size-1": size[1], "Size-2": size[2]}
    return parsed | settings
