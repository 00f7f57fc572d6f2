"""The worker with continuous batching (`SDSERVE_BATCHING=continuous`), on the CPU with the tiny
model and a real Valkey: jobs of any steps, schedulers, guidance and size run at once, each
image equals its job made alone, jobs join between steps, cancel leaves at the next step, and
progress is per job."""

from __future__ import annotations

import base64
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis

from app.jobs.contract import Status
from app.jobs.keys import GROUP, STREAM
from tests.conftest import SERVED, JobStore, wait_for
from tests.test_sources import picture
from tests.test_uploads import encoded
from tests.test_worker import alone, max_diff, png, record_steps, run_until_done, runner, submit
from worker.runner import Runner


def serve(r: Runner, until: threading.Event) -> threading.Thread:
    def loop() -> None:
        while not until.is_set():
            r.step()

    thread = threading.Thread(target=loop)
    thread.start()
    SERVED.append((until, thread))  # stopped after the test if the test did not stop it
    return thread


def continuous(store: JobStore, model: Path, redis_url: str, **settings: Any) -> Runner:
    return runner(store, model, redis_url, batching="continuous", **settings)


def test_a_mix_runs_at_once_and_each_image_equals_its_job_alone(
    store: JobStore, tiny_model: Path, redis_url: str
) -> None:
    mix: list[dict[str, Any]] = [
        {"steps": 3, "scheduler": "dpmpp_2m", "guidance_scale": 7.5, "seed": 1},
        {"steps": 6, "scheduler": "euler_a", "guidance_scale": 4.0, "seed": 2, "n": 2},
        {"steps": 2, "scheduler": "ddim", "guidance_scale": 9.0, "seed": 3},
        {"steps": 5, "scheduler": "unipc", "guidance_scale": 6.0, "seed": 4, "width": 96,
         "height": 64},
        {"steps": 4, "scheduler": "lms", "guidance_scale": 5.0, "seed": 5, "prompt": "b"},
    ]  # fmt: skip
    ids = [submit(store, **kw) for kw in mix]
    r = continuous(store, tiny_model, redis_url)
    r.open()
    done = threading.Event()
    worker = serve(r, done)
    wait_for(lambda: all(_status(store, i) is Status.SUCCEEDED for i in ids), 120, "the mix")
    done.set()
    worker.join(60)
    r.close()
    for job_id, kw in zip(ids, mix, strict=True):
        for k in range(int(kw.get("n", 1))):
            # The static engine alone: the same images, up to fp32 rounding of the batch.
            assert max_diff(png(store, job_id, k), alone(r.engines.first, store, job_id, k)) <= 1
    assert redis.Redis.from_url(redis_url).xpending(STREAM, GROUP)["pending"] == 0


def test_a_job_joins_between_steps_and_cancel_leaves_at_the_next_one(
    store: JobStore, tiny_model: Path, redis_url: str
) -> None:
    long_id = submit(store, steps=60, width=256, height=256, seed=7)
    doomed = submit(store, steps=60, width=256, height=256, seed=8)
    r = continuous(store, tiny_model, redis_url, max_batch=4)
    r.open()
    done = threading.Event()
    worker = serve(r, done)
    wait_for(lambda: _step(store, long_id) >= 3, 120, "the long job to be under way")
    late = submit(store, steps=2, seed=9)  # joins the rows in flight, finishes first
    wait_for(lambda: _status(store, late) is Status.SUCCEEDED, 120, "the late job")
    assert _status(store, long_id) is Status.RUNNING  # it did not wait for the long one
    at_cancel = _step(store, doomed)
    assert store.cancel(doomed)
    wait_for(lambda: _status(store, long_id) is Status.SUCCEEDED, 300, "the long job")
    done.set()
    worker.join(60)
    r.close()
    assert 0 < at_cancel < 60 and _status(store, doomed) is Status.CANCELED
    assert max_diff(png(store, late, 0), alone(r.engines.first, store, late, 0)) <= 1
    assert redis.Redis.from_url(redis_url).xpending(STREAM, GROUP)["pending"] == 0


