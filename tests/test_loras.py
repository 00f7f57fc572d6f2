"""LoRA per row (issue 23, points 1-3): rows with different LoRAs (several, at different
weights, the text encoders' apart from the UNet's, or none) step in one UNet call each step, and
each image equals diffusers' pipeline with the same files loaded by `load_lora_weights` and set
by `set_adapters` at those weights (unfused), for its seed; a row without LoRAs beside them
equals the base model's image. On the tiny SD and SDXL models, with LoRAs the tests write in
diffusers/PEFT and kohya key layouts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from tests.test_rows import max_diff, run_counting_calls
from worker.adapters import LoraRefused, LoraUse
from worker.compiled import Tuning
from worker.engine import BatchShape, Engine, ImageSpec
from worker.schedulers import make_scheduler
from worker.tiny import build_tiny_model
from worker.tiny_addons import build_tiny_lora

CPU = torch.device("cpu")

# Steps of the comparison with diffusers; tests/test_lora_kernel.py runs it with fewer, since
# each step there is Triton's interpreter stepping every LoRA layer.
STEPS = 4

# Each row's LoRAs: (name, text encoders' weight, UNet's weight).
ROWS: dict[str, tuple[LoraUse, ...]] = {
    "peft": (LoraUse("peft", 0.8, 0.8),),
    "both": (LoraUse("peft", 0.5, 0.5), LoraUse("kohya", 1.0, 1.0)),
    "apart": (LoraUse("kohya", 0.3, 1.2),),  # A1111's <lora:kohya:0.3:1.2>
    "none": (),
}


@pytest.fixture(scope="module", params=["tiny", "tiny-sdxl"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    arch = request.param
    root = tmp_path_factory.mktemp(f"loras-{arch}")
    model = build_tiny_model(root / arch, arch)
    folder = root / "loras"
    build_tiny_lora(model, folder / "peft.safetensors", "peft", rank=4, seed=1)
    build_tiny_lora(model, folder / "kohya.safetensors", "kohya", rank=8, seed=2)
    tuning = Tuning(max_batch=4, rows=True, loras=folder, lora_slots=4, lora_row_rank=16)
    return arch, model, folder, Engine(str(model), CPU, tuning)


def pixels(images: np.ndarray) -> list[np.ndarray]:
    return list((np.asarray(images) * 255).round().astype(np.uint8))


def diffusers_images(arch: str, model: Path, folder: Path, engine: Engine) -> dict[str, Any]:
    kind = StableDiffusionXLPipeline if arch == "tiny-sdxl" else StableDiffusionPipeline
    options = {} if arch == "tiny-sdxl" else {"safety_checker": None}
    pipe = kind.from_pretrained(str(model), **options)
    pipe.scheduler = make_scheduler("euler", engine.scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    for name in ("peft", "kohya"):
        pipe.load_lora_weights(str(folder / f"{name}.safetensors"), adapter_name=name)
    text = ["text_encoder", "text_encoder_2"] if arch == "tiny-sdxl" else ["text_encoder"]
    out = {}
    for key, uses in ROWS.items():
        if uses:
            pipe.enable_lora()
            weights = [{"unet": u.unet} | {t: u.text for t in text} for u in uses]
            pipe.set_adapters([u.name for u in uses], weights)
        else:
            pipe.disable_lora()
        generator = [torch.Generator().manual_seed(5)]
        made = pipe("a red fox", negative_prompt="blurry", height=64, width=64,
                    num_inference_steps=STEPS, guidance_scale=6.0, generator=generator,
                    output_type="np").images  # fmt: skip
        out[key] = pixels(made)[0]
    return out


def test_each_row_takes_its_loras_as_diffusers_does(served: Any) -> None:
    arch, model, folder, engine = served
    theirs = diffusers_images(arch, model, folder, engine)
    assert max_diff(theirs["peft"], theirs["none"]) > 2, "the LoRA shows"
    assert max_diff(theirs["apart"], theirs["both"]) > 2
    shape = BatchShape(64, 64, STEPS, "euler")
    lanes = []
    for key, uses in ROWS.items():
        engine.adapters.fetch(key, uses)
        spec = ImageSpec("a red fox", "blurry", 6.0, 5, loras=uses)
        lanes.append(engine.prepare(key, [spec], shape))
    try:
        ours, calls = run_counting_calls(engine, lanes)  # every row in one UNet call per step
    finally:
        for key in ROWS:
            engine.adapters.release(key)
    assert calls == STEPS
    for key in ROWS:
        assert max_diff(ours[key][0], theirs[key]) <= 1, key


def test_what_a_worker_refuses(served: Any, tmp_path: Path) -> None:
    """An unknown name, a LoRA for another model, more ranks than a row takes: refused before
    anything loads; a corrupt file: unreadable."""
    arch, _model, folder, engine = served
    adapters = engine.adapters
    other = build_tiny_model(tmp_path / "other", "tiny-sdxl" if arch == "tiny" else "tiny")
    build_tiny_lora(other, folder / "foreign.safetensors", "peft", seed=3)
    build_tiny_lora(Path(engine.model), folder / "wide.safetensors", "peft", rank=24, seed=4)
    (folder / "broken.safetensors").write_bytes(b"\x00" * 64)
    adapters.refresh()
    try:
        for name, words in [("nope", "no LoRA named"), ("foreign", "another"),
                            ("wide", "rank 24"), ("broken", "not a safetensors file")]:  # fmt: skip
            with pytest.raises(LoraRefused, match=words):
                adapters.fetch("job", [LoraUse(name, 1.0, 1.0)])
        with pytest.raises(LoraRefused, match="ranks in all"):  # 8 + 16 > 16
            build_tiny_lora(Path(engine.model), folder / "r16.safetensors", "peft", rank=16)
            adapters.refresh()
            adapters.fetch("job", [LoraUse("kohya", 1, 1), LoraUse("r16", 1, 1)])
        assert set(adapters.names()) >= {"peft", "kohya", "r16"}
        assert not {"nope", "foreign", "wide", "broken"} & set(adapters.names())
    finally:
        for name in ("foreign", "wide", "broken", "r16"):
            (folder / f"{name}.safetensors").unlink(missing_ok=True)
        adapters.refresh()


def test_least_recently_used_leaves_first_and_held_ones_stay(served: Any) -> None:
    _arch, model, folder, engine = served
    adapters = engine.adapters
    for k in range(5):
        build_tiny_lora(model, folder / f"extra{k}.safetensors", "peft", rank=4, seed=10 + k)
    adapters.refresh()
    try:
        adapters.fetch("held", [LoraUse("extra0", 1, 1)])  # held by a job in flight
        for k in range(1, 5):  # 4 slots: each new one pushes out the oldest idle one
            adapters.fetch(f"job{k}", [LoraUse(f"extra{k}", 1, 1)])
            adapters.release(f"job{k}")
        assert "extra0" in adapters.resident and "extra1" not in adapters.resident
        assert len(adapters.resident) == 4
        misses = adapters.misses
        adapters.fetch("again", [LoraUse("extra4", 1, 1)])
        assert adapters.misses == misses, "a resident LoRA is not read again"
    finally:
        for name in ("held", "again"):
            adapters.release(name)
        for k in range(5):
            (folder / f"extra{k}.safetensors").unlink()
        adapters.refresh()


def test_resident_loras_are_held_at_the_take_others_are_fetched(served: Any) -> None:
    """`hold` takes a job's LoRAs on the loop's thread only where each is resident and written
    (no file read, no write); otherwise it holds nothing and the job's reader fetches them."""
    _arch, _model, _folder, engine = served
    adapters = engine.adapters
    adapters.refresh()  # nothing resident, nothing read
    both = [LoraUse("peft", 1, 1), LoraUse("kohya", 0.5, 0.5)]
    assert not adapters.hold("early", both), "nothing is resident yet"
    assert not any(adapters.resident.get(n) for n in ("peft", "kohya"))
    adapters.fetch("first", both[:1])
    assert not adapters.hold("mixed", both), "kohya is not resident: the reader fetches it"
    assert "mixed" not in adapters.resident["peft"].users, "nothing held for a refused hold"
    hits = adapters.hits
    assert adapters.hold("second", both[:1])
    assert adapters.hits == hits + 1 and adapters.resident["peft"].users == {"first", "second"}
    adapters.release("first")
    adapters.release("second")
    assert not adapters.resident["peft"].users, "a held LoRA is let go as a fetched one is"
    assert not adapters.hold("ghost", [LoraUse("missing", 1, 1)])
    with pytest.raises(LoraRefused, match="no LoRA named 'missing'"):
        adapters.fetch("ghost", [LoraUse("missing", 1, 1)])
