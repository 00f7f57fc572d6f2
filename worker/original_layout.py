"""Weights in the original (CompVis / Stability) single-file layout that A1111 and civitai users
hold, written from diffusers' layout, for the tests (issue 23, 6-7): a file written here and
read back by diffusers' single-file loader is the same model: a VAE alone
(`vae-ft-mse-840000-ema-pruned.safetensors` and kin), or a whole SD 1.x checkpoint (UNet under
`model.diffusion_model.`, CLIP under `cond_stage_model.transformer.`, the VAE under
`first_stage_model.`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
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
    """The VAE's weights in the original layout, as one .safetensors file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(original_vae(vae), str(target))
    return target


def original_vae(vae: Any) -> dict[str, Any]:
    """The VAE's weights by their original names. Its attention's projections are 1x1
    convolutions there (linear layers in diffusers)."""
    blocks = len(vae.decoder.up_blocks)
    out = {}
    for key, tensor in vae.state_dict().items():
        name = vae_key(key, blocks)
        if ".mid.attn_1." in name and name.endswith(".weight") and tensor.dim() == 2:
            tensor = tensor[:, :, None, None]
        out[name] = tensor.detach().contiguous()
    return out


UNET_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj",
               "emb_layers.1"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
               ("conv_shortcut", "skip_connection")]  # fmt: skip


def unet_key(key: str, layers: int, attended_up: set[int]) -> str:
    """A UNet weight's name in the original layout. `layers`: resnets per down block (an up
    block has one more); `attended_up`: the up blocks with attentions (an upsampler's index in
    its block is after them)."""
    fixed = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0",
             "conv_out": "out.2", "add_embedding.linear_1": "label_emb.0.0",
             "add_embedding.linear_2": "label_emb.0.2"}  # fmt: skip
    module, _, tail = key.rpartition(".")
    if module in fixed:
        return f"{fixed[module]}.{tail}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        at = 1 + block * (layers + 1) + j
        return _block(f"input_blocks.{at}", kind, rest)
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        at = 1 + int(m.group(1)) * (layers + 1) + layers
        return f"input_blocks.{at}.0.op.{m.group(2)}"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
        kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
        index = 1 if kind == "attentions" else 2 * j
        return _block(f"middle_block.{index}", kind, rest, whole=True)
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        return _block(f"output_blocks.{block * (layers + 1) + j}", kind, rest)
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        block = int(m.group(1))
        at = block * (layers + 1) + layers
        return f"output_blocks.{at}.{2 if block in attended_up else 1}.conv.{m.group(2)}"
    raise ValueError(f"no original name for the UNet's {key!r}")


def _block(prefix: str, kind: str, rest: str, whole: bool = False) -> str:
    """A resnet's (renamed) or an attention's (named alike) weight in its original block."""
    if kind == "attentions":
        return f"{prefix}{'' if whole else '.1'}.{rest}"
    return f"{prefix}{'' if whole else '.0'}.{_renamed(rest, UNET_RESNET)}"


def write_single_file_sd(pipeline: Any, target: Path) -> Path:
    """A pipeline's UNet, text encoders and VAE as one checkpoint of the original layout (as
    civitai's and A1111's `.safetensors` files hold them): SD 1.x (CLIP under
    `cond_stage_model.transformer.`), SD 2.x (OpenCLIP under `cond_stage_model.model.`), SDXL's
    base (CLIP under `conditioner.embedders.0.transformer.`, OpenCLIP under
    `conditioner.embedders.1.model.`) and refiner (OpenCLIP under
    `conditioner.embedders.0.model.`), inpainting UNets alike."""
    unet, vae = pipeline.unet, pipeline.vae
    text: Any = getattr(pipeline, "text_encoder", None)
    text_2 = getattr(pipeline, "text_encoder_2", None)
    layers = int(unet.config.layers_per_block)
    attended_up = {k for k, kind in enumerate(unet.config.up_block_types)
                   if "CrossAttn" in kind}  # fmt: skip
    out = {}
    for key, tensor in unet.state_dict().items():
        out[f"model.diffusion_model.{unet_key(key, layers, attended_up)}"] = tensor
    if text_2 is not None:  # SDXL: its second encoder is OpenCLIP's; the refiner has only it
        second = (
            "conditioner.embedders.1.model."
            if text is not None
            else "conditioner.embedders.0.model."
        )
        out |= {second + k: t for k, t in original_open_clip(text_2).items()}
        if text is not None:
            out |= {f"conditioner.embedders.0.transformer.{k}": t for k, t in clip(text).items()}
    elif text.config.hidden_size == OPEN_CLIP_H:  # SD 2.x
        out |= {f"cond_stage_model.model.{k}": t for k, t in original_open_clip(text).items()}
    else:
        out |= {f"cond_stage_model.transformer.{k}": t for k, t in clip(text).items()}
    out |= {f"first_stage_model.{name}": t for name, t in original_vae(vae).items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in out.items()}, str(target))
    return target


