"""Where the worker's threads spend a load's seconds: py-spy's samples of each thread (waiting
included: the torch call the loop blocks in shows), then of the thread that holds Python's lock,
summed by function.

Why: on an H100 the loop never waited for the GPU in its lead bound under the uniform load (its
host time was 99% "step") while a host step is about 2 ms of work, and the prompt reader's few
encoder calls took a second when the text encoders have LoRA layers (2026-12-05). Whether the
loop blocks in a CUDA call, or the threads queue for Python's lock, is what these samples say.
`python3 -m bench.gpu_check --profile` samples during (a) and (l); py-spy must be installed
(`../shared/tools/gpu-wheels py-spy` on the lent machines) and allowed to read the process.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RATE_HZ = 100
TOP = 8
# A frame of the project's own code (where in sdserve a thread is), as py-spy names frames:
# "function (path:line)".
OURS = re.compile(r"\((?:.*/)?(worker|app|bench)/[^/]+\.py:\d+\)$")


@dataclass
class Thread:
    """One thread's samples: how many, the frames they ended in (`leaves`), and the deepest
    frame of the project's code in each (`ours`)."""

    samples: int = 0
    leaves: Counter[str] = field(default_factory=Counter)
    ours: Counter[str] = field(default_factory=Counter)


def py_spy() -> str | None:
    """py-spy's program: on PATH, beside this Python (a virtual environment's), or in the
    `bin` of a folder on sys.path (what `pip install --target` makes, as on the lent GPU
    machines)."""
    found = shutil.which("py-spy")
    places = [Path(sys.executable).parent, *(Path(p) / "bin" for p in sys.path if p)]
    for place in places if found is None else []:
        if (place / "py-spy").is_file():
            return str(place / "py-spy")
    return found


