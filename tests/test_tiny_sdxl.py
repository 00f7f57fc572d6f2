"""The random SDXL models the project builds offline (`sdserve make-tiny-model --arch tiny-sdxl`
and `tiny-sdxl-refiner`): diffusers' own SDXL pipelines load and run them, base and refiner
together as diffusers' ensemble of experts; the benchmark layouts have the real models' sizes.
They are what the SDXL family's tests compare against (issue 22)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image

from worker.tiny import build_tiny_model, xl_unet

SDSERVE = str(Path(sys.executable).parent / "sdserve")


@pytest.fixture(scope="module")
def xl(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("xl")
    for arch in ("tiny-sdxl", "tiny-sdxl-refiner"):
        subprocess.run([SDSERVE, "make-tiny-model", "--arch", arch, str(root / arch)],
                       check=True, timeout=120)  # fmt: skip
    return root / "tiny-sdxl", root / "tiny-sdxl-refiner"


def test_the_tiny_sdxl_is_a_diffusers_sdxl_folder(xl: tuple[Path, Path]) -> None:
    base, refiner = xl
    index = json.loads((base / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    for part in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae"):
        assert index[part][1] is not None
    index = json.loads((refiner / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLImg2ImgPipeline"
    assert index["text_encoder"][1] is None and index["requires_aesthetics_score"] is True
    pipe = StableDiffusionXLPipeline.from_pretrained(base)
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token == "<|endoftext|>"
    assert pipe.vae.config.force_upcast and pipe.vae.config.scaling_factor == 0.13025
    # Context: both encoders' hidden states side by side; added: the pooled one and 6 time ids.
    width = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert pipe.unet.config.cross_attention_dim == width
    assert pipe.unet.config.addition_embed_type == "text_time"


def test_diffusers_runs_base_and_refiner_as_one_ensemble(xl: tuple[Path, Path]) -> None:
    base = StableDiffusionXLPipeline.from_pretrained(xl[0])
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(xl[1])
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(3)
    latents = base("a red fox", height=64, width=64, num_inference_steps=5, denoising_end=0.8,
                   output_type="latent", generator=generator).images  # fmt: skip
    image = refiner("a red fox", image=latents, num_inference_steps=5, denoising_start=0.8,
                    output_type="np", generator=generator).images[0]  # fmt: skip
    assert image.shape == (64, 64, 3) and np.isfinite(image).all() and image.std() > 0


def test_the_img2img_and_inpainting_pipelines_load_the_base(xl: tuple[Path, Path]) -> None:
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    img2img = StableDiffusionXLImg2ImgPipeline.from_pretrained(xl[0])
    out = img2img("a cat", image=picture, strength=0.6, num_inference_steps=4,
                  output_type="np").images[0]  # fmt: skip
    assert out.shape == (64, 64, 3)
    inpaint = StableDiffusionXLInpaintPipeline.from_pretrained(xl[0])
    out = inpaint("a cat", image=picture, mask_image=mask, height=64, width=64,
                  num_inference_steps=4, output_type="np").images[0]  # fmt: skip
    assert out.shape == (64, 64, 3)


def test_the_benchmark_layouts_have_the_real_models_sizes() -> None:
    """stabilityai/stable-diffusion-xl-base-1.0's UNet has 2,567,463,684 parameters; the
    refiner's takes a 1280-wide context and 2560 added features (its pooled embedding and five
    time ids of 256), as its published config says."""
    with torch.device("meta"):
        base, refiner = xl_unet("sdxl"), xl_unet("sdxl-refiner")
    assert sum(p.numel() for p in base.parameters()) == 2_567_463_684
    assert base.config.cross_attention_dim == 2048
    assert base.config.projection_class_embeddings_input_dim == 2816
    assert refiner.config.cross_attention_dim == 1280
    assert refiner.config.projection_class_embeddings_input_dim == 2560
    assert refiner.config.block_out_channels == (384, 768, 1536, 1536)


def test_a_second_seed_writes_other_weights(tmp_path: Path) -> None:
    one = build_tiny_model(tmp_path / "a", "tiny-sdxl")
    two = build_tiny_model(tmp_path / "b", "tiny-sdxl", seed=1)
    a = StableDiffusionXLPipeline.from_pretrained(one).unet.conv_in.weight
    b = StableDiffusionXLPipeline.from_pretrained(two).unet.conv_in.weight
    assert not torch.equal(a, b)
