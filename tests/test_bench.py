"""The benchmarks' own parts: their client (a load must not be lost to a kept-alive connection
that the server closed as a request went out: seen on the H200, one such disconnect ended a run),
how they take a missed ETA apart, and the masked-context comparison's CPU smoke run."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import time
from argparse import Namespace
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.jobs.eta import Pace
from bench import batching, eta_lab, gpu_check, masked, window, worker_metrics
from bench.batching import chosen_loads
from bench.bench import Done, again
from bench.paces import PaceLog, eta_parts, parts_lines
from bench.worker_metrics import REAL_ROWS
from tests.conftest import JobStore, free_port, process, sdserve_env, wait_for


async def serve_closing_first(seen: list[bytes]) -> asyncio.Server:
    """An HTTP server that drops its first connection without answering, as a server closing
    an idle kept-alive connection does, and answers every later request."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        seen.append(request)
        if len(seen) > 1:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def test_a_request_dropped_unanswered_is_sent_again() -> None:
    async def main() -> None:
        seen: list[bytes] = []
        server = await serve_closing_first(seen)
        port = server.sockets[0].getsockname()[1]
        async with server, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            with pytest.raises(httpx.RemoteProtocolError):
                await http.get("/jobs/x")  # what ended the run
            seen.clear()
            answer = await again(lambda: http.get("/jobs/x"))
        assert answer.status_code == 200 and answer.text == "ok"
        assert len(seen) == 2 and all(r.startswith(b"GET /jobs/x ") for r in seen)

    asyncio.run(main())


def test_the_eta_at_submission_is_taken_apart_from_the_heartbeat_it_used(
    store: JobStore, redis_url: str
) -> None:
    """bench/paces.py reads the worker's pace from a real heartbeat and sets what the estimate
    assumed (steps x the step at the rows it predicted, plus the finish) beside the run."""
    pace = Pace(base_s=0.01, row_s=0.002, rows=10, row_cap=64, finish_s=0.1, rows_mean=6.0)
    info = json.dumps({"models": ["default"]} | pace.fields())
    assert store.heartbeat("gpu0", "token", 15, info)
    log = PaceLog(redis_url)
    log.read()
    [sample] = log.samples
    assert sample.pace == pace
    submitted = sample.at + 0.5
    # Read at submission: 1.5 s; it ended 2 s later, after a 0.2-s wait and a 1.8-s run.
    done = Done(submitted, submitted + 2.1, 0.2, "succeeded", submitted + 2.0,
                (1.5, submitted), None, 1.8, "queued")  # fmt: skip
    parts = eta_parts([(done, 25, 2)], log)
    step_s = 0.01 + 0.002 * (10 + 2)  # beside the rows now, and its own
    assert parts["jobs"] == 1
    assert parts["predicted_step_ms_p50"] == pytest.approx(step_s * 1000)
    assert parts["predicted_ran_s_p50"] == pytest.approx(25 * step_s + 0.1)
    assert parts["run_step_ms_p50"] == pytest.approx((1.8 - 0.1) / 25 * 1000)
    assert (parts["eta_s_p50"], parts["actual_s_p50"], parts["wait_s_p50"]) == (1.5, 2.0, 0.2)
    assert parts["beat_age_s_p50"] == pytest.approx(0.5)
    assert log.at(sample.at - 1) is None  # nothing read before the first sample
    table = "\n".join(parts_lines(parts))
    assert "| a step, ms | 34.0 | 68.0" in table
    # And job by job, for the spread the medians hide: read while queued, 25 steps of 2 rows.
    [each] = parts["each"]
    assert (each["eta_s"], each["steps"], each["job_rows"], each["read_running"]) == (1.5, 25, 2, 0)
    assert each["row_ms"] == pytest.approx(2.0) and each["read_at"] == submitted


