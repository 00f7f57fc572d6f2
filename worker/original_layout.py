"""Weights in the original (CompVis / Stability) single-file layout that A1111 and civitai users
hold, written from diffusers' layout, for the tests (issue 23, 6-7): a file written here and
read back by diffusers' single-file loader is the same model. Only what the tests need so far:
the VAE (`vae-ft-mse-840000-ema-pruned.safetensors` and kin)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

# diffusers' names -> the original's, in order (the first pattern that matches renames).
RESNET = [("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
          ("conv_shortcut", "nin_shortcut")]  # fmt: skip
ATTENTION = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
             ("to_out.0", "proj_out")]  # fmt: skip


def vae_key(key: str, blocks: int) -> str:
    """A VAE weight's name in the original layout. The decoder's up blocks are numbered from
    the bottom there (diffusers' first is the original's last)."""
    key = key.replace(".conv_norm_out.", ".norm_out.")
    if m := re.fullmatch(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        side, way, block, resnet, rest = m.groups()
        index = int(block) if way == "down" else blocks - 1 - int(block)
        return f"{side}.{way}.{index}.block.{resnet}.{_renamed(rest, RESNET)}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", key):
        return f"encoder.down.{m.group(1)}.downsample.{m.group(2)}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        return f"decoder.up.{blocks - 1 - int(m.group(1))}.upsample.{m.group(2)}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        side, resnet, rest = m.groups()
        return f"{side}.mid.block_{int(resnet) + 1}.{_renamed(rest, RESNET)}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        side, rest = m.groups()
        return f"{side}.mid.attn_1.{_renamed(rest, ATTENTION)}"
    return key  # conv_in, conv_out, norm_out, quant_conv, post_quant_conv: the same


def _renamed(rest: str, names: list[tuple[str, str]]) -> str:
    for ours, theirs in names:
        if rest.startswith(f"{ours}."):
            return theirs + rest[len(ours) :]
    raise ValueError(f"no original name for {rest!r}")


def write_single_file_vae(vae: Any, target: Path) -> Path:
    """The VAE's weights in the original layout, as one .safetensors file. Its attention's
    projections are 1x1 convolutions there (linear layers in diffusers)."""
    blocks = len(vae.decoder.up_blocks)
    out = {}
    for key, tensor in vae.state_dict().items():
        name = vae_key(key, blocks)
        if ".mid.attn_1." in name and name.endswith(".weight") and tensor.dim() == 2:
            tensor = tensor[:, :, None, None]
        out[name] = tensor.detach().contiguous()
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(target))
    return target
