"""A job's outcome, written off the GPU's thread: its images encoded and stored, then its status,
then its entry acked.

The loops hand an `Outcome` (`Succeeded` with pixels, or `Failed` with a code and a reason) to a
small pool; the GPU goes on. The pool's backlog is bounded: when it is full the GPU waits, so a
slow store cannot pile up pixels without end. A write that fails fails the job (`storage_error`);
if even that cannot be written, the worker stops, and a restart runs the job again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np

from app.jobs.contract import ErrorCode, Job, plain_reason
from app.jobs.storage import Storage, result_key
from app.jobs.worker_store import WorkerStore
from worker.images import Provenance, encode_png, parameters
from worker.lease import Lease
from worker.metrics import WorkerMetrics
from worker.progress import Tracker
from worker.shutdown import Shutdown

log = logging.getLogger("sdserve.worker")

STORAGE_ATTEMPTS = 4  # first try, then after 0.5, 1 and 2 seconds


Images = list[np.ndarray | None]


@dataclass(frozen=True)
class Succeeded:
    """HxWx3 pixels per image, in order; None for an image that came out non-finite. `finish`:
    the job's task's last touch (an inpainting's overlay, an upscale's resize), done in the
    pool: at a picture's own size (inpainting of the masked area only, up to 4096 x 4096) it
    takes a good part of a second, which the GPU's thread would wait for."""

    images: Images
    finish: Callable[[Images], Images] | None = None


@dataclass(frozen=True)
class Failed:
    code: ErrorCode
    message: str


Outcome = Succeeded | Failed


class Completions:
    def __init__(
        self,
        backlog: int,
        store: WorkerStore,
        storage: Storage,
        lease: Lease,
        tracker: Tracker,
        metrics: WorkerMetrics,
        shutdown: Shutdown,
        provenance: Callable[[Job], Provenance],
    ) -> None:
        self.store = store
        self.storage = storage
        self.lease = lease
        self.tracker = tracker
        self.metrics = metrics
        self.shutdown = shutdown
        self.provenance = provenance  # the model's and LoRAs' names in the images' infotext
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="complete")
        # Jobs handed to the pool and not yet written: the GPU waits for room.
        self._backlog = threading.BoundedSemaphore(backlog)

    def complete(self, job: Job, outcome: Outcome) -> None:
        """Hand a job's outcome to the pool, waiting for room; every future is checked."""
        self._backlog.acquire()
        self.metrics.completion_backlog.inc()
        future = self._pool.submit(self._write, job, outcome)
        future.add_done_callback(partial(self._written, job))

    def close(self) -> None:
        """Wait for every outcome in the pool to be written."""
        self._pool.shutdown(wait=True)

    def count_failure(self, code: ErrorCode) -> None:
        self.metrics.failures.labels(code.value).inc()

    def _write(self, job: Job, outcome: Outcome) -> None:
        if isinstance(outcome, Failed):
            self.fail(job, outcome.code, outcome.message)
            return
        images = outcome.images
        if outcome.finish is not None:
            try:
                images = outcome.finish(images)
            except Exception as e:  # the job's inputs or task, not storage: the job fails
                log.exception("finishing the images failed", extra={"job_id": job.id})
                self.fail(job, ErrorCode.ENGINE, f"{type(e).__name__}: {e}")
                return
        self._succeed(job, images)

    def _written(self, job: Job, future: Future[None]) -> None:
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
                self.shutdown.die(e, "completion")
                return
        self.lease.release([job.delivery])

    def fail(self, job: Job, code: ErrorCode, message: str) -> None:
        log.warning("failed (%s): %s", code.value, message, extra={"job_id": job.id})
        self.count_failure(code)
        self.shutdown.redis(partial(self.store.fail, job, code, message))

    def _succeed(self, job: Job, images: Images) -> None:
        """Encode and store one job's images (pool thread); its entry is acked after that."""
        finite = [image for image in images if image is not None]
        if len(finite) < len(images):
            self.fail(job, ErrorCode.NUMERICAL, "the model produced non-finite pixels")
            return
        pngs = []
        model, lora_hashes, ti_hashes = self.provenance(job)
        for image, seed in zip(finite, job.request.seeds(), strict=True):
            with self.metrics.png_encode.time():
                text = parameters(job.request, seed, model, lora_hashes, ti_hashes)
                pngs.append(encode_png(image, text))
        # The images first, then the status and the ack: a crash in between leaves orphan
        # files (swept after the TTL), never a succeeded job without images.
        for k, png in enumerate(pngs):
            self._store_file(result_key(job.id, k), png)
        if self.shutdown.redis(partial(self.store.succeed, job, len(pngs))):
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
