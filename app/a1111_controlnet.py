"""The A1111 ControlNet extension's API shape (issue 24, 2), mapped onto native ControlNet units:
`alwayson_scripts.controlnet.args` (Forge's `ControlNet` key too), unit by unit. A unit at its
defaults but `enabled: false` is skipped; a field sdserve cannot honour is a 422 naming it
(`alwayson_scripts.controlnet.args.K.field`), never dropped in silence."""

from __future__ import annotations

import contextlib
import math
import re
from typing import Any

from app.a1111 import A1111Error, shown
from app.controls import MODULES

KEYS = ("controlnet", "ControlNet")  # A1111's extension, Forge's built-in
RESIZE = {0: "resize", 1: "crop", 2: "fill", "Just Resize": "resize",
          "Crop and Resize": "crop", "Resize and Fill": "fill"}  # fmt: skip
MODES = {0: "balanced", 1: "prompt", 2: "control", "Balanced": "balanced",
         "My prompt is more important": "prompt",
         "ControlNet is more important": "control"}  # fmt: skip
# The extension's module names (and their older aliases) to sdserve's preprocessors.
PREPROCESSORS = {"none": "none", "None": "none", "canny": "canny", "invert": "invert",
                 "invert (from white bg & black line)": "invert"}  # fmt: skip
KNOWN = {"enabled", "module", "model", "weight", "image", "input_image", "resize_mode",
         "processor_res", "threshold_a", "threshold_b", "guidance_start", "guidance_end",
         "control_mode", "pixel_perfect", "guess_mode", "mask"}  # fmt: skip
# Fields that change nothing here (memory and UI settings), or whose only honoured value is
# their default.
IGNORED = {"lowvram", "low_vram", "is_ui", "save_detected_map", "advanced_weighting",
           "hr_option", "input_mode", "batch_images", "output_dir", "loopback",
           "inpaint_crop_input_image", "effective_region_mask", "ipadapter_input",
           "animatediff_batch", "batch_modifiers", "batch_image_files", "batch_keyframe_idx",
           "pulid_mode", "union_control_type", "mask_image", "use_preview_as_input"}  # fmt: skip
DEFAULTS: dict[str, tuple[Any, ...]] = {
    "hr_option": ("Both", 0, None), "input_mode": ("simple", 0, None),
    "advanced_weighting": (None,), "inpaint_crop_input_image": (False, True, None),
    "loopback": (False, None), "mask_image": (None,), "effective_region_mask": (None,),
    "union_control_type": ("Unknown", None), "ipadapter_input": (None,),
    "use_preview_as_input": (False, None), "batch_images": ("", None, []),
}  # fmt: skip
HASH = re.compile(r"\s*\[[0-9a-fA-F]{6,}\]$")  # the extension's " [d14c016b]" after a name
# A native unit's fields by the extension's names: a native unit's error names the field sent.
SENT_AS = {"start": "guidance_start", "end": "guidance_end", "mode": "control_mode",
           "resize": "resize_mode", "preprocess": "module", "low_threshold": "threshold_a",
           "high_threshold": "threshold_b"}  # fmt: skip
SENT_NAMES = re.compile(r"\b(" + "|".join(SENT_AS) + r")\b")


def in_sent_names(message: str, prefix: str = "") -> str:
    """A native unit's check across its fields ("end (0.2) must come after start (0.8)") in
    the names the extension sent (`guidance_end`, `guidance_start`; detect's body puts
    `controlnet_` before each)."""
    return SENT_NAMES.sub(lambda m: prefix + SENT_AS[m.group(1)], message)


# The extension's bools as its pydantic model reads them (strings in any case).
TRUE, FALSE = {"1", "on", "t", "true", "y", "yes"}, {"0", "off", "f", "false", "n", "no"}


def units(
    alwayson: dict[str, Any], controlnets: list[str], source: str | None = None
) -> tuple[list[tuple[str, dict[str, Any]]], bool]:
    """The native units (each with its picture as base64), each with where it was in the
    payload, of a payload's `alwayson_scripts`; and whether it had any other script. A unit
    without a picture takes `source` (img2img's picture, as the extension gives it one)."""
    key = next((k for k in KEYS if k in alwayson), None)
    others = any(k not in KEYS for k in alwayson)
    if key is None:
        return [], others
    script = alwayson[key]
    args = script.get("args") if isinstance(script, dict) else script
    if not isinstance(args, list):
        raise A1111Error(f"alwayson_scripts.{key}.args", "must be a list of units")
    out = []
    for k, unit in enumerate(args):
        where = f"alwayson_scripts.{key}.args.{k}"
        if not isinstance(unit, dict):
            raise A1111Error(where, "must be an object")
        if not flag(unit.get("enabled"), True, f"{where}.enabled"):
            continue
        out.append((where, native(unit, where, controlnets, source)))
    return out, others


