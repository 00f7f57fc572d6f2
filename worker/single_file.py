"""Single-file checkpoints (issue 23, 7): the one `.safetensors` file of the original layout
that A1111 and civitai users hold, served as a diffusers folder.

diffusers' single-file loader reads the weights (offline: the configuration comes from a
diffusers folder of the same kind given beside the file, `;config=`, whose weights are not
needed); the family and variant are read from the weights (diffusers' own detection: SD 1.x,
SD 2.x, inpainting, SDXL base or refiner) and logged, with what the UNet predicts (the
configuration's scheduler says, unless the file carries the `v_pred` key). The pipeline is
written once as a diffusers folder in the cache, under the file's digest of name, size and
time, so a restart loads it as any folder (seconds) and every part of the worker reads one
layout.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from app.jobs.settings import cache_dir

log = logging.getLogger("sdserve.models")

# diffusers' names for what a checkpoint holds -> the pipeline that reads it (said in the log).
PIPELINES = {
    "v1": "StableDiffusionPipeline",
    "v2": "StableDiffusionPipeline",
    "inpainting": "StableDiffusionInpaintPipeline",
    "inpainting_v2": "StableDiffusionInpaintPipeline",
    "xl_base": "StableDiffusionXLPipeline",
    "xl_inpaint": "StableDiffusionXLInpaintPipeline",
    "xl_refiner": "StableDiffusionXLImg2ImgPipeline",
}


# The key that v-prediction checkpoints carry (SD 2.x 768-v merges, v-pred SDXL finetunes): the
# convention ComfyUI and reForge read. Without it the configuration folder's scheduler says.
V_PRED_KEY = "v_pred"


def detected(path: Path) -> tuple[str, bool]:
    """What the checkpoint holds, as diffusers detects it from its weights' names and shapes
    (read from the header only), and whether it says it predicts v."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    shapes: dict[str, Any] = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (not a dict)
            shapes[key] = torch.empty(f.get_slice(key).get_shape(), device="meta")
    kind: str = infer_diffusers_model_type(shapes)
    return kind, V_PRED_KEY in shapes


def as_folder(checkpoint: str, config: str) -> str:
    """The checkpoint as a diffusers folder (converted on first use, then from the cache)."""
    path = Path(checkpoint).expanduser()
    stat = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}\n{stat.st_size}\n{stat.st_mtime_ns}\n{config}"
                            .encode()).hexdigest()[:16]  # fmt: skip
    target = cache_dir() / "models" / "single-file" / f"{path.stem}-{digest}"
    kind, v_pred = detected(path)
    if (target / "model_index.json").is_file():
        log.info("checkpoint %s (%s): converted already, %s", path.name, kind, target)
        return str(target)
    import diffusers

    # The configuration says which pipeline reads it; the weights say what they are: a
    # mismatch (an SDXL file given SD's configuration) is said before diffusers fails on it.
    pipeline_name = str(json.loads((Path(config) / "model_index.json").read_text())["_class_name"])
    if PIPELINES.get(kind, pipeline_name) != pipeline_name:
        log.warning("checkpoint %s: its weights look like %s (%s), its configuration is a %s",
                    path.name, kind, PIPELINES[kind], pipeline_name)  # fmt: skip
    started = time.perf_counter()
    kind_of = getattr(diffusers, pipeline_name)
    options = {"safety_checker": None} if "XL" not in pipeline_name else {}
    pipeline = kind_of.from_single_file(str(path), config=config, local_files_only=True,
                                        **options)  # fmt: skip
    prediction = pipeline.scheduler.config.get("prediction_type", "epsilon")
    if v_pred and prediction != "v_prediction":
        log.info("checkpoint %s: v-prediction (its %r key), not the configuration's %s",
                 path.name, V_PRED_KEY, prediction)  # fmt: skip
        pipeline.scheduler.register_to_config(prediction_type="v_prediction")
        prediction = "v_prediction"
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written aside, then renamed: a crash or a second worker never sees half a folder.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        pipeline.save_pretrained(str(Path(tmp) / "model"))
        with contextlib.suppress(OSError):  # another worker won the race: use its folder
            (Path(tmp) / "model").rename(target)
    log.info("checkpoint %s: %s (detected from its weights), %s, converted in %.1fs to %s",
             path.name, kind, prediction, time.perf_counter() - started, target)  # fmt: skip
    return str(target)
