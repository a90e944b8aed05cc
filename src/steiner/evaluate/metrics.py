"""Plain metric functions (no model): intervals, majority votes, s1's scaling metrics, an RL
run's trend."""

from __future__ import annotations

import math
from collections import Counter
from itertools import combinations
from typing import Any


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sound at small n and at 0% / 100%)."""
    if total == 0:
        return 0.0, 0.0
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def majority(answers: list[str | None]) -> str | None:
    """The most common non-empty answer; ties go to the one seen first."""
    counts = Counter(a for a in answers if a)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a and counts[a] == best)


def pass_at_k(n: int, correct: int, k: int) -> float:
    """The unbiased pass@k of Chen et al. (2021) from n samples of which ``correct`` are: the
    chance that k of them, drawn without replacement, hold a correct one. Reading pass@k off
    the first k samples instead would waste the other n - k and vary more."""
    if n - correct < k:
        return 1.0
    return 1.0 - math.comb(n - correct, k) / math.comb(n, k)


def sampled_rates(corrects: list[list[bool]]) -> dict[str, float]:
    """What k samples per problem say beyond greedy pass@1: ``avg@k``, the mean accuracy of
    a sample (what reasoning-model papers report as pass@1 at a temperature), and the
    unbiased pass@j for j = 2, 4, 8, ... up to k, so one run gives the whole curve of
    parallel sampling (pass@k itself is "a sample was right"). Shares of the problems."""
    if not corrects:
        return {}
    k = len(corrects[0])
    rates = {f"avg@{k}": sum(sum(c) / k for c in corrects) / len(corrects)}
    sizes = [j for j in (2**i for i in range(1, k.bit_length())) if j < k] + [k]
    for j in sizes:
        rates[f"pass@{j}"] = sum(pass_at_k(k, sum(c), j) for c in corrects) / len(corrects)
    return {key: round(value, 4) for key, value in rates.items()}


def sampled_keys(metrics: dict[str, Any]) -> list[str]:
    """The keys of an eval's metrics that its k samples gave (maj@k, avg@k, pass@j), in
    their order: greedy pass@1 and its interval are not among them."""
    return [
        key
        for key in metrics
        if key.startswith(("maj@", "avg@", "pass@")) and key not in ("pass@1", "pass@1_ci95")
    ]


def scaling_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    """s1's metrics over rows {"budget", "accuracy", "control"} of one mode:
    Control: mean share of runs that stayed within their budget;
    Scaling: mean slope of accuracy over budget across all pairs of budgets;
    Performance: the best accuracy."""
    rows = sorted(rows, key=lambda r: r["budget"])
    pairs = [(a, b) for a, b in combinations(rows, 2) if b["budget"] != a["budget"]]
    slopes = [(b["accuracy"] - a["accuracy"]) / (b["budget"] - a["budget"]) for a, b in pairs]
    return {
        "control": sum(r["control"] for r in rows) / len(rows) if rows else 0.0,
        "scaling": sum(slopes) / len(slopes) if slopes else 0.0,
        "performance": max((r["accuracy"] for r in rows), default=0.0),
        "monotone": all(
            b["accuracy"] >= a["accuracy"] for a, b in zip(rows, rows[1:], strict=False)
        ),
    }


def fifth(steps: int) -> int:
    """How many steps a fifth of an RL run's ``steps`` is (one at least): one step's groups
    are too few samples to compare."""
    return max(1, steps // 5)


def first_and_last_fifth(history: list[dict[str, Any]], key: str) -> tuple[float, float]:
    """The mean of ``key`` over the first and the last ``fifth`` of an RL run's steps."""
    k = fifth(len(history))
    return sum(h[key] for h in history[:k]) / k, sum(h[key] for h in history[-k:]) / k
