"""Compile helpers (worker/helpers.py): processes that compile parts of the warm-up beside it,
into the compile cache the warm-up then reads."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import sdserve_env
from worker import helpers
from worker.compiled import Tuning
from worker.engines import load_engines
from worker.helpers import Helpers
from worker.process import helped
from worker.settings import WorkerSettings

HELPER_SAYS = re.compile(
    r"compile helper: model (\S+) \((\w+)\) loaded in [\d.]+s, compiled in ([\d.]+)s"
    r" \(compile cache: (\d+) graphs found, (\d+) compiled\)"
)


def helper_env(tiny_model: Path, cache: Path) -> dict[str, str]:
    """The worker's settings as a helper reads them: inductor on the CPU (the GPU's compiler,
    C++ kernels in place of Triton ones), its cache in `cache`."""
    env = sdserve_env("redis://127.0.0.1:1/0", tiny_model, compile="on", device="cpu")
    # One compile thread: the suite runs beside it on few cores.
    return env | {"TORCHINDUCTOR_CACHE_DIR": str(cache), "TORCHINDUCTOR_COMPILE_THREADS": "1"}


def test_what_a_helper_compiles_the_warm_up_finds_in_the_cache(
    tiny_model: Path, tmp_path: Path
) -> None:
    """A helper compiles the VAE's decoder and encoder with inductor; a process that compiles
    another graph first and then the same parts by the warm-up's code (as a worker does after
    its UNet) finds both in the cache and compiles only its own."""
    env = helper_env(tiny_model, tmp_path / "cache")
    command = [sys.executable, "-m", "worker.compile_helper", "default", "rest", str(os.getpid())]
    cold = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    said = HELPER_SAYS.search(cold.stderr)
    assert cold.returncode == 0 and said, cold.stderr[-3000:]
    assert said.groups()[:2] == ("default", "rest") and said.groups()[3:] == ("0", "2")
    after_another = (
        "import os\nimport torch\n"
        "torch.compile(lambda x: (x * 2).sin(), backend='inductor')(torch.ones(3))\n"
        "from worker.compile_helper import main\n"
        "main(['default', 'rest', str(os.getppid())])\n"
    )
    warm = subprocess.run([sys.executable, "-c", after_another], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    found = HELPER_SAYS.search(warm.stderr)
    assert warm.returncode == 0 and found, warm.stderr[-3000:]
    assert found.groups()[3:] == ("2", "1")  # the decoder and the encoder found; its own made
    assert float(found.group(3)) < float(said.group(3)) / 2


def test_a_helper_that_fails_or_hangs_leaves_its_part_to_the_warm_up(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """A helper that exits with an error is said and waited for no longer; one that takes too
    long is stopped (its process gone) when the warm-up reaches its part."""
    for key, value in helper_env(tiny_model, tmp_path / "cache").items():
        monkeypatch.setenv(key, value)
    caplog.set_level(logging.INFO, "sdserve.worker")
    # Not among the settings' models: each helper exits 1. A third model gets none.
    failing = Helpers(["not-a-model", "nor-this", "nor-that"])
    assert sorted(failing._running) == ["nor-this", "not-a-model"]
    assert failing.compiles_unet("nor-this") and not failing.compiles_unet("nor-that")
    failing.wait("not-a-model")
    failing.wait("nor-that")  # no helper: nothing to wait for
    assert "the compile helper of not-a-model exited with 1" in caplog.text
    failing.stop()
    monkeypatch.setattr(helpers, "WAIT_S", 1.0)
    slow = Helpers(["default"])  # an inductor compile on this CPU: tens of seconds
    process = slow._running["default"]
    started = time.monotonic()
    slow.wait("default")
    assert time.monotonic() - started < 10 and process.poll() is not None
    assert "the compile helper of default took over 1s: stopped" in caplog.text
    slow.wait("default")  # stopped already: nothing to wait for
    slow.stop()


def test_a_helper_leaves_when_its_worker_is_killed(tiny_model: Path, tmp_path: Path) -> None:
    """A worker killed before it could stop its helpers (SIGKILL, an orchestrator's): the helper
    notices within seconds and exits, rather than compile on for nobody."""
    spawner = (  # a worker as far as its helpers go
        "import time\n"
        "from worker.helpers import Helpers\n"
        "helpers = Helpers(['default'])\n"
        "print(helpers._running['default'].pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    env = helper_env(tiny_model, tmp_path / "cache")
    worker = subprocess.Popen([sys.executable, "-c", spawner], env=env, stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    assert worker.stdout is not None
    helper = int(worker.stdout.readline())
    time.sleep(2)  # the helper is still importing torch (about 4 s on this CPU), or beyond
    assert alive(helper)
    worker.kill()
    worker.wait()
    deadline = time.monotonic() + 15
    while alive(helper) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(helper), "the helper outlived its worker"


def alive(pid: int) -> bool:
    """Running (not gone, nor a zombie waiting for init to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class Recorded:
    """Helpers as load_engines uses them, saying when it asks what: the first model's helper
    compiles its rest, the second's all of it."""

    def __init__(self) -> None:
        self.said: list[str] = []

    def compiles_unet(self, name: str) -> bool:
        return name == "second"

    def wait(self, name: str) -> None:
        self.said.append(f"wait {name}")

    def stop(self, name: str | None = None) -> None:
        self.said.append(f"stop {name}")

    def running(self) -> bool:
        return True


def test_each_model_warms_up_from_its_helper(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first model's warm-up waits for its helper after its UNet and before its VAE; a
    further model's before its warm-up; each helper is stopped once its model is warm."""
    from worker import compiled

    tuning = Tuning(max_batch=2, compile=True, compile_backend="eager", rows=True,
                    compiled_sizes=((64, 64),), prompt_chunks=1)  # fmt: skip
    recorded = Recorded()
    vae_warmed = compiled.CompiledCalls._warm_vae

    def warm_vae(calls: compiled.CompiledCalls, latent_scale: int) -> tuple[float, float]:
        recorded.said.append("vae")
        return vae_warmed(calls, latent_scale)

    monkeypatch.setattr(compiled.CompiledCalls, "_warm_vae", warm_vae)
    models = {"first": str(tiny_model), "second": str(tiny_model)}
    engines, _, _ = load_engines(models, torch.device("cpu"), tuning, recorded)  # type: ignore[arg-type]
    assert list(engines) == ["first", "second"]
    assert recorded.said == ["wait first", "vae", "stop first", "wait second", "vae",
                             "stop second"]  # fmt: skip


def test_helpers_are_on_where_inductor_compiles_on_a_large_gpu() -> None:
    cpu = torch.device("cpu")
    compiling = Tuning(max_batch=2, compile=True)
    assert not helped(WorkerSettings(), cpu, compiling)  # auto: a GPU's
    assert helped(WorkerSettings(compile_helpers="on"), cpu, compiling)
    assert not helped(WorkerSettings(compile_helpers="on"), cpu, Tuning(max_batch=2))
    assert not helped(WorkerSettings(compile_helpers="off"), cpu, compiling)


@pytest.mark.parametrize(("gib", "auto", "on"), [(24, 0, 2), (40, 2, 2), (48, 2, 2),
                                                 (79.1, 3, 3), (139.8, 6, 6)])  # fmt: skip
def test_a_gpu_with_room_for_more_copies_gives_more_models_a_helper(
    gib: float, auto: int, on: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two models get a helper on a GPU of 40 GiB, and one more for each further 20 GiB (an
    H100's 79 GiB: three, so SD 1.5 beside SDXL's base and refiner compiles aside too); set
    on, a smaller GPU still gets two; models past the count, or warmed, get none."""
    memory = type("Properties", (), {"total_memory": int(gib * 2**30)})()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _device: memory)
    gpu, compiling = torch.device("cuda"), Tuning(max_batch=2, compile=True)
    assert helped(WorkerSettings(), gpu, compiling) == auto
    assert helped(WorkerSettings(compile_helpers="on"), gpu, compiling) == on
    eager_backend = dataclasses.replace(compiling, compile_backend="eager")
    assert helped(WorkerSettings(), gpu, eager_backend) == 0
    models = ["base", "refiner", "sd15", "other"]
    assert helpers.helped_parts(models, ["refiner"], 3) == {"base": "rest", "sd15": "all"}
    assert helpers.helped_parts(models, (), auto) == dict(
        list({"base": "rest", "refiner": "all", "sd15": "all", "other": "all"}.items())[:auto]
    )


def test_a_warm_up_out_of_memory_beside_helpers_starts_again_without_them(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The helpers' copies of models may take the GPU memory a warm-up needs: then they are all
    stopped and the warm-up runs again alone (the worker starts, slower), where before helpers
    the model fitted."""
    from worker.engine import Engine

    tuning = Tuning(max_batch=2, rows=True, compiled_sizes=((64, 64),), prompt_chunks=1)
    recorded = Recorded()
    warmed = Engine.warm_up
    calls = []

    def warm_up(engine: Engine, helped: Any = None) -> None:
        calls.append(helped)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (a helper holds the rest)")
        warmed(engine, helped)

    monkeypatch.setattr(Engine, "warm_up", warm_up)
    models = {"first": str(tiny_model), "second": str(tiny_model)}
    engines, _, _ = load_engines(models, torch.device("cpu"), tuning, recorded)  # type: ignore[arg-type]
    assert list(engines) == ["first", "second"]
    assert recorded.said == ["stop None"]  # all stopped; none waited for again
    assert calls[0] is not None and calls[1:] == [None, None]  # again, then the second: alone


def test_a_start_from_a_cache_its_models_warmed_up_with_starts_no_helper_for_them(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start marks its models warmed in the compile cache; a start after it with that cache
    starts no helper for them (a helper there only imports and loads before it reads what the
    worker reads in seconds); a mark made under other compile settings, or a cache without
    marks, leaves the helpers on; a model not yet warmed keeps its helper beside one that
    was."""
    from worker import process

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SDSERVE_MODELS", f"first={tiny_model},second={tiny_model}")
    settings = WorkerSettings(compile_helpers="on")
    tuning, cpu = Tuning(max_batch=2, compile=True), torch.device("cpu")
    started: list[dict[str, str]] = []

    def helpers_of(models: list[str], warmed: Any = (), count: int = 2) -> dict[str, str]:
        started.append(helpers.helped_parts(models, warmed, count))
        return started[-1]

    monkeypatch.setattr(process, "Helpers", helpers_of)
    first = process.warm_marks(settings.held_models(), cpu, tuning)
    assert first.warmed() == []
    process.started_helpers(settings, cpu, tuning, first)
    assert started == [{"first": "rest", "second": "all"}]
    first.mark()
    again = process.warm_marks(settings.held_models(), cpu, tuning)
    assert again.warmed() == ["first", "second"]
    assert process.started_helpers(settings, cpu, tuning, again) is None
    other = dataclasses.replace(tuning, compiled_sizes=((768, 768),))
    assert process.warm_marks(settings.held_models(), cpu, other).warmed() == []
    assert helpers.helped_parts(["first", "second"], ["first"]) == {"second": "all"}
    assert len(started) == 1
    # Nothing compiles: no cache, no marks (and none written).
    plain = process.warm_marks(settings.held_models(), cpu, Tuning(max_batch=2))
    plain.mark()
    assert plain.warmed() == [] and len(list((tmp_path / "cache").rglob("*"))) == 3
