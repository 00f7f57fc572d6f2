"""Live previews and ETAs: the preview's math, a worker writing previews and finishing times
while a job runs (real Valkey, the tiny model), and what the API, A1111's progress and the
queue make of them."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from PIL import Image

from app.jobs.contract import Status, Txt2ImgRequest
from app.jobs.eta import Pace, queued_eta
from app.jobs.keys import worker_key
from tests.conftest import JobStore, wait_for
from tests.test_continuous import continuous, serve
from tests.test_worker import submit
from worker.previews import clean_latents, colours, fit_colours
from worker.progress import StepFit, Tracker


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_clean_latents_undo_the_noising(prediction: str) -> None:
    clean, noise = torch.randn(2, 4, 8, 8, dtype=torch.float64).unbind(0)
    signal = 0.3
    level = (1 - signal**2) ** 0.5
    sample = signal * clean + level * noise
    output = noise if prediction == "epsilon" else signal * noise - level * clean
    assert torch.allclose(clean_latents(sample, output, signal, prediction), clean)


class LinearVae(torch.nn.Module):
    """A VAE whose decoder is linear per pixel: latents `scale` times smaller, colours a fixed
    mix of the latent channels plus a bias."""

    def __init__(self, decoder: torch.Tensor, scale: int) -> None:
        super().__init__()
        self.decoder, self.scale = decoder, scale  # (channels + 1, 3)
        self.config = type("Config", (), {"scaling_factor": 0.5})()

    def encode(self, pictures: torch.Tensor) -> Any:
        # Any latents will do: the fit is against what the decoder makes of them.
        small = torch.nn.functional.avg_pool2d(pictures, self.scale)
        latents = torch.cat([small, small[:, :1] * small[:, 1:2]], 1)  # 4 channels
        return type("Encoded", (), {"latent_dist": type("D", (), {"mode": lambda _: latents})()})

    def decode(self, latents: torch.Tensor) -> Any:
        scaled = latents * self.config.scaling_factor
        rgb = torch.einsum("nchw,cr->nrhw", scaled, self.decoder[:-1]) + self.decoder[-1].view(
            1, 3, 1, 1
        )
        big = rgb.repeat_interleave(self.scale, 2).repeat_interleave(self.scale, 3)
        return type("Decoded", (), {"sample": big * 2 - 1})


def test_the_colour_map_is_the_decoders_when_it_is_linear() -> None:
    decoder = torch.tensor(
        [[0.20, 0.10, -0.05], [0.05, 0.25, 0.0], [-0.1, 0.05, 0.3], [0.1, -0.1, 0.1],
         [0.5, 0.45, 0.5]], dtype=torch.float64,
    )  # fmt: skip
    vae = LinearVae(decoder, scale=4)
    fitted = fit_colours(vae, torch.device("cpu"), torch.float64, 4)
    # Latents as the UNet makes them (the VAE's scaling applied) to the decoder's colours.
    assert torch.allclose(fitted[:-1], decoder[:-1], atol=1e-6)
    assert torch.allclose(fitted[-1], decoder[-1], atol=1e-6)
    latents = torch.rand(1, 4, 3, 3, dtype=torch.float64) * 0.5
    expected = torch.einsum("nchw,cr->nhwr", latents, decoder[:-1]) + decoder[-1]
    got = colours(latents, fitted)
    assert got.dtype == torch.uint8 and got.shape == (1, 3, 3, 3)
    assert (got.double() - expected.clamp(0, 1) * 255).abs().max() <= 0.51


def test_a_queued_job_waits_only_when_the_workers_are_full() -> None:
    request = Txt2ImgRequest(prompt="x", steps=20, n=1)  # guided: 2 UNet rows
    # A step takes 20 ms + 10 ms a row in flight.
    roomy = Pace(base_s=0.02, row_s=0.01, rows=4, row_cap=16, finish_s=0.5)
    assert queued_eta(0, request, [roomy]) == pytest.approx(20 * 0.08 + 0.5)  # joins now
    full = Pace(base_s=0.02, row_s=0.01, rows=16, row_cap=16, finish_s=0.5)
    run = 20 * 0.18 + 0.5  # a job at full load
    # 16 rows come free every run: the first in line waits for 2 of them, the 8th for 16.
    assert queued_eta(0, request, [full]) == pytest.approx(2 / 16 * run + run)
    assert queued_eta(7, request, [full]) == pytest.approx(run + run)
    assert queued_eta(0, request, [Pace(0.0, 0.0, 0, 16, 0.0)]) is None  # not measured yet


def test_the_step_time_is_fitted_as_a_line_over_the_rows() -> None:
    fit = StepFit()
    for rows in (2, 8, 16, 4, 30, 12) * 5:
        fit.add(rows, 0.02 + 0.005 * rows, 1.0)
    base, per_row = fit.line()
    assert base == pytest.approx(0.02) and per_row == pytest.approx(0.005)
    steady = StepFit()  # one load only: in proportion to the rows
    for _ in range(5):
        steady.add(8, 0.08, 1.0)
    assert steady.line() == pytest.approx((0.0, 0.01))


def test_the_tracker_measures_the_pace_and_counts_down() -> None:
    tracker = Tracker(row_cap=16)
    tracker.at("a", 0, 10, 2)
    for step in range(1, 4):
        time.sleep(0.02)
        tracker.at("a", step, 10, 2)
    pace = tracker.pace()
    assert pace.rows == 2 and 0.015 < pace.step_s(2) < 0.1
    report = tracker.running()["a"]
    assert report.step == 3 and report.finish_in_s is not None
    assert report.finish_in_s == pytest.approx(7 * pace.step_s(2), abs=0.03)


def test_a_job_denoised_no_longer_counts_as_rows_in_flight() -> None:
    """Jobs whose steps are done are decoded and stored while others step: their rows are not
    in flight, neither in the pace nor in the estimate of the jobs that took their place."""
    tracker = Tracker(row_cap=16)
    tracker.at("old", 0, 3, 8)
    for step in range(1, 4):
        time.sleep(0.01)
        tracker.at("old", step, 3, 8)
    tracker.denoised("old")
    tracker.at("new", 0, 10, 2)
    pace = tracker.pace()
    assert pace.rows == 2
    reports = tracker.running()
    assert reports["old"].step == 3
    assert reports["new"].finish_in_s == pytest.approx(10 * pace.step_s(2), abs=0.01)
    tracker.at("new", 0, 10, 4)  # a second pass of other rows
    assert tracker.pace().rows == 4


def test_the_tracker_averages_the_rows_in_flight_over_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pace carries the rows now and their recent average, which follows the rows held,
    weighted by how long they were held."""
    from worker import progress

    monkeypatch.setattr(progress, "ROWS_MEAN_S", 0.2)
    tracker = Tracker(row_cap=64)
    assert tracker.pace().rows_mean == 0.0
    tracker.at("a", 0, 10, 40)
    time.sleep(0.05)  # 40 rows for a quarter of the average's time: about 40 x (1 - e^-0.25)
    held = tracker.pace().rows_mean
    assert held is not None and 5 < held < 15
    time.sleep(1.0)  # five times its time: the average is the rows held
    assert tracker.pace().rows_mean == pytest.approx(40, abs=0.5)
    tracker.remove("a")
    time.sleep(0.05)
    pace = tracker.pace()
    assert pace.rows == 0 and pace.rows_mean is not None and 25 < pace.rows_mean < 35


