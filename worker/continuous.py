"""Continuous batching: the worker's GPU loop when `SDSERVE_BATCHING=continuous`.

Every call of `step` lets queued jobs join the rows in flight (the policy in
worker/stepping.py), runs one UNet call for the lanes of one model and latent size
(worker/rows.py, Engine.step), starts the VAE decode of lanes that finished, hands decodes the
GPU has done to the completion pool, and drops the lanes of jobs canceled meanwhile. A job that
arrives one step after others started waits one step, not a whole batch; the loop never waits
for the GPU while it has rows to step (the host queues the next step behind the decode, and
picks the pixels up when they are there). What a job needs before its first step is read off
the loop's thread while the steps run: its picture, ControlNet images and LoRAs by a reader
thread, its prompts by the prompt reader (several jobs' in one encoder call).
What it works with (worker/loop.py's parts) keeps the bookkeeping: the lease on the entries
(worker/lease.py), progress (worker/progress.py), and the written outcomes
(worker/completions.py).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any

import torch

from app.jobs.contract import ErrorCode, Job
from app.jobs.tasks import unet_rows
from worker.adapters import LoraRefused, LoraUse
from worker.completions import Failed, Succeeded
from worker.controls import ControlRefused, ControlUse
from worker.devices import beside_the_loop, read_stream
from worker.engine import Engine
from worker.inputs import ImageSpec, NotHeld, Source
from worker.loop import Parts
from worker.lora_files import LoraUnreadable
from worker.metrics import JOIN_PARTS
from worker.previews import Previews
from worker.rows import Lane, Size
from worker.sources import MissingInput, control_uses, image_specs
from worker.stepping import Candidate, Readiness, Turns, admit, leaving
from worker.tasks import task
from worker.timing import Phases
from worker.vae import Decoding

log = logging.getLogger("sdserve.worker")

# How a job that cannot start fails: its input gone, a LoRA file unreadable; anything else it
# asked for that this worker cannot give is `invalid_request`.
# What a job's reader thread hands its join: the source picture (None: from noise), and the
# ControlNet units with their control images.
Loaded = tuple[Source | None, tuple[ControlUse, ...]]

REFUSALS: dict[type[Exception], ErrorCode] = {
    MissingInput: ErrorCode.INPUT,
    LoraUnreadable: ErrorCode.LORA,
}


def read_ahead(engine: Engine, jobs: list[list[ImageSpec]]) -> None:
    """These jobs' prompts encoded into their engine's cache, off the GPU's thread. A prompt
    that fails here (too long, a LoRA refused) is read again at its job's join, which fails
    the job with the reason; the others' are read all the same."""
    try:
        engine.read_prompts(jobs)
        return
    except Exception as e:
        if len(jobs) == 1:
            log.debug("a prompt was not read ahead: %s", e)
            return
    for specs in jobs:  # one job at a time: all but the one that failed
        try:
            engine.read_prompts([specs])
        except Exception as e:
            log.debug("a prompt was not read ahead: %s", e)


