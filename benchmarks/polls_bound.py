"""The floor under any per-job poll schedule: polls per job against notice delay, for a known job-time mix.

Issue 27 asked for <= 5 polls a job at <= 5% mean notice delay (delay / job duration). This computes the
best any client can do by polling each job on its own, even one told the exact distribution of job times
in advance: a dynamic programme over poll instants on a grid, for job times uniform on [LO, HI] seconds,
trading the mean number of status polls against the mean delay / duration (a Lagrange multiplier swept
over a range). A client pays one more call per job to fetch the result once it has ended.

    python benchmarks/polls_bound.py 10 30     # the cap section's mix
    python benchmarks/polls_bound.py 12 92     # the polls section's mix (2 s queue + 10-90 s run)
"""

from __future__ import annotations

import argparse
import bisect
import math
import random


def best_schedule(lo: float, hi: float, weight: float, steps: int) -> list[float]:
    """Poll instants minimising E[delay / D] + weight * E[polls] for D ~ U[lo, hi] (a poll at hi ends all)."""
    grid = [lo + (hi - lo) * i / steps for i in range(steps + 1)]
    density = 1.0 / (hi - lo)
    best = [math.inf] * (steps + 1)
    best[0] = 0.0
    came_from = [0] * (steps + 1)
    for j in range(1, steps + 1):
        b = grid[j]
        for i in range(j):
            a = grid[i]
            # Jobs ending in (a, b] are noticed at b: their delay / duration integrated; every job still
            # running at a pays this poll.
            cost = best[i] + density * (b * math.log(b / a) - (b - a)) + weight * density * (hi - a)
            if cost < best[j]:
                best[j], came_from[j] = cost, i
    points, j = [], steps
    while j > 0:
        points.append(grid[j])
        j = came_from[j]
    return points[::-1]


def evaluate(points: list[float], lo: float, hi: float, samples: int = 100_000) -> tuple[float, float]:
    rng = random.Random(1)
    polls = delay = 0.0
    for _ in range(samples):
        d = rng.uniform(lo, hi)
        i = bisect.bisect_left(points, d)
        polls += i + 1
        delay += (points[i] - d) / d
    return polls / samples, delay / samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("lo", type=float)
    parser.add_argument("hi", type=float)
    parser.add_argument("--steps", type=int, default=400, help="grid points between lo and hi")
    args = parser.parse_args()
    print(f"job times uniform on [{args.lo:g}, {args.hi:g}] s, the best per-job poll schedule:")
    print("| status polls / job | calls / job (+ the result) | mean notice delay / duration |")
    print("|---|---|---|")
    for weight in (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.03, 0.06):
        polls, delay = evaluate(best_schedule(args.lo, args.hi, weight, args.steps), args.lo, args.hi)
        print(f"| {polls:.2f} | {polls + 1:.2f} | {delay:.2%} |")


if __name__ == "__main__":
    main()
