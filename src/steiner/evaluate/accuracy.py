"""``steiner eval``: accuracy of a model on a problem file, with raw outputs.

Greedy decoding gives pass@1; with ``samples`` k > 1, k sampled answers per problem give
maj@k, avg@k and pass@j. The model is a local directory, or a server's (``base_url``: see
``steiner.infer.remote``). Every problem's outputs go to ``outputs.jsonl`` (raw text, parsed trace,
``correct``) as soon as its batch is done, so a re-run skips what is there. A re-run goes on only
with the settings that decide the outputs (``eval_settings.json``) and the same question and
reference answer under each problem id, so old outputs never pass for another model's,
budget's or problem's.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from steiner.domains import get_domain, load_problems
from steiner.evaluate.metrics import majority, sampled_rates, wilson_interval
from steiner.infer.budget import Budget
from steiner.infer.generate import MADE_BY, Completion, generate, load, question_chat
from steiner.infer.remote import Endpoint, generate_remote
from steiner.io import (
    InputError,
    check_model_dir,
    check_resume_record,
    derived_seed,
    local_path,
    sole_writer,
    write_json,
)


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
    max_step_tokens: int | None = None
    top_p: float = 1.0  # for the k samples, as temperature
    # an OpenAI-compatible server (steiner serve, or vllm serve with StepBudgetVLLM) that
    # serves ``model`` by that name, instead of a local model directory
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"


SETTINGS_FILE = "eval_settings.json"


def output_settings(cfg: EvalConfig) -> dict[str, Any]:
    """The settings that decide a problem's outputs, which a re-run into the same directory
    must keep. Not the output directory, the batch size or the limit, and not the problem
    file's path: each output carries its question, and that is checked instead, so a moved
    file resumes and a changed one does not."""
    d = asdict(cfg)
    for key in ("problems", "out", "batch_size", "limit", "api_key_env"):
        d.pop(key)
    if cfg.samples <= 1:  # greedy only: the sampling settings are unused
        d.pop("temperature")
        d.pop("top_p")
        d.pop("seed")
    if cfg.base_url is None:  # a served model is its name at that URL
        d["model"] = local_path(cfg.model)
    return d


def read_outputs(path: Path) -> dict[str, tuple[int, dict[str, Any]]]:
    """Each problem id's output record and its line in ``outputs.jsonl``. A last line without
    its newline is what a crash cut short: it is left out, to be redone."""
    done: dict[str, tuple[int, dict[str, Any]]] = {}
    if not path.exists():
        return done
    lines = path.read_text(encoding="utf-8").split("\n")
    for lineno, line in enumerate(lines[:-1], start=1):  # lines[-1]: "" or the cut line
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if not isinstance(rec, dict) or "id" not in rec:
            raise InputError(
                path, lineno, "expected one output record per line; remove it or use a new --out"
            )
        done[rec["id"]] = (lineno, rec)
    return done


def drop_cut_line(path: Path) -> None:
    """Truncate ``path`` after its last newline, so what is appended starts a line of its own."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("r+b") as fh:
        fh.seek(-1, os.SEEK_END)
        if fh.read(1) != b"\n":  # only a crashed run's file is read whole
            fh.seek(0)
            fh.truncate(fh.read().rfind(b"\n") + 1)


def answer_key(domain_name: str, problem: dict[str, Any], answer: str) -> str | None:
    """What a majority vote compares: the option letter for MCQ, a text answer's canonical
    form, the stripped text otherwise."""
    if domain_name == "mcq":
        from steiner.domains.mcq import extract_letter

        return extract_letter(answer, len(problem.get("options") or []) or 10)
    if domain_name == "text":  # "4" and "4.0" are one vote, as the checker counts them one
        from steiner.domains.text import canonical_answer

        return canonical_answer(answer) or None
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
    """Run (or resume) an eval; returns the metrics written to ``metrics.json``."""
    return evaluate_records(cfg, progress, model_and_tokenizer)[0]


