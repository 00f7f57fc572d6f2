"""Expiry of images in storage, and of queued jobs no worker can run: sweeps run by the API
processes."""

from __future__ import annotations

import logging
import threading

from app.jobs.api_store import ApiStore
from app.jobs.storage import Storage, expiry_cutoff
from app.settings import ApiSettings

log = logging.getLogger("sdserve.api")

OVERDUE_INTERVAL_S = 1.0


class Sweeper:
    """Deletes images older than the result TTL from storage, in one API process at a time
    (a lock in Redis per interval): a directory has no lifecycle rules, and this way a bucket
    needs none either."""

    def __init__(self, store: ApiStore, storage: Storage, settings: ApiSettings) -> None:
        self.store, self.storage, self.settings = store, storage, settings
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sweeper", daemon=True)
        self._overdue = threading.Thread(target=self._overdue_loop, name="overdue", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._overdue.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()
        self._overdue.join()

    def _overdue_loop(self) -> None:
        """Jobs whose model no live worker holds still end at their deadline: every API
        process looks each second (a job ends once, whoever writes it first)."""
        while not self._stopping.wait(OVERDUE_INTERVAL_S):
            try:
                if failed := self.store.fail_overdue():
                    log.warning("%d queued jobs passed their deadline with no worker for their"
                                " model", failed)  # fmt: skip
            except Exception:  # Redis away: the next turn tries again
                log.debug("looking for overdue jobs failed", exc_info=True)

    def _loop(self) -> None:
        interval = self.settings.sweep_interval_s
        while not self._stopping.wait(interval):
            try:
                if self.store.sweep_turn(interval):
                    removed = self.storage.sweep(expiry_cutoff(self.settings.result_ttl_s))
                    log.info("swept %d expired images from storage", removed)
            except Exception:  # storage or Redis away: the next turn tries again
                log.exception("sweeping expired images failed")
