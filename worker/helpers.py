"""Compile helpers: processes that compile parts of the warm-up beside it.

A cold start's minutes are compiles, one after another in the worker's process: the UNet's
(about 100 s of an H200's host), then the VAE's decoder and encoder (25 and 18 s), each
ControlNet's, and each further model's UNet and VAE. Most of a compile is the host's work on
one core. A helper process (`python -m worker.compile_helper`) builds the same engine
from the same settings and compiles some of these at the same time, into the compile cache
(TORCHINDUCTOR_CACHE_DIR) that the warm-up then reads: there they load in a second or two. The
first model's UNet is the worker's own work (its warm-up starts with it) and the rest of that
model its helper's; a second model is a helper's whole, and so is a third and more where the
GPU has room for their copies (worker/process.py `helped`: one an extra 20 GiB past 40; a
model past them compiles in the warm-up, as without helpers). What a helper compiles is
what the warm-up would, by the same code (`CompiledCalls.precompile`): the same graphs, the
same cache entries. A helper that fails or hangs costs its time only: the warm-up compiles
whatever the cache lacks, as without helpers; a warm-up that runs out of GPU memory beside the
helpers stops them all and starts again alone (worker/engines.py). Nothing here changes what is
served.

`SDSERVE_COMPILE_HELPERS` (auto: where the worker compiles with inductor on a GPU of 40 GiB or
more, since a helper holds a second copy of its model and its largest call's activations for
as long as it runs).

A start from a compile cache that already holds a model's parts starts no helper for it
(`WarmMarks`): there a helper only costs time. It imports torch and loads its model before it
reads the cache, so the warm-up waited for it (an H100, 2026-12-06: 27 s for parts the worker
reads in 4, 10 s of a 46 s start spent waiting).
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("sdserve.worker")

# A helper is waited for at most this long after the warm-up reaches its part (it started with
# the worker, so it has had the first model's UNet compile's minutes already); then it is
# stopped and the warm-up compiles that part itself.
WAIT_S = 600.0


# Models that get a helper, at the least: the first two (the first model's rest, the second
# whole). Each helper holds a copy of its model while it runs, so the worker gives more models
# one only where the GPU has the room (worker/process.py `helped`); a model past them compiles
# in its warm-up.
HELPED_MODELS = 2


def helped_parts(
    models: list[str], warmed: Iterable[str] = (), count: int = HELPED_MODELS
) -> dict[str, str]:
    """The part a helper compiles for each of the first `count` models, but those `warmed`
    (their parts are in the compile cache): the first model's rest, the others' all."""
    parts = {name: "rest" if i == 0 else "all" for i, name in enumerate(models[:count])}
    return {name: part for name, part in parts.items() if name not in set(warmed)}


class WarmMarks:
    """Which models' warm-ups have ended with this compile cache: a mark file each, under the
    cache, named by a fingerprint of what the compiled code depends on (the caller's: torch's
    version, the GPU, the model's source, the compile settings). A mark that lies (the cache
    emptied by hand) costs a slower start, not a wrong one: the warm-up compiles what the cache
    lacks, as it does without helpers."""

    def __init__(self, cache: Path | None, fingerprints: dict[str, str]) -> None:
        self._at = cache / "sdserve-warmed" if cache is not None else None
        self._keys = {name: hashlib.sha256(fingerprint.encode()).hexdigest()[:20]
                      for name, fingerprint in fingerprints.items()}  # fmt: skip

    def warmed(self) -> list[str]:
        if self._at is None:
            return []
        return [name for name, key in self._keys.items() if (self._at / key).exists()]

    def mark(self) -> None:
        """Every model warmed up: their compiled parts are in the cache now."""
        if self._at is None:
            return
        try:
            self._at.mkdir(parents=True, exist_ok=True)
            for key in self._keys.values():
                (self._at / key).touch()
        except OSError as e:  # a read-only cache: every start is as a first one, no worse
            log.warning("compile cache %s: cannot mark the models warmed (%s)", self._at, e)


class Helpers:
    """A helper process for each of the first `count` models, started at once: the first
    model's without its UNet (`rest`), the others' whole (`all`); none for a model `warmed`."""

    def __init__(
        self, models: list[str], warmed: Iterable[str] = (), count: int = HELPED_MODELS
    ) -> None:
        self._parts = helped_parts(models, warmed, count)
        helper = [sys.executable, "-m", "worker.compile_helper"]
        self._running = {
            name: subprocess.Popen([*helper, name, part, str(os.getpid())])
            for name, part in self._parts.items()
        }
        self._started = time.monotonic()
        log.info("compile helpers started: %s",
                 ", ".join(f"{name} ({part})" for name, part in self._parts.items()))  # fmt: skip

    def compiles_unet(self, name: str) -> bool:
        return self._parts.get(name) == "all"

    def wait(self, name: str) -> None:
        """Until `name`'s helper has finished (its compiled code then in the cache), failed, or
        taken too long (stopped: the warm-up compiles its part)."""
        process = self._running.get(name)
        if process is None:
            return
        try:
            code = process.wait(WAIT_S)
        except subprocess.TimeoutExpired:
            log.warning("the compile helper of %s took over %.0fs: stopped; the warm-up"
                        " compiles its part", name, WAIT_S)  # fmt: skip
            self.stop(name)
            return
        if code != 0:
            log.warning("the compile helper of %s exited with %d: the warm-up compiles its"
                        " part", name, code)  # fmt: skip
        else:
            log.info("the compile helper of %s was done %.1fs after the start", name,
                     time.monotonic() - self._started)  # fmt: skip

    def running(self) -> bool:
        return any(process.poll() is None for process in self._running.values())

    def stop(self, name: str | None = None) -> None:
        """Stop `name`'s helper (every one: None) if it still runs: its work is no longer
        wanted (its model warmed up, or the worker is stopping)."""
        for key in [name] if name is not None else list(self._running):
            process = self._running.pop(key, None)
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
