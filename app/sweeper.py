"""Expiry of images in storage: a sweep, run by the API processes."""

from __future__ import annotations

import logging
import threading

from app.jobs.api_store import ApiStore
from app.settings import ApiSettings
from app.storage import Storage, expiry_cutoff

log = logging.getLogger("sdserve.api")


class Sweeper:
    """Deletes images older than the result TTL from storage, in one API process at a time
    (a lock in Redis per interval): a directory has no lifecycle rules, and this way a bucket
    needs none either."""

    def __init__(self, store: ApiStore, storage: Storage, settings: ApiSettings) -> None:
        self.store, self.storage, self.settings = store, storage, settings
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sweeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()

    def _loop(self) -> None:
        interval = self.settings.sweep_interval_s
        while not self._stopping.wait(interval):
            try:
                if self.store.sweep_turn(interval):
                    removed = self.storage.sweep(expiry_cutoff(self.settings.result_ttl_s))
                    log.info("swept %d expired images from storage", removed)
            except Exception:  # storage or Redis away: the next turn tries again
                log.exception("sweeping expired images failed")
