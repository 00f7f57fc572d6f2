"""PNG encoding with A1111's `parameters` text chunk, so other tools read how it was made; and
the JPEG of a job's live preview."""

from __future__ import annotations

import io
from typing import NamedTuple

import numpy as np
from PIL import Image

from app.jobs.contract import ControlNetUnit, JobRequest, Lora
from worker import png
from worker.schedulers import SAMPLERS
from worker.tasks import task


class Provenance(NamedTuple):
    """What the infotext names of a job's weights: the model's file, the short hash of each
    LoRA and embedding it used."""

    model: str
    lora_hashes: dict[str, str]
    ti_hashes: dict[str, str]


def parameters(
    request: JobRequest,
    seed: int,
    model: str,
    lora_hashes: dict[str, str] | None = None,
    ti_hashes: dict[str, str] | None = None,
) -> str:
    """A1111's infotext: prompt, optional negative line, then comma-separated settings. The
    job's LoRAs are in the prompt as A1111's tags (a request's `loras`, or the tags its prompt
    had on A1111's routes), and their hashes as A1111 writes them."""
    tags = [lora_tag(lora) for lora in request.loras]
    words = [request.prompt, *[t for t in tags if t not in request.prompt]]
    lines = [" ".join(w for w in words if w)]  # a prompt of tags only: no leading space
    if request.negative_prompt:
        lines.append(f"Negative prompt: {request.negative_prompt}")
    settings = {
        "Steps": request.steps,
        "Sampler": SAMPLERS[request.scheduler].a1111_name,
        "CFG scale": request.guidance_scale,
        "Seed": seed,
        "Size": f"{request.width}x{request.height}",
        "Model": model,
    }
    if request.vae is not None:
        settings["VAE"] = request.vae
    if request.clip_skip > 1:  # A1111 writes it when it is not the default
        settings["Clip skip"] = request.clip_skip
    settings |= task(request).words(request)  # its task's words, as A1111 writes them
    for k, unit in enumerate(getattr(request, "controlnets", [])):
        settings[f"ControlNet {k}"] = control_words(unit)
    refiner = getattr(request, "refiner", None)
    if refiner is not None:
        settings |= {"Refiner": refiner.model, "Refiner switch at": refiner.switch_at}
    for key, hashes in (("Lora hashes", lora_hashes), ("TI hashes", ti_hashes)):
        if hashes:  # as A1111 writes them: quoted, one list
            listed = ", ".join(f"{name}: {digest}" for name, digest in hashes.items())
            settings[key] = f'"{listed}"'
    lines.append(", ".join(f"{k}: {v}" for k, v in settings.items()))
    return "\n".join(lines)


# A1111's names of the control modes and resize modes.
CONTROL_MODES = {"balanced": "Balanced", "prompt": "My prompt is more important",
                 "control": "ControlNet is more important"}  # fmt: skip
RESIZE_MODES = {"resize": "Just Resize", "crop": "Crop and Resize", "fill": "Resize and Fill"}


def control_words(unit: ControlNetUnit) -> str:
    """A ControlNet unit as A1111's infotext gives it: quoted, its settings comma-separated."""
    words = {"Module": unit.preprocess, "Model": unit.model, "Weight": unit.weight,
             "Resize Mode": RESIZE_MODES[unit.resize]}  # fmt: skip
    if unit.preprocess == "canny":
        words |= {"Threshold A": float(unit.low_threshold),
                  "Threshold B": float(unit.high_threshold)}  # fmt: skip
    words |= {"Guidance Start": unit.start, "Guidance End": unit.end,
              "Control Mode": CONTROL_MODES[unit.mode]}  # fmt: skip
    return '"' + ", ".join(f"{k}: {v}" for k, v in words.items()) + '"'


def lora_tag(lora: Lora) -> str:
    """A LoRA as A1111's prompts name it: `<lora:name:weight>`, `<lora:name:te:unet>`."""
    if lora.text_weight is None or lora.text_weight == lora.weight:
        return f"<lora:{lora.name}:{lora.weight:g}>"
    return f"<lora:{lora.name}:{lora.text_weight:g}:{lora.weight:g}>"


def encode_png(pixels: np.ndarray, text: str) -> bytes:
    """HxWx3 uint8 to PNG bytes with the infotext as its `parameters` (worker/png.py: faster
    than Pillow's fastest, the same size)."""
    return png.encode(pixels, {"parameters": text})


PREVIEW_QUALITY = 85


def encode_preview(pictures: list[np.ndarray]) -> bytes:
    """A job's previews (HxWx3 uint8 each) side by side, as one JPEG."""
    strip = np.concatenate(pictures, axis=1)
    out = io.BytesIO()
    Image.fromarray(strip).save(out, format="JPEG", quality=PREVIEW_QUALITY)
    return out.getvalue()
