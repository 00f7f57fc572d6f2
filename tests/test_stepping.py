"""The step scheduler's policy, alone: admission and turns."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from worker.stepping import AHEAD_MAX, Candidate, Readiness, Turns, admit, leaving

A, B = (512, 512), (768, 512)


def job(key: str, rows: int = 1, at: float = 0.0, size: tuple[int, int] = A) -> Candidate[str]:
    return Candidate(key, size, rows, at)


def test_jobs_join_oldest_first_while_there_is_room() -> None:
    waiting = [job("c", 2, 3.0), job("a", 2, 1.0), job("b", 2, 2.0)]
    assert [c.key for c in admit(waiting, in_flight=0, cap=4)] == ["a", "b"]
    assert [c.key for c in admit(waiting, in_flight=2, cap=4)] == ["a"]
    assert admit(waiting, in_flight=4, cap=4) == []


def test_a_job_joins_whole_and_nobody_overtakes_the_oldest() -> None:
    waiting = [job("big", 4, 1.0), job("small", 1, 2.0)]
    # Three rows free: "big" does not fit, and "small" may not jump ahead of it.
    assert admit(waiting, in_flight=5, cap=8) == []
    assert [c.key for c in admit(waiting, in_flight=4, cap=8)] == ["big"]


def test_a_job_larger_than_the_cap_runs_alone() -> None:
    assert [c.key for c in admit([job("huge", 8)], in_flight=0, cap=4)] == ["huge"]
    assert admit([job("huge", 8)], in_flight=1, cap=4) == []


def test_a_suspect_runs_alone() -> None:
    suspect = Candidate("s", A, 1, 1.0, alone=True)
    others = [job("a", 1, 0.5), job("b", 1, 2.0)]
    # Behind "a", the suspect waits for an empty engine; "b" may not overtake it.
    assert [c.key for c in admit([suspect, *others], in_flight=0, cap=8)] == ["a"]
    assert admit([suspect, others[1]], in_flight=1, cap=8) == []
    assert [c.key for c in admit([suspect, others[1]], in_flight=0, cap=8)] == ["s"]
    assert admit([others[1]], in_flight=1, cap=8, alone_in_flight=True) == []


def test_sizes_take_turns_and_a_new_size_goes_first() -> None:
    turns: Turns[tuple[int, int]] = Turns()
    assert [turns.next([A]) for _ in range(3)] == [A, A, A]
    assert turns.next([A, B]) == B  # never stepped: longest ago
    assert [turns.next([A, B]) for _ in range(4)] == [A, B, A, B]
    turns.forget([B])
    assert turns.next([A, B]) == A
    assert turns.next([]) is None
    # What the next call will step, asked ahead (the loop takes jobs for the room it frees):
    # the same answer, and asking takes no turn.
    assert [turns.peek([A, B]) for _ in range(2)] == [B, B]
    assert turns.next([A, B]) == B and turns.peek([A, B]) == A and turns.peek([]) is None


@given(st.lists(st.integers(min_value=1, max_value=8), min_size=1, max_size=40),
       st.integers(min_value=1, max_value=32))  # fmt: skip
def test_every_job_joins_in_order_and_the_cap_holds(sizes: list[int], cap: int) -> None:
    """Jobs finish a step cycle after joining; whatever the sizes, every job gets in, in the
    order it came, and the rows in flight never pass the cap (but for one oversized job)."""
    waiting = [job(str(k), rows, float(k)) for k, rows in enumerate(sizes)]
    order: list[str] = []
    for _round in range(len(sizes) + 1):  # each round: what is in flight finishes
        joined = admit(waiting, in_flight=0, cap=cap)
        assert joined, "someone always gets in when nothing is in flight"
        rows = sum(c.rows for c in joined)
        assert rows <= cap or len(joined) == 1
        order += [c.key for c in joined]
        waiting = [c for c in waiting if c not in joined]
        if not waiting:
            break
    assert order == [str(k) for k in range(len(sizes))]


@given(st.lists(st.sampled_from([A, B, (512, 768)]), min_size=1, max_size=3, unique=True),
       st.integers(min_value=1, max_value=30))  # fmt: skip
def test_no_size_waits_more_than_one_round(sizes: list[tuple[int, int]], calls: int) -> None:
    turns: Turns[tuple[int, int]] = Turns()
    picked = [turns.next(sizes) or A for _ in range(calls + len(sizes))]
    for k in range(len(picked) - len(sizes) + 1):
        window = picked[k : k + len(sizes)]
        assert sorted(window) == sorted(sizes)  # each size once in every len(sizes) calls


def test_jobs_are_taken_as_many_calls_ahead_as_they_take_to_be_ready() -> None:
    readiness = Readiness()
    assert readiness.ahead() == 1  # nothing measured: in the call that frees the room
    readiness.called(0.14)
    readiness.joined(0.05)
    assert readiness.ahead() == 1  # ready within a call
    for _ in range(40):  # LoRA jobs: 1.4 s to be ready, calls of 0.14 s
        readiness.joined(1.4)
    assert readiness.ahead() == AHEAD_MAX  # 10 calls' worth, held to the most
    for _ in range(40):
        readiness.joined(0.3)
    assert readiness.ahead() == 3  # the running mean follows what joins take now


def test_lanes_leave_within_the_calls_ahead() -> None:
    # (calls left, of the key that steps next)
    lanes = [(1, True), (1, False), (2, True), (4, True), (25, True)]
    assert leaving(lanes, keys=2, ahead=1) == [0]  # the coming call finishes lane 0 only
    assert leaving(lanes, keys=1, ahead=1) == [0]
    assert leaving(lanes, keys=1, ahead=4) == [0, 1, 2, 3]
    assert leaving(lanes, keys=2, ahead=4) == [0, 1, 2]  # two keys: a lane's call is every other
    assert leaving([], keys=0, ahead=8) == []
