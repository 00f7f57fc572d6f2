"""Single-file checkpoints (issue 23, 7): `sdserve make-tiny-model DIR [--arch ARCH]
--single-file OUT.safetensors` writes the tiny model as one checkpoint of the original layout;
a worker given `OUT.safetensors;config=DIR` reads it offline, says what the weights are, and
makes the same images as the diffusers folder it came from. A pickled checkpoint, or one
without its configuration, stops the settings, naming why."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from app.cli import main
from tests.test_rows import run
from worker.compiled import Tuning
from worker.engine import BatchShape, Engine, ImageSpec
from worker.engines import load_engines
from worker.settings import WorkerSettings
from worker.single_file import as_folder

CPU = torch.device("cpu")


def test_a_single_file_checkpoint_makes_its_folders_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    redis_url: str,
) -> None:  # fmt: skip
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder, file = tmp_path / "tiny", tmp_path / "tiny.safetensors"
    main(["make-tiny-model", str(folder), "--single-file", str(file)])
    assert file.is_file()
    entry = f"{file};config={folder}"
    settings = WorkerSettings(redis_url=redis_url, models={"sd": entry})
    for wrong, why in [(str(file), "config=FOLDER"), (f"{tmp_path}/x.ckpt", "pickled"),
                       (f"{file};config={tmp_path}", "config=FOLDER")]:  # fmt: skip
        with pytest.raises(ValueError, match=why):
            WorkerSettings(redis_url=redis_url, models={"sd": wrong})
    tuning = Tuning(max_batch=2, rows=True)
    with caplog.at_level(logging.INFO, logger="sdserve.models"):
        engines, _load, _warm = load_engines(settings.held_models(), CPU, tuning)
    assert "tiny.safetensors: v1 (detected from its weights)" in caplog.text
    again, _load, _warm = load_engines(settings.held_models(), CPU, tuning)  # from the cache
    assert again["sd"].model == engines["sd"].model
    original = Engine(str(folder), CPU, tuning)
    shape = BatchShape(64, 64, 3, "euler")
    images = []
    for engine in (engines["sd"], original):
        lane = engine.prepare("k", [ImageSpec("a red fox", "blurry", 6.0, 2)], shape)
        images.append(run(engine, [lane])["k"][0])
    assert np.array_equal(images[0], images[1])


LAYOUTS = [("sd15-inpaint", "inpainting"), ("tiny-sd2", "v2"), ("tiny-sdxl", "xl_base"),
           ("tiny-sdxl-refiner", "xl_refiner")]  # fmt: skip


@pytest.mark.parametrize(("arch", "kind"), LAYOUTS)
def test_every_layout_reads_back_weight_for_weight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    arch: str, kind: str,
) -> None:  # fmt: skip
    """SD 2.x (OpenCLIP's layout, v-prediction), inpainting, SDXL's base (two encoders) and
    refiner: written as A1111 users hold them, detected as what they are, read back into the
    same pipeline, weight for weight, with the same scheduler (so the same images)."""
    from diffusers import DiffusionPipeline

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder, file = tmp_path / arch, tmp_path / f"{arch}.safetensors"
    main(["make-tiny-model", str(folder), "--arch", arch, "--single-file", str(file)])
    with caplog.at_level(logging.INFO, logger="sdserve.models"):
        converted = as_folder(str(file), str(folder))
    assert f"{file.name}: {kind} (detected from its weights)" in caplog.text
    assert "look like" not in caplog.text  # the configuration's pipeline is the weights'
    mine, theirs = (
        DiffusionPipeline.from_pretrained(converted),
        DiffusionPipeline.from_pretrained(str(folder)),
    )
    assert type(mine) is type(theirs)
    assert mine.scheduler.config == theirs.scheduler.config
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, original = getattr(mine, name, None), getattr(theirs, name, None)
        if original is None or ours is None:
            assert ours is original is None, name
            continue
        want = original.state_dict()
        got = ours.state_dict()
        assert got.keys() == want.keys(), name
        assert all(torch.equal(got[k], want[k]) for k in want), name


@pytest.mark.parametrize("arch", ["tiny-sd2", "tiny-sdxl"])
def test_sd2_and_sdxl_files_make_their_folders_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arch: str
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder, file = tmp_path / arch, tmp_path / f"{arch}.safetensors"
    main(["make-tiny-model", str(folder), "--arch", arch, "--single-file", str(file)])
    tuning = Tuning(max_batch=2, rows=True)
    shape = BatchShape(64, 64, 3, "euler")
    images = []
    for source in (as_folder(str(file), str(folder)), str(folder)):
        engine = Engine(source, CPU, tuning)
        lane = engine.prepare("k", [ImageSpec("a red fox", "blurry", 6.0, 2)], shape)
        images.append(run(engine, [lane])["k"][0])
    assert np.array_equal(images[0], images[1])


def test_a_v_pred_key_makes_the_unet_predict_v(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A checkpoint that carries `v_pred` (v-prediction merges and finetunes) predicts v even
    where its configuration folder says epsilon; one without it keeps the folder's."""
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file, save_file

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder, file = tmp_path / "tiny", tmp_path / "tiny.safetensors"
    main(["make-tiny-model", str(folder), "--single-file", str(file)])
    marked = tmp_path / "tiny-v.safetensors"
    save_file(load_file(str(file)) | {"v_pred": torch.tensor([])}, str(marked))
    with caplog.at_level(logging.INFO, logger="sdserve.models"):
        plain, v = as_folder(str(file), str(folder)), as_folder(str(marked), str(folder))
    assert "tiny-v.safetensors: v-prediction (its 'v_pred' key)" in caplog.text
    assert DiffusionPipeline.from_pretrained(plain).scheduler.config.prediction_type == "epsilon"
    assert DiffusionPipeline.from_pretrained(v).scheduler.config.prediction_type == "v_prediction"
