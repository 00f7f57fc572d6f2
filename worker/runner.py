"""The worker process: take jobs from the stream, run them in batches, store the results.

Threads: the GPU loop (`Runner.run`); a reader that keeps the next batch's entries gathered
while the GPU works; a reporter that writes progress, notices cancellations and sends
heartbeats; and a small pool that encodes PNGs and writes results. Neither Redis nor PNG
encoding holds the GPU up, but the pool's backlog is bounded: when it is full the GPU waits.

A thread that dies of an error it cannot handle stops the whole worker with exit code 1, so
that its orchestrator restarts it, rather than leaving it half alive with a fresh heartbeat.
Only transient Redis errors (unreachable, loading, full) are retried.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import secrets
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from types import FrameType
from typing import TypeVar

import numpy as np
import redis
import torch

from app import logs
from app.jobs.contract import Delivery, ErrorCode, Job, UpscaleRequest, plain_reason
from app.jobs.eta import denoising_steps, unet_rows
from app.jobs.store import is_transient
from app.jobs.worker_store import WorkerStore
from app.settings import refuse
from app.storage import Storage, open_storage, result_key
from worker.batching import Assembly, Slot, chunks, group
from worker.compiled import Tuning
from worker.continuous import RowLoop
from worker.engine import BatchShape, Engine, NoUpscaler, resolve_device
from worker.images import encode_png, encode_preview, parameters
from worker.inbox import Inbox
from worker.metrics import WorkerMetrics
from worker.progress import Tracker
from worker.rows import Lane
from worker.settings import TINY_MODEL_DIR, WorkerSettings
from worker.sources import (
    MissingInput,
    finished,
    image_specs,
    in_lanes,
    job_shape,
    load_source,
    next_pass,
)

log = logging.getLogger("sdserve.worker")
R = TypeVar("R")

REPORT_INTERVAL_S = 0.25
READ_BLOCK_MS = 1000
MAX_BACKOFF_S = 10.0
STORAGE_ATTEMPTS = 4  # first try, then after 0.5, 1 and 2 seconds


X4 = "x4-upscaler"  # the engine key of the x4 upscaler's jobs


class NameTaken(Exception):
    """Another live worker process holds this worker name."""


class Runner:
    def __init__(
        self,
        settings: WorkerSettings,
        store: WorkerStore,
        engines: Engine | dict[str, Engine],
        storage: Storage,
        metrics: WorkerMetrics | None = None,
        upscaler: Engine | None = None,
    ) -> None:
        self.settings = settings
        self.upscaler = upscaler  # the x4 upscaler (SDSERVE_UPSCALER), if this worker has one
        self.store = store
        # The models this worker holds, by name (one engine: the first the settings name).
        if isinstance(engines, Engine):
            engines = {next(iter(settings.held_models())): engines}
        self.engines = engines
        store.models = list(engines)
        # The first model's engine: what every engine shares (device, tuning) is read here.
        engine = self.engine = next(iter(engines.values()))
        self.storage = storage
        self.name = settings.worker_name
        # This process's hold on its name: a restart under the same name gets a new token.
        self.token = secrets.token_hex(8)
        self.fatal: BaseException | None = None
        self.stopping = threading.Event()
        tuning = engine.tuning
        self.tracker = Tracker(tuning.row_cap(), (tuning.tile, tuning.tile_overlap))
        self.metrics = metrics or WorkerMetrics(
            settings.max_batch, engine.tuning.buckets(), engine.tuning.row_buckets()
        )
        for each in engines.values():
            each.observer = self.metrics
            each.calls.on_recompile = lambda _reason: self.metrics.recompiles.inc()
        self._completions = ThreadPoolExecutor(max_workers=2, thread_name_prefix="complete")
        # Jobs handed to the pool and not yet written: the GPU waits for room.
        self._backlog = threading.BoundedSemaphore(2 * settings.max_batch)
        # The entries this process holds (read, claimed, not acked), by (model, entry id).
        self._held: dict[tuple[str, str], Delivery] = {}
        self._grace_ends = math.inf
        self._lock = threading.Lock()
        self._suspects: set[str] = set()  # at most one: a suspect runs alone
        self.inbox: Inbox[Delivery] = Inbox(settings.max_batch)
        self._closed = threading.Event()
        self.rows = RowLoop(self) if settings.batching == "continuous" else None
        self._reader = self._thread(self._read_loop, "reader")
        self._reporter = self._thread(self._report_loop, "reporter")

    def _thread(self, loop: Callable[[], None], name: str) -> threading.Thread:
        def guarded() -> None:
            try:
                loop()
            except BaseException as e:
                self._die(e, name)

        return threading.Thread(target=guarded, name=name, daemon=True)

    def _die(self, error: BaseException, where: str) -> None:
        """An error no retry can mend: stop everything; `serve` exits 1."""
        log.critical("%s died: %s: %s", where, type(error).__name__, error, exc_info=error)
        if self.fatal is None:
            self.fatal = error
        self._grace_ends = 0.0  # nothing more runs on the GPU
        self.stopping.set()

    def run(self) -> None:
        """Serve until `stop()`; the batch in hand is finished and written first."""
        self.open()
        try:
            while not self.stopping.is_set():
                self.step()
        except BaseException as e:
            self._die(e, "GPU loop")
        if self.fatal is None:
            self.close()

    def stop(self) -> None:
        """Stop reading; the batch in hand has `stop_grace_s` to finish."""
        self._grace_ends = time.monotonic() + self.settings.stop_grace_s
        self.stopping.set()

    def open(self) -> None:
        self.redis_call(self.store.ensure_group)
        self._claim_name()
        # Entries a process of this name took before a restart and never acked come first
        # (before the first heartbeat takes over other workers' entries). All of them, but
        # only one suspect: those left are touched by no one, so any worker takes them later,
        # one at a time.
        mine = partial(
            self.store.reclaim, self.name, 0, self.settings.delivery_cap, 100_000, owner=self.name
        )
        taken = self.redis_call(mine) or []
        if taken:
            log.warning("took back %d entries this name held before a restart", len(taken))
        self._take(taken)
        self.redis_call(self._heartbeat)
        self._reader.start()
        self._reporter.start()
        log.info("worker %s ready on %s", self.name, self.engine.device)

    def _claim_name(self) -> None:
        """Hold this worker's name, or raise NameTaken if another live process holds it.

        A holder that died (a restart under the same name) leaves its heartbeat for at most
        its TTL: wait that long for it to lapse. A live holder renews it meanwhile.
        """
        ttl = self.settings.heartbeat_ttl_s
        deadline = time.monotonic() + ttl + 1
        info = self._info()
        beat = partial(self.store.heartbeat, self.name, self.token, ttl, info)
        while not self.redis_call(beat):
            if self.stopping.is_set():  # told to stop while waiting: nothing held, nothing to do
                return
            if time.monotonic() > deadline:
                raise NameTaken(
                    f"another live worker is named {self.name!r} (its heartbeat stayed fresh"
                    f" for {ttl}s): give each worker its own SDSERVE_WORKER_NAME"
                )
            log.warning("worker name %s is held; waiting for it to lapse", self.name)
            time.sleep(1)

    def step(self) -> int:
        """Static batching: run the next batch of entries, if any came; continuous batching:
        one UNet step of the rows in flight, after letting new jobs join. Returns how many
        entries it took."""
        if self.rows is not None:
            return self.rows.step()
        window_s = self.settings.batch_window_ms / 1000
        deliveries = self.inbox.take(window_s, timeout_s=READ_BLOCK_MS / 1000)
        if deliveries:
            self._process(deliveries)
        return len(deliveries)

    def close(self) -> None:
        """Hand back what was read but not run, wait for results in flight, then leave."""
        if not self.stopping.is_set():
            self.stop()
        if self.rows is not None:
            self.rows.finish_up()
        self._reader.join()
        unrun = self.inbox.drain()
        if unrun:  # back in the stream at once, for any worker: not stranded until we return
            self.redis_call(partial(self.store.hand_back, unrun))
            self.release(unrun)
        self._completions.shutdown(wait=True)
        self._closed.set()
        self._reporter.join()
        self.redis_call(partial(self.store.retire, self.name, self.token))
        log.info("worker %s stopped", self.name)

    def release(self, deliveries: list[Delivery]) -> None:
        """These entries are acked (or handed back): no longer this process's to renew."""
        with self._lock:
            for d in deliveries:
                self._held.pop((d.model, d.entry_id), None)

    def _read_loop(self) -> None:
        """Keep the inbox topped up, so the next batch is gathered while this one runs."""
        while not self.stopping.is_set():
            if self.inbox.wait_for_room(READ_BLOCK_MS / 1000):
                read = partial(self.store.read, self.name, self.inbox.room(), READ_BLOCK_MS)
                self._take(self.redis_call(read) or [])

    def start_jobs(self, deliveries: list[Delivery]) -> list[Job]:
        """Mark the entries' jobs running; those that ended meanwhile are out of hand."""
        start = partial(self.store.start, deliveries, self.name, self._count_failure)
        jobs = self.redis_call(start) or []
        self.release([d for d in deliveries if d.job_id not in {job.id for job in jobs}])
        now = time.time()
        for job in jobs:
            self.metrics.queue_wait.labels(job.delivery.model).observe(now - job.created_at)
        jobs = [job for job in jobs if self._prompts_fit(job)]
        with self._lock:  # suspects that will not run (ended meanwhile) are out of hand
            self._suspects -= {d.job_id for d in deliveries} - {job.id for job in jobs}
        return jobs

    def _prompts_fit(self, job: Job) -> bool:
        """A prompt over the model's limit fails its job (the API refuses such prompts once a
        worker has published its tokenizer: this is for jobs queued before that)."""
        request = job.request
        limit = self.engine.tuning.prompt_chunks
        try:
            engine = self.engine_of(job)
        except NoUpscaler as e:  # the job fails, never the worker
            self.complete(job, self.fail, job, ErrorCode.INVALID, str(e))
            self.settle_suspect(job.id)
            return False
        for field in ("prompt", "negative_prompt"):
            pieces = engine.chunk_count(getattr(request, field), request.prompt_syntax)
            if pieces > limit:
                message = f"{field}: {pieces} chunks of 75 tokens; the model takes at most {limit}"
                self.complete(job, self.fail, job, ErrorCode.INVALID, message)
                self.settle_suspect(job.id)
                return False
        return True

    def settle_suspect(self, job_id: str) -> None:
        with self._lock:
            self._suspects.discard(job_id)

    def _process(self, deliveries: list[Delivery]) -> None:
        jobs = self.start_jobs(deliveries)
        # A suspect (its workers died with it twice) runs alone: if it kills this worker too,
        # no stranger's delivery count goes up with it. So does a job from a source picture:
        # static batches are text to image.
        alone = [job for job in jobs if job.delivery.suspect or in_lanes(job.request)]
        for batch in [
            *group([j for j in jobs if j not in alone]),
            *([j] for j in alone),
        ]:
            self._run_group(batch)

    def _run_group(self, jobs: list[Job]) -> None:
        request = jobs[0].request
        shape = job_shape(request)
        assembly: Assembly[np.ndarray | None] = Assembly(jobs)
        settled: set[str] = set()  # outcome handed to the pool, which acks after writing it
        if in_lanes(request):
            if not self.out_of_grace():
                settled = self._run_source(jobs[0], shape)
        else:
            for chunk in chunks(jobs, self.engine.tuning.max_batch):
                rows = [s for s in chunk
                        if not (s.job.id in settled or self.tracker.is_gone(s.job.id))]  # fmt: skip
                if rows and not self.out_of_grace():
                    settled |= self._run_batch(rows, shape, assembly)
        unsettled = [job for job in jobs if job.id not in settled]
        # Ended elsewhere (canceled): nothing to write, only ack. Cut short by the stop
        # grace: back to the queue, for another worker.
        for job in (j for j in unsettled if self.tracker.is_gone(j.id)):
            self.redis_call(partial(self.store.ack, job.delivery))
            self.release([job.delivery])
        cut = [job.delivery for job in unsettled if not self.tracker.is_gone(job.id)]
        if cut and self.fatal is None:
            log.warning("stop grace over: %d jobs go back to the queue", len(cut))
            self.redis_call(partial(self.store.hand_back, cut))
            self.release(cut)
        self.tracker.forget({job.id for job in jobs})
        with self._lock:
            self._suspects -= {job.id for job in jobs}

    def out_of_grace(self) -> bool:
        return self.stopping.is_set() and time.monotonic() > self._grace_ends

    def _keep_going(self, step: int) -> bool:
        """After each step: go on unless every job ended elsewhere or the stop grace is over."""
        return self.tracker.advance(step) and not self.out_of_grace()

    def _run_batch(
        self, rows: list[Slot], shape: BatchShape, assembly: Assembly[np.ndarray | None]
    ) -> set[str]:
        """Run one batch; returns the jobs whose outcome it handed to the pool."""
        jobs = list({s.job.id: s.job for s in rows}.values())
        specs = [image_specs(s.job.request)[s.index] for s in rows]
        self.tracker.begin({job.id: (job.request.steps, unet_rows(job.request)) for job in jobs})
        started = time.perf_counter()
        try:
            images = self.engine_of(jobs[0]).generate(specs, shape, self._keep_going)
        except torch.cuda.OutOfMemoryError:
            return self._split(rows, shape, assembly)
        except Exception as e:  # the worker lives on; these jobs fail with the reason
            log.exception("batch of %d images failed", len(rows))
            for job in jobs:
                self.complete(job, self.fail, job, ErrorCode.ENGINE, f"{type(e).__name__}: {e}")
            return {job.id for job in jobs}
        finally:
            self.tracker.end()
        seconds = time.perf_counter() - started
        self.metrics.batch_seconds.observe(seconds)
        self.metrics.batch_size.observe(len(rows))
        log.info(
            "batch of %d images (%d jobs) %dx%d %d steps %s in %.2fs",
            len(rows),
            len(jobs),
            shape.width,
            shape.height,
            shape.steps,
            shape.scheduler,
            seconds,
        )
        if images is None:  # every job ended elsewhere, or the stop grace ran out
            return set()
        whole = assembly.add(rows, images)
        for job in whole:
            self.complete(job, self.succeed, job, assembly.take(job))
        return {job.id for job in whole}

    def _run_source(self, job: Job, shape: BatchShape) -> set[str]:
        """img2img, inpainting, upscaling or a hires fix in static mode: the job alone, through
        the row hooks."""
        tuning = self.engine.tuning
        rows = unet_rows(job.request, tuning.tile, tuning.tile_overlap)
        self.tracker.begin({job.id: (denoising_steps(job.request), rows)})
        try:
            engine = self.engine_of(job)
            source = load_source(self.storage, job.id, job.request)
            specs = image_specs(job.request)
            lane: Lane | None = engine.prepare(job.id, specs, shape, source)
            while lane is not None:
                while not lane.done:
                    engine.step([lane])
                    if not self._keep_going(lane.earlier_steps + lane.step):
                        return set()  # canceled, or the stop grace ran out
                last, lane = lane, next_pass(engine, job.request, lane)
            images = engine.images(engine.finish(last))
        except MissingInput as e:
            self.complete(job, self.fail, job, ErrorCode.INPUT, str(e))
            return {job.id}
        except NoUpscaler as e:
            self.complete(job, self.fail, job, ErrorCode.INVALID, str(e))
            return {job.id}
        except Exception as e:  # out of memory included: one job is as small as it gets
            log.exception("a job from a source picture failed", extra={"job_id": job.id})
            self.complete(job, self.fail, job, ErrorCode.ENGINE, f"{type(e).__name__}: {e}")
            return {job.id}
        finally:
            self.tracker.end()
        self.complete(job, self.succeed, job, finished(images, source, job.request))
        return {job.id}

    def _split(
        self, rows: list[Slot], shape: BatchShape, assembly: Assembly[np.ndarray | None]
    ) -> set[str]:
        """Out of GPU memory: retry in halves, down to one image, which then fails alone."""
        self.engine.release_memory()  # the cache is the device's: one engine empties it
        self.metrics.oom_splits.inc()
        if len(rows) == 1:
            job = rows[0].job
            message = f"one {shape.width}x{shape.height} image does not fit in GPU memory"
            self.complete(job, self.fail, job, ErrorCode.OUT_OF_MEMORY, message)
            return {job.id}
        half = len(rows) // 2
        log.warning("out of GPU memory at %d images: retrying as %d + %d", len(rows), half,
                    len(rows) - half)  # fmt: skip
        settled = self._run_batch(rows[:half], shape, assembly)
        rest = [s for s in rows[half:] if s.job.id not in settled]
        return settled | (self._run_batch(rest, shape, assembly) if rest else set())

    def complete(self, job: Job, write: Callable[..., None], *args: object) -> None:
        """Hand a job's outcome to the pool, waiting for room; every future is checked."""
        self._backlog.acquire()
        self.metrics.completion_backlog.inc()
        future = self._completions.submit(write, *args)
        future.add_done_callback(partial(self._completed, job))

    def _completed(self, job: Job, future: Future[None]) -> None:
        """A completion ended: its entry is acked, or, if it raised, the job fails with the
        reason (and if even that cannot be written, the worker stops: a restart runs it
        again)."""
        self._backlog.release()
        self.metrics.completion_backlog.dec()
        self.tracker.stored(job.id)
        error = future.exception()
        if error is not None:
            log.error("writing the result failed: %s: %s", type(error).__name__, error,
                      exc_info=error, extra={"job_id": job.id})  # fmt: skip
            try:
                reason = plain_reason(error)
                self.fail(job, ErrorCode.STORAGE, f"storing the result failed: {reason}")
            except BaseException as e:
                self._die(e, "completion")
                return
        self.release([job.delivery])

    def _count_failure(self, code: ErrorCode) -> None:
        self.metrics.failures.labels(code.value).inc()

    def fail(self, job: Job, code: ErrorCode, message: str) -> None:
        log.warning("failed (%s): %s", code.value, message, extra={"job_id": job.id})
        self._count_failure(code)
        self.redis_call(partial(self.store.fail, job, code, message))

    def succeed(self, job: Job, images: list[np.ndarray | None]) -> None:
        """Encode and store one job's images (pool thread); its entry is acked after that."""
        finite = [image for image in images if image is not None]
        if len(finite) < len(images):
            self.fail(job, ErrorCode.NUMERICAL, "the model produced non-finite pixels")
            return
        pngs = []
        for image, seed in zip(finite, job.request.seeds(), strict=True):
            with self.metrics.png_encode.time():
                text = parameters(job.request, seed, Path(self.engine_of(job).model).name)
                pngs.append(encode_png(image, text))
        # The images first, then the status and the ack: a crash in between leaves orphan
        # files (swept after the TTL), never a succeeded job without images.
        for k, png in enumerate(pngs):
            self._store_file(result_key(job.id, k), png)
        if self.redis_call(partial(self.store.succeed, job, len(pngs))):
            self.metrics.images.labels(job.delivery.model).inc(len(pngs))
            log.info("succeeded: %d images", len(pngs), extra={"job_id": job.id})
        else:
            log.info("had ended meanwhile (canceled): result dropped", extra={"job_id": job.id})

    def _store_file(self, key: str, data: bytes) -> None:
        """Write to storage, retrying a few times with backoff; the last error propagates
        (the job then fails `storage_error`)."""
        for attempt in range(STORAGE_ATTEMPTS):
            try:
                self.storage.put(key, data)
                return
            except Exception as e:
                if attempt == STORAGE_ATTEMPTS - 1:
                    raise
                log.warning("storage write failed (%s); retrying", e)
                self.metrics.storage_retries.inc()
                time.sleep(0.5 * 2**attempt)

    def _report_loop(self) -> None:
        """Progress and cancellations often; heartbeat, touching and reclaiming with each beat.

        Runs until the worker has closed, so a batch finishing in its stop grace still reports
        and still counts as alive.
        """
        next_beat = time.monotonic() + self.settings.heartbeat_ttl_s / 3
        while not self._closed.wait(REPORT_INTERVAL_S):
            try:
                running = self.tracker.running()
                if running:
                    previews = {
                        job_id: (step, encode_preview(pictures))
                        for job_id, (step, pictures) in self.tracker.take_previews().items()
                    }
                    self.tracker.mark_gone(self.store.report(running, previews))
                if time.monotonic() >= next_beat:
                    self._heartbeat()
                    next_beat = time.monotonic() + self.settings.heartbeat_ttl_s / 3
            except redis.RedisError as e:
                if not is_transient(e):
                    raise
                log.warning("reporter: redis unavailable: %s", e)

    def engine_key(self, job: Job) -> str:
        """Which engine runs the job: the x4 upscaler's jobs its, the others their model's
        (whose queue they came from)."""
        request = job.request
        return (
            X4
            if isinstance(request, UpscaleRequest) and request.method == "x4"
            else (job.delivery.model)
        )

    def engine_of(self, job: Job) -> Engine:
        key = self.engine_key(job)
        if key == X4:
            if self.upscaler is None:
                raise NoUpscaler("this worker has no x4 upscaler (SDSERVE_UPSCALER)")
            return self.upscaler
        return self.engines[key]

    def _info(self) -> str:
        """What the heartbeat says: the models held, and the pace the API's queued ETAs use."""
        info = {"device": str(self.engine.device), "models": list(self.engines),
                "upscaler": self.upscaler is not None}  # fmt: skip
        return json.dumps(info | self.tracker.pace().fields())

    def _heartbeat(self) -> None:
        ttl = self.settings.heartbeat_ttl_s
        if not self.store.heartbeat(self.name, self.token, ttl, self._info()):
            # Our heartbeat lapsed (Redis unreachable past the TTL) and another process took
            # the name: two of us would renew each other's entries. Leave.
            raise NameTaken(f"another live worker took the name {self.name!r}")
        self.metrics.last_heartbeat.set_to_current_time()
        # Each beat: a Redis restarted without persistence has lost them.
        for model, engine in self.engines.items():
            self.store.publish_tokenizer(model, engine.published_tokenizer.fields())
        with self._lock:
            held = list(self._held.values())
        self.store.touch(self.name, held)
        claim_idle_ms = self.settings.claim_idle_s * 1000
        room = self.inbox.room()
        if room > 0 and not self.stopping.is_set():
            taken = self.store.reclaim(
                self.name, claim_idle_ms, self.settings.delivery_cap, room,
                suspect=not self._suspects,
            )  # fmt: skip
            if taken:
                log.warning("took over %d entries of a worker gone silent", len(taken))
                self._take(taken)
        self.store.forget_consumers(claim_idle_ms)
        self.store.trim()

    def _take(self, deliveries: list[Delivery]) -> None:
        with self._lock:
            self._suspects |= {d.job_id for d in deliveries if d.suspect}
            self._held |= {(d.model, d.entry_id): d for d in deliveries}
        self.inbox.put(deliveries)

    def redis_call(self, call: Callable[[], R]) -> R | None:
        """Run a Redis call, retrying with backoff while Redis is away (or full); None once
        stopping. Any other Redis error propagates: retrying would only hide it."""
        delay = 0.5
        while True:
            try:
                return call()
            except redis.RedisError as e:
                if not is_transient(e):
                    raise
                log.warning("redis unavailable (%s); retrying in %.1fs", e, delay)
                if self.stopping.wait(delay):
                    return None
                delay = min(delay * 2, MAX_BACKOFF_S)