def test_the_masked_comparison_runs_both_variants_on_one_unet(tiny_model: Path) -> None:
    """Per length and masked through the compiled boundary (dynamo's guards, the "eager"
    backend on the CPU): every load timed in both, the same rows out of both, one table."""
    args = Namespace(model=str(tiny_model), device="cpu", backend="eager", side=64, rows=6,
                     repeats=2)  # fmt: skip
    found = masked.run(args)
    for variant in ("per length", "masked"):
        assert {k for k in found["results"][variant] if k.startswith("step_ms")} == {
            f"step_ms {load}" for load in masked.LOADS
        }
    assert all(d <= 1e-4 for d in found["largest_difference"].values())
    text = masked.table(found["results"], found["largest_difference"])
    rows = [line for line in text.splitlines() if line.startswith("| ")][1:]  # past the head
    assert [row.split(" | ")[0] for row in rows] == [f"| {load}" for load in masked.LOADS]


def test_a_shorter_check_reads_the_loads_it_ran() -> None:
    """`--loads a,e --no-restart` (a comparison of two settings in a few minutes): its rows are
    those of the loads it ran, (a) always among them; an unknown load is refused by name."""
    assert chosen_loads("e", gpu_check.LOADS) == {"a", "e"}
    assert chosen_loads(None, gpu_check.LOADS) == set(gpu_check.LOADS)
    # (h) is read against what (a) and (k) predict: asked alone, it brings (k) (a run on
    # 2026-12-05 that named l,h ran both and then failed at its table for want of (k)).
    assert chosen_loads("l,h", gpu_check.LOADS, gpu_check.NEEDS) == {"a", "l", "h", "k"}
    with pytest.raises(SystemExit, match="no load named z"):
        chosen_loads("a,z", gpu_check.LOADS)
    closed = {"img_s": 9.0, "eq25_s": 9.0, "latency_p50_s": 7.0, "latency_p95_s": 9.0,
              "queue_wait_p50_s": 2.0, "queue_wait_p95_s": 3.0, "gpu": None}  # fmt: skip
    # (a) with the worker's steady figures (which count), (e) from an older run without.
    steady = {"image_steps_s": 250.0, "eq25_s": 10.0, "img_s": 10.0}
    run = {"kinds": [{"kind": "txt2img", "status": "succeeded", "seconds": 0.3}],
           "recompiles": 0, "a": closed | {"steady": steady}, "e": closed | {"eq25_s": 9.1},
           "alone": {"latency_p50_s": 0.24}, "cold_start_s": 150.0,
           "gpu": "NVIDIA H200", "date": "2026-12-05", "commit": "x", "command": "c"}  # fmt: skip
    rows = {row[0]: row for row in gpu_check.checks(run)}
    assert rows["(a) uniform img/s"][1:] == ("10.00", "≥ 10", True)
    assert rows["(e) 2-3 chunks, 25-step eq./s of (a)'s"][1:] == ("9.10 = 0.91", "≥ 0.90", True)
    assert rows["cold start s"][1:] == ("150", "≤ 90", False)
    # --keep-cache: the start is read against the cached start's target, named as such.
    kept = {row[0]: row for row in gpu_check.checks(run | {"cache_kept": True})}
    assert kept["start s, from the compile cache kept"][1:] == ("150", "≤ 30", False)
    assert "cold start s" not in kept
    assert not any(name.startswith(("(b)", "(d)", "(c)")) for name in rows)
    # (l) says its LoRAs were made resident before its window, and how long that took.
    with_l = run | {"l": closed | {"img_s": 8.1}, "l_preload_s": 2.04}
    l_row = {row[0]: row for row in gpu_check.checks(with_l)}["(l) half with LoRAs img/s, / (a)"]
    assert l_row[1:] == ("8.10 = 0.81 (its 8 LoRAs made resident first in 2.0 s)", "≥ 0.90", False)
    text = gpu_check.table(run, list(rows.values()))
    assert "| (a) | 9.00 | 10.00 | 10.00 |" in text and "| (e) | 9.00 | - | - |" in text
    assert "| (b) |" not in text