def native(
    unit: dict[str, Any], where: str, controlnets: list[str], source: str | None = None
) -> dict[str, Any]:
    """One extension unit as a native unit (a null field: its default, as the extension's
    model reads it); without a picture of its own, `source`'s (img2img's)."""
    unit = {field: value for field, value in unit.items()
            if value is not None or field not in KNOWN | IGNORED}  # fmt: skip
    for field, value in unit.items():
        if field in KNOWN:
            continue
        if field not in IGNORED:
            raise A1111Error(f"{where}.{field}", "sdserve does not know this field")
        if field in DEFAULTS and value not in DEFAULTS[field]:
            raise A1111Error(f"{where}.{field}", f"sdserve cannot honour {shown(value)}")
    model = HASH.sub("", str(unit.get("model") or ""))
    if model not in controlnets:
        served = ", ".join(controlnets) or "none"
        raise A1111Error(f"{where}.model", f"unknown ControlNet {shown(unit.get('model'))};"
                         f" this server's: {served} (/controlnet/model_list)")  # fmt: skip
    preprocess = preprocessor(unit.get("module") or "none", f"{where}.module")
    if unit.get("mask") not in (None, ""):
        raise A1111Error(f"{where}.mask", "a unit's mask is not offered")
    picture = unit.get("image", unit.get("input_image"))
    if isinstance(picture, dict):  # the extension's {"image": ..., "mask": ...}
        if picture.get("mask") not in (None, ""):
            raise A1111Error(f"{where}.image.mask", "a unit's mask is not offered")
        picture = picture.get("image")
    if picture in (None, "") and source:
        picture = source
    if not isinstance(picture, str) or not picture:
        raise A1111Error(f"{where}.image", "a unit needs its picture (base64; in img2img it"
                         " takes the init image's when it has none)")  # fmt: skip
    resize = unit.get("resize_mode", 1)
    mode = unit.get("control_mode", 2 if unit.get("guess_mode") else 0)
    for field, value, table in (("resize_mode", resize, RESIZE), ("control_mode", mode, MODES)):
        if not isinstance(value, int | str) or value not in table:
            names = ", ".join(repr(k) for k in table)
            raise A1111Error(f"{where}.{field}", f"{shown(value)}: one of {names}")
    fields = {"model": model, "image": picture, "weight": unit.get("weight", 1.0),
              "start": unit.get("guidance_start", 0.0), "end": unit.get("guidance_end", 1.0),
              "mode": MODES[mode], "resize": RESIZE[resize], "preprocess": preprocess}  # fmt: skip
    if preprocess == "canny":
        fields["low_threshold"] = threshold(unit.get("threshold_a"), 100, f"{where}.threshold_a")
        fields["high_threshold"] = threshold(unit.get("threshold_b"), 200, f"{where}.threshold_b")
    # The preprocessor runs at the job's size here: the extension's pixel-perfect resolution.
    # Another processor_res (with a preprocessor) would detect at another scale.
    resolution = unit.get("processor_res", -1)
    perfect = flag(unit.get("pixel_perfect"), False, f"{where}.pixel_perfect")
    if preprocess != "none" and not perfect and resolution not in (-1, None):
        fields["processor_res"] = resolution
    return fields


def preprocessor(module: Any, field: str) -> str:
    """sdserve's preprocessor for the extension's module name."""
    if not isinstance(module, str) or module not in PREPROCESSORS:
        raise A1111Error(field, f"{shown(module)} is not offered; these are:"
                         f" {', '.join(MODULES.values())} (/controlnet/module_list)")  # fmt: skip
    return PREPROCESSORS[module]


def threshold(value: Any, default: int, field: str) -> int:
    """A canny threshold as the extension sends it: a number (or one written out), or -1 (or
    none) for the module's own default."""
    if value in (-1, None):
        return default
    number = value
    if isinstance(value, str):  # "50", as the extension's model reads it
        with contextlib.suppress(ValueError):
            number = float(value)
    if isinstance(number, bool) or not isinstance(number, int | float) or not math.isfinite(number):
        raise A1111Error(field, f"{shown(value)}: a threshold is a number (-1: the default)")
    return round(number)


def flag(value: Any, default: bool, field: str) -> bool:
    """One of the extension's bools (its model reads "false", 0 and the like as False);
    absent or null: its default."""
    if value is None:
        return default
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE | FALSE:
        return value.strip().lower() in TRUE
    raise A1111Error(field, f"{shown(value)}: true or false")
