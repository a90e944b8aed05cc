"""``steiner scale``: accuracy and reasoning tokens per step budget (inference-time scaling).

``cap`` mode sets max_steps = budget (the model may stop earlier); ``extend`` mode sets
min_steps = budget (the model must keep going, like the seed's extension, choosing proceed
or backtrack itself). Control is the share of runs whose step count obeys the budget.
"""

from __future__ import annotations

import csv
import io
from dataclasses import replace
from pathlib import Path
from typing import Any

from steiner.domains import load_problems
from steiner.evaluate.accuracy import EvalConfig, evaluate_records
from steiner.evaluate.metrics import scaling_metrics
from steiner.infer.generate import load
from steiner.io import save_figure, sole_writer, write_json, write_lines

MODES = ("cap", "extend")


def run_scale(
    base: EvalConfig, budgets: list[int], modes: list[str], progress=None
) -> dict[str, Any]:
    out = Path(base.out)
    load_problems(base.problems, base.domain)  # a bad file is one error line before the model loads
    # a served model (--base-url) is asked over HTTP, budget by budget
    model_and_tokenizer = None if base.base_url else load(base.model)
    with sole_writer(out, "--out"):
        rows = []
        for mode in modes:
            for b in budgets:
                cfg = replace(
                    base,
                    out=str(out / f"{mode}-{b}"),
                    samples=1,
                    max_steps=b if mode == "cap" else None,
                    min_steps=b if mode == "extend" else 0,
                )
                m, records = evaluate_records(cfg, model_and_tokenizer=model_and_tokenizer)
                steps = [r["outputs"][0]["n_steps"] for r in records]
                within = [s <= b if mode == "cap" else s >= b for s in steps]
                rows.append(
                    {
                        "mode": mode,
                        "budget": b,
                        "accuracy": m["pass@1"],
                        "n": m["n"],
                        "mean_reasoning_tokens": m["mean_reasoning_tokens"],
                        "mean_steps": m["mean_steps"],
                        "control": sum(within) / len(within) if within else 0.0,
                    }
                )
                if progress:
                    progress(len(rows), len(modes) * len(budgets))
        summary = {mode: scaling_metrics([r for r in rows if r["mode"] == mode]) for mode in modes}
        result = {"model": base.model, "problems": base.problems, "rows": rows, "metrics": summary}
        write_json(out / "scale.json", result)
        table = io.StringIO()
        writer = csv.DictWriter(table, list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        write_lines(out / "scale.csv", [table.getvalue()])
        plot_scale(rows, out / "scale.png")
        return result


def budget_labels(
    points: list[tuple[int, float, float]], x_span: float, y_span: float
) -> list[tuple[str, float, float]]:
    """Labels for one mode's (budget, tokens, accuracy) points: consecutive budgets whose
    points fall within 2 % of the axes of each other share one label ("3-4"), so labels
    that would print on top of each other (a model that stops needing more steps) read."""
    groups: list[list[tuple[int, float, float]]] = []
    for point in points:
        last = groups[-1][-1] if groups else None
        if (
            last is not None
            and abs(point[1] - last[1]) <= 0.02 * x_span
            and abs(point[2] - last[2]) <= 0.02 * y_span
        ):
            groups[-1].append(point)
        else:
            groups.append([point])
    return [
        (str(g[0][0]) if len(g) == 1 else f"{g[0][0]}-{g[-1][0]}", g[0][1], g[0][2]) for g in groups
    ]


def plot_scale(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["mean_reasoning_tokens"] for r in rows]
    ys = [100 * r["accuracy"] for r in rows]
    x_span, y_span = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, mode in enumerate(dict.fromkeys(r["mode"] for r in rows)):
        pts = [r for r in rows if r["mode"] == mode]
        ax.plot(
            [r["mean_reasoning_tokens"] for r in pts],
            [100 * r["accuracy"] for r in pts],
            marker="o",
            label=mode,
        )
        points = [(r["budget"], r["mean_reasoning_tokens"], 100 * r["accuracy"]) for r in pts]
        # cap's labels below its points, extend's above: the two curves meet where cap's
        # largest budget and extend's smallest give the same traces
        offset = (4, -11) if i % 2 == 0 else (4, 5)
        for text, x, y in budget_labels(points, x_span, y_span):
            ax.annotate(text, (x, y), xytext=offset, textcoords="offset points", fontsize=8)
    ax.set_xlabel("mean reasoning tokens")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("accuracy vs reasoning tokens (labels: step budget)")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
