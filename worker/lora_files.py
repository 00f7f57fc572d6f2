"""LoRA files as the worker holds them: each adapted layer's down and up weights, by the layer's
name in the model (issue 23).

The key layouts people's files come in (kohya/A1111 `lora_unet_...lora_down.weight` with an
`alpha`, SGM block names, diffusers' older `...processor.to_q_lora.down.weight`, diffusers/PEFT
`unet....lora_A.weight`) are read by diffusers' own converters, so a file means here what it
means to `load_lora_weights`. What is ours: each layer's scale (alpha / rank, as PEFT scales
it; 1 where a file gives no alpha) is folded into its up weights, so a row's LoRA weight is
the only factor left at serving time.

A file's header alone tells which layers it adapts and their shapes (`shapes`): the worker
checks a LoRA fits a model without reading its weights, and reads them only when a job needs
them.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

# Where each component's layers sit in a file, after diffusers' conversion.
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


class LoraUnreadable(ValueError):
    """A LoRA file that cannot be read as one (corrupt, another format, layers the model has
    not): its jobs fail with the reason, the worker goes on."""


@dataclass(frozen=True)
class Delta:
    """One layer's low-rank update: up @ down, the scale folded into `up`."""

    down: torch.Tensor  # (rank, in) for a Linear, (rank, in, 1, 1) for a 1x1 convolution
    up: torch.Tensor  # (out, rank) / (out, rank, 1, 1)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


# component -> the layer's name in that component -> its delta
Deltas = dict[str, dict[str, Delta]]


def lora_names(folder: Path | None) -> dict[str, Path]:
    """The LoRAs in a folder, by file name without `.safetensors`, sorted."""
    if folder is None or not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.glob("*.safetensors")) if p.is_file()}


def short_hash(path: Path) -> str:
    """A1111's short hash of a LoRA file (its `Lora hashes`): the first 12 hex digits of the
    SHA-256 of the file past its header (kohya's "addnet" hash: metadata edits keep it)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        header = int.from_bytes(f.read(8), "little")
        f.seek(8 + header)
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()[:12]


def shapes(path: Path) -> Deltas:
    """The file's deltas as meta tensors (shapes only): read from its header."""
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            for key in f.keys():  # noqa: SIM118 (not a dict)
                shape = f.get_slice(key).get_shape()
                tensors[key] = torch.empty(shape, device="meta")
    except Exception as e:
        raise LoraUnreadable(f"{path.name}: not a safetensors file ({e})") from e
    return _deltas(path.name, tensors, metadata, meta=True)


def read(path: Path) -> Deltas:
    """The file's deltas, on the CPU in float32."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key).float() for key in f.keys()}  # noqa: SIM118
    except Exception as e:
        raise LoraUnreadable(f"{path.name}: not a safetensors file ({e})") from e
    return _deltas(path.name, tensors, metadata, meta=False)


def _deltas(name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
            meta: bool) -> Deltas:  # fmt: skip
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils.state_dict_utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    tensors = _kohya_scaled(tensors, meta)
    try:
        # SDXL's loader reads every layout SD's does, and the second text encoder's keys too.
        state, _alphas = StableDiffusionXLPipeline.lora_state_dict(tensors)
    except Exception as e:
        raise LoraUnreadable(f"{name}: not a LoRA diffusers reads ({e})") from e
    config = _peft_config(metadata)
    out: Deltas = {}
    for component in COMPONENTS:
        part = {k.removeprefix(f"{component}."): v for k, v in state.items()
                if k.startswith(f"{component}.")}  # fmt: skip
        if not part:
            continue
        try:
            if component == "unet":
                part = convert_unet_state_dict_to_peft(part)
            else:
                part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
        except Exception as e:
            raise LoraUnreadable(f"{name}: its {component} layers: {e}") from e
        layers: dict[str, Delta] = {}
        for key, down in part.items():
            if not key.endswith(".lora_A.weight"):
                continue
            layer = key.removesuffix(".lora_A.weight").removeprefix("text_model.")
            up = part.get(key.replace(".lora_A.", ".lora_B."))
            if up is None:
                raise LoraUnreadable(f"{name}: {component}.{layer} has no up weights")
            scale = config.scale(f"{component}.{layer}", down.shape[0])
            layers[layer] = Delta(down, up if scale == 1 or meta else up * scale)
        unknown = [k for k in part if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
        if unknown:  # DoRA magnitudes, biases: not a plain LoRA
            raise LoraUnreadable(f"{name}: {component} has weights no plain LoRA has: {unknown[0]}")
        out[component] = layers
    if not out:
        raise LoraUnreadable(f"{name}: no LoRA layers for a UNet or text encoder")
    return out


def _kohya_scaled(tensors: dict[str, torch.Tensor], meta: bool) -> dict[str, torch.Tensor]:
    """A kohya/A1111 file's up weights times alpha / rank, its alphas gone: each layer's scale
    as PEFT applies it, whatever diffusers' conversion does with alphas afterwards."""
    alphas = {k.removesuffix(".alpha"): v for k, v in tensors.items() if k.endswith(".alpha")}
    if not alphas:
        return tensors
    out = {k: v for k, v in tensors.items() if not k.endswith(".alpha")}
    for layer, alpha in alphas.items():
        down, up = out.get(f"{layer}.lora_down.weight"), out.get(f"{layer}.lora_up.weight")
        if down is None or up is None:
            continue
        if not meta:
            out[f"{layer}.lora_up.weight"] = up * (float(alpha) / down.shape[0])
    return out


@dataclass(frozen=True)
class _PeftConfig:
    """A diffusers/PEFT file's saved LoraConfig (diffusers writes it as metadata): its alpha,
    and the layers whose alpha differs. Without one, every layer's scale is 1 (alpha = rank)."""

    alpha: float | None = None
    alpha_pattern: dict[str, float] | None = None

    def scale(self, layer: str, rank: int) -> float:
        if self.alpha is None:
            return 1.0
        alpha = self.alpha
        for pattern, value in (self.alpha_pattern or {}).items():
            if re.search(rf"(^|\.){re.escape(pattern)}$", layer):
                alpha = value
        return alpha / rank


def _peft_config(metadata: dict[str, str]) -> _PeftConfig:
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return _PeftConfig()
    try:
        configs: dict[str, Any] = json.loads(raw)
    except ValueError:
        return _PeftConfig()
    # One config per component ("unet.lora_alpha"...), or one for all.
    alpha = next((v for k, v in configs.items() if k.endswith("lora_alpha")), None)
    pattern: dict[str, float] = {}
    for k, v in configs.items():
        if k.endswith("alpha_pattern") and isinstance(v, dict):
            pattern.update({p: float(a) for p, a in v.items()})
    return _PeftConfig(None if alpha is None else float(alpha), pattern or None)
