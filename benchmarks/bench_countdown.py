"""Countdown generation speed: `steiner countdown generate --count 10000` vs a naive generator.

Goal (issue 2): 10,000 countdown-4 problems in <= 20 s on a 2-core machine.
Baseline, measured in the same run: rejection sampling of (numbers, target) pairs checked by
an unmemoised brute-force search, the obvious way to write a generator.
"""

from __future__ import annotations

import random
import subprocess
import sys
import tempfile
import time
from itertools import combinations
from pathlib import Path

GOAL_S = 20.0


def naive_solvable(values: list[int], target: int) -> bool:
    if len(values) == 1:
        return values[0] == target
    for i, j in combinations(range(len(values)), 2):
        a, b = max(values[i], values[j]), min(values[i], values[j])
        rest = [v for k, v in enumerate(values) if k not in (i, j)]
        results = [a + b, a - b, a * b] + ([a // b] if b and a % b == 0 else [])
        if any(naive_solvable([*rest, r], target) for r in results):
            return True
    return False


def naive_generate(count: int, seed: int) -> int:
    rng = random.Random(seed)
    made = 0
    while made < count:
        nums = [rng.randint(1, 50) for _ in range(4)]
        if naive_solvable(nums, rng.randint(10, 100)):
            made += 1
    return made


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "problems.jsonl"
        start = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "steiner.cli",
                "countdown",
                "generate",
                "--n-numbers",
                "4",
                "--count",
                "10000",
                "--seed",
                "1",
                "--out",
                str(out),
            ],
            check=True,
        )
        ours_s = time.perf_counter() - start
        lines = sum(1 for _ in out.open())
    n_naive = 1000
    start = time.perf_counter()
    naive_generate(n_naive, seed=1)
    naive_s = (time.perf_counter() - start) * 10000 / n_naive
    print(
        f"steiner countdown generate: 10000 problems ({lines} lines) in {ours_s:.1f} s "
        f"(goal <= {GOAL_S:.0f} s: {'met' if ours_s <= GOAL_S else 'MISSED'})"
    )
    print(f"naive brute-force generator: {naive_s:.1f} s for 10000 (extrapolated from {n_naive})")
    print(f"speed-up vs naive: {naive_s / ours_s:.1f}x")


if __name__ == "__main__":
    main()
