"""``steiner eval``: accuracy of a model on a problem file, with raw outputs.

Greedy decoding gives pass@1; with ``samples`` k > 1, k sampled answers per problem give
maj@k and pass@k. Every problem's outputs go to ``outputs.jsonl`` (raw text, parsed trace,
``correct``) as soon as its batch is done, so a re-run skips what is there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from steiner.domains import get_domain, load_problems
from steiner.evaluate.metrics import majority, wilson_interval
from steiner.infer.budget import Budget
from steiner.infer.generate import Completion, generate, load
from steiner.io import write_json


@dataclass
class EvalConfig:
    model: str
    problems: str
    out: str
    domain: str | None = None
    samples: int = 1
    temperature: float = 0.7  # for the k samples; pass@1 is always greedy
    min_steps: int = 0
    max_steps: int | None = None
    max_reasoning_tokens: int | None = None
    extend_with: str = "model"
    max_new_tokens: int = 1024
    batch_size: int = 16
    seed: int = 0
    limit: int | None = None


def answer_key(domain_name: str, problem: dict[str, Any], answer: str) -> str | None:
    """What a majority vote compares: the option letter for MCQ, the stripped text otherwise."""
    if domain_name == "mcq":
        from steiner.domains.mcq import extract_letter

        return extract_letter(answer, len(problem.get("options") or []) or 10)
    return answer.strip() or None


def output_record(out: Completion, correct: bool) -> dict[str, Any]:
    return {
        "text": out.text,
        "answer": out.answer,
        "correct": correct,
        "trace": out.trace.to_dict(),
        "format_errors": out.format_errors,
        "n_steps": out.trace.n_steps,
        "n_backtracks": out.trace.n_backtracks,
        "reasoning_tokens": out.reasoning_tokens,
        "completion_tokens": out.completion_tokens,
        "finish_reason": out.finish_reason,
    }


def evaluate(
    cfg: EvalConfig,
    progress: Callable[[int, int], None] | None = None,
    model_and_tokenizer: tuple[Any, Any] | None = None,
) -> dict[str, Any]:
    problems = load_problems(cfg.problems, cfg.domain)[: cfg.limit]
    domain_name = cfg.domain or (problems[0]["domain"] if problems else "countdown")
    domain = get_domain(domain_name)
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs_path = out_dir / "outputs.jsonl"
    done = _read_done(outputs_path)
    todo = [p for p in problems if p["id"] not in done]
    model, tokenizer = model_and_tokenizer or load(cfg.model)
    budget = Budget(cfg.min_steps, cfg.max_steps, cfg.max_reasoning_tokens, None, cfg.extend_with)
    if progress:
        progress(len(problems) - len(todo), len(problems))
    with outputs_path.open("a", encoding="utf-8") as fh:
        for start in range(0, len(todo), cfg.batch_size):
            batch = todo[start : start + cfg.batch_size]
            convs = [[{"role": "user", "content": p["question"]}] for p in batch]
            greedy = generate(
                model, tokenizer, convs, [budget] * len(batch), cfg.max_new_tokens, 0.0
            )
            sampled: list[list[Completion]] = [[] for _ in batch]
            for k in range(cfg.samples if cfg.samples > 1 else 0):
                outs = generate(
                    model,
                    tokenizer,
                    convs,
                    [budget] * len(batch),
                    cfg.max_new_tokens,
                    cfg.temperature,
                    seed=cfg.seed * 1000 + start + k,
                )
                for row, o in zip(sampled, outs, strict=True):
                    row.append(o)
            for problem, g, samples in zip(batch, greedy, sampled, strict=True):
                rec = {
                    "id": problem["id"],
                    "question": problem["question"],
                    "reference": problem.get("answer"),
                    "correct": (ok := domain.check_answer(problem, g.answer)),
                    "outputs": [output_record(g, ok)],
                }
                if samples:
                    oks = [domain.check_answer(problem, s.answer) for s in samples]
                    rec["samples"] = [
                        output_record(s, ok) for s, ok in zip(samples, oks, strict=True)
                    ]
                    vote = majority([answer_key(domain_name, problem, s.answer) for s in samples])
                    rec["maj_correct"] = vote is not None and domain.check_answer(problem, vote)
                    rec["pass_correct"] = any(oks)
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
            if progress:
                progress(len(problems) - len(todo) + start + len(batch), len(problems))
    metrics = summarize(_read_done(outputs_path), [p["id"] for p in problems], cfg)
    write_json(out_dir / "metrics.json", metrics)
    return metrics


def _read_done(path: Path) -> dict[str, dict[str, Any]]:
    done: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash: that problem is redone
            done[rec["id"]] = rec
    return done


def summarize(done: dict[str, dict[str, Any]], ids: list[str], cfg: EvalConfig) -> dict[str, Any]:
    recs = [done[i] for i in ids if i in done]
    n = len(recs)
    firsts = [r["outputs"][0] for r in recs]
    correct = sum(r["correct"] for r in recs)
    lo, hi = wilson_interval(correct, n)
    mean = lambda key: round(sum(o[key] for o in firsts) / n, 3) if n else 0.0  # noqa: E731
    metrics = {
        "model": cfg.model,
        "problems": cfg.problems,
        "n": n,
        "correct": correct,
        "pass@1": round(correct / n, 4) if n else 0.0,
        "pass@1_ci95": [round(lo, 4), round(hi, 4)],
        "mean_reasoning_tokens": mean("reasoning_tokens"),
        "mean_steps": mean("n_steps"),
        "mean_backtracks": mean("n_backtracks"),
        "format_error_rate": round(sum(bool(o["format_errors"]) for o in firsts) / n, 4)
        if n
        else 0.0,
        "config": asdict(cfg),
    }
    if cfg.samples > 1 and n:
        metrics[f"maj@{cfg.samples}"] = round(sum(r.get("maj_correct", False) for r in recs) / n, 4)
        metrics[f"pass@{cfg.samples}"] = round(
            sum(r.get("pass_correct", False) for r in recs) / n, 4
        )
    return metrics
