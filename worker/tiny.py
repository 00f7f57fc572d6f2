"""Random-weight Stable Diffusion models in diffusers layout, built offline from code.

It has the real model's structure (CLIP tokenizer and text encoder, a cross-attention UNet, an
8x VAE, SD's noise schedule) at a size a CPU runs in a second, so the local run and the tests
load it through the same `from_pretrained` path as real weights.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionUpscalePipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# Stable Diffusion 1.x's noise schedule and default scheduler.
SD_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins for bytes that CLIP's byte-level BPE works on."""
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    out, shifted = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + shifted))
            shifted += 1
    return out


def _tokenizer(workdir: Path, pad: str | None = None) -> CLIPTokenizer:
    """A CLIP tokenizer with no merges: every byte is a token (plus an end-of-word form). SDXL's
    second tokenizer pads with "!" where the first pads with its end token."""
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + [BOS, EOS]
    (workdir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (workdir / "merges.txt").write_text("#version: 0.2\n")
    # transformers 5 reads vocab/merges only through from_pretrained, not the constructor.
    options = {"pad_token": pad} if pad else {}
    tokenizer: CLIPTokenizer = CLIPTokenizer.from_pretrained(
        str(workdir), model_max_length=77, **options
    )
    return tokenizer


def _scheduler() -> PNDMScheduler:
    scheduler = PNDMScheduler(**SD_SCHEDULE)
    # Stable Diffusion 1.x's scheduler_config.json says this too (PNDM has no such option, but
    # DDIM, made from the same config, clamps its prediction unless told not to).
    scheduler.register_to_config(clip_sample=False)
    return scheduler


def build_tiny_model(target: Path, arch: str = "tiny", seed: int = 0) -> Path:
    """Write a random-weight model to `target` (created if missing) and return its path.

    `tiny`: seconds on a CPU, for tests and local runs. `sd15`: Stable Diffusion 1.5's sizes
    (UNet 860M parameters, CLIP ViT-L/14 text encoder, the SD VAE), for benchmarks: the same
    compute as the real weights, stored in fp16. `sd15-inpaint`: the tiny sizes with SD 1.5
    inpainting's 9-channel UNet. `tiny-sd2`: SD 2.x's layout (768-v: an OpenCLIP-wide text
    encoder, linear projections, v-prediction) at tiny sizes. `x4-upscaler`: the SD x4
    upscaler's layout at the tiny sizes;
    `sd-x4-upscaler`: at its real sizes, for benchmarks. `tiny-sdxl` and `tiny-sdxl-refiner`:
    SDXL's base and refiner layouts at tiny sizes; `sdxl` and `sdxl-refiner`: at their real
    sizes, for benchmarks. Another `seed`, other weights (a second model to serve).
    """
    target = Path(target)
    torch.manual_seed(seed)
    if arch in XL:
        return _build_sdxl(target, arch)
    with tempfile.TemporaryDirectory() as work:
        tokenizer = _tokenizer(Path(work))
    if arch in UPSCALERS:
        return _build_upscaler(target, tokenizer, ARCHITECTURES[arch])
    sizes = ARCHITECTURES[INPAINTING.get(arch, arch)]
    inpainting = arch in INPAINTING
    text_encoder = _text_encoder(tokenizer, sizes)
    assert text_encoder.config.vocab_size >= len(tokenizer)
    # An inpainting UNet takes the mask and the masked picture's latents beside the latents.
    unet = UNet2DConditionModel(sample_size=64, in_channels=9 if inpainting else 4,
                                out_channels=4, **sizes["unet"])  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        sample_size=512,
        # Four blocks: three downsamplings, the 8x latent scale of the real VAE.
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        **sizes["vae"],
    )
    kind = StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline
    scheduler = _scheduler()
    if arch == "tiny-sd2":  # SD 2.x at 768: the UNet predicts v
        scheduler.register_to_config(prediction_type="v_prediction")
    pipeline = kind(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if not arch.startswith("tiny") and sizes is not ARCHITECTURES["tiny"]:
        pipeline.to(torch.float16)  # half the bytes to write and to load
    pipeline.save_pretrained(str(target))
    return target


# The x4 upscaler's noise schedules: its sampler's (v-prediction) and the one that noises the
# low-resolution picture it is given.
X4_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
               "beta_schedule": "scaled_linear"}  # fmt: skip
