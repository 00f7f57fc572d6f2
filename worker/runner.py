"""The running worker: its parts, its threads, and its start and stop.

Threads: the GPU loop (`Runner.run`: continuous batching, worker/continuous.py); a reader that
keeps the next entries gathered while the GPU works (worker/lease.py); a reporter that writes
progress, notices cancellations and sends heartbeats; and a small pool that encodes PNGs and
writes results (worker/completions.py). Neither Redis nor PNG encoding holds the GPU up.

A thread that dies of an error it cannot handle stops the whole worker (worker/shutdown.py),
so that its orchestrator restarts it, rather than leaving it half alive with a fresh heartbeat.
Only transient Redis errors (unreachable, loading, full) are retried.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import redis

from app.jobs.contract import Delivery, ErrorCode, Job
from app.jobs.storage import Storage
from app.jobs.store import is_transient
from app.jobs.worker_store import WorkerStore
from worker.compiled import cudagraph_skips
from worker.completions import Completions, Failed
from worker.continuous import RowLoop
from worker.engine import Engine
from worker.engines import Engines
from worker.images import encode_preview
from worker.inbox import Inbox
from worker.inputs import NotHeld
from worker.lease import Lease
from worker.loop import Parts
from worker.metrics import WorkerMetrics
from worker.progress import Tracker
from worker.settings import WorkerSettings
from worker.shutdown import Shutdown

log = logging.getLogger("sdserve.worker")

REPORT_INTERVAL_S = 0.25
# The pace is written again as soon as jobs are taken, join or leave, at most this often: a job
# submitted between two reports reads the rows that joined since.
PACE_INTERVAL_S = 0.01


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
        self.store = store
        # The models this worker holds, by name (one engine: the first the settings name).
        if isinstance(engines, Engine):
            engines = {next(iter(settings.held_models())): engines}
        self.engines = Engines(engines, upscaler)
        store.models = list(engines)
        self.name = settings.worker_name
        tuning = self.engines.tuning
        self.tracker = Tracker(tuning.row_cap(), (tuning.tile, tuning.tile_overlap))
        self.metrics = metrics or WorkerMetrics(tuning.row_buckets())
        for each in engines.values():
            each.observer = self.metrics
            if each.adapters is not None:
                each.adapters.observer = self.metrics
            each.calls.on_recompile = lambda _reason: self.metrics.recompiles.inc()
        held = [e.adapters for e in engines.values() if e.adapters is not None]
        self.metrics.loras_resident.set_function(lambda: sum(len(a.resident) for a in held))
        self.metrics.cudagraph_skips.set_function(cudagraph_skips)
        self.metrics.warm_entries_left.set_function(self.engines.warm_entries_left)
        self.shutdown = Shutdown(settings.stop_grace_s)
        self.inbox: Inbox[Delivery] = Inbox(settings.max_batch)
        self.lease = Lease(settings, store, self.inbox, self.shutdown, self._info)
        # Each beat: a Redis restarted without persistence has lost them.
        self.lease.on_beat.append(self._publish_tokenizers)
        self.lease.on_beat.append(self._publish_loras)
        self._refreshes: dict[str, int] = {}  # A1111's refresh-loras/-embeddings: times asked
        self._skipped_said: dict[str, dict[str, str]] = {}  # model -> LoRA files it skips, why
        self.lease.on_beat.append(self.metrics.last_heartbeat.set_to_current_time)
        self.completions = Completions(
            2 * settings.max_batch, store, storage, self.lease, self.tracker, self.metrics,
            self.shutdown, self.engines.provenance,
        )  # fmt: skip
        parts = Parts(settings, self.inbox, self.start_jobs, storage, self.engines, self.tracker,
                      self.lease, self.completions, self.metrics, self.shutdown)  # fmt: skip
        self.loop = RowLoop(parts)
        self._closed = threading.Event()
        self._reader = self.shutdown.guarded(self._read_loop, "reader")
        self._reporter = self.shutdown.guarded(self._report_loop, "reporter")

    @property
    def fatal(self) -> BaseException | None:
        return self.shutdown.fatal

    def run(self) -> None:
        """Serve until `stop()`; the work in hand is finished and written first."""
        self.open()
        try:
            while not self.shutdown.stopping.is_set():
                self.step()
        except BaseException as e:
            self.shutdown.die(e, "GPU loop")
        if self.fatal is None:
            self.close()

    def stop(self) -> None:
        """Stop reading; the work in hand has `stop_grace_s` to finish."""
        self.shutdown.stop()

    def open(self) -> None:
        self.shutdown.redis(self.store.ensure_group)
        self.lease.claim()
        self.lease.take_back()
        self.shutdown.redis(self.lease.beat)
        self._reader.start()
        self._reporter.start()
        log.info("worker %s ready on %s", self.name, self.engines.device)

    def step(self) -> int:
        """One turn of the loop: a UNet step of the rows in flight after letting new jobs join.
        Returns how many entries it took."""
        return self.loop.step()

    def close(self) -> None:
        """Hand back what was read but not run, wait for results in flight, then leave."""
        if not self.shutdown.stopping.is_set():
            self.stop()
        self.loop.finish_up()
        self._reader.join()
        self.lease.hand_back(self.inbox.drain())
        self.completions.close()
        self._closed.set()
        self.tracker.changed.set()  # the reporter's wait ends now
        self._reporter.join()
        self.shutdown.redis(self.lease.retire)
        log.info("worker %s stopped", self.name)

    def _read_loop(self) -> None:
        """Keep the inbox topped up, so the next batch is gathered while this one runs."""
        while not self.shutdown.stopping.is_set():
            self.lease.read()

    def start_jobs(self, deliveries: list[Delivery]) -> list[Job]:
        """Mark the entries' jobs running; those that ended meanwhile are out of hand."""
        jobs = self.shutdown.redis(
            lambda: self.store.start(deliveries, self.name, self.completions.count_failure)
        )
        jobs = jobs or []
        self.lease.release([d for d in deliveries if d.job_id not in {job.id for job in jobs}])
        now = time.time()
        for job in jobs:
            self.metrics.queue_wait.labels(job.delivery.model).observe(now - job.created_at)
        jobs = [job for job in jobs if self._prompts_fit(job)]
        # Suspects that will not run (ended meanwhile) are out of hand.
        self.lease.settle({d.job_id for d in deliveries} - {job.id for job in jobs})
        return jobs

    def _prompts_fit(self, job: Job) -> bool:
        """A job this worker holds no engine for (the x4 upscaler, its refiner) fails, as do a
        clip skip deeper than the model's text encoder and a prompt over the model's limit (the
        API refuses such prompts once a worker has published its tokenizer: this is for jobs
        queued before that)."""
        request = job.request
        limit = self.engines.tuning.prompt_chunks
        try:
            engine = self.engines.of(job)
            self.engines.refiner(job)
        except NotHeld as e:  # the job fails, never the worker
            self.completions.complete(job, Failed(ErrorCode.INVALID, str(e)))
            return False
        layers = engine.family.clip_layers
        if request.clip_skip > layers:
            message = (
                f"clip_skip: {request.clip_skip}; this model's text encoder has {layers} layers"
            )
            self.completions.complete(job, Failed(ErrorCode.INVALID, message))
            return False
        for field in ("prompt", "negative_prompt"):
            pieces = engine.chunk_count(getattr(request, field), request.prompt_syntax)
            if pieces > limit:
                message = f"{field}: {pieces} chunks of 75 tokens; the model takes at most {limit}"
                self.completions.complete(job, Failed(ErrorCode.INVALID, message))
                return False
        return True

    def _report_loop(self) -> None:
        """Progress and cancellations often; the heartbeat (worker/lease.py) every third of its
        TTL.

        Runs until the worker has closed, so a batch finishing in its stop grace still reports
        and still counts as alive.
        """
        next_beat = time.monotonic() + self.settings.heartbeat_ttl_s / 3
        next_report = time.monotonic() + REPORT_INTERVAL_S
        published = ""  # the pace last written between heartbeats
        while not self._closed.is_set():
            # Between two reports, the pace alone as soon as jobs are taken, join or leave
            # (`Tracker.changed`), at most every PACE_INTERVAL_S.
            self.tracker.changed.wait(max(0.0, next_report - time.monotonic()))
            self.tracker.changed.clear()
            if self._closed.wait(PACE_INTERVAL_S):
                break
            try:
                if time.monotonic() >= next_report:
                    next_report = time.monotonic() + REPORT_INTERVAL_S
                    running = self.tracker.running()
                    if running:
                        previews = {
                            job_id: (step, encode_preview(pictures))
                            for job_id, (step, pictures) in self.tracker.take_previews().items()
                        }
                        self.tracker.mark_gone(self.store.report(running, previews))
                # The rows in flight turn over within a job's run (a second or two at 60%
                # load), several times between two heartbeats: queued jobs' ETAs (the API)
                # read the pace written here.
                pace = json.dumps(self.tracker.pace().fields())
                if pace != published:
                    self.store.publish_pace(self.name, self.lease.token, pace)
                    published = pace
                if time.monotonic() >= next_beat:
                    self.lease.beat()
                    next_beat = time.monotonic() + self.settings.heartbeat_ttl_s / 3
            except redis.RedisError as e:
                if not is_transient(e):
                    raise
                log.warning("reporter: redis unavailable: %s", e)

    def _info(self) -> str:
        """What the heartbeat says: the models held, and the pace the API's queued ETAs use."""
        return json.dumps(self.engines.info() | self.tracker.pace().fields())

    def _publish_loras(self) -> None:
        """The LoRAs and embeddings each model takes, for the API: the LoRA folder listed again
        each beat, read again (and the embeddings folder, between steps) where refresh-loras
        (refresh-embeddings) was asked for since the last beat."""
        asked = {what: self._asked(what) for what in ("loras", "embeddings")}
        ttl = 3 * self.settings.heartbeat_ttl_s
        for model, engine in self.engines.models.items():
            if engine.embeddings is not None:
                engine.embeddings_asked |= asked["embeddings"]
                record = {"loaded": engine.embeddings.loaded, "skipped": engine.embeddings.skipped}
                self.store.publish_embeddings(model, record, ttl)
            if engine.adapters is None:
                continue
            if asked["loras"]:
                engine.adapters.refresh()
                engine.family.forget()  # prompts encoded with the files' old weights
            else:
                engine.adapters.rescan()
            skipped = engine.adapters.skipped()
            for name, why in skipped.items():  # each file's reason said once in the log
                if self._skipped_said.setdefault(model, {}).get(name) != why:
                    # Another model's LoRA is expected where families share a folder.
                    level = logging.WARNING if engine.adapters.unreadable(name) else logging.INFO
                    log.log(level, "model %s skips LoRA %s: %s", model, name, why)
            self._skipped_said[model] = skipped
            self.store.publish_loras(model, engine.adapters.names(), ttl, skipped)

    def _asked(self, what: str) -> bool:
        """Whether refresh-`what` was asked for since the last beat."""
        count = self.store.refreshes(what)
        before = self._refreshes.get(what)
        self._refreshes[what] = count
        return before is not None and count != before

    def _publish_tokenizers(self) -> None:
        for model, fields in self.engines.tokenizers().items():
            self.store.publish_tokenizer(model, fields)
