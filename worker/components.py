"""The model's parts, loaded once and resident (diffusers' components): the CLIP tokenizer and
text encoder (an SDXL model's second ones beside them; an SDXL refiner has only the second), the
UNet, the VAE and the scheduler's configuration; and for the x4 upscaler its low-resolution
noise schedule."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from threading import Lock
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizerFast
from transformers.utils import logging as transformers_logging

from worker.schedulers import load_schedule

# Progress bars and advice about optional packages are noise in a service's log.
for _library in (diffusers_logging, transformers_logging):
    _library.set_verbosity_error()
    _library.disable_progress_bar()


@dataclass
class Components:
    model: str  # the folder (or hub id) they came from
    device: torch.device
    dtype: torch.dtype
    tokenizer: CLIPTokenizerFast | None  # None: an SDXL refiner (the second encoder only)
    text_encoder: Any  # CLIPTextModel, or None
    unet: Any  # UNet2DConditionModel
    vae: Any  # AutoencoderKL
    scheduler_config: dict[str, Any]
    # The x4 upscaler's: how its low-resolution picture is noised. None for other models.
    low_res_scheduler: DDPMScheduler | None
    # SDXL's second tokenizer and text encoder (with the pooled projection); None elsewhere.
    tokenizer_2: CLIPTokenizerFast | None = None
    text_encoder_2: Any = None  # CLIPTextModelWithProjection
    # The pipeline's own settings (model_index.json): SDXL's `force_zeros_for_empty_prompt`,
    # `requires_aesthetics_score`.
    options: dict[str, Any] = field(default_factory=dict)
    # Textual-inversion embeddings of several vectors: first token id -> all of them
    # (worker/embeddings.py); what the published tokenizer expands.
    expansions: dict[int, list[int]] = field(default_factory=dict)
    # Held while the text encoders read prompts, and while embeddings change their token
    # tables: two threads read prompts (worker/prompting.py `Remembered`).
    reading: Lock = field(default_factory=Lock, compare=False, repr=False)

    @property
    def family(self) -> str:
        """ "sdxl" for a UNet that takes SDXL's added conditioning (pooled text and time ids),
        "sd" for SD 1.x/2.x (and the x4 upscaler)."""
        return "sdxl" if self.unet.config.addition_embed_type == "text_time" else "sd"

    @property
    def latent_scale(self) -> int:
        """Pixels per latent along a side."""
        return int(2 ** (len(self.vae.config.block_out_channels) - 1))

    @property
    def inpainting_unet(self) -> bool:
        """A 9-channel UNet (an inpainting model) takes a mask and a masked picture beside the
        latents, for every job."""
        return bool(self.unet.config.in_channels == 9)

    def weight_bytes(self) -> int:
        """What the model's weights take (text encoder, UNet, VAE)."""
        modules = (self.text_encoder, self.text_encoder_2, self.unet, self.vae)
        return sum(p.numel() * p.element_size() for m in modules if m is not None
                   for p in m.parameters())  # fmt: skip


# SDSERVE_VAE_UPCAST: what a VAE that overflows in fp16 runs in on a GPU.
UPCASTS = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def vae_dtype_of(force_upcast: bool, dtype: torch.dtype, upcast: str) -> torch.dtype:
    """An SDXL-family VAE's dtype beside parts of `dtype`: theirs, unless its config says it
    overflows there (`force_upcast`) and they are fp16 (a GPU's): then `upcast`'s."""
    if force_upcast and dtype == torch.float16:
        return UPCASTS[upcast]
    return dtype