UPSCALERS = ("x4-upscaler", "sd-x4-upscaler")


def _text_config(tokenizer: CLIPTokenizer, sizes: dict[str, Any]) -> CLIPTextConfig:
    return CLIPTextConfig(
        **sizes,
        max_position_embeddings=77,
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS),
        pad_token_id=tokenizer.pad_token_id,
    )


def _text_encoder(tokenizer: CLIPTokenizer, sizes: dict[str, Any]) -> CLIPTextModel:
    return CLIPTextModel(_text_config(tokenizer, sizes["text_encoder"]))


def _build_upscaler(target: Path, tokenizer: CLIPTokenizer, sizes: dict[str, Any]) -> Path:
    """The Stable Diffusion x4 upscaler's layout: a UNet taking the latents and the noised
    low-resolution picture (7 channels) and the noise level as a class label, a 4x VAE."""
    text_encoder = _text_encoder(tokenizer, sizes)
    unet = UNet2DConditionModel(sample_size=128, in_channels=7, out_channels=4,
                                num_class_embeds=1000, **sizes["unet"])  # fmt: skip
    levels = len(sizes["vae"]["block_out_channels"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, scaling_factor=0.08333,
                        down_block_types=("DownEncoderBlock2D",) * levels,
                        up_block_types=("UpDecoderBlock2D",) * levels, **sizes["vae"])  # fmt: skip
    scheduler = DDIMScheduler(**X4_SCHEDULE, prediction_type="v_prediction", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)  # fmt: skip
    pipeline = StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        low_res_scheduler=DDPMScheduler(**X4_SCHEDULE), scheduler=scheduler, max_noise_level=350,
    )  # fmt: skip
    if sizes is not ARCHITECTURES["x4-upscaler"]:
        pipeline.to(torch.float16)
    pipeline.save_pretrained(str(target))
    return target


# Inpainting layouts: another architecture's sizes, with a 9-channel UNet. `sd15-inpaint` is SD
# 1.5's inpainting model's layout at the tiny sizes, for tests and local runs.
INPAINTING = {"sd15-inpaint": "tiny"}