def record(pid: int, seconds: float, out: Path, gil: bool = False) -> Path | None:
    """py-spy's raw samples of the process for `seconds` (every thread, idle ones too; with
    `gil`, only the thread holding Python's lock). None without py-spy or when it cannot read
    the process (its error is kept beside `out`)."""
    exe = py_spy()
    if exe is None:
        return None
    base = [exe, "record", "-p", str(pid), "-d", str(max(1, round(seconds))), "-r", str(RATE_HZ),
            "--format", "raw", "-o", str(out), "--threads", "--nonblocking"]  # fmt: skip
    # Without pausing the worker (native frames would need it, and pauses would slow the
    # load being read): Python's frames only; a CUDA call shows as the torch function making it.
    command = [*base, "--gil"] if gil else [*base, "--idle"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode == 0 and out.exists():
        return out
    out.with_suffix(".err").write_text(done.stdout + done.stderr)
    return None


def parse(raw: str) -> dict[str, Thread]:
    """py-spy's raw lines (`thread (id): name;frame;...;frame count`) summed per thread name
    (pool threads' numbers dropped: `source_0` and `source_1` are one reader pool)."""
    threads: dict[str, Thread] = defaultdict(Thread)
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        head = frames[0].split(": ", 1)[-1]
        name = re.sub(r"_\d+$", "", head.split(" (")[0]) or head
        n = int(count)
        thread = threads[name]
        thread.samples += n
        body = frames[1:] or ["(no frame)"]
        thread.leaves[body[-1]] += n
        mine = next((f for f in reversed(body) if OURS.search(f)), "(outside sdserve)")
        thread.ours[mine] += n
    return dict(threads)


def summary(path: Path | None, top: int = TOP) -> dict[str, Any] | None:
    """Each thread's share of the samples and its top frames: leaves, and the project's."""
    if path is None:
        return None
    threads = parse(path.read_text())
    total = sum(t.samples for t in threads.values()) or 1
    return {
        name: {
            "share": t.samples / total,
            "samples": t.samples,
            "leaves": [(f, n / t.samples) for f, n in t.leaves.most_common(top)],
            "ours": [(f, n / t.samples) for f, n in t.ours.most_common(top)],
        }
        for name, t in sorted(threads.items(), key=lambda kv: -kv[1].samples)
    }


def profile(pid: int, seconds: float, work: Path, tag: str) -> dict[str, Any]:
    """Half the seconds every thread (waiting too), half the lock's holder."""
    half = max(1.0, seconds / 2)
    threads = summary(record(pid, half, work / f"threads-{tag}.txt"))
    lock = summary(record(pid, half, work / f"gil-{tag}.txt", gil=True))
    return {"threads": threads, "gil": lock}


def lines(name: str, found: dict[str, Any], top: int = 4) -> list[str]:
    """A load's profile as a few lines of markdown."""
    out = [f"Threads of the worker in ({name}) (py-spy; share of samples, top frames):", ""]
    for kind, title in (("threads", "all samples, waiting too"), ("gil", "holding the lock")):
        threads = found.get(kind)
        if not threads:
            out.append(f"- {title}: no samples (py-spy missing or refused; see its .err)")
            continue
        for thread, t in list(threads.items())[:6]:
            ours = "; ".join(f"{f} {share:.0%}" for f, share in t["ours"][:top])
            leaves = "; ".join(f"{f} {share:.0%}" for f, share in t["leaves"][:top])
            out.append(f"- {title}, {thread} {t['share']:.0%}: ours: {ours} | leaves: {leaves}")
    return [*out, ""]


# -- a worker's start -------------------------------------------------------------------------


# Where a start's main thread is, from the outermost frame in: (stage, frame it is under).
def _called(function: str, module: str = r"[^)]*") -> re.Pattern[str]:
    """A frame of `function` (a method's name after its class's, as py-spy writes it) in
    `module`."""
    return re.compile(rf"^(?:\w+\.)?{function} \((?:.*/)?{module}:\d+\)$")


STAGES = (
    ("serving", _called("run", r"worker/runner\.py")),
    ("helper wait", _called("wait", r"worker/helpers\.py")),
    ("warm-up: VAE", _called("_warm_vae")),
    ("warm-up: ControlNets", _called("_warm_control")),
    ("warm-up: UNet entries", _called("_warm_entry")),
    ("warm-up: a job", _called("warm_up", r"worker/engine\.py")),
    ("load", _called("load_engines")),
    ("settings, storage, metrics", _called("serve", r"worker/process\.py")),
)
# Within a stage, what torch is doing: the first of these with a frame in the stack.
DOING = (
    (
        "inductor: cached graph loaded",
        re.compile(r"FxGraphCache|AOTAutogradCache|load_by_key_path|PyCodeCache"),
    ),
    (
        "triton: kernels compiled or loaded",
        re.compile(r"triton/compiler/|precompile|async_compile|_load_kernel"),
    ),
    ("CUDA graphs: recorded", re.compile(r"^\S*record\S* \(.*cudagraph_trees\.py")),
    ("CUDA graphs: warm-up run", re.compile(r"^\S*(?:warmup|Warmup|run_eager)\S* \(")),
    ("CUDA graphs: other", re.compile(r"cudagraph_trees\.py")),
    ("dynamo: guards built", re.compile(r"build_guards|_dynamo/guards\.py")),
    ("dynamo: traced", re.compile(r"symbolic_convert|_dynamo/variables/|convert_frame")),
    ("inductor: compiled", re.compile(r"compile_fx|aot_autograd|_inductor/|_functorch/")),
    ("weights read", re.compile(r"safetensors|from_pretrained|load_state_dict")),
    ("CUDA synchronize", re.compile(r"synchronize")),
    ("imported", re.compile(r"_find_and_load")),
)


IMPORTS = "interpreter and imports"
# A module's body run by an import: "<module> (torch/nn/functional.py:1)", the path as py-spy
# shortens it (from a folder on sys.path, or whole).
MODULE = re.compile(r"^<module> \((.+):\d+\)$")
OWN = {"app", "worker", "bench", "__main__"}


def package(path: str) -> str:
    """The top package of a module's path: after site-packages, else its first folder (a
    shortened path) or its last (a whole one: one of sdserve's own)."""
    parts = path.split("/")
    for installed in ("site-packages", "dist-packages"):
        if installed in parts[:-1]:
            return parts[parts.index(installed) + 1].removesuffix(".py")
    if path.startswith("/") or len(parts) == 1:
        return parts[-2] if len(parts) > 1 else parts[0].removesuffix(".py")
    return parts[0]


def imported(frames: list[str]) -> str | None:
    """The package a sample of the start's imports is in: the outermost module not sdserve's
    that an import is running (what sdserve imported, not what that imported)."""
    for frame in frames:
        found = MODULE.match(frame)
        if found and package(found.group(1)) not in OWN and not found.group(1).startswith("<"):
            return f"import {package(found.group(1))}"
    return None


def start_sampler(pid: int, seconds: float, out: Path) -> Future[Path | None]:
    """py-spy's samples of a worker from its spawn, every thread waiting or not, for
    `seconds`, on a thread of its own (py-spy cannot read an interpreter that has not begun:
    it is tried again for two seconds)."""

    def sample() -> Path | None:
        began = time.monotonic()
        while True:
            found = record(pid, seconds - (time.monotonic() - began), out)
            if found is not None or time.monotonic() - began > 2:
                return found
            time.sleep(0.05)

    pool = ThreadPoolExecutor(1, thread_name_prefix="py-spy-start")
    sampling = pool.submit(sample)
    pool.shutdown(wait=False)
    return sampling


def start_phases(path: Path | None, rate_hz: int = RATE_HZ) -> dict[str, dict[str, float]] | None:
    """Seconds of the main thread's start by stage, and within each by what torch was doing
    (bench/gpu_check.py --profile-start): where a start's seconds go."""
    if path is None:
        return None
    stages: dict[str, Counter[str]] = defaultdict(Counter)
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not count.isdigit() or "MainThread" not in frames[0]:
            continue
        body = frames[1:]
        stage = next((name for name, under in STAGES if any(under.search(f) for f in body)),
                     IMPORTS)  # fmt: skip
        doing = (imported(body) if stage == IMPORTS else None) or next(
            (name for name, marker in DOING if any(marker.search(f) for f in body)),
            body[-1].split(" (")[0] if body else "(no frame)")  # fmt: skip
        stages[stage][doing] += int(count)
    order = sorted(stages.items(), key=lambda kv: -sum(kv[1].values()))
    return {stage: {what: n / rate_hz for what, n in doings.most_common(8)}
            for stage, doings in order}  # fmt: skip


def start_lines(phases: dict[str, dict[str, float]]) -> list[str]:
    """The cached start's seconds as markdown lines."""
    out = ["Where the cached start's main thread went (py-spy, seconds):", ""]
    for stage, doings in phases.items():
        parts = "; ".join(f"{what} {s:.1f}" for what, s in doings.items())
        out.append(f"- {stage} {sum(doings.values()):.1f}: {parts}")
    return [*out, ""]