def test_a_queued_job_runs_beside_the_rows_in_flight_now() -> None:
    """A job that joins runs beside the rows in flight now, whether or not its worker also
    publishes their recent average (the benchmarks' records read that)."""
    from app.jobs.contract import Txt2ImgRequest
    from app.jobs.eta import Pace, queued_eta

    request = Txt2ImgRequest(prompt="x", steps=10, guidance_scale=7.5)
    fields = {"base_s": 0.1, "row_s": 0.01, "rows": 4, "row_cap": 62, "finish_s": 1.0}
    averaged = Pace.parse(json.dumps(fields | {"rows_mean": 20.0}))
    now_only = Pace.parse(json.dumps(fields))
    assert averaged is not None and now_only is not None and now_only.rows_mean is None
    # 10 steps of 0.1 + 0.01 x (4 beside + its own 2) s, and a finish.
    assert queued_eta(0, request, [averaged]) == pytest.approx(10 * (0.1 + 0.01 * 6) + 1.0)
    assert queued_eta(0, request, [now_only]) == pytest.approx(10 * (0.1 + 0.01 * 6) + 1.0)


def test_a_queued_job_runs_beside_the_jobs_taken_and_queued_before_it() -> None:
    """Jobs a worker has taken (their inputs being read) and jobs queued ahead join before this
    one and step beside it: their rows count, once each (a job taken but not yet reported
    may itself be among the rows taken)."""
    request = Txt2ImgRequest(prompt="x", steps=10, guidance_scale=7.5)  # 2 UNet rows
    fields = {"base_s": 0.1, "row_s": 0.01, "rows": 4, "row_cap": 62, "finish_s": 1.0}
    pace = Pace.parse(json.dumps(fields | {"taken": 6}))
    older = Pace.parse(json.dumps(fields))  # a worker from before the field: none taken
    assert pace is not None and pace.taken == 6 and older is not None and older.taken == 0
    # 4 in flight + 6 taken + 3 jobs of 2 rows ahead, and its own 2.
    assert queued_eta(3, request, [pace]) == pytest.approx(10 * (0.1 + 0.01 * 18) + 1.0)
    assert queued_eta(0, request, [older]) == pytest.approx(10 * (0.1 + 0.01 * 6) + 1.0)
    # Started, not yet reported: its own 2 rows are among the 6 taken (4 + 4 others + 2).
    assert queued_eta(0, request, [pace], started=True) == pytest.approx(
        10 * (0.1 + 0.01 * 10) + 1.0
    )
    # Rows taken take room: 56 in flight and 6 taken leave none, so it waits for rows to free.
    full = Pace.parse(json.dumps(fields | {"rows": 56, "taken": 6}))
    assert full is not None and full.free == 0
    run = 10 * (0.1 + 0.01 * 62) + 1.0
    assert queued_eta(0, request, [full]) == pytest.approx(2 / 62 * run + run)


