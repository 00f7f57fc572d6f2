"""The worker loop in this process, with a real Redis server and the tiny model on the CPU."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import torch
from PIL import Image

from app.jobs.contract import Status, Txt2ImgRequest
from app.jobs.keys import GROUP, STREAM
from app.jobs.storage import open_storage
from tests.conftest import JobStore, enqueue, stored_image, wait_for
from worker.engine import BatchShape, Engine, ImageSpec, Tuning
from worker.previews import Previews
from worker.rows import Lane
from worker.runner import Runner
from worker.settings import WorkerSettings


def runner(store: JobStore, model: Path, redis_url: str, **settings: Any) -> Runner:
    """A worker in this process (continuous batching: one UNet step per `step()`; `close()`
    runs the rows in flight to the end)."""
    options = {"max_batch": 16, "batch_window_ms": 200, "worker_name": "test-worker",
               "batching": "continuous", **settings}  # fmt: skip
    worker_settings = WorkerSettings(redis_url=redis_url, **options)
    tuning = Tuning(max_batch=worker_settings.max_batch, tile=worker_settings.tile,
                    tile_overlap=worker_settings.tile_overlap)  # fmt: skip
    engine = Engine(str(model), torch.device("cpu"), tuning)
    return Runner(worker_settings, store, engine, open_storage(worker_settings.storage))


def record_steps(r: Runner, monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Every UNet step the engine is asked for (it still runs them): the jobs of its lanes."""
    steps: list[list[str]] = []
    step = r.engines.first.step

    def recording(lanes: Sequence[Lane], previews: Collection[str] = ()) -> Previews | None:
        steps.append([lane.key for lane in lanes])
        return step(lanes, previews)

    monkeypatch.setattr(r.engines.first, "step", recording)
    return steps


def run_until_done(r: Runner, store: JobStore, ids: list[str], limit: int = 200) -> None:
    """Step the worker until every job has ended."""
    for _ in range(limit):
        views = [store.view(i) for i in ids]
        if all(v is not None and v.status not in (Status.QUEUED, Status.RUNNING) for v in views):
            return
        r.step()
    raise AssertionError(f"not ended in {limit} steps: {ids}")


def step_until_progress(r: Runner, store: JobStore, job_id: str) -> threading.Thread:
    """Run one step in a thread; return once `job_id` is past its first denoising step."""
    worker = threading.Thread(target=r.step)
    worker.start()

    def progressing() -> bool:
        view = store.view(job_id)
        return view is not None and view.progress is not None and view.progress.step > 0

    wait_for(progressing, 60, "progress")
    return worker


def run_once(r: Runner) -> int:
    r.open()
    try:
        return r.step()
    finally:
        r.close()  # waits until every result is stored


def submit(store: JobStore, **kw: Any) -> str:
    base = {"prompt": "x", "width": 64, "height": 96, "steps": 4, "seed": 1}
    return enqueue(store, Txt2ImgRequest.model_validate({**base, **kw}))


def png(store: JobStore, job_id: str, k: int) -> Image.Image:
    data = stored_image(job_id, k)
    assert data is not None, (job_id, k)
    return Image.open(io.BytesIO(data))


def max_diff(a: Image.Image, b: np.ndarray) -> int:
    return int(np.abs(np.asarray(a).astype(int) - b.astype(int)).max())


def alone(engine: Engine, store: JobStore, job_id: str, k: int) -> np.ndarray:
    """Image k of the job, computed by the engine with nobody else in the batch."""
    view = store.view(job_id)
    assert view is not None
    r = view.request
    shape = BatchShape(r.width, r.height, r.steps, r.scheduler)
    spec = ImageSpec(r.prompt, r.negative_prompt, r.guidance_scale, view.seeds[k])
    [image] = engine.generate([spec], shape) or [None]
    assert image is not None
    return image