def evaluate_records(
    cfg: EvalConfig,
    progress: Callable[[int, int], None] | None = None,
    model_and_tokenizer: tuple[Any, Any] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``evaluate``, with the output records of this run's problems, in their order."""
    # before any file is written or the model loaded
    budget = Budget.from_flags(
        cfg.min_steps, cfg.max_steps, cfg.max_reasoning_tokens, cfg.extend_with, cfg.max_step_tokens
    )
    if cfg.samples > 1 and cfg.temperature == 0:
        # k greedy samples are k copies of pass@1: maj@k and pass@k would only repeat it
        raise InputError("--temperature", None, f"expected > 0 with --samples {cfg.samples}, got 0")
    problems = load_problems(cfg.problems, cfg.domain)[: cfg.limit]
    domain_name = cfg.domain or (problems[0]["domain"] if problems else "countdown")
    if model_and_tokenizer is None and cfg.base_url is None:
        # before the output directory, which load() comes after
        check_model_dir(cfg.model, "--model", MADE_BY, adapters=True)
    with sole_writer(cfg.out, "--out"):
        return answer_problems(cfg, problems, domain_name, budget, progress, model_and_tokenizer)


def answerer(
    cfg: EvalConfig, model_and_tokenizer: tuple[Any, Any] | None
) -> Callable[..., list[Completion]]:
    """``generate`` with the model bound: the local one, or the server at ``--base-url``,
    which takes a batch's requests at once."""
    if cfg.base_url is not None:
        endpoint = Endpoint(
            cfg.base_url,
            cfg.model,
            os.environ.get(cfg.api_key_env) or "none",
            concurrency=cfg.batch_size,
        )
        return functools.partial(generate_remote, endpoint)
    model, tokenizer = model_and_tokenizer or load(cfg.model)
    return functools.partial(generate, model, tokenizer)


def answer_problems(
    cfg: EvalConfig,
    problems: list[dict[str, Any]],
    domain_name: str,
    budget: Budget,
    progress: Callable[[int, int], None] | None,
    model_and_tokenizer: tuple[Any, Any] | None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``evaluate_records`` once its input is checked, holding ``--out``."""
    domain = get_domain(domain_name)
    out_dir = Path(cfg.out)
    outputs_path = out_dir / "outputs.jsonl"
    check_resume_record(
        out_dir / SETTINGS_FILE,
        output_settings(cfg),
        output_settings(EvalConfig(cfg.model, "", "")),
        "an eval",
        "use a new --out",
    )
    done = read_outputs(outputs_path)
    for problem in problems:
        lineno, rec = done.get(problem["id"], (None, {}))
        if lineno is not None and rec.get("question") != problem["question"]:
            raise InputError(
                outputs_path,
                lineno,
                f"problem {problem['id']!r} was answered here with another question: "
                f"{cfg.problems} changed since; use a new --out",
            )
        if lineno is not None and rec.get("reference") != problem.get("answer"):
            # a corrected gold answer: the stored verdicts were checked against the old one
            raise InputError(
                outputs_path,
                lineno,
                f"problem {problem['id']!r} was checked here against another answer "
                f"({rec.get('reference')!r}, now {problem.get('answer')!r}): {cfg.problems} "
                "changed since; use a new --out",
            )
    todo = [p for p in problems if p["id"] not in done]
    drop_cut_line(outputs_path)
    records_by_id = {i: rec for i, (_, rec) in done.items()}  # and this run's, as written
    answer = answerer(cfg, model_and_tokenizer)
    if progress:
        progress(len(problems) - len(todo), len(problems))
    with outputs_path.open("a", encoding="utf-8") as fh:
        for start in range(0, len(todo), cfg.batch_size):
            batch = todo[start : start + cfg.batch_size]
            convs = [question_chat(p) for p in batch]
            greedy = answer(convs, [budget] * len(batch), cfg.max_new_tokens, 0.0)
            sampled: list[list[Completion]] = [[] for _ in batch]
            for k in range(cfg.samples if cfg.samples > 1 else 0):
                outs = answer(
                    convs,
                    [budget] * len(batch),
                    cfg.max_new_tokens,
                    cfg.temperature,
                    cfg.top_p,
                    # from the problem, not its place in a batch: a resumed run, another
                    # --batch-size or --limit draw the same samples
                    seed=[derived_seed(cfg.seed, p["id"], k) for p in batch],
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
                records_by_id[rec["id"]] = rec
            fh.flush()
            os.fsync(fh.fileno())
            if progress:
                progress(len(problems) - len(todo) + start + len(batch), len(problems))
    records = [records_by_id[p["id"]] for p in problems]
    metrics = summarize(records, cfg)
    write_json(out_dir / "metrics.json", metrics)
    return metrics, records


def summarize(recs: list[dict[str, Any]], cfg: EvalConfig) -> dict[str, Any]:
    """The metrics of this run's output records."""
    n = len(recs)
    firsts = [r["outputs"][0] for r in recs]
    correct = sum(r["correct"] for r in recs)
    lo, hi = wilson_interval(correct, n)
    mean = lambda key: round(sum(o[key] for o in firsts) / n, 3) if n else 0.0  # noqa: E731
    share = lambda count: round(count / n, 4) if n else 0.0  # noqa: E731
    metrics = {
        "model": cfg.model,
        "problems": cfg.problems,
        "n": n,
        "correct": correct,
        "pass@1": share(correct),
        "pass@1_ci95": [round(lo, 4), round(hi, 4)],
        "mean_reasoning_tokens": mean("reasoning_tokens"),
        "mean_steps": mean("n_steps"),
        "mean_backtracks": mean("n_backtracks"),
        "format_error_rate": share(sum(bool(o["format_errors"]) for o in firsts)),
        # answers cut by --max-new-tokens or the model's positions (a prompt past them gets
        # none): a share here means the accuracy undercounts what the model would answer
        "length_cut_rate": share(sum(o["finish_reason"] == "length" for o in firsts)),
        # of those, the prompts that filled the positions on their own (no token written):
        # more --max-new-tokens cannot help them, only a model with more positions
        "prompt_too_long_rate": share(
            sum(o["finish_reason"] == "length" and o["completion_tokens"] == 0 for o in firsts)
        ),
        "config": asdict(cfg),
    }
    if cfg.samples > 1 and n:
        metrics[f"maj@{cfg.samples}"] = share(sum(r.get("maj_correct", False) for r in recs))
        metrics |= sampled_rates([[s["correct"] for s in r["samples"]] for r in recs])
    return metrics