def test_the_tracker_counts_jobs_taken_until_they_join_or_leave() -> None:
    """Rows taken count in the pace from the take until the job joins (then as rows in
    flight), is refused or handed back; each change wakes the reporter."""
    tracker = Tracker(row_cap=62)
    tracker.taken({"a": 2, "b": 4, "c": 2})
    assert tracker.changed.is_set()
    tracker.changed.clear()
    assert (tracker.pace().rows, tracker.pace().taken) == (0, 8)
    tracker.at("a", 0, 10, 2)  # joined
    assert (tracker.pace().rows, tracker.pace().taken) == (2, 6)
    assert tracker.changed.is_set()
    tracker.untaken("b")  # refused at its join
    tracker.remove("c")  # canceled while waiting to join
    assert (tracker.pace().rows, tracker.pace().taken) == (2, 0)
    tracker.changed.clear()
    tracker.untaken("b")  # already gone: nothing changes
    assert not tracker.changed.is_set()
    tracker.at("a", 1, 10, 2)  # a step of the same rows: the reporter's own turn says it
    assert not tracker.changed.is_set()
    tracker.denoised("a")
    assert tracker.changed.is_set() and tracker.pace().rows == 0


def slow_unet(engine: Any, seconds: float) -> Any:
    """Every UNet call takes at least `seconds`: the job runs long enough to be watched."""
    return engine.unet.register_forward_pre_hook(lambda *_: time.sleep(seconds))