ARCHITECTURES: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "text_encoder": {
            "vocab_size": 514,  # the byte-level tokenizer's size
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "projection_dim": 32,
        },
        "unet": {
            "layers_per_block": 1,
            # Attention only at the lowest resolution: at 512 px a 64x64 self-attention would
            # cost a CPU seconds per step, and the tiny model must stay fast there.
            "block_out_channels": (32, 32, 64),
            "down_block_types": ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
            "cross_attention_dim": 32,
            "attention_head_dim": 8,
            "norm_num_groups": 8,
        },
        "vae": {"block_out_channels": (8, 8, 16, 16), "layers_per_block": 1, "norm_num_groups": 8},
    },
    # SD 2.x's layout at tiny sizes: the text encoder as wide as OpenCLIP ViT-H (1024, which is
    # how diffusers tells SD 2.x from 1.x), linear projections, attention at the first level
    # with two layers a block (where diffusers looks for that width).
    "tiny-sd2": {
        "text_encoder": {
            "vocab_size": 514,
            "hidden_size": 1024,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 8,
            "projection_dim": 1024,
            "hidden_act": "gelu",
        },
        "unet": {
            "layers_per_block": 2,
            "block_out_channels": (32, 64),
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": 1024,
            "attention_head_dim": 8,
            "norm_num_groups": 8,
            "use_linear_projection": True,
        },
        "vae": {"block_out_channels": (8, 8, 16, 16), "layers_per_block": 1, "norm_num_groups": 8},
    },
    # stabilityai/stable-diffusion-x4-upscaler's sizes (UNet 473M parameters, OpenCLIP ViT-H
    # text encoder), for benchmarks.
    "sd-x4-upscaler": {
        "text_encoder": {
            "vocab_size": 49408,
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 23,
            "num_attention_heads": 16,
            "projection_dim": 512,
            "hidden_act": "gelu",
        },
        "unet": {
            "layers_per_block": 2,
            "block_out_channels": (256, 512, 512, 1024),
            "down_block_types": ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
            "up_block_types": ("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",),
            "only_cross_attention": (True, True, True, False),
            "use_linear_projection": True,
            "cross_attention_dim": 1024,
            "attention_head_dim": 8,
            "norm_num_groups": 32,
        },
        "vae": {
            "block_out_channels": (128, 256, 512),
            "layers_per_block": 2,
            "norm_num_groups": 32,
        },
    },
    "sd15": {
        "text_encoder": {
            "vocab_size": 49408,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "projection_dim": 768,
            "hidden_act": "quick_gelu",
        },
        "unet": {
            "layers_per_block": 2,
            "block_out_channels": (320, 640, 1280, 1280),
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
            "norm_num_groups": 32,
        },
        "vae": {
            "block_out_channels": (128, 256, 512, 512),
            "layers_per_block": 2,
            "norm_num_groups": 32,
        },
    },
}
# The x4 upscaler's layout at the tiny sizes, for tests and local runs: a VAE of three blocks,
# the real one's 4x latent scale.
ARCHITECTURES["x4-upscaler"] = {
    **ARCHITECTURES["tiny"],
    "vae": {"block_out_channels": (8, 16, 16), "layers_per_block": 1, "norm_num_groups": 8},
}


# SDXL: the base model reads two text encoders (CLIP ViT-L's penultimate layer beside OpenCLIP
# ViT-bigG's, the latter's pooled and projected embedding too) and six time ids per row
# (original size, crop corner, target size); its refiner only the second encoder, and five time
# ids (an aesthetic score in place of the target size). Its VAE is SD's with another scaling
# factor, and overflows in fp16 (`force_upcast`).
XL = ("tiny-sdxl", "tiny-sdxl-refiner", "sdxl", "sdxl-refiner")
XL_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
               "beta_schedule": "scaled_linear", "timestep_spacing": "leading",
               "steps_offset": 1}  # fmt: skip
XL_SCHEDULE_PUBLISHED = {"clip_sample": False, "sample_max_value": 1.0, "set_alpha_to_one": False,
                         "skip_prk_steps": True, "interpolation_type": "linear"}  # fmt: skip


def xl_unet(arch: str) -> UNet2DConditionModel:
    """The UNet of an SDXL layout (on the current default device: `meta` sizes it for free)."""
    sizes = XL_SIZES[arch.removesuffix("-refiner")]
    refiner = arch.endswith("-refiner")
    unet = sizes["refiner_unet" if refiner else "unet"]
    pooled = sizes["text_encoder_2"]["projection_dim"]
    time_ids = 5 if refiner else 6
    context = sizes["text_encoder_2"]["hidden_size"] + (
        0 if refiner else sizes["text_encoder"]["hidden_size"]
    )
    return UNet2DConditionModel(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        cross_attention_dim=context,
        addition_embed_type="text_time",
        addition_time_embed_dim=sizes["time_embed_dim"],
        projection_class_embeddings_input_dim=pooled + time_ids * sizes["time_embed_dim"],
        use_linear_projection=True,
        **unet,
    )


def _build_sdxl(target: Path, arch: str) -> Path:
    sizes = XL_SIZES[arch.removesuffix("-refiner")]
    refiner = arch.endswith("-refiner")
    with tempfile.TemporaryDirectory() as work:
        tokenizer = _tokenizer(Path(work))
    with tempfile.TemporaryDirectory() as work:
        tokenizer_2 = _tokenizer(Path(work), pad="!")
    # Billions of random weights are drawn in seconds on a GPU, minutes on a CPU.
    real = not arch.startswith("tiny") and torch.cuda.is_available()
    with torch.device("cuda" if real else "cpu"):
        return _write_sdxl(target, arch, sizes, refiner, tokenizer, tokenizer_2)


