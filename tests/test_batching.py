"""Grouping, chunking and the image-to-job mapping (pure)."""

from __future__ import annotations

import pytest

from app.jobs.contract import Delivery, Job, Txt2ImgRequest
from worker.batching import Assembly, chunks, group


def job(name: str, n: int = 1, **kw: object) -> Job:
    request = Txt2ImgRequest.model_validate({"prompt": name, "seed": 100, "n": n, **kw})
    return Job(Delivery(f"0-{name}", name), request)


def test_groups_by_size_steps_and_scheduler_only() -> None:
    a, b = job("a"), job("b", guidance_scale=2.0, negative_prompt="x", n=3)
    c, d = job("c", steps=30), job("d", width=256)
    e, f = job("e", scheduler="ddim"), job("f", seed=5)
    assert group([a, c, b, d, e, f]) == [[a, b, f], [c], [d], [e]]


def test_chunks_keep_order_and_split_requests_across_batches() -> None:
    a, b, c = job("a", n=3), job("b", n=1), job("c", n=4)
    batches = chunks([a, b, c], max_batch=3)
    assert [[(s.job.id, s.index) for s in batch] for batch in batches] == [
        [("a", 0), ("a", 1), ("a", 2)],
        [("b", 0), ("c", 0), ("c", 1)],
        [("c", 2), ("c", 3)],
    ]
    assert [s.seed for s in batches[2]] == [102, 103]


def test_every_image_lands_on_its_own_job_with_mixed_n() -> None:
    jobs = [job("a", n=2), job("b", n=1), job("c", n=5), job("d", n=1)]
    assembly: Assembly[str] = Assembly(jobs)
    done = []
    for batch in chunks(jobs, max_batch=4):
        done += assembly.add(batch, [f"{s.job.id}{s.index}" for s in batch])
    assert [j.id for j in done] == ["a", "b", "c", "d"]
    assert assembly.take(jobs[0]) == ["a0", "a1"]
    assert assembly.take(jobs[2]) == ["c0", "c1", "c2", "c3", "c4"]


def test_a_short_result_is_refused() -> None:
    jobs = [job("a", n=2)]
    [batch] = chunks(jobs, 8)
    with pytest.raises(AssertionError, match="1 outputs for 2 rows"):
        Assembly[str](jobs).add(batch, ["only one"])