def load_components(
    model: str,
    device: torch.device,
    fuse: bool,
    fuse_projections: bool = True,
    vae_source: str | None = None,
    upcast: str = "float32",
) -> Components:
    """The parts in fp16 on GPUs (fp32 on the CPU, which has no fast fp16 kernels); with `fuse`,
    channels-last convolutions and (unless `fuse_projections` is off: LoRAs adapt the q, k and
    v projections apart) fused attention projections (faster on GPUs). `vae_source`: another
    VAE than the model's (a VAE folder, or a model folder whose `vae` it is); `upcast`: the
    dtype on a GPU of a VAE that overflows in fp16 (`UPCASTS`)."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32

    def place(module: torch.nn.Module) -> Any:
        return module.to(device).eval().requires_grad_(False)

    unet = place(UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=dtype))
    # SDXL's VAE overflows in fp16 (black or NaN pictures): where its config says so
    # (`force_upcast`), it runs in fp32, as diffusers' SDXL pipelines run it, or in bf16 where
    # `upcast` asks (fp32's range, half its bytes). Other families' pipelines never upcast
    # (AutoencoderKL's config says so by default).
    vae_folder: str = model
    vae_subfolder: str | None = "vae"  # a model's own: its `vae` (a hub id's too)
    if vae_source is not None:
        vae_folder, vae_subfolder = vae_source, vae_subfolder_of(vae_source)
    vae_dtype = dtype
    if unet.config.addition_embed_type == "text_time":
        config_folder = model if single_file(vae_folder) else vae_folder
        config_subfolder = "vae" if single_file(vae_folder) else vae_subfolder
        vae_config = AutoencoderKL.load_config(config_folder, subfolder=config_subfolder)
        vae_dtype = vae_dtype_of(bool(vae_config.get("force_upcast", True)), dtype, upcast)
    vae = place(read_vae(vae_folder, vae_subfolder, vae_dtype, model))
    if fuse:
        for module in (unet, vae):
            if fuse_projections:
                module.fuse_qkv_projections()
            module.to(memory_format=torch.channels_last)
    # A 7-channel UNet (the x4 upscaler) takes a noised low-resolution picture beside the
    # latents, and its noise level as a class label.
    low_res = None
    if unet.config.in_channels == 7:
        low_res = DDPMScheduler.from_pretrained(model, subfolder="low_res_scheduler")
    options = pipeline_options(model)
    tokenizer = text_encoder = tokenizer_2 = text_encoder_2 = None
    if present(options, "text_encoder"):
        tokenizer = CLIPTokenizerFast.from_pretrained(model, subfolder="tokenizer")
        text_encoder = place(
            CLIPTextModel.from_pretrained(model, subfolder="text_encoder", dtype=dtype)
        )
    if present(options, "text_encoder_2"):
        tokenizer_2 = CLIPTokenizerFast.from_pretrained(model, subfolder="tokenizer_2")
        text_encoder_2 = place(CLIPTextModelWithProjection.from_pretrained(
            model, subfolder="text_encoder_2", dtype=dtype
        ))  # fmt: skip
    return Components(
        model=model,
        device=device,
        dtype=dtype,
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        unet=unet,
        vae=vae,
        scheduler_config=load_schedule(model),
        low_res_scheduler=low_res,
        tokenizer_2=tokenizer_2,
        text_encoder_2=text_encoder_2,
        options=options,
    )


def pipeline_options(model: str) -> dict[str, Any]:
    """The folder's model_index.json (which parts it has, the pipeline's settings); a folder
    without one is read as SD 1.x's parts."""
    index = Path(model) / "model_index.json"
    if index.is_file():
        options: dict[str, Any] = json.loads(index.read_text())
        return options
    try:  # a hub id: its model_index.json, as diffusers reads it
        return dict(DiffusionPipeline.load_config(model))
    except OSError:
        return {"text_encoder": ["transformers", "CLIPTextModel"]}


def present(options: dict[str, Any], part: str) -> bool:
    """Whether the pipeline has this part (model_index.json names it with a class, not null)."""
    entry = options.get(part)
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None


def vae_subfolder_of(source: str) -> str | None:
    """Where a VAE source keeps the VAE: a model folder in its `vae`, a VAE folder in itself."""
    return "vae" if (Path(source) / "vae" / "config.json").is_file() else None


def single_file(source: str) -> bool:
    """A VAE in one file of the original layout (A1111's and civitai's `.safetensors`)."""
    return source.endswith(".safetensors") and Path(source).is_file()


def read_vae(source: str, subfolder: str | None, dtype: torch.dtype, model: str) -> Any:
    """A VAE from a diffusers folder, or from one file of the original layout, read offline
    with the model's own VAE configuration (its sizes and scaling factor: a VAE file is for a
    family, and the model is of it)."""
    if single_file(source):
        return AutoencoderKL.from_single_file(source, config=model, subfolder="vae",
                                              local_files_only=True, torch_dtype=dtype)  # fmt: skip
    return AutoencoderKL.from_pretrained(source, subfolder=subfolder, torch_dtype=dtype)


def load_vae(source: str, like: Any, model: str) -> Any:
    """Another VAE for the model (SDSERVE_VAES): a diffusers folder (its own, or a model's
    `vae`) or a single file, in the dtype and on the device of the model's VAE `like`."""
    vae = read_vae(source, vae_subfolder_of(source), like.dtype, model)
    return vae.to(like.device).eval().requires_grad_(False)
