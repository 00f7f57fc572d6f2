"""Static batching, the worker's loop when `SDSERVE_BATCHING=static`: entries gathered for a batch
window, grouped by shape (size, steps, sampler), each group run to the end in batches of
max_batch images (one scheduler for the batch); jobs from a source picture, and suspects, run
alone through the row hooks. Continuous batching (worker/continuous.py) is the default; this
loop stays until continuous batching is shown ahead of it on every load (BENCHMARKS.md).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from app.jobs.contract import Delivery, ErrorCode, Job
from app.jobs.tasks import denoising_steps, unet_rows
from worker.batching import Assembly, Slot, chunks, group
from worker.completions import Failed, Succeeded
from worker.inputs import BatchShape, NoUpscaler
from worker.lease import READ_BLOCK_MS
from worker.loop import Parts
from worker.rows import Lane
from worker.sources import MissingInput, image_specs
from worker.tasks import task

log = logging.getLogger("sdserve.worker")


class BatchLoop:
    def __init__(self, parts: Parts) -> None:
        self.p = parts

    def step(self) -> int:
        window_s = self.p.settings.batch_window_ms / 1000
        deliveries = self.p.inbox.take(window_s, timeout_s=READ_BLOCK_MS / 1000)
        if deliveries:
            self._process(deliveries)
        return len(deliveries)

    def finish_up(self) -> None:
        """Nothing is in flight between steps: a batch runs to its end within `step`."""

    def _process(self, deliveries: list[Delivery]) -> None:
        jobs = self.p.start(deliveries)
        # A suspect (its workers died with it twice) runs alone: if it kills this worker too,
        # no stranger's delivery count goes up with it. So does a job from a source picture:
        # static batches are text to image.
        alone = [
            job
            for job in jobs
            if job.delivery.suspect or task(job.request).alone_in_static(job.request)
        ]
        for batch in [*group([j for j in jobs if j not in alone]), *([j] for j in alone)]:
            self._run_group(batch)

    def _run_group(self, jobs: list[Job]) -> None:
        p = self.p
        request = jobs[0].request
        shape = task(request).shape(request)
        assembly: Assembly[np.ndarray | None] = Assembly(jobs)
        settled: set[str] = set()  # outcome handed to the pool, which acks after writing it
        if task(request).alone_in_static(request):
            if not p.shutdown.out_of_grace():
                settled = self._run_source(jobs[0], shape)
        else:
            for chunk in chunks(jobs, p.engines.tuning.max_batch):
                rows = [s for s in chunk
                        if not (s.job.id in settled or p.tracker.is_gone(s.job.id))]  # fmt: skip
                if rows and not p.shutdown.out_of_grace():
                    settled |= self._run_batch(rows, shape, assembly)
        unsettled = [job for job in jobs if job.id not in settled]
        # Ended elsewhere (canceled): nothing to write, only ack. Cut short by the stop
        # grace: back to the queue, for another worker.
        for job in (j for j in unsettled if p.tracker.is_gone(j.id)):
            p.lease.ack(job.delivery)
        cut = [job.delivery for job in unsettled if not p.tracker.is_gone(job.id)]
        if cut and p.shutdown.fatal is None:
            log.warning("stop grace over: %d jobs go back to the queue", len(cut))
            p.lease.hand_back(cut)
        p.tracker.forget({job.id for job in jobs})
        p.lease.settle({job.id for job in jobs})

    def _keep_going(self, step: int) -> bool:
        """After each step: go on unless every job ended elsewhere or the stop grace is over."""
        return self.p.tracker.advance(step) and not self.p.shutdown.out_of_grace()

    def _run_batch(
        self, rows: list[Slot], shape: BatchShape, assembly: Assembly[np.ndarray | None]
    ) -> set[str]:
        """Run one batch; returns the jobs whose outcome it handed to the pool."""
        p = self.p
        jobs = list({s.job.id: s.job for s in rows}.values())
        specs = [image_specs(s.job.request)[s.index] for s in rows]
        p.tracker.begin({job.id: (job.request.steps, unet_rows(job.request)) for job in jobs})
        started = time.perf_counter()
        try:
            images = p.engines.of(jobs[0]).generate(specs, shape, self._keep_going)
        except torch.cuda.OutOfMemoryError:
            return self._split(rows, shape, assembly)
        except Exception as e:  # the worker lives on; these jobs fail with the reason
            log.exception("batch of %d images failed", len(rows))
            for job in jobs:
                p.completions.complete(job, Failed(ErrorCode.ENGINE, f"{type(e).__name__}: {e}"))
            return {job.id for job in jobs}
        finally:
            p.tracker.end()
        seconds = time.perf_counter() - started
        p.metrics.batch_seconds.observe(seconds)
        p.metrics.batch_size.observe(len(rows))
        log.info("batch of %d images (%d jobs) %dx%d %d steps %s in %.2fs", len(rows), len(jobs),
                 shape.width, shape.height, shape.steps, shape.scheduler, seconds)  # fmt: skip
        if images is None:  # every job ended elsewhere, or the stop grace ran out
            return set()
        whole = assembly.add(rows, images)
        for job in whole:
            p.completions.complete(job, Succeeded(assembly.take(job)))
        return {job.id for job in whole}

    def _run_source(self, job: Job, shape: BatchShape) -> set[str]:
        """img2img, inpainting, upscaling or a hires fix in static mode: the job alone, through
        the row hooks."""
        p = self.p
        tuning = p.engines.tuning
        rows = unet_rows(job.request, tuning.tile, tuning.tile_overlap)
        p.tracker.begin({job.id: (denoising_steps(job.request), rows)})
        outcome: Failed | Succeeded
        try:
            engine = p.engines.of(job)
            work = task(job.request)
            source = work.source(p.storage, job.id, job.request)
            lane: Lane | None = work.prepare(engine, job.id, shape, source, job.request)
            while lane is not None:
                while not lane.done:
                    engine.step([lane])
                    if not self._keep_going(lane.earlier_steps + lane.step):
                        return set()  # canceled, or the stop grace ran out
                last, lane = lane, work.next_pass(engine, job.request, lane)
            images = engine.images(engine.finish(last))
            outcome = Succeeded(work.finished(images, source, job.request))
        except MissingInput as e:
            outcome = Failed(ErrorCode.INPUT, str(e))
        except NoUpscaler as e:
            outcome = Failed(ErrorCode.INVALID, str(e))
        except Exception as e:  # out of memory included: one job is as small as it gets
            log.exception("a job from a source picture failed", extra={"job_id": job.id})
            outcome = Failed(ErrorCode.ENGINE, f"{type(e).__name__}: {e}")
        finally:
            p.tracker.end()
        p.completions.complete(job, outcome)
        return {job.id}

    def _split(
        self, rows: list[Slot], shape: BatchShape, assembly: Assembly[np.ndarray | None]
    ) -> set[str]:
        """Out of GPU memory: retry in halves, down to one image, which then fails alone."""
        p = self.p
        p.engines.first.release_memory()  # the cache is the device's: one engine empties it
        p.metrics.oom_splits.inc()
        if len(rows) == 1:
            job = rows[0].job
            message = f"one {shape.width}x{shape.height} image does not fit in GPU memory"
            p.completions.complete(job, Failed(ErrorCode.OUT_OF_MEMORY, message))
            return {job.id}
        half = len(rows) // 2
        log.warning("out of GPU memory at %d images: retrying as %d + %d", len(rows), half,
                    len(rows) - half)  # fmt: skip
        settled = self._run_batch(rows[:half], shape, assembly)
        rest = [s for s in rows[half:] if s.job.id not in settled]
        return settled | (self._run_batch(rest, shape, assembly) if rest else set())
