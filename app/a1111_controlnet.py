"""The A1111 ControlNet extension's API shape (issue 24, 2), mapped onto native ControlNet units:
`alwayson_scripts.controlnet.args` (Forge's `ControlNet` key too), unit by unit. A unit at its
defaults but `enabled: false` is skipped; a field sdserve cannot honour is a 422 naming it
(`alwayson_scripts.controlnet.args.K.field`), never dropped in silence."""

from __future__ import annotations

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


def units(
    alwayson: dict[str, Any], controlnets: list[str]
) -> tuple[list[tuple[str, dict[str, Any]]], bool]:
    """The native units (each with its picture as base64), each with where it was in the
    payload, of a payload's `alwayson_scripts`; and whether it had any other script."""
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
        if unit.get("enabled", True) is False:
            continue
        out.append((where, native(unit, where, controlnets)))
    return out, others


def native(unit: dict[str, Any], where: str, controlnets: list[str]) -> dict[str, Any]:
    """One extension unit as a native unit."""
    for field, value in unit.items():
        known = {"enabled", "module", "model", "weight", "image", "input_image", "resize_mode",
                 "processor_res", "threshold_a", "threshold_b", "guidance_start",
                 "guidance_end", "control_mode", "pixel_perfect", "guess_mode",
                 "mask"}  # fmt: skip
        if field in known:
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
    module = unit.get("module") or "none"
    if module not in PREPROCESSORS:
        raise A1111Error(f"{where}.module", f"{shown(module)} is not offered; these are:"
                         f" {', '.join(MODULES.values())} (/controlnet/module_list)")  # fmt: skip
    if unit.get("mask") not in (None, ""):
        raise A1111Error(f"{where}.mask", "a unit's mask is not offered")
    picture = unit.get("image", unit.get("input_image"))
    if isinstance(picture, dict):  # the extension's {"image": ..., "mask": ...}
        if picture.get("mask") not in (None, ""):
            raise A1111Error(f"{where}.image.mask", "a unit's mask is not offered")
        picture = picture.get("image")
    if not isinstance(picture, str) or not picture:
        raise A1111Error(f"{where}.image", "a unit needs its picture (base64)")
    resize = unit.get("resize_mode", 1)
    mode = unit.get("control_mode", 2 if unit.get("guess_mode") else 0)
    for field, value, table in (("resize_mode", resize, RESIZE), ("control_mode", mode, MODES)):
        if value not in table:
            names = ", ".join(repr(k) for k in table)
            raise A1111Error(f"{where}.{field}", f"{shown(value)}: one of {names}")
    preprocess = PREPROCESSORS[module]
    fields = {"model": model, "image": picture, "weight": unit.get("weight", 1.0),
              "start": unit.get("guidance_start", 0.0), "end": unit.get("guidance_end", 1.0),
              "mode": MODES[mode], "resize": RESIZE[resize], "preprocess": preprocess}  # fmt: skip
    low, high = unit.get("threshold_a", -1), unit.get("threshold_b", -1)
    if preprocess == "canny":  # the extension's -1 (or absent): the module's own defaults
        fields["low_threshold"] = 100 if low in (-1, None) else round(low)
        fields["high_threshold"] = 200 if high in (-1, None) else round(high)
    # The preprocessor runs at the job's size here: the extension's pixel-perfect resolution.
    # Another processor_res (with a preprocessor) would detect at another scale.
    resolution = unit.get("processor_res", -1)
    if preprocess != "none" and not unit.get("pixel_perfect") and resolution not in (-1, None):
        fields["processor_res"] = resolution
    return fields
