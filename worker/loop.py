"""What the worker's GPU loop works with.

The runner (worker/runner.py) builds the parts and calls the loop's `step` until told to stop,
then `finish_up`. There is one loop, continuous batching (worker/continuous.py): rows of many
jobs step together, joining and leaving at any step. (Static batches, jobs of one shape run to
the end together, were removed on 2026-12-04 once continuous batching met them on uniform load
and led on every other: BENCHMARKS.md keeps the comparison.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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