OPEN_CLIP_H = 1024  # SD 2.x's text encoder width: how the original layouts are told apart


def clip(text: Any) -> dict[str, Any]:
    """A transformers CLIP text model's weights as the original layout keeps them (its own
    names, under `text_model.`)."""
    return {(k if k.startswith("text_model.") else f"text_model.{k}"): t
            for k, t in text.state_dict().items()}  # fmt: skip


OPEN_CLIP_LAYER = [("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                   ("self_attn.out_proj", "attn.out_proj"), ("mlp.fc1", "mlp.c_fc"),
                   ("mlp.fc2", "mlp.c_proj")]  # fmt: skip


def original_open_clip(text: Any) -> dict[str, Any]:
    """A CLIP text model's weights in OpenCLIP's layout (SD 2.x, SDXL's second encoder): the
    attention's q, k and v in one `in_proj`, the projection stored transposed."""
    weights = {k.removeprefix("text_model."): t for k, t in text.state_dict().items()}
    out = {
        "token_embedding.weight": weights.pop("embeddings.token_embedding.weight"),
        "positional_embedding": weights.pop("embeddings.position_embedding.weight"),
        "ln_final.weight": weights.pop("final_layer_norm.weight"),
        "ln_final.bias": weights.pop("final_layer_norm.bias"),
    }
    if "text_projection.weight" in weights:
        out["text_projection"] = weights.pop("text_projection.weight").T
    weights.pop("embeddings.position_ids", None)
    for i in range(int(text.config.num_hidden_layers)):
        ours, theirs = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{theirs}attn.in_proj_{kind}"] = torch.cat(
                [weights.pop(f"{ours}self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")]
            )
            for a, b in OPEN_CLIP_LAYER:
                out[f"{theirs}{b}.{kind}"] = weights.pop(f"{ours}{a}.{kind}")
    if weights:
        raise ValueError(f"no OpenCLIP name for {sorted(weights)}")
    return out


def write_single_file_model(folder: Path, target: Path) -> Path:
    """The model in `folder` (diffusers' layout: SD 1.x, 2.x, SDXL base or refiner,
    inpainting) as one checkpoint of the original layout."""
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(str(folder))
    return write_single_file_sd(pipeline, target)


def original_controlnet(controlnet: Any) -> dict[str, Any]:
    """A diffusers ControlNet's weights in the original layout (`control_model.`): its encoder
    named as a UNet's, the control image's embedding `input_hint_block` (convolutions at even
    places, SiLUs between), the zero convolutions `zero_convs.K.0` and `middle_block_out.0`."""
    layers = int(controlnet.config.layers_per_block)
    blocks = len(controlnet.controlnet_cond_embedding.blocks)
    out = {}
    for key, tensor in controlnet.state_dict().items():
        if m := re.fullmatch(r"controlnet_cond_embedding\.(conv_in|conv_out|blocks\.\d+)\.(.+)",
                             key):  # fmt: skip
            part, rest = m.groups()
            at = 0 if part == "conv_in" else 2 * (blocks + 1) if part == "conv_out" else (
                2 * int(part.split(".")[1]) + 2)  # fmt: skip
            name = f"input_hint_block.{at}.{rest}"
        elif m := re.fullmatch(r"controlnet_down_blocks\.(\d+)\.(.+)", key):
            name = f"zero_convs.{m.group(1)}.0.{m.group(2)}"
        elif key.startswith("controlnet_mid_block."):
            name = f"middle_block_out.0.{key.removeprefix('controlnet_mid_block.')}"
        else:  # the encoder: a UNet's down path and middle block (no up blocks)
            name = unet_key(key, layers, set())
        out[f"control_model.{name}"] = tensor.detach().contiguous()
    return out


def write_single_file_controlnet(folder: Path, target: Path) -> Path:
    """The diffusers ControlNet in `folder` as one `.safetensors` file of the original layout
    (as A1111's ControlNet models are distributed)."""
    from diffusers import ControlNetModel

    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(original_controlnet(ControlNetModel.from_pretrained(str(folder))), str(target))
    return target