def test_a_load_is_read_as_image_steps_from_the_worker_rows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The steady figures: UNet rows a second, as image-steps by what the load's requests are
    (every image guided: two rows a step; half img2img at strength 0.75: 18 of 25 steps)."""
    monkeypatch.setattr(batching, "SOURCE_PICTURE", ["a picture"])  # made at a run's start
    assert batching.load_shape(batching.uniform) == (0.5, 25.0)
    assert batching.load_shape(batching.half_img2img) == (0.5, (25 + 18) / 2)
    unguided = batching.load_shape(lambda i: batching.uniform(i) | {"guidance_scale": 1.0})
    assert unguided == (1.0, 25.0)
    ends = ({REAL_ROWS: 100.0, "wall": 50.0}, {REAL_ROWS: 5100.0, "wall": 60.0})
    found = batching.steady(batching.half_img2img, ends)
    assert found == {"image_steps_s": 250.0, "eq25_s": 10.0, "img_s": 250.0 / 21.5}
    assert batching.steady(batching.uniform, None) is None
    assert batching.rate({"img_s": 9.0, "steady": found}, "eq25_s") == 10.0
    assert batching.rate({"img_s": 9.0, "steady": None}, "img_s") == 9.0


def test_a_closed_loop_counts_what_the_worker_stepped(
    api: httpx.Client, redis_url: str, tiny_model: Path, tmp_path: Path
) -> None:
    """Against the real service (a worker process on the tiny model): the image-steps the
    worker's rows say it made in the window agree with the jobs the clients saw end in it,
    within the jobs in flight at its two edges and a tenth for the moments each reading took
    (a scrape and a poll apart; a wrong count of rows an image-step would be off by half)."""
    port = free_port()
    env = sdserve_env(redis_url, tiny_model, metrics_port=str(port), max_batch="8")
    clients, steps, warm, seconds = 3, 6, 4.0, 6.0

    def small(i: int) -> dict[str, Any]:
        return batching.uniform(i) | {"width": 64, "height": 64, "steps": steps}

    with process(["worker"], env, tmp_path / "worker.log"):
        url = f"http://127.0.0.1:{port}/metrics"
        wait_for(lambda: worker_metrics.sums([REAL_ROWS], url), 60, "the worker's metrics")
        measured = worker_metrics.Window(warm, seconds, [REAL_ROWS], url)
        load = asyncio.run(batching.closed_loop(str(api.base_url), clients, small, warm,
                                                seconds, measured))  # fmt: skip
    assert load["failed"] == 0 and load["requests"] > 3
    made = load["steady"]["image_steps_s"] * seconds
    seen = load["requests"] * steps  # the steps of the jobs that ended in the window
    assert abs(made - seen) <= 2 * clients * steps + 0.1 * seen, (made, seen)
    assert load["steady"]["img_s"] == pytest.approx(made / seconds / steps)


def test_jobs_ended_in_a_short_window_misread_a_cohort_load() -> None:
    """bench.window's model of the uniform load: by where a 15-s window's edges fall, the jobs
    that end in it read anything within about 2 img/s, the image-steps made in it within a
    few hundredths of one another."""
    found = [window.readings(window.Uniform(), k, 5.0, 15.0) for k in range(12)]
    ended, made = [e for e, _ in found], [m for _, m in found]
    assert max(ended) - min(ended) > 1.5
    assert max(made) - min(made) < 0.3
    assert min(ended) < min(made) and max(ended) > max(made)


def test_the_eta_model_bounds_an_estimate_made_at_submission() -> None:
    """bench.eta_lab's model of the Poisson load: the service's estimate is off by some
    percent from what happened (arrivals are unknowable), and knowing when each job in flight
    ends narrows it."""
    found = eta_lab.modelled(6.0, seconds=300.0)
    assert found["jobs"] > 1000 and 5 < found["rows_now"] < 25
    assert 0.05 < found["knowing_ends"] < found["service"] < 0.35


def test_the_threads_profile_sums_py_spys_samples_per_thread_and_frame(tmp_path: Path) -> None:
    """bench/threads.py reads py-spy's raw samples: pool threads as one, each sample's leaf and
    its deepest frame of the project's code."""
    from bench import threads

    raw = tmp_path / "threads-a.txt"
    raw.write_text(
        "thread (0x1): MainThread;run (worker/runner.py:10);step (worker/continuous.py:140);"
        "replay (torch/cuda/graphs.py:88);cudaGraphLaunch (libcudart.so) 30\n"
        "thread (0x1): MainThread;run (worker/runner.py:10);wait (worker/timing.py:39) 10\n"
        "thread (0x2): prompts_0;_worker (concurrent/futures/thread.py:83);"
        "encode (worker/continuous.py:221);forward (transformers/clip.py:5) 6\n"
        "thread (0x3): source_0;_worker (concurrent/futures/thread.py:83);"
        "fetch (worker/adapters.py:330) 3\n"
        "thread (0x4): source_1;_worker (concurrent/futures/thread.py:83) 1\n"
    )
    found = threads.summary(raw)
    assert found is not None and list(found) == ["MainThread", "prompts", "source"]
    main = found["MainThread"]
    assert main["samples"] == 40 and main["share"] == 40 / 50
    assert main["ours"][0] == ("step (worker/continuous.py:140)", 0.75)
    assert main["leaves"][0] == ("cudaGraphLaunch (libcudart.so)", 0.75)
    assert found["source"]["samples"] == 4  # source_0 and source_1: one pool
    assert ("(outside sdserve)", 0.25) in found["source"]["ours"]
    text = "\n".join(threads.lines("a", {"threads": found, "gil": None}))
    assert "MainThread 80%" in text and "holding the lock: no samples" in text


