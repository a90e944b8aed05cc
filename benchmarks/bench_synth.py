"""Synthesis speed: 10,000 countdown-4 DAGs and 50,000 paths with the oracle teacher.

Goal (issue 3): <= 60 s on a 2-core machine. Runs `steiner synth` as a user would (two worker
processes) and, in the same run, the single-process baseline on a 1,000-problem slice.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL_S = 60.0


def steiner(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "steiner.cli", *args],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def timed_synth(shortcut: Path, out: Path, workers: int) -> tuple[float, dict]:
    start = time.perf_counter()
    steiner(
        "synth",
        "--shortcut",
        str(shortcut),
        "--out",
        str(out),
        "--teacher",
        "oracle",
        "--paths-per-dag",
        "5",
        "--workers",
        str(workers),
        "--chunk-size",
        "250",
    )
    return time.perf_counter() - start, json.loads((out / "stats.json").read_text())


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shortcut = tmp / "shortcut.jsonl"
        steiner(
            "countdown",
            "generate",
            "--n-numbers",
            "4",
            "--count",
            "10000",
            "--seed",
            "0",
            "--shortcut",
            "--out",
            str(shortcut),
        )
        small = tmp / "small.jsonl"
        small.write_text("".join(shortcut.read_text().splitlines(True)[:1000]))
        base_s, base = timed_synth(small, tmp / "base", workers=1)
        ours_s, stats = timed_synth(shortcut, tmp / "ours", workers=2)
    print(
        f"steiner synth --workers 2: {stats['dags']} DAGs, {stats['paths']} paths "
        f"in {ours_s:.1f} s "
        f"= {stats['paths'] / ours_s:.0f} paths/s (goal <= {GOAL_S:.0f} s: "
        f"{'met' if ours_s <= GOAL_S else 'MISSED'})"
    )
    print(
        f"baseline, one process, 1,000 problems: {base['paths']} paths in {base_s:.1f} s "
        f"= {base['paths'] / base_s:.0f} paths/s"
    )
    ratio = (stats["paths"] / ours_s) / (base["paths"] / base_s)
    print(f"ratio (paths/s, 2 workers vs 1 process): {ratio:.2f}x")
    print(
        f"mean steps {stats['mean_steps']}, backtracks {stats['backtrack_histogram']}, "
        f"dropped {stats['dropped']}"
    )


if __name__ == "__main__":
    main()
