"""The model's parts, loaded once and resident (diffusers' components): the CLIP tokenizer and
text encoder, the UNet, the VAE and the scheduler's configuration; and for the x4 upscaler its
low-resolution noise schedule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPTextModel, CLIPTokenizerFast
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
    tokenizer: CLIPTokenizerFast
    text_encoder: Any  # CLIPTextModel
    unet: Any  # UNet2DConditionModel
    vae: Any  # AutoencoderKL
    scheduler_config: dict[str, Any]
    # The x4 upscaler's: how its low-resolution picture is noised. None for other models.
    low_res_scheduler: DDPMScheduler | None

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
        modules = (self.text_encoder, self.unet, self.vae)
        return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def load_components(model: str, device: torch.device, fuse: bool) -> Components:
    """The parts in fp16 on GPUs (fp32 on the CPU, which has no fast fp16 kernels); with `fuse`,
    channels-last convolutions and fused attention projections (faster on GPUs)."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32

    def place(module: torch.nn.Module) -> Any:
        return module.to(device).eval().requires_grad_(False)

    unet = place(UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=dtype))
    vae = place(AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=dtype))
    if fuse:
        for module in (unet, vae):
            module.fuse_qkv_projections()
            module.to(memory_format=torch.channels_last)
    # A 7-channel UNet (the x4 upscaler) takes a noised low-resolution picture beside the
    # latents, and its noise level as a class label.
    low_res = None
    if unet.config.in_channels == 7:
        low_res = DDPMScheduler.from_pretrained(model, subfolder="low_res_scheduler")
    return Components(
        model=model,
        device=device,
        dtype=dtype,
        tokenizer=CLIPTokenizerFast.from_pretrained(model, subfolder="tokenizer"),
        text_encoder=place(
            CLIPTextModel.from_pretrained(model, subfolder="text_encoder", dtype=dtype)
        ),
        unet=unet,
        vae=vae,
        scheduler_config=load_schedule(model),
        low_res_scheduler=low_res,
    )