def test_a_start_too_long_for_one_call_goes_on_from_the_cache_the_first_left(
    tmp_path: Path,
) -> None:
    """--keep-cache (every service benchmark): what an earlier run compiled, even one cut off
    in its start, stays for the next run; without it the cache is emptied for a cold start,
    and the tables name which start they show."""
    parser = batching.service_parser("a benchmark", seconds=1)
    cold, kept = parser.parse_args([]), parser.parse_args(["--keep-cache"])
    cache = batching.compile_cache(tmp_path, "loras", cold)
    (cache / "fxgraph").mkdir(parents=True)
    (cache / "fxgraph" / "entry").write_text("compiled")
    assert batching.compile_cache(tmp_path, "loras", kept) == cache
    assert (cache / "fxgraph" / "entry").read_text() == "compiled"
    assert not batching.compile_cache(tmp_path, "loras", cold).exists()
    assert batching.start_name({"cache_kept": True}) == "from the compile cache kept"
    assert batching.start_name({"cache_kept": False}) == "no compile cache"


def test_a_run_names_the_code_it_ran_even_on_a_copy_with_an_older_head(tmp_path: Path) -> None:
    """`source_tree`: a clean checkout is its commit; a copy whose files differ from its HEAD
    (the lent GPU machines get one, its .git older than the files) names the git tree of the
    files as they are, which is the tree of the commit that holds them, untracked new files
    included; the copy's own index is left as it was."""
    from bench.batching import source_tree

    def git(*words: str) -> str:
        done = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *words],
                              cwd=tmp_path, capture_output=True, text=True, check=True)  # fmt: skip
        return done.stdout.strip()

    git("init", "-q")
    (tmp_path / "worker.py").write_text("old\n")
    git("add", "-A")
    git("commit", "-qm", "old")
    old = git("rev-parse", "--short", "HEAD")
    assert source_tree(tmp_path) == old
    (tmp_path / "worker.py").write_text("new\n")
    (tmp_path / "added.py").write_text("a file the old HEAD lacks\n")
    said = source_tree(tmp_path)
    # The copy's index is untouched: nothing staged, the new file still untracked.
    assert git("diff", "--cached", "--name-only") == "" and git("ls-files") == "worker.py"
    git("add", "-A")
    git("commit", "-qm", "new")
    tree = git("rev-parse", "HEAD^{tree}")
    assert said == f"{old} + uncommitted changes (tree {tree[:12]})"


def test_loads_wait_until_the_starts_idle_entries_are_recorded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`fully_warm` (the benches' loads wait for it): seconds from the start until the worker's
    gauge of entries left for idle time reads 0; NaN for a worker without it, or past the
    limit."""
    left = iter([3.0, 1.0, 0.0])
    monkeypatch.setattr(worker_metrics, "metric", lambda name: next(left))
    monkeypatch.setattr(time, "sleep", lambda s: None)
    ready = time.monotonic()
    took = worker_metrics.fully_warm(40.0, ready)
    assert 40.0 <= took < 41.0
    monkeypatch.setattr(worker_metrics, "metric", lambda name: float("nan"))
    assert math.isnan(worker_metrics.fully_warm(40.0, ready))
    monkeypatch.setattr(worker_metrics, "metric", lambda name: 2.0)
    assert math.isnan(worker_metrics.fully_warm(40.0, ready, limit_s=0.01))
