"""``steiner probe-latency``: completion tokens vs wall time against an OpenAI-compatible
endpoint, with a least-squares line and R² (the seed's o1 experiment: a straight line
suggests plain linear decoding rather than a parallel tree search)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from steiner.io import InputError, save_figure, write_json, write_jsonl

PROMPTS = [
    "Using the numbers {a}, {b}, {c}, reach {t}.",
    "What is {a} plus {b} times {c}?",
    "Find a path from {a} to {t} in a graph you make up.",
    "Explain in a few steps why {a} * {b} = {p}.",
]


def probe(
    base_url: str,
    model: str,
    n: int = 50,
    concurrency: int = 1,
    max_tokens: int = 512,
    api_key: str = "none",
    seed: int = 0,
    progress=None,
) -> list[dict[str, Any]]:
    """Send n varied requests (lengths vary through prompts and max_tokens); one record each."""
    import concurrent.futures as cf
    import random

    import openai

    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=600)
    rng = random.Random(seed)
    jobs = []
    for i in range(n):
        a, b, c = rng.randint(2, 60), rng.randint(2, 60), rng.randint(2, 60)
        prompt = rng.choice(PROMPTS).format(a=a, b=b, c=c, t=rng.randint(10, 100), p=a * b)
        jobs.append((i, prompt, rng.randint(max(8, max_tokens // 8), max_tokens)))

    def one(job):
        i, prompt, limit = job
        start = time.perf_counter()
        reply = client.chat.completions.create(
            model=model,
            max_tokens=limit,
            temperature=0.0,
            messages=[{"role": "user", "content": prompt}],
        )
        seconds = time.perf_counter() - start
        details = getattr(reply.usage, "completion_tokens_details", None)
        return {
            "i": i,
            "prompt": prompt,
            "max_tokens": limit,
            "seconds": round(seconds, 4),
            "completion_tokens": reply.usage.completion_tokens,
            "reasoning_tokens": getattr(details, "reasoning_tokens", None) or 0,
        }

    records = []
    with cf.ThreadPoolExecutor(concurrency) as pool:
        for rec in pool.map(one, jobs):
            records.append(rec)
            if progress:
                progress(len(records), n)
    return records


def fit_line(x: list[float], y: list[float]) -> dict[str, float]:
    """seconds ≈ a + b·tokens by least squares, with R²."""
    xs, ys = np.asarray(x, float), np.asarray(y, float)
    b, a = np.polyfit(xs, ys, 1)
    pred = a + b * xs
    ss_res, ss_tot = float(((ys - pred) ** 2).sum()), float(((ys - ys.mean()) ** 2).sum())
    return {
        "intercept_s": float(a),
        "seconds_per_token": float(b),
        "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else 0.0,
    }


def save_probe(records: list[dict[str, Any]], out: str | Path) -> dict[str, Any]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "latency.jsonl", records)  # the requests are kept, fit or not
    tokens = {r["completion_tokens"] for r in records}
    if len(tokens) < 2:
        # one length has no slope: polyfit returned a number anyway (a RankWarning aside)
        raise InputError(
            out / "latency.jsonl",
            None,
            f"all {len(records)} completions have {tokens.pop()} tokens; a line needs lengths "
            "that vary (a larger --max-tokens: each request's limit is drawn from 1/8 of it "
            "up to it)",
        )
    fit = fit_line([r["completion_tokens"] for r in records], [r["seconds"] for r in records])
    summary = {"n": len(records), **fit}
    write_json(out / "latency.json", summary)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["completion_tokens"] for r in records]
    ax.scatter(xs, [r["seconds"] for r in records], s=12)
    line = np.linspace(0, max(xs), 50)
    ax.plot(
        line,
        fit["intercept_s"] + fit["seconds_per_token"] * line,
        color="C1",
        label=f"{fit['intercept_s']:.3f} s + {1000 * fit['seconds_per_token']:.2f} ms/token, "
        f"R²={fit['r2']:.3f}",
    )
    ax.set_xlabel("completion tokens")
    ax.set_ylabel("request seconds")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, out / "latency.png")
    plt.close(fig)
    return summary