def _write_sdxl(
    target: Path, arch: str, sizes: dict[str, Any], refiner: bool, tokenizer: Any, tokenizer_2: Any
) -> Path:
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2,
                                                              sizes["text_encoder_2"]))  # fmt: skip
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=1024,
                        scaling_factor=0.13025, force_upcast=True,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, **sizes["vae"])  # fmt: skip
    common = {"vae": vae, "text_encoder_2": text_encoder_2, "tokenizer_2": tokenizer_2,
              "unet": xl_unet(arch), "scheduler": EulerDiscreteScheduler(**XL_SCHEDULE),
              "add_watermarker": False}  # fmt: skip
    pipeline: Any
    if refiner:
        pipeline = StableDiffusionXLImg2ImgPipeline(
            text_encoder=None, tokenizer=None, requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False, **common,
        )  # fmt: skip
    else:
        text_encoder = _text_encoder(tokenizer, sizes)
        pipeline = StableDiffusionXLPipeline(text_encoder=text_encoder, tokenizer=tokenizer,
                                             **common)  # fmt: skip
    if not arch.startswith("tiny"):
        pipeline.to(torch.float16)  # half the bytes to write and to load
    pipeline.save_pretrained(str(target))
    # The published SDXL scheduler config also carries settings that other samplers read
    # (DDIM's clip_sample is on unless the config says otherwise): written as published.
    config_file = target / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text()) | XL_SCHEDULE_PUBLISHED
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True))
    return target


# As the tiny SD UNet (its context width is SDXL's two encoders', set by xl_unet), with SDXL's
# linear projections and added conditioning.
TINY_XL_UNET = {
    **{k: v for k, v in ARCHITECTURES["tiny"]["unet"].items() if k != "cross_attention_dim"},
    "transformer_layers_per_block": 1,
}
TINY_XL_SECOND = {"num_hidden_layers": 10, "hidden_size": 48, "intermediate_size": 96,
                  "projection_dim": 48}  # fmt: skip
XL_SIZES: dict[str, dict[str, Any]] = {
    "tiny-sdxl": {
        "text_encoder": ARCHITECTURES["tiny"]["text_encoder"],
        # Wider than the first, with ten layers, as diffusers tells SDXL's single files apart
        # (by the widths, and by the tenth layer); the pooled embedding: 48.
        "text_encoder_2": ARCHITECTURES["tiny"]["text_encoder"] | TINY_XL_SECOND,
        "time_embed_dim": 8,
        "unet": TINY_XL_UNET,
        "refiner_unet": TINY_XL_UNET,
        "vae": ARCHITECTURES["tiny"]["vae"],
    },
    # stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0's sizes (UNets of 2.6B and
    # 2.3B parameters, CLIP ViT-L and OpenCLIP ViT-bigG text encoders, the SDXL VAE).
    "sdxl": {
        "text_encoder": ARCHITECTURES["sd15"]["text_encoder"],
        "text_encoder_2": {
            "vocab_size": 49408,
            "hidden_size": 1280,
            "intermediate_size": 5120,
            "num_hidden_layers": 32,
            "num_attention_heads": 20,
            "projection_dim": 1280,
            "hidden_act": "gelu",
        },
        "time_embed_dim": 256,
        "unet": {
            "layers_per_block": 2,
            "block_out_channels": (320, 640, 1280),
            "down_block_types": ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
            "up_block_types": ("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",),
            "transformer_layers_per_block": (1, 2, 10),
            "attention_head_dim": (5, 10, 20),
            "norm_num_groups": 32,
        },
        "refiner_unet": {
            "layers_per_block": 2,
            "block_out_channels": (384, 768, 1536, 1536),
            "down_block_types": ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",),
            "transformer_layers_per_block": 4,
            "attention_head_dim": (6, 12, 24, 24),
            "norm_num_groups": 32,
        },
        "vae": ARCHITECTURES["sd15"]["vae"],
    },
}