class RowLoop:
    def __init__(self, parts: Parts) -> None:
        self.p = parts
        self.waiting: dict[str, tuple[Job, float]] = {}  # started, not yet joined; since when
        self.lanes: dict[str, tuple[Job, Lane]] = {}
        # Decodes started, with the engine whose VAE decodes (a refiner's, after its pass).
        self.decodings: deque[tuple[Job, Engine, Decoding]] = deque()
        self.previews: deque[tuple[dict[str, Job], Previews]] = deque()
        self.sources: dict[str, Source] = {}  # the source pictures of jobs in flight
        # Their ControlNet units with their control images (a hires fix's pass takes them too).
        self.controls: dict[str, tuple[ControlUse, ...]] = {}
        # Source pictures being read and decoded (storage, PNG) off the GPU's thread, from
        # the job's start: at its join the picture is there, and no step waits for it.
        self.loading: dict[str, Future[Loaded]] = {}
        self._readers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="source")
        # The prompts of jobs taken, being encoded off the GPU's thread (`_read_prompts`); a
        # job with LoRAs has a pending one until its LoRAs are resident (`fetching`).
        self.prompts: dict[str, Future[None]] = {}
        self.fetching: dict[str, Job] = {}
        # When each waiting job's inputs and prompts were read (monotonic): its join wait's
        # parts (metrics `join_wait_parts`).
        self.read_at: dict[str, dict[str, float]] = {}
        self._prompt_reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prompts")
        # Its encoder calls on a stream of their own (SDSERVE_READ_STREAM; worker/devices.py).
        stream = parts.settings.read_stream
        self._read_stream = read_stream(parts.engines.device) if stream else None
        # (engine, size): the rows of one UNet call (an engine: a model, or the x4 upscaler).
        self.turns: Turns[tuple[str, Size]] = Turns()
        # How long jobs take to be ready against how long a UNet call takes: how many calls
        # ahead of their room jobs are taken (`_leaving`). When the last call ended, while
        # calls follow one another (None when the loop ran out of rows).
        self.readiness = Readiness()
        self._called_at: float | None = None

    @property
    def busy(self) -> bool:
        return bool(self.lanes or self.waiting or self.decodings)

    def step(self) -> int:
        p = self.p
        phases = Phases(p.metrics.loop_seconds)
        for engine in p.engines.models.values():  # between steps: no prompt is being read
            if engine.embeddings_asked:
                engine.refresh_embeddings()
        idle_wait = p.settings.batch_window_ms / 1000
        # Only as many jobs are taken (and so started: `running`) as there are images free in
        # flight, counting those that leave by the time a job taken now is ready to join
        # (`_leaving`); the rest stay queued, with their place and their deadline. With rows
        # in flight, never wait for company: the next step is due now.
        room = p.settings.max_batch - self._images() + self._leaving()
        deliveries = []
        # Idle with warm-up entries left (CUDA graphs the start left, `now_and_later`): look
        # for jobs without waiting, and record one entry if none came (about 0.4 s).
        warming = not self.busy and p.engines.warming()
        if room > 0:
            deliveries = p.inbox.take(0 if self.busy else idle_wait,
                                      0 if self.busy or warming else 1.0, room)  # fmt: skip
        if warming and not deliveries:
            p.engines.warm_next()
        if deliveries:
            now = time.monotonic()
            started = list(p.start(deliveries))
            tuning = p.engines.tuning
            for job in started:
                self.waiting[job.id] = (job, now)
                self.loading[job.id] = self._load(job)
                self._stamp(job.id, "inputs", self.loading[job.id])
            # Their rows count in the pace from now: a job queued next runs beside them.
            p.tracker.taken({job.id: unet_rows(job.request, tuning.tile, tuning.tile_overlap)
                             for job in started})  # fmt: skip
            self._read_prompts(started)
        elif self.fetching:
            self._read_prompts([])
        phases.done("take")
        self._leave_canceled()
        if p.shutdown.stopping.is_set():
            self._hand_back_waiting()
        self._join()
        phases.done("join")
        if self.lanes:
            self._step_one_size()
            self._called()
        else:
            self._called_at = None
        phases.done("step")
        # With nothing left to step, wait for the decodes rather than spin.
        self._deliver(wait=not self.lanes)
        phases.done("deliver")
        p.metrics.rows_in_flight.set(sum(lane.images for _, lane in self.lanes.values()))
        return len(deliveries)

    def _load(self, job: Job) -> Future[Loaded]:
        """The job's source picture, read and preprocessed by a reader thread, its ControlNet
        units' control images read there, and its LoRAs made resident there (its prompts are
        read once they are: `_fetched`); none of these: no thread hop."""
        work = task(job.request)
        loras = image_specs(job.request)[0].loras
        controlled = bool(getattr(job.request, "controlnets", None))
        nothing_read = not work.reads_picture and not controlled
        if nothing_read and (not loras or self._held(job, loras)):
            done: Future[Loaded] = Future()
            done.set_result((None, ()))
            return done
        engine, storage = self.p.engines.of(job), self.p.storage

        def read() -> Loaded:
            if loras:  # made resident, and held for the job until it leaves
                if engine.adapters is None:
                    raise LoraRefused("this worker serves no LoRAs (SDSERVE_LORA_DIR)")
                engine.adapters.fetch(job.id, loras)
            controls = control_uses(storage, job.id, job.request) if controlled else ()
            if not work.reads_picture:
                return None, controls
            source = work.source(storage, job.id, job.request)
            if source is not None:
                source = engine.ready(source, work.shape(job.request))
            return source, controls

        return self._readers.submit(read)

    def _held(self, job: Job, loras: Sequence[LoraUse]) -> bool:
        """The job's LoRAs held at its take, all of them resident (`Adapters.hold`): its
        prompts are read with the others' taken with it."""
        try:
            adapters = self.p.engines.of(job).adapters
        except NotHeld:  # the reader's path says so
            return False
        return adapters is not None and adapters.hold(job.id, loras)

    def _read_prompts(self, jobs: list[Job]) -> None:
        """The prompts of the jobs just taken, encoded by the prompt reader's thread while the
        coming step runs, in as few encoder calls as they fill (8 prompts a call), into the
        cache where their lanes find them. Read at each join, they were encoded one job at a
        time on the GPU's thread: when a uniform load's jobs end together and 31 join at once,
        the GPU waited for those encodes (7% of its time; 19% with the text encoders' LoRA
        layers: H100, 2026-12-05). A job joins rows in flight once its prompts are read.

        A job with LoRAs waits here until its LoRAs are resident (a reader thread makes them
        so, `_load`; the text encoders read them): `_fetched` brings it back, with the others
        whose LoRAs came since, and their prompts are read together, LoRAs per row. (Read by
        each job's reader thread, one encoder call a job, on an H200 half of a uniform load
        with LoRAs joined so late that its steps ran 48 rows of 62, 2026-12-05.)"""
        groups: dict[int, tuple[Engine, list[list[ImageSpec]]]] = {}
        read: list[str] = []
        taken = []
        for job in jobs:
            if getattr(job.request, "loras", None) and not self._loaded(job.id):
                self.fetching[job.id] = job
                self.prompts[job.id] = Future()  # pending: the job does not join yet
            else:
                taken.append(job)
        for job in taken + self._fetched():
            try:
                specs = image_specs(job.request)
                engine = self.p.engines.of(job)
            except Exception:  # the join says what (NotHeld and the like)
                self._unread(job.id)
                continue
            groups.setdefault(id(engine), (engine, []))[1].append(specs)
            read.append(job.id)
        if not read:
            return

        def encode() -> None:
            with beside_the_loop(self._read_stream):
                for engine, specs in groups.values():
                    read_ahead(engine, specs)

        reading = self._prompt_reader.submit(encode)
        for key in read:
            self.prompts[key] = reading
            self._stamp(key, "prompts", reading)

    def _loaded(self, key: str) -> bool:
        """The job's inputs are in, without a problem (its LoRAs held at its take)."""
        loading = self.loading.get(key)
        return loading is not None and loading.done() and loading.exception() is None

    def _stamp(self, key: str, part: str, reading: Future[Any]) -> None:
        """Note when `reading` is done (in whichever thread finishes it)."""
        stamps = self.read_at.setdefault(key, {})
        reading.add_done_callback(lambda _done: stamps.__setitem__(part, time.monotonic()))

    def _fetched(self) -> list[Job]:
        """The jobs whose LoRAs have come since the last step (their prompts to read now);
        one whose LoRAs failed joins as it is, and its join says why."""
        came = []
        for key, job in list(self.fetching.items()):
            loading = self.loading.get(key)
            if loading is not None and not loading.done():
                continue
            self.fetching.pop(key)
            if loading is not None and loading.exception() is None:
                came.append(job)
            else:
                self.prompts.pop(key, None)
        return came

    def _unread(self, key: str) -> None:
        """Nothing more to read for the job (it joined, left or failed)."""
        self.prompts.pop(key, None)
        self.fetching.pop(key, None)
        self.read_at.pop(key, None)

    def _waited(self, key: str, since: float) -> None:
        """A job joins: its wait since taken, and its parts: its inputs, then its prompts
        (those read after its inputs were), then room in flight or its turn."""
        now = time.monotonic()
        metrics = self.p.metrics
        metrics.join_wait.observe(now - since)
        stamps = self.read_at.get(key, {})
        inputs = min(max(since, stamps.get("inputs", now)), now)
        prompts = min(max(inputs, stamps.get("prompts", inputs)), now)
        self.readiness.joined(prompts - since)
        for part, seconds in zip(JOIN_PARTS, (inputs - since, prompts - inputs, now - prompts),
                                 strict=True):  # fmt: skip
            metrics.join_wait_parts.labels(part).inc(seconds)

    def _leaving(self) -> int:
        """Images whose lanes leave (their last step, no pass after it) by the time a job
        taken now is ready to join: those the coming step finishes, and more calls ahead when
        jobs take longer than a call to be ready (`Readiness`). Jobs are taken for them now:
        their pictures, LoRAs and prompts are read while those steps run, and they join when
        the room is free. Taken only once the room is free, an img2img job would join a step
        later (its picture still being read) and its rows would stay empty that step; a job
        with LoRAs, several (on an H100, half of a load with LoRAs took 1.4 s from taken to
        ready while steps took 0.14 s, and its steps held 47 rows of 62: 2026-12-05). (It
        joins no earlier than the room frees: the rows in flight still count at each join.)"""
        keys = self._keys()
        following = self.turns.peek(keys)
        lanes = [(job, lane) for job, lane in self.lanes.values() if not lane.later_steps]
        key = self.p.engines.key
        remaining = [(lane.steps - lane.step, (key(job, lane), lane.size) == following)
                     for job, lane in lanes]  # fmt: skip
        ahead = self.readiness.ahead()
        self.p.metrics.take_ahead.set(ahead)
        return sum(lanes[i][1].images for i in leaving(remaining, len(keys), ahead))

    def _called(self) -> None:
        """A UNet call ended (its launch, on a GPU): the time since the last, while they
        follow one another."""
        now = time.monotonic()
        if self._called_at is not None:
            self.readiness.called(now - self._called_at)
        self._called_at = now

    def _keys(self) -> list[tuple[str, Size]]:
        """The keys of the rows in flight (a model and size: rows that share a UNet call)."""
        return list(dict.fromkeys((self.p.engines.key(job, lane), lane.size)
                                  for job, lane in self.lanes.values()))  # fmt: skip

    def _images(self) -> int:
        """Images taken and not yet finished: in flight, and started but not joined."""
        flying = sum(lane.images for _, lane in self.lanes.values())
        return flying + sum(job.request.n for job, _ in self.waiting.values())

    def finish_up(self) -> None:
        """Stopping: run the rows in flight to the end, within the stop grace; hand back the
        rest (and whatever had not joined) for another worker."""
        p = self.p
        self._hand_back_waiting()
        while self.lanes and not p.shutdown.out_of_grace() and p.shutdown.fatal is None:
            self._leave_canceled()
            if self.lanes:
                self._step_one_size()
            self._deliver(wait=False)
        self._deliver(wait=True)
        cut = [job for job, _lane in self.lanes.values()]
        if cut and p.shutdown.fatal is None:
            log.warning("stop grace over: %d jobs go back to the queue", len(cut))
            p.lease.hand_back([job.delivery for job in cut])
        for job in cut:
            self._forget(job)
        self.lanes.clear()
        self._readers.shutdown(wait=False, cancel_futures=True)
        self._prompt_reader.shutdown(wait=False, cancel_futures=True)

    def _hand_back_waiting(self) -> None:
        p = self.p
        jobs = [job for job, _since in self.waiting.values()]
        if jobs:
            p.lease.hand_back([job.delivery for job in jobs])
            for job in jobs:
                p.lease.settle({job.id})
                p.tracker.untaken(job.id)
                self.loading.pop(job.id, None)
                self._unread(job.id)
                self._release_loras(job)
        self.waiting.clear()

    def _leave_canceled(self) -> None:
        """Jobs canceled elsewhere leave at the next step: acked, nothing written."""
        p = self.p
        for key in [k for k in [*self.lanes, *self.waiting] if p.tracker.is_gone(k)]:
            job = self.lanes.pop(key, None) or self.waiting.pop(key, None)
            if job is not None:
                p.lease.ack(job[0].delivery)
                self._forget(job[0])

    def _join(self) -> None:
        p = self.p
        if p.shutdown.stopping.is_set():
            return
        # Counted in UNet rows: a guided image takes two (cond and uncond), another one; a
        # picture in tiles, that many per tile.
        tuning = p.engines.tuning
        # With rows in flight, a job whose picture (or prompt) is still being read joins at a
        # later step rather than make this one wait for it (the GPU would idle); with none,
        # waiting for it costs nothing.
        busy = bool(self.lanes)
        candidates = [
            Candidate(job.id, (job.request.width, job.request.height),
                      unet_rows(job.request, tuning.tile, tuning.tile_overlap),
                      job.created_at, alone=job.delivery.suspect)
            for job, _since in self.waiting.values()
            if not busy or (self.loading[job.id].done() and self._prompts_read(job.id))
        ]  # fmt: skip
        in_flight = sum(lane.unet_rows for _, lane in self.lanes.values())
        alone = any(job.delivery.suspect for job, _ in self.lanes.values())
        for candidate in admit(candidates, in_flight, p.engines.tuning.row_cap(), alone):
            job, since = self.waiting.pop(candidate.key)
            self._waited(job.id, since)
            self._unread(job.id)
            request = job.request
            work = task(request)
            shape = work.shape(request)
            try:
                source, controls = self.loading.pop(job.id).result()
                refiner = p.engines.refiner(job)
                lane = work.begin(p.engines.of(job), job.id, shape, source, request, refiner,
                                  controls)  # fmt: skip
            except (MissingInput, NotHeld, LoraRefused, LoraUnreadable, ControlRefused) as e:
                code = REFUSALS.get(type(e), ErrorCode.INVALID)
                p.completions.complete(job, Failed(code, str(e)))
                self._forget(job, tracked=False)
                continue
            except Exception as e:  # the worker lives on; this job fails with the reason
                log.exception("preparing a job failed", extra={"job_id": job.id})
                p.completions.complete(job, Failed(ErrorCode.ENGINE, f"{type(e).__name__}: {e}"))
                self._forget(job, tracked=False)
                continue
            if source is not None:
                self.sources[job.id] = source
            if controls:
                self.controls[job.id] = controls
            self.lanes[job.id] = (job, lane)
            p.tracker.at(job.id, lane.earlier_steps, lane.job_steps, lane.unet_rows)

    def _prompts_read(self, key: str) -> bool:
        reading = self.prompts.get(key)
        return reading is None or reading.done()

    def _step_one_size(self) -> None:
        """One UNet call: the rows of one model and size, whichever has waited longest (a
        refiner's pass is its model's rows: they batch with other jobs' refiner passes)."""
        p = self.p
        keys = self._keys()
        self.turns.forget(keys)
        key = self.turns.next(keys)
        group = [(job, lane) for job, lane in self.lanes.values()
                 if (p.engines.key(job, lane), lane.size) == key]  # fmt: skip
        self._step(group)
        for job, lane in group:
            if job.id not in self.lanes:
                continue  # failed in this step
            at = lane.earlier_steps + lane.step
            p.tracker.at(job.id, at, lane.job_steps, lane.unet_rows)
            if lane.done:
                del self.lanes[job.id]
                self._finish(job, lane)

    def _step(self, group: list[tuple[Job, Lane]]) -> None:
        """One UNet call for the group; out of GPU memory, the group is split in halves (a
        failed call leaves every lane as it was) down to one lane, which then fails alone."""
        p = self.p
        every = p.settings.preview_every
        wanted = {
            job.id for job, lane in group
            if every and (lane.step + 1) % every == 0 and lane.step + 1 < lane.steps
        }  # fmt: skip
        try:
            made = p.engines.of(*group[0]).step([lane for _, lane in group], wanted)
            if made is not None:
                self.previews.append(({job.id: job for job, _ in group}, made))
            return
        except torch.cuda.OutOfMemoryError:
            p.engines.first.release_memory()
            p.metrics.oom_splits.inc()
            if len(group) == 1:
                job, lane = group[0]
                message = f"one {lane.size[0]}x{lane.size[1]} job does not fit in GPU memory"
                self._fail(job, ErrorCode.OUT_OF_MEMORY, message)
                return
        except Exception as e:  # the worker lives on; these jobs fail with the reason
            log.exception("a step of %d jobs failed", len(group))
            for job, _lane in group:
                self._fail(job, ErrorCode.ENGINE, f"{type(e).__name__}: {e}")
            return
        half = len(group) // 2
        self._step(group[:half])
        self._step(group[half:])

    def _fail(self, job: Job, code: ErrorCode, message: str) -> None:
        self.lanes.pop(job.id, None)
        self.p.completions.complete(job, Failed(code, message))
        self._forget(job)

    def _finish(self, job: Job, lane: Lane) -> None:
        """A lane done: its next pass joins in its place (a hires fix's, a refiner's), or its
        decode starts (by the VAE of the model that stepped it last)."""
        engines = self.p.engines
        try:
            refiner = engines.refiner(job)
            then = task(job.request).next_pass(engines.of(job), job.request, lane, refiner,
                                               self.controls.get(job.id, ()))  # fmt: skip
        except (NotHeld, ControlRefused) as e:  # what the request asks cannot run here
            self._fail(job, ErrorCode.INVALID, str(e))
            return
        except Exception as e:  # out of memory included: the job fails alone
            log.exception("a second pass failed to start", extra={"job_id": job.id})
            self._fail(job, ErrorCode.ENGINE, f"{type(e).__name__}: {e}")
            return
        if then is not None:
            self.lanes[job.id] = (job, then)
            return
        try:
            self.p.tracker.denoised(job.id)
            engine = engines.of(job, lane)
            self.decodings.append((job, engine, engine.finish(lane)))
        except Exception as e:
            self._decode_failed(job, e)

    def _deliver(self, wait: bool) -> None:
        """Hand the decodes that are done (all of them, with `wait`) to the completion pool, in
        the order they started."""
        p = self.p
        while self.previews and self.previews[0][1].ready():
            jobs, previews = self.previews.popleft()
            for key in previews.rows:
                p.tracker.preview(jobs[key].id, *previews.pictures(key))
        while self.decodings and (wait or self.decodings[0][2].ready()):
            job, engine, decoding = self.decodings.popleft()
            try:
                images = engine.images(decoding)
            except Exception as e:
                self._decode_failed(job, e)
                continue
            finish = partial(task(job.request).finished, source=self.sources.get(job.id),
                             request=job.request)  # fmt: skip
            p.completions.complete(job, Succeeded(images, finish))
            self._forget(job)

    def _release_loras(self, job: Job) -> None:
        """The job's LoRAs may leave the GPU when room is needed (they stay until then)."""
        try:
            adapters = self.p.engines.of(job).adapters
        except NotHeld:
            return
        if adapters is not None:
            adapters.release(job.id)

    def _decode_failed(self, job: Job, error: Exception) -> None:
        log.exception("decoding failed", extra={"job_id": job.id})
        self.p.completions.complete(
            job, Failed(ErrorCode.ENGINE, f"{type(error).__name__}: {error}")
        )
        self._forget(job)

    def _forget(self, job: Job, tracked: bool = True) -> None:
        p = self.p
        self._release_loras(job)
        self.sources.pop(job.id, None)
        self.controls.pop(job.id, None)
        self.loading.pop(job.id, None)
        self._unread(job.id)
        if tracked:
            p.tracker.remove(job.id)
        else:  # it never joined: refused at its join
            p.tracker.untaken(job.id)
        p.tracker.forget({job.id})
        p.lease.settle({job.id})
