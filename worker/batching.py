"""From jobs to batches and back: grouping, chunking, and the image-to-job mapping."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from app.jobs.contract import Job

T = TypeVar("T")


@dataclass(frozen=True)
class Slot:
    """Image `index` of `job`: one row of a batch."""

    job: Job
    index: int

    @property
    def seed(self) -> int:
        return self.job.request.seeds()[self.index]


def group(jobs: Sequence[Job]) -> list[list[Job]]:
    """Jobs that can share a batch (same model, width, height, steps, scheduler), first come
    first."""
    groups: dict[tuple[str, int, int, int, str], list[Job]] = {}
    for job in jobs:
        r = job.request
        key = (job.delivery.model, r.width, r.height, r.steps, r.scheduler)
        groups.setdefault(key, []).append(job)
    return list(groups.values())


def chunks(jobs: Sequence[Job], max_batch: int) -> list[list[Slot]]:
    """Every image of every job, in order, cut into batches of at most `max_batch` rows."""
    slots = [Slot(job, k) for job in jobs for k in range(job.request.n)]
    return [slots[i : i + max_batch] for i in range(0, len(slots), max_batch)]


class Assembly(Generic[T]):
    """Collects each job's images across batches; a job is whole once all n have come back."""

    def __init__(self, jobs: Sequence[Job]) -> None:
        self._images: dict[str, dict[int, T]] = {job.id: {} for job in jobs}

    def add(self, rows: Sequence[Slot], outputs: Sequence[T]) -> list[Job]:
        """File each output under its row's job and image index; returns the jobs now whole."""
        # Every row must get exactly its own output: a short or long result is a bug, never a
        # reason to hand one job another's images.
        assert len(outputs) == len(rows), f"{len(outputs)} outputs for {len(rows)} rows"
        whole = []
        for slot, output in zip(rows, outputs, strict=True):
            images = self._images[slot.job.id]
            assert slot.index not in images, f"image {slot.index} of {slot.job.id} twice"
            images[slot.index] = output
            if len(images) == slot.job.request.n:
                whole.append(slot.job)
        return whole

    def take(self, job: Job) -> list[T]:
        """The job's images in index order (once whole)."""
        images = self._images.pop(job.id)
        return [images[k] for k in range(job.request.n)]