def prepare_model(model: str) -> str:
    """The model to load; the default tiny model is built on first use."""
    if model == str(TINY_MODEL_DIR) and not (TINY_MODEL_DIR / "model_index.json").exists():
        from worker.tiny import build_tiny_model

        TINY_MODEL_DIR.parent.mkdir(parents=True, exist_ok=True)
        # Built aside, then renamed: a crash or a second worker never sees half a model.
        with tempfile.TemporaryDirectory(dir=TINY_MODEL_DIR.parent) as tmp:
            build_tiny_model(Path(tmp) / "model")
            with contextlib.suppress(OSError):  # another worker won the race: use its model
                (Path(tmp) / "model").rename(TINY_MODEL_DIR)
        log.info("built the tiny model in %s", TINY_MODEL_DIR)
    return model


def load_engines(
    models: dict[str, str], device: torch.device, tuning: Tuning
) -> tuple[dict[str, Engine], float, float]:
    """Load and warm up each model, saying what each holds in memory; and the seconds all the
    loading and all the warming took. Models that do not fit beside each other stop the worker
    (exit 2) naming them: hold fewer per worker."""
    engines: dict[str, Engine] = {}
    load_s = warm_s = 0.0
    for name, source in models.items():
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        started = time.perf_counter()
        try:
            engine = Engine(prepare_model(source), device, tuning)
            loaded = time.perf_counter()
            engine.warm_up()
        except torch.cuda.OutOfMemoryError:
            beside = f" beside {', '.join(engines)}" if engines else ""
            refuse(f"model {name} does not fit in {device}'s memory{beside}: give this worker"
                   " fewer models (SDSERVE_WORKER_MODELS) or a larger GPU")  # fmt: skip
        warmed = time.perf_counter()
        engines[name] = engine
        load_s, warm_s = load_s + loaded - started, warm_s + warmed - loaded
        weights = engine.weight_bytes()
        held = torch.cuda.memory_allocated(device) - before if device.type == "cuda" else weights
        log.info("model %s (%s): %.0f MiB of weights, %.0f MiB held on %s; loaded in %.1fs,"
                 " warmed up in %.1fs", name, source, weights / 2**20, held / 2**20, device,
                 loaded - started, warmed - loaded)  # fmt: skip
    return engines, load_s, warm_s


