"""What the worker's GPU loop is, whichever batching it does, and what it works with.

The runner (worker/runner.py) builds the parts and calls the loop's `step` until told to stop,
then `finish_up`. Two loops exist today: continuous batching (worker/continuous.py, the
default: rows of many jobs step together, joining and leaving at any step) and static batches
(worker/static.py: jobs of one shape gathered, run to the end together).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from app.jobs.contract import Delivery, Job
from app.jobs.storage import Storage
from worker.completions import Completions
from worker.engines import Engines
from worker.inbox import Inbox
from worker.lease import Lease
from worker.metrics import WorkerMetrics
from worker.progress import Tracker
from worker.settings import WorkerSettings
from worker.shutdown import Shutdown


@dataclass(frozen=True)
class Parts:
    settings: WorkerSettings
    inbox: Inbox[Delivery]  # entries read and held, not yet started
    # Marks entries' jobs running; returns those still to run (others ended meanwhile, or
    # failed at the door: a prompt over the model's limit).
    start: Callable[[list[Delivery]], list[Job]]
    storage: Storage  # the jobs' source pictures
    engines: Engines
    tracker: Tracker  # progress, previews, cancellations, the pace
    lease: Lease
    completions: Completions
    metrics: WorkerMetrics
    shutdown: Shutdown


class Loop(Protocol):
    def step(self) -> int:
        """Let work in, run one unit of it (a UNet step, or a batch); how many entries it took."""
        ...

    def finish_up(self) -> None:
        """Stopping: finish what is in flight within the stop grace; hand back the rest."""
        ...
