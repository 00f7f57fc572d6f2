"""Why a closed loop's throughput is read from the worker's rows, not from the jobs that end in
its window: a model of the uniform load, no service, no GPU.

64 clients each send a 25-step guided request as soon as their last one is done (after a
poll's delay); the loop steps up to 31 images (62 rows) at the step time of the eleventh GPU
check (123 ms at 62 rows), decodes the images a step finishes (7.5 ms each), and fills the
room they leave from the queue at the next step. Jobs that start together end together, 25
steps later, and their places are taken together: the load runs in cohorts, and a 15-s
window holds four or five of them by where its edges fall. For windows starting at
`--phases` different moments, the table gives the spread of the two readings: the jobs that
ended in the window a second, and the image-steps made in it / 25.

    python3 -m bench.window [--phases 40] [--seconds 15]
"""

from __future__ import annotations

import argparse
import random
import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class Uniform:
    clients: int = 64
    images_cap: int = 31  # 62 rows, two a guided image
    steps: int = 25
    base_s: float = 0.0076  # a step: base + row x rows (123 ms at 62 rows)
    row_s: float = 0.00186
    decode_s: float = 0.0075  # an image's decode, between two steps
    poll_s: float = 0.05  # a client sees its job done within a poll, then sends the next


def readings(load: Uniform, seed: int, warm: float, seconds: float) -> tuple[float, float]:
    """(jobs ended in the window a second, image-steps made in it a second / steps)."""
    rng = random.Random(seed)
    now = rng.uniform(0, 4)  # the load's start: where the window's edges fall in a cohort
    queue = sorted(now + rng.uniform(0, load.poll_s) for _ in range(load.clients))
    lanes: list[int] = []  # steps left, per image in flight
    ended = made = 0
    start, stop = warm, warm + seconds
    while now < stop:
        while len(lanes) < load.images_cap and queue and queue[0] <= now:
            queue.pop(0)
            lanes.append(load.steps)
        if not lanes:
            now = queue[0]
            continue
        took = load.base_s + load.row_s * 2 * len(lanes)
        if start <= now and now + took <= stop:
            made += len(lanes)
        now += took
        lanes = [left - 1 for left in lanes]
        done = lanes.count(0)
        lanes = [left for left in lanes if left]
        now += load.decode_s * done
        ended += done if start <= now <= stop else 0
        queue = sorted([*queue, *(now + rng.uniform(0, load.poll_s) for _ in range(done))])
    return ended / seconds, made / load.steps / seconds


def spread(values: list[float]) -> str:
    return (f"{min(values):.2f} | {statistics.median(values):.2f} | {max(values):.2f} |"
            f" {statistics.pstdev(values):.2f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--phases", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    args = parser.parse_args()
    found = [readings(Uniform(), k, args.warmup, args.seconds) for k in range(args.phases)]
    print(f"{args.phases} windows of {args.seconds:.0f} s, uniform load (img/s):\n")
    print("| reading | min | median | max | sd |\n|---|---|---|---|---|")
    print(f"| jobs ended in the window | {spread([e for e, _ in found])} |")
    print(f"| image-steps in the window / 25 | {spread([m for _, m in found])} |")


if __name__ == "__main__":
    main()
