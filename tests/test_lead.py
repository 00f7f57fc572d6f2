"""The host runs at most RUN_AHEAD UNet calls ahead of the GPU (worker/timing.py Lead)."""

from __future__ import annotations

import torch

from worker.timing import RUN_AHEAD, Lead


class Mark:
    """A stand-in for a CUDA event: records when the host waited for it."""

    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name = log, name

    def synchronize(self) -> None:
        self.log.append(self.name)


def test_the_host_waits_for_the_call_launched_run_ahead_calls_back() -> None:
    waited: list[str] = []
    made = iter(range(100))
    lead = Lead("cuda", mark=lambda: Mark(waited, f"call {next(made)}"))
    for _ in range(RUN_AHEAD):
        lead.launched()
    assert waited == []  # within the lead: no wait
    lead.launched()
    assert waited == ["call 0"]  # the third call waits for the first to be done
    for _ in range(3):
        lead.launched()
    assert waited == [f"call {k}" for k in range(4)]  # one wait a call, oldest first


def test_on_the_cpu_nothing_is_marked_or_waited_for() -> None:
    lead = Lead(torch.device("cpu"))
    assert all(lead.launched() == 0.0 for _ in range(5))
