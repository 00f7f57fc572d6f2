"""Textual-inversion embeddings (issue 23, 4): a worker reads the folder's embeddings (A1111's
.pt and .safetensors, diffusers', SDXL's clip_l/clip_g), skips those for another model and
says so, and each row that names one in its prompt or negative prompt equals diffusers'
pipeline with the same files loaded by `load_textual_inversion`, for its seed, beside rows
without, in one UNet call per step; the published tokenizer counts an embedding's vectors as
tokens, as the worker reads them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file

from app.jobs.prompts import count
from tests.test_rows import max_diff, run
from worker.compiled import Tuning
from worker.engine import BatchShape, Engine, ImageSpec
from worker.schedulers import make_scheduler
from worker.tiny import build_tiny_model
from worker.tiny_addons import build_tiny_embedding

CPU = torch.device("cpu")

# name -> (layout, vectors, suffix); SDXL's are A1111's clip_l/clip_g .safetensors.
FILES: dict[str, tuple[Any, int, str]] = {
    "fluffy": ("a1111-pt", 3, ".pt"),
    "glow": ("a1111", 1, ".safetensors"),
    "shade": ("diffusers", 2, ".safetensors"),
}
ROWS = {  # prompt, negative prompt
    "both": ("a fluffy cat, glow", "shade"),
    "one": ("a cat in glow", ""),
    "none": ("a cat", ""),
}


def pixels(images: np.ndarray) -> list[np.ndarray]:
    return list((np.asarray(images) * 255).round().astype(np.uint8))


@pytest.mark.parametrize("arch", ["tiny", "tiny-sdxl"])
def test_embeddings_read_as_diffusers_reads_them(
    arch: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    root = tmp_path_factory.mktemp(f"ti-{arch}")
    model = build_tiny_model(root / arch, arch)
    other = build_tiny_model(root / "other", "tiny" if arch == "tiny-sdxl" else "tiny-sdxl")
    folder = root / "embeddings"
    suffixes = {name: ".safetensors" if arch == "tiny-sdxl" else suffix
                for name, (_layout, _vectors, suffix) in FILES.items()}  # fmt: skip
    for k, (name, (layout, vectors, _suffix)) in enumerate(FILES.items()):
        build_tiny_embedding(model, folder / f"{name}{suffixes[name]}", layout, vectors, seed=k)
    build_tiny_embedding(other, folder / "foreign.safetensors", "a1111", 2)
    (folder / "junk.pt").write_bytes(b"not a pickle")
    engine = Engine(str(model), CPU, Tuning(max_batch=4, rows=True, embeddings=folder))
    assert engine.embeddings is not None
    assert set(engine.embeddings.loaded) == set(FILES)
    assert set(engine.embeddings.skipped) == {"foreign", "junk"}
    assert engine.embeddings.loaded["fluffy"]["vectors"] == 3
    # The API counts what the worker reads: "fluffy" is 3 tokens, "glow" 1.
    vocabulary = engine.published_tokenizer.vocabulary()
    assert count("fluffy", "plain", vocabulary)[0] == 3
    assert count("glow", "plain", vocabulary)[0] == 1

    kind = StableDiffusionXLPipeline if arch == "tiny-sdxl" else StableDiffusionPipeline
    options = {} if arch == "tiny-sdxl" else {"safety_checker": None}
    pipe = kind.from_pretrained(str(model), **options)
    pipe.scheduler = make_scheduler("euler", engine.scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    for name in sorted(FILES):  # the worker's order
        path = folder / f"{name}{suffixes[name]}"
        if arch == "tiny-sdxl":
            state = load_file(str(path))
            pipe.load_textual_inversion(state["clip_l"], token=name, text_encoder=pipe.text_encoder,
                                        tokenizer=pipe.tokenizer)  # fmt: skip
            pipe.load_textual_inversion(state["clip_g"], token=name,
                                        text_encoder=pipe.text_encoder_2,
                                        tokenizer=pipe.tokenizer_2)  # fmt: skip
        else:
            pipe.load_textual_inversion(str(path), token=name)
    theirs = {}
    for key, (prompt, negative) in ROWS.items():
        # diffusers' SDXL reads no negative prompt (None) as zeros, as sdserve reads "".
        generator = [torch.Generator().manual_seed(3)]
        made = pipe(prompt, negative_prompt=negative or None, height=64, width=64,
                    num_inference_steps=4, guidance_scale=6.0, generator=generator,
                    output_type="np").images  # fmt: skip
        theirs[key] = pixels(made)[0]
    shape = BatchShape(64, 64, 4, "euler")
    lanes = [engine.prepare(key, [ImageSpec(prompt, negative, 6.0, 3)], shape)
             for key, (prompt, negative) in ROWS.items()]  # fmt: skip
    ours = run(engine, lanes)
    for key in ROWS:
        assert max_diff(ours[key][0], theirs[key]) <= 1, key
    # The embeddings show: the same prompts through the model without them differ.
    plain = Engine(str(model), CPU, Tuning(max_batch=4, rows=True))
    spec = ImageSpec(*ROWS["both"], 6.0, 3)
    without = run(plain, [plain.prepare("k", [spec], shape)])["k"][0]
    assert max_diff(without, ours["both"][0]) > 2
    lane = plain.prepare("n", [ImageSpec("a cat", "", 6.0, 3)], shape)
    assert max_diff(run(plain, [lane])["n"][0], ours["none"][0]) <= 1


def test_a_refresh_takes_new_files(tiny_model: Path, tmp_path: Path) -> None:
    """refresh-embeddings (between steps): a file added since start is read, the published
    tokenizer changes with it, the ones there stay."""
    folder = tmp_path / "embeddings"
    build_tiny_embedding(tiny_model, folder / "glow.safetensors", "a1111", 1)
    engine = Engine(str(tiny_model), CPU, Tuning(max_batch=4, rows=True, embeddings=folder))
    before = engine.published_tokenizer.digest
    build_tiny_embedding(tiny_model, folder / "late.safetensors", "a1111", 2, seed=5)
    engine.embeddings_asked = True
    engine.refresh_embeddings()
    assert engine.embeddings is not None and set(engine.embeddings.loaded) == {"glow", "late"}
    assert engine.published_tokenizer.digest != before
    assert count("late", "plain", engine.vocabulary)[0] == 2 and not engine.embeddings_asked
    lane = engine.prepare(
        "k", [ImageSpec("a late cat", "", 6.0, 1)], BatchShape(64, 64, 2, "euler")
    )
    assert run(engine, [lane])["k"][0].shape == (64, 64, 3)


def test_a_refresh_reads_again_the_files_it_skipped(tiny_model: Path, tmp_path: Path) -> None:
    """A file skipped at start (met half-copied) loads at a refresh once it is whole; one
    skipped and removed since is no longer listed."""
    folder = tmp_path / "embeddings"
    whole = build_tiny_embedding(tiny_model, tmp_path / "glow.safetensors", "a1111", 1)
    folder.mkdir()
    (folder / "glow.safetensors").write_bytes(whole.read_bytes()[:40])  # half-copied
    (folder / "gone.pt").write_bytes(b"not an embedding")
    engine = Engine(str(tiny_model), CPU, Tuning(max_batch=4, rows=True, embeddings=folder))
    assert engine.embeddings is not None and set(engine.embeddings.skipped) == {"glow", "gone"}
    (folder / "glow.safetensors").write_bytes(whole.read_bytes())
    (folder / "gone.pt").unlink()
    engine.embeddings_asked = True
    engine.refresh_embeddings()
    assert set(engine.embeddings.loaded) == {"glow"} and engine.embeddings.skipped == {}
    assert count("glow", "plain", engine.vocabulary)[0] == 1
