"""Random-weight add-ons for a model, in the layouts people's files come in (issue 23): LoRAs in
diffusers/PEFT (`unet.<layer>.lora_A.weight`) and kohya/A1111 (`lora_unet_<layer>.lora_down.
weight` with an `alpha`) keys; textual-inversion embeddings as A1111 (`.pt` with
`string_to_param`, `.safetensors` with `emb_params`, SDXL's `clip_l`/`clip_g`) and diffusers
(`{token: vectors}`) write them. The tests load them into diffusers' pipeline and into sdserve's
workers; the benchmarks write them at the real models' sizes and at real ranks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from worker.adapters import adaptable
from worker.components import pipeline_options, present

Layout = Literal["peft", "kohya"]


def build_tiny_lora(
    model: Path,
    target: Path,
    layout: Layout = "peft",
    rank: int = 4,
    seed: int = 0,
    text: bool = True,
    strength: float = 0.5,
) -> Path:
    """Write a LoRA of every adaptable layer of the model's UNet (and, with `text`, its text
    encoders) to `target` (a .safetensors file): random down and up weights of `rank`, whose
    update is about `strength` of a layer's input. kohya files carry an alpha of rank / 2 (their
    scale is alpha / rank)."""
    generator = torch.Generator().manual_seed(seed)
    components = {"unet": _meta_unet(model)}
    if text:
        options = pipeline_options(str(model))
        for name in ("text_encoder", "text_encoder_2"):
            if present(options, name):
                components[name] = _meta_text_encoder(model / name, name == "text_encoder_2")
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
    if "text_encoder_2" in components:  # SDXL's kohya files number both encoders
        prefixes["text_encoder"] = "lora_te1_"
    tensors: dict[str, torch.Tensor] = {}
    for component, module in components.items():
        for name, layer in module.named_modules():
            if not adaptable(component, name, layer):
                continue
            assert isinstance(layer, nn.Linear | nn.Conv2d)
            outputs, inputs = int(layer.weight.shape[0]), int(layer.weight.shape[1])
            tail = (1, 1) if isinstance(layer, nn.Conv2d) else ()
            down = torch.randn(rank, inputs, *tail, generator=generator) / inputs**0.5
            up = torch.randn(outputs, rank, *tail, generator=generator) * strength / rank**0.5
            if component != "unet" and not name.startswith("text_model."):
                name = f"text_model.{name}"  # as files written with older transformers name it
            if layout == "peft":
                tensors[f"{component}.{name}.lora_A.weight"] = down
                tensors[f"{component}.{name}.lora_B.weight"] = up
            else:
                key = prefixes[component] + name.replace(".", "_")
                alpha = rank / 2
                tensors[f"{key}.lora_down.weight"] = down
                tensors[f"{key}.lora_up.weight"] = up * (rank / alpha)  # the same update
                tensors[f"{key}.alpha"] = torch.tensor(alpha)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(target))
    return target


def _meta_unet(model: Path) -> nn.Module:
    config = UNet2DConditionModel.load_config(str(model), subfolder="unet")
    with torch.device("meta"):
        unet: nn.Module = UNet2DConditionModel.from_config(config)
    return unet


def _meta_text_encoder(folder: Path, projection: bool) -> nn.Module:
    config = CLIPTextConfig.from_pretrained(str(folder))
    kind = CLIPTextModelWithProjection if projection else CLIPTextModel
    with torch.device("meta"):
        encoder: nn.Module = kind(config)
    return encoder


EmbeddingLayout = Literal["a1111-pt", "a1111", "diffusers"]


def build_tiny_embedding(
    model: Path, target: Path, layout: EmbeddingLayout = "a1111", vectors: int = 2, seed: int = 0
) -> Path:
    """Write a random textual-inversion embedding of `vectors` vectors for the model's text
    encoders to `target` (its file name, without the suffix, is its name): one tensor for SD
    1.x/2.x, `clip_l` and `clip_g` for SDXL (A1111's layout). Its vectors are about the size of
    the model's own token embeddings."""
    generator = torch.Generator().manual_seed(seed)
    options = pipeline_options(str(model))
    widths = {name: int(CLIPTextConfig.from_pretrained(str(model / name)).hidden_size)
              for name in ("text_encoder", "text_encoder_2") if present(options, name)}  # fmt: skip
    tensors = {name: torch.randn(vectors, width, generator=generator) * 0.5
               for name, width in widths.items()}  # fmt: skip
    target.parent.mkdir(parents=True, exist_ok=True)
    if "text_encoder_2" in tensors:
        save_file({"clip_l": tensors["text_encoder"], "clip_g": tensors["text_encoder_2"]},
                  str(target))  # fmt: skip
    elif layout == "a1111-pt":
        vector = tensors["text_encoder"]
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vector},
                    "name": target.stem, "step": 1000, "sd_checkpoint_name": "tiny"},
                   str(target))  # fmt: skip
    elif layout == "a1111":
        save_file({"emb_params": tensors["text_encoder"]}, str(target))
    else:
        save_file({f"<{target.stem}>": tensors["text_encoder"]}, str(target))
    return target


def build_tiny_controlnet(
    model: Path, target: Path, seed: int = 0, embedding: tuple[int, ...] = (8, 8, 8, 8)
) -> Path:
    """Write a random ControlNet for the model (diffusers' layout, `target` a folder): its
    encoder copied from a UNet of the model's configuration (random weights, as diffusers'
    `from_unet` makes one), the control image's embedding tiny (a benchmark passes the real
    one's widths, 16, 32, 96, 256), and the zero convolutions that a trained ControlNet learns
    drawn at random, so its residuals show in an image."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(model / "unet")))
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=embedding)
    zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                  controlnet.controlnet_cond_embedding.conv_out]  # fmt: skip
    with torch.no_grad():
        for conv in zero_convs:
            for weight in conv.parameters():
                weight.normal_(0.0, 0.05)
    controlnet.save_pretrained(str(target))
    return target
