"""The step scheduler's policy: which queued jobs join the rows in flight, and which latent size
takes the next UNet call. Pure (no torch, no Redis): the runner asks, then does.

- A job joins whole (all its images at once, so they share one sampler state), oldest first,
  while the images in flight stay within the cap. The oldest job that does not fit stops the
  line: a younger, smaller job never overtakes it, so no job waits for ever behind a stream of
  small ones. A job that must run alone (a suspect: its workers died with it before) joins
  only when nothing is in flight, and nothing joins beside it.
- Jobs are taken ahead of their room: a job taken is ready to join once its inputs and prompts
  are read, which takes a few UNet calls when the GPU is busy (LoRAs, pictures, encoder calls
  beside the steps); taken only when its room frees, its rows would stay empty that long.
  `Readiness` says how many calls ahead to take, from what the last joins and steps took.
- Sizes take turns: the size that has waited longest since its last UNet call goes next. With
  one size in flight that is every call; with two they alternate; no size starves.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
Size = tuple[int, int]  # (width, height) in pixels: rows of one size share a UNet call


@dataclass(frozen=True)
class Candidate(Generic[K]):
    """A job that waits to join: its key, its size, its images, when it was queued."""

    key: K
    size: Size
    rows: int
    queued_at: float
    alone: bool = False


def admit(
    waiting: Sequence[Candidate[K]], in_flight: int, cap: int, alone_in_flight: bool = False
) -> list[Candidate[K]]:
    """The jobs that join now, oldest first, each whole, while `in_flight` images stay within
    `cap`. A job larger than the cap joins when nothing else is in flight."""
    if alone_in_flight:
        return []
    joined: list[Candidate[K]] = []
    for job in sorted(waiting, key=lambda c: c.queued_at):
        fits = in_flight + job.rows <= cap or in_flight == 0
        if not fits or (job.alone and in_flight):
            break
        joined.append(job)
        in_flight += job.rows
        if job.alone:
            break
    return joined


# Calls ahead at most: a job taken shows `running` at step 0 and holds its LoRAs from then, so
# it is not taken much earlier than it needs (its entry is this worker's already: the reader
# keeps the inbox filled).
AHEAD_MAX = 8
# Weight of the newest sample in the running means (a few joins and steps in the past count).
RECENT = 0.2


@dataclass
class Readiness:
    """Running means of how long a job taken takes to be ready to join (its inputs and prompts
    read: `ready_s`) and of how long one UNet call of the rows in flight takes (`call_s`)."""

    ready_s: float = 0.0
    call_s: float = 0.0

    def joined(self, ready_s: float) -> None:
        self.ready_s = _mean(self.ready_s, ready_s)

    def called(self, call_s: float) -> None:
        self.call_s = _mean(self.call_s, call_s)

    def ahead(self) -> int:
        """How many UNet calls before its room frees a job is taken (1: in the call that frees
        it, so it joins at the next)."""
        if self.call_s <= 0 or self.ready_s <= self.call_s:
            return 1
        return min(AHEAD_MAX, math.ceil(self.ready_s / self.call_s))


def _mean(mean: float, sample: float) -> float:
    return sample if mean <= 0 else mean + RECENT * (sample - mean)


def leaving(remaining: Sequence[tuple[int, bool]], keys: int, ahead: int) -> list[int]:
    """Which of the lanes in flight (each: UNet calls left in its pass, whether it is of the
    key that steps next) leave within `ahead` calls: a lane of the next key with one call
    left leaves in the coming call; beyond that, with `keys` keys taking turns, each of a
    lane's calls is one of every `keys`."""
    turns = max(keys, 1)
    return [i for i, (left, next_key) in enumerate(remaining)
            if (left <= 1 and next_key) or (ahead > 1 and left * turns <= ahead)]  # fmt: skip


class Turns(Generic[K]):
    """Which size's rows (or model and size's: any key of rows that share a UNet call) step
    next: the one whose last UNet call is longest ago."""

    def __init__(self) -> None:
        self._last: dict[K, int] = {}
        self._calls = 0

    def peek(self, sizes: Sequence[K]) -> K | None:
        """The size `next` would pick now, without taking its turn."""
        if not sizes:
            return None
        # Never stepped counts as longest ago; ties go to the size listed first (older work).
        return min(sizes, key=lambda s: self._last.get(s, -1))

    def next(self, sizes: Sequence[K]) -> K | None:
        size = self.peek(sizes)
        if size is None:
            return None
        self._calls += 1
        self._last[size] = self._calls
        return size

    def forget(self, live: Sequence[K]) -> None:
        """Drop sizes with no rows left, so the record does not grow."""
        self._last = {s: n for s, n in self._last.items() if s in live}