def serve(settings: WorkerSettings) -> None:
    """The worker process: load and warm up the model, then run until SIGTERM or SIGINT.

    Exits 2 on a setting that cannot work (checked before the model loads: storage, the
    metrics port, the worker name), 1 when a thread died of an error it could not handle.
    """
    logs.configure(settings.log_json)
    try:
        device = resolve_device(settings.device)
    except RuntimeError as e:
        raise SystemExit(f"sdserve: {e}") from None
    storage = open_storage(settings.storage)
    try:
        storage.check()
    except Exception as e:
        refuse(f"SDSERVE_STORAGE={settings.storage}: cannot write there: {e}")
    cuda = device.type == "cuda"
    tuning = Tuning(
        max_batch=settings.max_batch,
        fuse=cuda,
        compile=settings.compile == "on" or (settings.compile == "auto" and cuda),
        compiled_sizes=tuple(settings.compiled_sizes),
        vae_chunk=settings.vae_chunk,
        rows=settings.batching == "continuous",
        prompt_chunks=settings.max_prompt_chunks,
        tile=settings.tile,
        tile_overlap=settings.tile_overlap,
    )
    metrics = WorkerMetrics(settings.max_batch, tuning.buckets(), tuning.row_buckets())
    if settings.metrics_port:
        try:
            metrics.serve(settings.metrics_port)
        except OSError as e:
            refuse(f"SDSERVE_METRICS_PORT={settings.metrics_port}: {e.strerror}")
    # Compiled kernels are reused from here by the next start: seconds instead of minutes.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(settings.compile_cache))
    engines, load_s, warm_s = load_engines(settings.held_models(), device, tuning)
    upscaler = None
    if settings.upscaler:
        # Uncompiled: its shapes differ from the models' and vary with each picture.
        upscaler = Engine(settings.upscaler, device, dataclasses.replace(tuning, compile=False))
        log.info("x4 upscaler %s: %.0f MiB of weights", settings.upscaler,
                 upscaler.weight_bytes() / 2**20)  # fmt: skip
    # A read blocks up to READ_BLOCK_MS: the socket must wait longer than that.
    store = WorkerStore.connect(settings.redis_url, settings.result_ttl_s, READ_BLOCK_MS / 1000 + 5,
                                settings.record_grace_s)  # fmt: skip
    runner = Runner(settings, store, engines, storage, metrics, upscaler)
    runner.metrics.model_load.set(load_s)
    runner.metrics.warm_up.set(warm_s)
    if cuda:
        runner.metrics.gpu_memory.set_function(lambda: torch.cuda.memory_allocated(device))
        runner.metrics.gpu_memory_peak.set_function(lambda: torch.cuda.max_memory_allocated(device))

    def stop(signum: int, _frame: FrameType | None) -> None:
        log.info("%s: finishing the batch in hand, then exiting", signal.Signals(signum).name)
        runner.stop()  # starts the stop grace's clock too

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        runner.run()
    except NameTaken as e:
        refuse(str(e))
    if runner.fatal is not None:
        # Half a worker is worse than none: its entries go to others (or to this name's next
        # start). Other threads may be stuck on what killed this one: no waiting for them.
        with contextlib.suppress(Exception):
            store.retire(runner.name, runner.token)
        logging.shutdown()
        os._exit(1)