def test_a_running_job_shows_its_preview_and_eta_everywhere(
    store: JobStore, tiny_model: Path, redis_url: str, api: httpx.Client
) -> None:
    r = continuous(store, tiny_model, redis_url, preview_every=2)
    hook = slow_unet(r.engines.first, 0.15)
    job_id = submit(store, steps=16, n=2, width=64, height=96)
    store.remember_latest("", job_id)  # A1111's progress is about the caller's latest job
    r.open()
    done = threading.Event()
    worker = serve(r, done)
    seen: list[dict[str, Any]] = []
    try:
        wait_for(lambda: (api.get(f"/jobs/{job_id}").json().get("preview_url") or "") != "",
                 60, "a preview")  # fmt: skip

        # Its pace is written as it runs (the heartbeat's, written before it started, says no
        # rows): its 4 rows in flight (two guided images).
        def rows_written() -> bool:
            pace = Pace.parse(store.worker_infos().get(r.name, "{}"))
            return pace is not None and pace.rows == 4

        wait_for(rows_written, 10, "the pace with the job's rows")
        view = api.get(f"/jobs/{job_id}").json()
        picture = api.get(view["preview_url"])
        assert picture.status_code == 200 and picture.headers["content-type"] == "image/jpeg"
        strip = Image.open(io.BytesIO(picture.content))
        scale = r.engines.first.latent_scale
        assert strip.format == "JPEG" and strip.size == (2 * 64 // scale, 96 // scale)
        progress = api.get("/sdapi/v1/progress").json()
        assert progress["current_image"] is not None and progress["eta_relative"] > 0
        Image.open(io.BytesIO(base64.b64decode(progress["current_image"]))).load()
        assert api.get("/sdapi/v1/progress?skip_current_image=true").json()["current_image"] is None
        while (view := api.get(f"/jobs/{job_id}").json())["status"] == "running":
            seen.append(view)
            time.sleep(0.2)
    finally:
        done.set()
        worker.join(60)
        hook.remove()
        r.close()
    assert view["status"] == Status.SUCCEEDED.value and view["preview_url"] is None
    assert view["eta_s"] is None
    etas = [v["eta_s"] for v in seen if v["eta_s"] is not None]
    assert len(etas) >= 3 and etas[-1] < etas[0]  # counts down as it runs
    steps = [int(v["preview_url"].split("=")[1]) for v in seen if v["preview_url"]]
    assert steps == sorted(steps) and all(s % 2 == 0 for s in steps)


def test_preview_is_a_404_without_one(api: httpx.Client, store: JobStore) -> None:
    job_id = submit(store)
    assert api.get(f"/jobs/{job_id}/preview.jpg").status_code == 404
    assert api.get("/jobs/AAAAAAAAAAAAAAAAAAAAAA/preview.jpg").status_code == 404


def test_a_queued_job_has_an_eta_once_a_worker_measured_its_pace(
    api: httpx.Client, store: JobStore
) -> None:
    job_id = submit(store, steps=10)
    assert api.get(f"/jobs/{job_id}").json()["eta_s"] is None  # no worker
    # As a worker's heartbeat says it: the models it holds (the job's among them), its pace.
    info = {"models": ["default"], "device": "cpu", "base_s": 0.1, "row_s": 0.05, "rows": 0,
            "row_cap": 8, "finish_s": 1.03}  # fmt: skip
    store.heartbeat("paced", "token", 30, json.dumps(info))
    time.sleep(1.1)  # the API reads who is live and what they hold at most once a second
    # 10 steps of its 2 rows at 0.1 + 0.05 x 2 s, and a finish: to the hundredth (a tenth is a
    # tenth of a second-long job).
    assert api.get(f"/jobs/{job_id}").json()["eta_s"] == pytest.approx(3.03)
    # Between heartbeats the worker writes its pace as it moves (4 rows in flight now): that
    # one counts; a process that does not hold the name writes nothing.
    moved = {"base_s": 0.1, "row_s": 0.05, "rows": 4, "row_cap": 8, "finish_s": 1.03}
    assert not store.publish_pace("paced", "not-its-token", json.dumps(moved | {"rows": 0}))
    assert not store.publish_pace("gone", "token", json.dumps(moved))  # no heartbeat, no key
    assert store.publish_pace("paced", "token", json.dumps(moved))
    assert not store.client.exists(worker_key("gone"))
    # Beside 4 rows: 10 steps at 0.1 + 0.05 x (4 + 2) s, and a finish; read at once (the
    # pace is read with each view: a queued job's ETA from a pace up to a second old missed
    # more, 2026-12-05), though the API read the workers a moment ago.
    assert api.get(f"/jobs/{job_id}").json()["eta_s"] == pytest.approx(5.03)
    moved["rows"] = 6
    assert store.publish_pace("paced", "token", json.dumps(moved))
    assert api.get(f"/jobs/{job_id}").json()["eta_s"] == pytest.approx(6.03)
    assert json.loads(store.worker_infos()["paced"])["device"] == "cpu"  # the rest kept


def test_a_picture_in_tiles_has_a_preview_beside_whole_ones(tiny_model: Path) -> None:
    """Pictures past the tile size had no preview (issue 21, 19): a tiled lane's preview is
    the whole picture, its tiles' predictions blended as its latents are; a whole picture's
    is made as before."""
    import torch

    from worker.compiled import Tuning
    from worker.engine import BatchShape, Engine, ImageSpec

    engine = Engine(str(tiny_model), torch.device("cpu"), Tuning(tile=64, tile_overlap=16))
    big = engine.prepare("big", [ImageSpec("a", "", 7.5, 1)], BatchShape(96, 96, 3, "ddim"))
    small = engine.prepare("small", [ImageSpec("b", "", 7.5, 2)], BatchShape(64, 64, 3, "ddim"))
    assert big.tiling is not None and small.tiling is None
    made = engine.step([big], {"big"})
    assert made is not None
    step, [picture] = made.pictures("big")
    assert step == 1 and picture.shape == (12, 12, 3)
    whole = engine.step([small], {"small"})
    assert whole is not None and whole.pictures("small")[1][0].shape == (8, 8, 3)
