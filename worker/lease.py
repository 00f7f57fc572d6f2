"""The worker's hold on its name and on the stream entries it took.

A worker is a consumer of the queue streams under a fixed name (restarted by its orchestrator
under the same name). It holds:

- its name, through a heartbeat with a token of this process: a second live process with the
  same name cannot start, and a restart waits for the dead holder's heartbeat to lapse;
- the entries it read and has not acked: renewed ("touched") at every beat, so no other worker
  reclaims them while this one is alive; handed back to the stream when it stops before running
  them; taken back at the next start when it died holding them;
- at most one suspect (an entry whose workers died with it twice): a suspect runs alone.

Each beat also takes over the entries of workers gone silent, when there is room for them.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable

from app.jobs.contract import Delivery
from app.jobs.worker_store import WorkerStore
from worker.inbox import Inbox
from worker.settings import WorkerSettings
from worker.shutdown import Shutdown

log = logging.getLogger("sdserve.worker")

READ_BLOCK_MS = 1000


class NameTaken(Exception):
    """Another live worker process holds this worker name."""


class Lease:
    def __init__(
        self,
        settings: WorkerSettings,
        store: WorkerStore,
        inbox: Inbox[Delivery],
        shutdown: Shutdown,
        info: Callable[[], str],
    ) -> None:
        self.settings = settings
        self.store = store
        self.inbox = inbox
        self.shutdown = shutdown
        self.info = info  # what the heartbeat says (models, device, pace)
        self.on_beat: list[Callable[[], None]] = []  # what else each beat renews
        self.name = settings.worker_name
        # This process's hold on its name: a restart under the same name gets a new token.
        self.token = secrets.token_hex(8)
        self._held: dict[tuple[str, str], Delivery] = {}  # by (model, entry id)
        self._suspects: set[str] = set()  # at most one: a suspect runs alone
        self._lock = threading.Lock()

    def claim(self) -> None:
        """Hold this worker's name, or raise NameTaken if another live process holds it.

        A holder that died (a restart under the same name) leaves its heartbeat for at most
        its TTL: wait that long for it to lapse. A live holder renews it meanwhile.
        """
        ttl = self.settings.heartbeat_ttl_s
        deadline = time.monotonic() + ttl + 1
        while not self.shutdown.redis(
            lambda: self.store.heartbeat(self.name, self.token, ttl, self.info())
        ):
            if self.shutdown.stopping.is_set():  # told to stop while waiting: nothing held
                return
            if time.monotonic() > deadline:
                raise NameTaken(
                    f"another live worker is named {self.name!r} (its heartbeat stayed fresh"
                    f" for {ttl}s): give each worker its own SDSERVE_WORKER_NAME"
                )
            log.warning("worker name %s is held; waiting for it to lapse", self.name)
            time.sleep(1)

    def take_back(self) -> None:
        """Entries a process of this name took before a restart and never acked come first
        (before the first heartbeat takes over other workers' entries). All of them, but only
        one suspect: those left are touched by no one, so any worker takes them later, one at
        a time."""
        cap = self.settings.delivery_cap
        taken = self.shutdown.redis(
            lambda: self.store.reclaim(self.name, 0, cap, 100_000, owner=self.name)
        )
        if taken:
            log.warning("took back %d entries this name held before a restart", len(taken))
        self.take(taken or [])

    def read(self) -> None:
        """Read new entries while the inbox has room (the reader thread's loop body)."""
        if self.inbox.wait_for_room(READ_BLOCK_MS / 1000):
            room = self.inbox.room()
            self.take(
                self.shutdown.redis(lambda: self.store.read(self.name, room, READ_BLOCK_MS)) or []
            )

    def take(self, deliveries: list[Delivery]) -> None:
        with self._lock:
            self._suspects |= {d.job_id for d in deliveries if d.suspect}
            self._held |= {(d.model, d.entry_id): d for d in deliveries}
        self.inbox.put(deliveries)

    def release(self, deliveries: list[Delivery]) -> None:
        """These entries are acked (or handed back): no longer this process's to renew."""
        with self._lock:
            for d in deliveries:
                self._held.pop((d.model, d.entry_id), None)

    def ack(self, delivery: Delivery) -> None:
        """Done with, nothing to write (canceled meanwhile)."""
        self.shutdown.redis(lambda: self.store.ack(delivery))
        self.release([delivery])

    def hand_back(self, deliveries: list[Delivery]) -> None:
        """Back to the stream at once, for any worker: not stranded until this name returns."""
        if deliveries:
            self.shutdown.redis(lambda: self.store.hand_back(deliveries))
            self.release(deliveries)

    def settle(self, job_ids: set[str]) -> None:
        """These jobs ran (or will not run here): no longer a suspect this worker holds."""
        with self._lock:
            self._suspects -= job_ids

    def beat(self) -> None:
        """The heartbeat; touching what is held; taking over entries of workers gone silent."""
        ttl = self.settings.heartbeat_ttl_s
        if not self.store.heartbeat(self.name, self.token, ttl, self.info()):
            # Our heartbeat lapsed (Redis unreachable past the TTL) and another process took
            # the name: two of us would renew each other's entries. Leave.
            raise NameTaken(f"another live worker took the name {self.name!r}")
        for renew in self.on_beat:
            renew()
        with self._lock:
            held = list(self._held.values())
        self.store.touch(self.name, held)
        claim_idle_ms = self.settings.claim_idle_s * 1000
        room = self.inbox.room()
        if room > 0 and not self.shutdown.stopping.is_set():
            taken = self.store.reclaim(
                self.name, claim_idle_ms, self.settings.delivery_cap, room,
                suspect=not self._suspects,
            )  # fmt: skip
            if taken:
                log.warning("took over %d entries of a worker gone silent", len(taken))
                self.take(taken)
        self.store.forget_consumers(claim_idle_ms)
        self.store.trim()

    def retire(self) -> None:
        self.store.retire(self.name, self.token)