def test_mixed_requests_step_together_and_land_on_their_own_jobs(
    store: JobStore,
    engine: Engine,
    tiny_model: Path,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ids = [
        submit(store, prompt="a red fox", seed=7, n=1),
        submit(
            store, prompt="a blue whale", negative_prompt="cartoon", seed=7, n=3, guidance_scale=2
        ),
        submit(store, prompt="a green frog", seed=1000, n=2, guidance_scale=12),
        submit(store, prompt="a red fox", seed=8, n=1, scheduler="dpmpp_2m"),
    ]
    r = runner(store, tiny_model, redis_url)
    steps = record_steps(r, monkeypatch)
    assert run_once(r) == 4
    assert sorted(steps[0]) == sorted(ids)  # one UNet call for all seven images
    for job_id in ids:
        view = store.view(job_id)
        assert view is not None and view.status is Status.SUCCEEDED, view
        assert len(view.images) == view.request.n
        for k, seed in enumerate(view.seeds):
            image = png(store, job_id, k)
            assert image.size == (64, 96)
            assert f"Seed: {seed}," in image.info["parameters"]
            assert view.request.prompt in image.info["parameters"]
            assert max_diff(image, alone(engine, store, job_id, k)) <= 1
    assert redis.Redis.from_url(redis_url).xpending(STREAM, GROUP)["pending"] == 0


def test_a_request_larger_than_max_batch_runs_alone_in_calls_of_the_cap(
    store: JobStore, engine: Engine, tiny_model: Path, redis_url: str
) -> None:
    job_id = submit(store, n=5, seed=50)
    r = runner(store, tiny_model, redis_url, max_batch=2)
    calls: list[int] = []
    r.engines.first.unet.register_forward_pre_hook(lambda _m, args: calls.append(len(args[0])))
    run_once(r)
    assert calls and max(calls) <= 4  # 10 rows, in UNet calls of at most 2 x max_batch
    view = store.view(job_id)
    assert view is not None and view.status is Status.SUCCEEDED and len(view.images) == 5
    for k in range(5):
        assert max_diff(png(store, job_id, k), alone(engine, store, job_id, k)) <= 1


def test_progress_shows_and_cancel_stops_a_running_job(
    store: JobStore, tiny_model: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = submit(store, width=512, height=512, steps=100)
    other = submit(store, steps=2)
    r = runner(store, tiny_model, redis_url)
    steps = record_steps(r, monkeypatch)
    r.open()
    worker = step_until_progress(r, store, job_id)
    worker.join(60)
    assert store.cancel(job_id)
    run_until_done(r, store, [job_id, other])  # the worker lives on
    r.close()
    assert sum(job_id in lanes for lanes in steps) < 100  # left at a step, not run to the end
    view = store.view(job_id)
    assert view is not None and view.status is Status.CANCELED and view.images == []
    assert stored_image(job_id, 0) is None
    done = store.view(other)
    assert done is not None and done.status is Status.SUCCEEDED
    assert redis.Redis.from_url(redis_url).xpending(STREAM, GROUP)["pending"] == 0


def test_non_finite_pixels_fail_the_job_with_a_typed_error(
    store: JobStore, tiny_model: Path, redis_url: str
) -> None:
    def nan(_m: torch.nn.Module, _a: object, output: torch.Tensor) -> torch.Tensor:
        return output * float("nan")

    job_id = submit(store)
    r = runner(store, tiny_model, redis_url)
    r.engines.first.vae.decoder.register_forward_hook(nan)
    run_once(r)
    view = store.view(job_id)
    assert view is not None and view.status is Status.FAILED and view.images == []
    assert view.error is not None and view.error.code == "numerical"


def test_an_engine_error_fails_its_jobs_and_the_worker_goes_on(
    store: JobStore, tiny_model: Path, redis_url: str
) -> None:
    def explode(_m: torch.nn.Module, _a: object) -> None:
        raise RuntimeError("injected fault")

    broken = submit(store)
    r = runner(store, tiny_model, redis_url)
    r.open()
    hook = r.engines.first.unet.register_forward_pre_hook(explode)
    try:
        r.step()
    finally:
        hook.remove()
    fine = submit(store)
    run_until_done(r, store, [broken, fine])
    r.close()
    failed, succeeded = store.view(broken), store.view(fine)
    assert failed is not None and failed.error is not None
    assert failed.status is Status.FAILED and failed.error.code == "engine_error"
    assert "injected fault" in failed.error.message
    assert succeeded is not None and succeeded.status is Status.SUCCEEDED


def test_close_hands_back_entries_read_but_not_run(
    store: JobStore, tiny_model: Path, redis_url: str
) -> None:
    ids = [submit(store, prompt=f"p{i}") for i in range(5)]
    r = runner(store, tiny_model, redis_url, max_batch=2, batch_window_ms=0)
    r.open()
    assert r.step() == 2
    wait_for(lambda: r.inbox.room() == 0, 10, "the next batch to be gathered")
    r.close()
    assert redis.Redis.from_url(redis_url).xpending(STREAM, GROUP)["pending"] == 0
    views = [store.view(i) for i in ids]
    assert [v.status if v else None for v in views] == [Status.SUCCEEDED] * 2 + [Status.QUEUED] * 3
    assert [v.position if v else None for v in views[2:]] == [0, 1, 2]
    assert sorted(d.job_id for d in store.read("another", 10, 100)) == sorted(ids[2:])


def oom_above(rows: int) -> Callable[[torch.nn.Module, tuple[Any, ...]], None]:
    """A UNet pre-hook that runs out of memory for more than `rows` images (CFG: 2 rows each)."""

    def hook(_m: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if len(args[0]) > 2 * rows:
            raise torch.cuda.OutOfMemoryError("injected: CUDA out of memory")

    return hook


def test_out_of_memory_splits_the_step_down_to_what_fits(
    store: JobStore,
    engine: Engine,
    tiny_model: Path,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ids = [submit(store, prompt=f"p{i}", seed=i, n=2) for i in range(3)]
    r = runner(store, tiny_model, redis_url, max_batch=8)
    steps = record_steps(r, monkeypatch)
    r.engines.first.unet.register_forward_pre_hook(oom_above(2))
    run_once(r)
    # 3 lanes of 2 images: out of memory; 1 lane fits, 2 lanes do not; then each alone.
    assert [len(lanes) for lanes in steps[:5]] == [3, 1, 2, 1, 1]
    for job_id in ids:
        view = store.view(job_id)
        assert view is not None and view.status is Status.SUCCEEDED, view
        for k in range(2):
            assert max_diff(png(store, job_id, k), alone(engine, store, job_id, k)) <= 1


def test_one_image_that_does_not_fit_fails_alone(
    store: JobStore, tiny_model: Path, redis_url: str
) -> None:
    too_big = submit(store, width=512, height=512, seed=1)
    fits = submit(store, seed=2)
    r = runner(store, tiny_model, redis_url)

    def oom_at_512(_m: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if args[0].shape[-1] == 64:  # latents of 512 px
            raise torch.cuda.OutOfMemoryError("injected: CUDA out of memory")

    r.engines.first.unet.register_forward_pre_hook(oom_at_512)
    run_once(r)
    failed, ok = store.view(too_big), store.view(fits)
    assert failed is not None and failed.error is not None
    assert failed.status is Status.FAILED and failed.error.code == "out_of_memory"
    assert ok is not None and ok.status is Status.SUCCEEDED


def test_past_the_stop_grace_the_batch_goes_back_to_the_queue(
    store: JobStore, tiny_model: Path, redis_url: str
) -> None:
    job_id = submit(store, width=512, height=512, steps=100)
    r = runner(store, tiny_model, redis_url, stop_grace_s=0)
    r.open()
    worker = step_until_progress(r, store, job_id)
    r.stop()
    worker.join(60)
    r.close()
    assert redis.Redis.from_url(redis_url).xpending(STREAM, GROUP)["pending"] == 0
    [again] = store.read("next-worker", 10, 100)  # in the stream again, for anyone
    assert again.job_id == job_id
    [job] = store.start([again], "next-worker")
    assert job.id == job_id


def test_suspects_are_taken_over_one_at_a_time_and_run_alone(
    store: JobStore, tiny_model: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = [submit(store, prompt=f"p{i}") for i in range(3)]
    store.ensure_group()
    store.start(store.read("died-once", 10, 100), "died-once")
    # Delivered twice now, all three; each time started by a worker that died.
    store.start(store.reclaim("died-twice", 0, cap=3, count=10), "died-twice")
    options = {"heartbeat_ttl_s": 3, "claim_idle_s": 3, "worker_name": "third"}
    r = runner(store, tiny_model, redis_url, **options)
    steps = record_steps(r, monkeypatch)
    r.open()

    def all_ended() -> bool:
        r.step()
        return all(v is not None and v.status is Status.SUCCEEDED for v in map(store.view, ids))

    wait_for(all_ended, 60, "the suspects to be taken over and run")
    r.close()
    assert steps and all(len(lanes) == 1 for lanes in steps)  # each alone
    assert {key for lanes in steps for key in lanes} == set(ids)


def test_a_package_without_cached_bytecode_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker says at start which of its largest imports had no bytecode to read (each start
    then compiles their sources again); compiled, the package is not named."""
    import py_compile

    from worker.bytecode import without_bytecode

    package = tmp_path / "sourceonly"
    package.mkdir()
    (package / "__init__.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert without_bytecode(("sourceonly", "no_such_package")) == ["sourceonly"]
    py_compile.compile(str(package / "__init__.py"), doraise=True)
    assert without_bytecode(("sourceonly",)) == []
