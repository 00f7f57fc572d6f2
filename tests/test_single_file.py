"""Single-file checkpoints (issue 23, 7; SD 1.x so far): `sdserve make-tiny-model DIR
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