def test_a_job_is_taken_in_the_step_that_frees_its_room_and_joins_at_the_next(
    api: httpx.Client,
    store: JobStore,
    tiny_model: Path,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An img2img job's picture is read while the step that frees its room runs, so it joins
    at the next step; taken only once its room was free, it joined a step later (its picture
    still being read) and its rows stayed empty that step."""
    leaving = submit(store, steps=2, seed=1)
    staying = submit(store, steps=8, seed=2)
    r = continuous(store, tiny_model, redis_url, max_batch=2)
    steps = record_steps(r, monkeypatch)
    r.open()
    try:
        wait_for(lambda: r.inbox.room() <= r.inbox.capacity - 2, 30, "both jobs read")
        r.step()
        assert steps == [[leaving, staying]]
        image = base64.b64encode(encoded(picture(), "PNG")).decode()
        made = api.post("/v1/img2img", json={"prompt": "x", "image": image, "strength": 0.5,
                                             "steps": 4, "seed": 3})  # fmt: skip
        assert made.status_code == 202, made.text
        later = made.json()["id"]
        wait_for(lambda: r.inbox.room() < r.inbox.capacity, 30, "the img2img job read")
        r.step()  # `leaving`'s last: the images in flight are at max_batch until it ends
        assert steps[-1] == [leaving, staying]
        assert _status(store, later) is Status.RUNNING  # taken for the room this step freed
        wait_for(lambda: r.loop.loading[later].done() and r.loop.prompts[later].done(), 30,
                 "its picture and prompt read")  # fmt: skip
        r.step()
        assert steps[-1] == [staying, later]  # no step went by without it
        run_until_done(r, store, [leaving, staying, later])
    finally:
        r.close()
    assert all(_status(store, i) is Status.SUCCEEDED for i in (leaving, staying, later))


def test_jobs_slow_to_be_ready_are_taken_calls_ahead_and_join_when_the_room_frees(
    store: JobStore, tiny_model: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When jobs take several calls to be ready (LoRAs, pictures, prompts read beside busy
    steps), they are taken that many calls before their room frees, so they are ready by then;
    they still join only once it is free."""
    leaving = submit(store, steps=4, seed=1)
    staying = submit(store, steps=12, seed=2)
    r = continuous(store, tiny_model, redis_url, max_batch=2)
    steps = record_steps(r, monkeypatch)
    r.open()
    monkeypatch.setattr(r.loop.readiness, "ahead", lambda: 3)
    try:
        wait_for(lambda: r.inbox.room() <= r.inbox.capacity - 2, 30, "both jobs read")
        r.step()
        assert steps == [[leaving, staying]]
        early = submit(store, steps=4, seed=3)
        wait_for(lambda: r.inbox.room() < r.inbox.capacity, 30, "the new job read")
        r.step()  # `leaving` has 3 calls left then: its room is 3 calls ahead
        assert _status(store, early) is Status.RUNNING  # taken, not joined
        assert steps[-1] == [leaving, staying]
        wait_for(lambda: r.loop.prompts.get(early) is None or r.loop.prompts[early].done(), 30,
                 "its prompt read")  # fmt: skip
        r.step()
        r.step()  # `leaving`'s last
        assert steps[-2:] == [[leaving, staying]] * 2  # the room was not free: it waited
        r.step()
        assert steps[-1] == [staying, early]  # joined at the call after the room freed
        run_until_done(r, store, [leaving, staying, early])
    finally:
        r.close()
    assert all(_status(store, i) is Status.SUCCEEDED for i in (leaving, staying, early))


def test_stopping_finishes_the_rows_in_flight_and_hands_back_the_rest(
    store: JobStore, tiny_model: Path, redis_url: str
) -> None:
    # Long enough that it is still running after the half second below on any CPU (30 steps
    # at 256x256 once ended within it, and the queued job was taken).
    running = submit(store, steps=100, width=384, height=384)
    r = continuous(store, tiny_model, redis_url, max_batch=1)
    r.open()
    done = threading.Event()
    worker = serve(r, done)
    wait_for(lambda: _step(store, running) >= 1, 120, "the job to run")
    queued = submit(store, steps=2, seed=3)  # read, but no room in flight: it stays queued
    wait_for(lambda: r.inbox.room() < r.inbox.capacity, 30, "the job to be read")
    time.sleep(0.5)  # steps go on; it is not taken
    assert _status(store, queued) is Status.QUEUED
    done.set()
    worker.join(60)
    r.close()  # finishes `running`, hands `queued` back
    assert _status(store, running) is Status.SUCCEEDED
    view = store.view(queued)
    assert view is not None and view.status is Status.QUEUED and view.position == 0


def _status(store: JobStore, job_id: str) -> Status | None:
    view = store.view(job_id)
    return view.status if view else None


def _step(store: JobStore, job_id: str) -> int:
    view = store.view(job_id)
    return view.progress.step if view and view.progress else 0


def test_the_seed_contract_holds_across_modes(
    store: JobStore, tiny_model: Path, redis_url: str
) -> None:
    """The same request gives the same image in static and continuous mode."""
    job_id = submit(store, steps=3, seed=11, guidance_scale=8.0)
    r = continuous(store, tiny_model, redis_url)
    r.open()
    deadline = time.monotonic() + 60
    while _status(store, job_id) is not Status.SUCCEEDED and time.monotonic() < deadline:
        r.step()
    r.close()
    image = np.asarray(png(store, job_id, 0))
    assert max_diff(png(store, job_id, 0), alone(r.engines.first, store, job_id, 0)) <= 1
    assert image.shape == (96, 64, 3)


def encoder_calls(engine: Any, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every call of the engine's text encoder (it still runs): the thread that made it, and
    the rows it encoded."""
    encoder = engine.parts.text_encoder
    forward = encoder.forward
    calls: list[tuple[str, int]] = []

    def recording(ids: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append((threading.current_thread().name, len(ids)))
        return forward(ids, *args, **kwargs)

    monkeypatch.setattr(encoder, "forward", recording)
    return calls


def test_the_prompts_of_jobs_taken_together_are_read_off_the_loop_in_one_encoder_call(
    store: JobStore, tiny_model: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Jobs taken while rows are in flight have their prompts encoded by the prompt reader's
    thread, batched (five prompts: one call of the encoder's fixed 8 rows), and join once
    read: at their joins the loop's thread encodes nothing. (Each joined alone, every join
    ran the text encoder on the GPU's thread, one job at a time.)"""
    first = submit(store, steps=30, seed=1, prompt="the first")
    r = continuous(store, tiny_model, redis_url, max_batch=8)
    calls = encoder_calls(r.engines.first, monkeypatch)
    steps = record_steps(r, monkeypatch)
    r.open()
    try:
        wait_for(lambda: r.inbox.room() < r.inbox.capacity, 30, "the first job read")
        r.step()
        assert steps == [[first]]
        calls.clear()
        others = [submit(store, steps=3, seed=2 + k, prompt=f"prompt {k}") for k in range(5)]
        wait_for(lambda: r.inbox.room() <= r.inbox.capacity - 5, 30, "the five jobs read")
        r.step()  # takes them, while the first job's rows are in flight
        assert set(others) <= set(r.loop.prompts) | set(r.loop.lanes)  # taken
        wait_for(lambda: all(r.loop.prompts[k].done() for k in others if k in r.loop.prompts),
                 30, "their prompts read")  # fmt: skip
        r.step()
        assert set(others) <= set(steps[-1])  # all joined
        run_until_done(r, store, [first, *others])
    finally:
        r.close()
    assert [name.startswith("prompts") for name, _rows in calls] == [True]
    assert calls[0][1] == 8  # five prompts padded to one fixed batch
    for job_id in others:
        assert _status(store, job_id) is Status.SUCCEEDED
        assert max_diff(png(store, job_id, 0), alone(r.engines.first, store, job_id, 0)) <= 1


def lora_worker(tiny_model: Path, redis_url: str, tmp_path: Path) -> tuple[Any, Any]:
    """A continuous worker's settings and CPU engine serving two LoRAs the test writes
    (`style`, PEFT rank 4; `detail`, kohya rank 8)."""
    import torch

    from worker.engine import Engine, Tuning
    from worker.settings import WorkerSettings
    from worker.tiny_addons import build_tiny_lora

    folder = tmp_path / "loras"
    folder.mkdir()
    build_tiny_lora(tiny_model, folder / "style.safetensors", "peft", rank=4, seed=1)
    build_tiny_lora(tiny_model, folder / "detail.safetensors", "kohya", rank=8, seed=2)
    settings = WorkerSettings(redis_url=redis_url, max_batch=8, batch_window_ms=200,
                              worker_name="test-worker", batching="continuous",
                              lora_dir=folder)  # fmt: skip
    engine = Engine(str(tiny_model), torch.device("cpu"),
                    Tuning(max_batch=8, rows=True, loras=folder, lora_slots=4,
                           lora_row_rank=16))  # fmt: skip
    return settings, engine


def test_jobs_with_loras_have_their_prompts_read_together_once_their_loras_are_resident(
    store: JobStore,
    tiny_model: Path,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Jobs with LoRAs taken together wait (not joined) while their LoRAs are made resident,
    then their prompts are read in one encoder call on the prompt reader's thread, each row
    with its own LoRAs, and each image equals its job made alone with its LoRAs. (Read one job
    at a time by each job's reader thread, they joined late: on an H200, half of a uniform
    load with LoRAs stepped 48 rows of 62, 2026-12-05.)"""
    from app.jobs.storage import open_storage
    from worker.adapters import LoraUse
    from worker.engine import BatchShape, ImageSpec

    settings, engine = lora_worker(tiny_model, redis_url, tmp_path)
    adapters = engine.adapters
    assert adapters is not None
    first = submit(store, steps=30, seed=1, prompt="the first")
    r = Runner(settings, store, engine, open_storage(settings.storage))
    calls = encoder_calls(engine, monkeypatch)
    gate = threading.Event()  # the LoRAs come when the test says
    fetch = adapters.fetch

    def held(key: str, uses: Any) -> None:
        assert gate.wait(30)
        fetch(key, uses)

    monkeypatch.setattr(adapters, "fetch", held)
    steps = record_steps(r, monkeypatch)
    r.open()
    try:
        wait_for(lambda: r.inbox.room() < r.inbox.capacity, 30, "the first job read")
        r.step()
        calls.clear()
        loras: list[list[dict[str, Any]]] = [
            [{"name": "style", "weight": 0.8}], [{"name": "detail", "weight": 1.1}],
            [{"name": "style", "weight": 0.5}, {"name": "detail", "weight": 0.7}]]  # fmt: skip
        with_loras = [submit(store, steps=3, seed=2 + k, prompt=f"prompt {k}", loras=uses)
                      for k, uses in enumerate(loras)]  # fmt: skip
        plain = submit(store, steps=3, seed=9, prompt="no lora")
        wait_for(lambda: r.inbox.room() <= r.inbox.capacity - 4, 30, "the four jobs read")
        r.step()  # takes them: the plain job's prompt is read, the others' wait
        wait_for(lambda: r.loop.prompts[plain].done(), 30, "the plain job's prompt read")
        r.step()
        assert plain in steps[-1] and not set(with_loras) & set(steps[-1])
        assert set(with_loras) <= set(r.loop.waiting)  # taken, waiting for their LoRAs
        time.sleep(0.3)  # their LoRAs take a while: the join wait's inputs part says so
        gate.set()
        wait_for(lambda: all(r.loop.loading[k].done() for k in with_loras), 30, "their LoRAs")
        r.step()  # their prompts, read together
        wait_for(lambda: all(r.loop.prompts[k].done() for k in with_loras), 30, "read")
        r.step()
        assert set(with_loras) <= set(steps[-1])  # all joined
        run_until_done(r, store, [first, *with_loras, plain])
        registry = r.metrics.registry

        def waited(part: str) -> float:
            value = registry.get_sample_value("sdserve_worker_join_wait_parts_seconds_total",
                                              {"part": part})  # fmt: skip
            assert value is not None
            return value

        assert waited("inputs") >= 3 * 0.3  # the three jobs' LoRAs, held
        total = registry.get_sample_value("sdserve_worker_join_wait_seconds_sum")
        parts = sum(waited(part) for part in ("inputs", "prompts", "room"))
        assert total is not None and parts == pytest.approx(total, abs=1e-6)
    finally:
        gate.set()
        r.close()
    # The plain job's prompt (its negative is the first job's), then the six of the three
    # jobs with LoRAs (each prompt and negative prompt read with its job's LoRAs): 8 rows each.
    assert calls == [("prompts_0", 8), ("prompts_0", 8)], calls
    for job_id, uses in zip(with_loras, loras, strict=True):
        assert _status(store, job_id) is Status.SUCCEEDED
        view = store.view(job_id)
        assert view is not None
        rows = tuple(LoraUse(u["name"], u["weight"], u["weight"]) for u in uses)
        fetch("alone", rows)
        try:
            spec = ImageSpec(view.request.prompt, "", view.request.guidance_scale, view.seeds[0],
                             loras=rows)  # fmt: skip
            [image] = engine.generate([spec], BatchShape(64, 96, 3, view.request.scheduler)) or [
                None
            ]
        finally:
            adapters.release("alone")
        assert image is not None and max_diff(png(store, job_id, 0), image) <= 1
    assert max_diff(png(store, plain, 0), alone(engine, store, plain, 0)) <= 1


def test_a_job_whose_loras_are_resident_is_read_with_the_others_at_its_take(
    store: JobStore,
    tiny_model: Path,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """A job whose LoRAs are resident holds them at its take on the loop's thread (no reader
    thread, no step waiting for it): its prompts are read in the same encoder call as a plain
    job's taken with it, it joins at the same step, and its image equals the job made alone.
    (Through a reader's hop, half of a load with LoRAs took 1.2 s more from taken to ready
    than the other half, its LoRAs resident: an H200, 2026-12-06.)"""
    from app.jobs.storage import open_storage
    from worker.adapters import LoraUse
    from worker.engine import BatchShape, ImageSpec

    settings, engine = lora_worker(tiny_model, redis_url, tmp_path)
    adapters = engine.adapters
    assert adapters is not None
    rows = (LoraUse("style", 0.8, 0.8),)
    adapters.fetch("earlier", rows)  # an earlier job's: resident
    adapters.release("earlier")

    def no_fetch(key: str, uses: Any) -> None:
        raise AssertionError("a resident LoRA is held at the take, not fetched")

    monkeypatch.setattr(adapters, "fetch", no_fetch)
    first = submit(store, steps=30, seed=1, prompt="the first")
    r = Runner(settings, store, engine, open_storage(settings.storage))
    calls = encoder_calls(engine, monkeypatch)
    steps = record_steps(r, monkeypatch)
    r.open()
    try:
        wait_for(lambda: r.inbox.room() < r.inbox.capacity, 30, "the first job read")
        r.step()
        calls.clear()
        styled = submit(store, steps=3, seed=2, prompt="styled",
                        loras=[{"name": "style", "weight": 0.8}])  # fmt: skip
        plain = submit(store, steps=3, seed=9, prompt="no lora")
        wait_for(lambda: r.inbox.room() <= r.inbox.capacity - 2, 30, "the two jobs read")
        r.step()  # takes both: one read of their prompts
        assert not r.loop.fetching  # none waits for a reader
        assert adapters.resident["style"].users == {styled}
        wait_for(lambda: all(r.loop.prompts[k].done() for k in (styled, plain)), 30, "read")
        r.step()
        assert {styled, plain} <= set(steps[-1])  # joined together
        run_until_done(r, store, [first, styled, plain])
        assert not adapters.resident["style"].users, "let go when the job ended"
    finally:
        r.close()
    assert calls == [("prompts_0", 8)], calls  # both jobs' prompts and negatives: one call
    assert _status(store, styled) is Status.SUCCEEDED
    view = store.view(styled)
    assert view is not None
    spec = ImageSpec(view.request.prompt, "", view.request.guidance_scale, view.seeds[0],
                     loras=rows)  # fmt: skip
    [image] = engine.generate([spec], BatchShape(64, 96, 3, view.request.scheduler)) or [None]
    assert image is not None and max_diff(png(store, styled, 0), image) <= 1


def test_a_prompt_that_cannot_be_read_ahead_fails_its_job_alone(
    store: JobStore, tiny_model: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Among jobs taken together, one whose prompt is over the worker's chunks: the others'
    prompts are still read ahead (one encoder call each, on the prompt reader's thread), and
    that job fails at its join with the reason, the others succeed."""
    first = submit(store, steps=30, seed=1, prompt="the first")
    r = continuous(store, tiny_model, redis_url, max_batch=8)
    calls = encoder_calls(r.engines.first, monkeypatch)
    r.open()
    try:
        wait_for(lambda: r.inbox.room() < r.inbox.capacity, 30, "the first job read")
        r.step()
        calls.clear()
        too_long = "word " * 400  # over the engine's 4 chunks of 75 tokens
        ids = [submit(store, steps=3, seed=2, prompt="fine one"),
               submit(store, steps=3, seed=3, prompt=too_long),
               submit(store, steps=3, seed=4, prompt="fine two")]  # fmt: skip
        wait_for(lambda: r.inbox.room() <= r.inbox.capacity - 3, 30, "the three jobs read")
        run_until_done(r, store, [first, *ids])
    finally:
        r.close()
    assert calls and all(name.startswith("prompts") for name, _rows in calls)
    assert [_status(store, i) for i in ids] == [Status.SUCCEEDED, Status.FAILED, Status.SUCCEEDED]
    view = store.view(ids[1])
    assert view is not None and view.error is not None and "chunks" in view.error.message


def test_an_idle_loop_warms_what_the_start_left_one_entry_a_step_and_takes_jobs_first(
    store: JobStore, tiny_model: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With warm-up entries left for idle time (a compiled worker's middle row buckets and
    longer prompts), an idle step looks for jobs without waiting its idle second and records
    one entry; a step that finds a job takes it and records none."""
    r = continuous(store, tiny_model, redis_url, max_batch=2)
    left = [3]
    monkeypatch.setattr(r.engines, "warming", lambda: left[0] > 0)

    def warm_next() -> bool:
        left[0] -= 1
        return True

    monkeypatch.setattr(r.engines, "warm_next", warm_next)
    r.open()
    try:
        began = time.monotonic()
        r.step()
        assert left == [2] and time.monotonic() - began < 0.5
        job = submit(store, steps=2, seed=1)
        wait_for(lambda: r.inbox.room() < r.inbox.capacity, 30, "the job read")
        r.step()
        assert left == [2] and _status(store, job) is Status.RUNNING
        run_until_done(r, store, [job])
        while left[0]:
            r.step()
        began = time.monotonic()
        r.step()  # nothing left to warm: an idle step waits for jobs again
        assert time.monotonic() - began >= 0.9
    finally:
        r.close()
    assert _status(store, job) is Status.SUCCEEDED
