"""Bytecode for the worker's imports, kept under its compile cache where the installed packages
have none to read.

Why: Python compiles a module's source at each import that finds no bytecode for it, and writes
the result beside the source only where it may. An install made with `pip --no-compile`, or one
whose bytecode is stale, in a place the worker's user cannot write (a read-only image layer)
compiles torch's sources at every start: on the lent H100s, 8.4 s of a 35 s start from the
compile cache (py-spy, 2026-12-07: `SourceLoader.source_to_code` under `import torch`).

So a worker whose largest imports had no bytecode (`without_bytecode`) compiles, once it is
serving, the source of every module it imported into `place(cache)`, in a process of its own
at the lowest priority (`keep`), and marks the place complete. The next start reads bytecode
from there (`use`: Python's `sys.pycache_prefix`, set before torch is imported, and
`PYTHONPYCACHEPREFIX` for the processes it starts). The compile cache is where the worker
already keeps what a restart should not redo (a volume in containers). Python checks each
bytecode file against its source's time and size as usual: an upgraded package's stale files
are compiled again, never run.

This module imports nothing but the standard library: the command line calls `use` before
anything imports torch.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

log = logging.getLogger("sdserve.worker")

# The largest packages a worker imports: without their bytecode cached, each start compiles
# their sources again (diffusers and transformers: 14-15 s of imports on a 2-core host instead of
# 6), as where the packages are installed with `pip --no-compile` and the user the worker runs
# as cannot write beside them.
LARGEST_IMPORTS = ("diffusers", "transformers", "torch")

FOLDER = "bytecode"
COMPLETE = "complete"  # written once every module's bytecode is in the place

# Compiles the files named on stdin, one a line, into PYTHONPYCACHEPREFIX; prints how many
# failed (a source Python cannot compile is imported from source as before).
COMPILER = """
import os, py_compile, sys
os.nice(19)  # beside the serving worker: the lowest priority
failed = 0
for path in sys.stdin.read().splitlines():
    try:
        py_compile.compile(path, doraise=True)
    except Exception:
        failed += 1
print(failed)
"""


def place(cache: Path) -> Path:
    """Where bytecode is kept under a compile cache: by the interpreter's tag (cpython-312),
    since another Python cannot read it."""
    return cache / FOLDER / sys.implementation.cache_tag


def use(cache: Path) -> Path | None:
    """Read bytecode from `place(cache)` from now on, where an earlier start completed it and
    no other place is set (PYTHONPYCACHEPREFIX); the place, or None. Called before the
    imports it is for."""
    if sys.pycache_prefix is not None:
        return None
    at = place(cache)
    if not (at / COMPLETE).exists():
        return None
    sys.pycache_prefix = str(at)
    os.environ["PYTHONPYCACHEPREFIX"] = str(at)  # compile helpers: processes of their own
    return at


def without_bytecode(packages: tuple[str, ...] = LARGEST_IMPORTS) -> list[str]:
    """Those of `packages` whose top module was imported from source, no bytecode cached for
    it (Python's own lookup: beside the source, or under the place `use` set)."""
    missing = []
    for name in packages:
        spec = importlib.util.find_spec(name)
        origin = spec.origin if spec is not None else None
        if origin is None or not origin.endswith(".py"):
            continue
        if not Path(importlib.util.cache_from_source(origin)).exists():
            missing.append(name)
    return missing


def imported_sources() -> list[str]:
    """The source file of every module imported so far (those loaded from bytecode alone or
    from extensions have none to compile)."""
    sources = set()
    for module in list(sys.modules.values()):
        spec = getattr(module, "__spec__", None)
        origin = getattr(spec, "origin", None)
        if isinstance(origin, str) and origin.endswith(".py") and os.path.isfile(origin):
            sources.add(origin)
    return sorted(sources)


def keep(cache: Path, packages: tuple[str, ...] = LARGEST_IMPORTS) -> threading.Thread | None:
    """Where the largest imports had no bytecode and no place is in use: compile every
    imported module's source into `place(cache)` in a process at the lowest priority, and
    mark the place complete when it is done; the thread that waits for it (None where nothing
    is to be done)."""
    missing = without_bytecode(packages)
    if not missing or sys.pycache_prefix is not None:
        return None
    at = place(cache)
    sources = imported_sources()
    log.warning("%s imported without cached bytecode: each start compiled their sources again;"
                " compiling the %d modules imported into %s for the next start", ", ".join(missing),
                len(sources), at)  # fmt: skip

    def compile_all() -> None:
        try:
            at.mkdir(parents=True, exist_ok=True)
            done = subprocess.run(
                [sys.executable, "-c", COMPILER], input="\n".join(sources), text=True,
                capture_output=True, timeout=1800,
                env=os.environ | {"PYTHONPYCACHEPREFIX": str(at)},
            )  # fmt: skip
            if done.returncode != 0:
                log.warning("bytecode for the next start: the compiler exited with %d: %s",
                            done.returncode, done.stderr[-500:])  # fmt: skip
                return
            (at / COMPLETE).write_text(f"{len(sources)} modules, {done.stdout.strip()} failed\n")
            log.info("bytecode for the next start: %d modules compiled into %s", len(sources), at)
        except (OSError, subprocess.SubprocessError) as e:  # a read-only cache: as before
            log.warning("bytecode for the next start: not kept in %s (%s)", at, e)

    thread = threading.Thread(target=compile_all, name="bytecode", daemon=True)
    thread.start()
    return thread
