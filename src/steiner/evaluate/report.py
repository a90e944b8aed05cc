"""``steiner report RUN_DIR``: one Markdown + HTML page from whatever a run directory holds:
synthesis stats, training summaries, eval metrics, scaling and latency results and plots."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from steiner.evaluate.metrics import first_and_last_fifth, sampled_keys
from steiner.io import InputError, write_lines


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    # a | in a cell (a directory's name, a message) would end the cell and shift the row
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return out + [""]


# Python-Markdown passes raw HTML through and reads these as markup; neither it nor the
# standard library escapes text for Markdown, so model output and questions go through this
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]|#])")


_ENTITY_START = re.compile(r"&(?=#?\w+;)")


def _md_text(text: str) -> str:
    """``text`` as it is, in one Markdown line: its markup characters escaped, ``<`` as an
    entity (a tag would be kept as HTML), an ``&`` that would start an entity as one too
    (``&amp;`` showed as ``&``) and its line breaks as spaces."""
    text = _ENTITY_START.sub("&amp;", " ".join(text.split()))
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text).replace("<", "&lt;")


def _md_code(text: str) -> str:
    """``text`` as inline code (Markdown escapes a code span's HTML itself), or as escaped text
    when a backtick in it would end the span."""
    line = " ".join(text.split())
    return f"`{line}`" if "`" not in line else _md_text(line)


def _rel(path: Path, root: Path) -> str:
    """``path`` as the report names it: from ``root``, or the root's own name when it is the
    root (a report of one eval directory named its row ".")."""
    rel = path.relative_to(root)
    return str(rel) if rel.parts else root.resolve().name


def _in_run_order(root: Path, pattern: str) -> list[Path]:
    """The files named ``pattern`` under ``root``, oldest first: the order a pipeline wrote
    them (the demo's CPT, then its SFTs, then RL; the shortcut's eval before the Steiner
    models'), which reads better than the alphabet's (``steiner-rl`` before ``steiner-sft``).
    Files written in the same instant keep their paths' order."""
    return sorted(root.rglob(pattern), key=lambda p: (p.stat().st_mtime_ns, p))


class _Record(BaseModel):
    # the fields the report reads; a file may hold more
    model_config = ConfigDict(extra="allow", strict=True)


class _Target(_Record):
    target: str
    measured: Any
    met: bool


class _StageTime(_Record):
    stage: str
    seconds: float
    seconds_all_attempts: float | None = None
    train_seconds: float | None = None


class _Demo(_Record):
    profile: str
    domain: str
    targets: list[_Target]
    stages: list[_StageTime]
    total_seconds: float


class _SynthStats(_Record):
    dags: int
    paths: int
    mean_steps: float
    mean_reasoning_tokens: float
    backtrack_histogram: dict[str, int]


class _TrainingSummary(_Record):
    stage: str
    steps: int
    tokens_seen: int
    tokens_per_s: float
    train_seconds: float
    train_seconds_all_runs: float | None = None
    first_loss: float | None = None
    final_loss: float | None = None
    final_eval_loss: float | None = None


class _RLStep(_Record):
    step: int
    mean_reward: float
    accuracy: float
    mean_steps: float
    mean_backtracks: float


class _RLSummary(_Record):
    history: list[_RLStep] = Field(min_length=1)
    train_seconds: float | None = None  # rl_summary.json files written before it lack it


class _Metrics(_Record):
    n: int
    correct: int
    pass_at_1: float = Field(alias="pass@1")
    pass_at_1_ci95: tuple[float, float] = Field(alias="pass@1_ci95")
    mean_steps: float
    mean_backtracks: float
    mean_reasoning_tokens: float
    format_error_rate: float
    length_cut_rate: float | None = None  # absent from the metrics of older runs

    @model_validator(mode="after")
    def sampling_rates_are_numbers(self) -> _Metrics:
        extra = self.model_extra or {}
        for key in sampled_keys(extra):  # maj@k, avg@k, pass@j: shown as %
            value = extra[key]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{key!r} is not a number")
        return self


class _ScaleRow(_Record):
    mode: str
    budget: int
    accuracy: float
    mean_reasoning_tokens: float
    mean_steps: float
    control: float


class _ModeMetrics(_Record):
    control: float
    scaling: float
    performance: float
    monotone: bool


class _Scale(_Record):
    rows: list[_ScaleRow]
    metrics: dict[str, _ModeMetrics]


class _Latency(_Record):
    intercept_s: float
    seconds_per_token: float
    r2: float
    n: int


# What each file the report reads must hold, types too: a run directory may also hold another
# tool's file of the same name (an lm-eval metrics.json, say), or a hand-edited one, which is
# listed as not read instead of stopping the report with a KeyError or a format TypeError.
SCHEMAS: dict[str, type[_Record]] = {
    "demo.json": _Demo,
    "stats.json": _SynthStats,
    "training_summary.json": _TrainingSummary,
    "rl_summary.json": _RLSummary,
    "metrics.json": _Metrics,
    "scale.json": _Scale,
    "latency.json": _Latency,
}


def read_steiner_json(
    path: Path, kind: str, skipped: list[tuple[Path, str]]
) -> dict[str, Any] | None:
    """``path`` as the ``kind`` file Steiner writes, or None, with the reason in ``skipped``."""
    try:
        text = path.read_text(encoding="utf-8")
        d = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        skipped.append((path, f"not JSON: {exc}"))
        return None
    if not isinstance(d, dict):
        skipped.append((path, f"expected a JSON object, got {type(d).__name__}"))
        return None
    try:
        # from the text, so that JSON's arrays read as the tuples strict mode asks for
        SCHEMAS[kind].model_validate_json(text)
    except ValidationError as exc:
        skipped.append((path, f"not a Steiner {kind}: {_first_problem(exc)}"))
        return None
    return d


def _first_problem(exc: ValidationError) -> str:
    """A schema's first complaint, where it is and what: "field 'rows.0.accuracy': ..."."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")  # pydantic's words for our own checks
    return f"field {where!r}: {msg}" if where else msg


class _ShownStep(_Record):
    name: str
    thought: str
    summary: str
    reflection: str


class _ShownTrace(_Record):
    steps: list[_ShownStep]
    decisions: list[str]
    answer: str


class _ShownOutput(_Record):
    trace: _ShownTrace


def example_trace(root: Path, skipped: list[tuple[Path, str]]) -> list[str]:
    """A correct held-out answer whose reasoning backtracked, step by step, from the eval
    directory written last that has one, outside scaling sweeps (in a demo: the RL model,
    its final one). A file whose chosen output lacks what is shown is listed in ``skipped``
    and the one written before it is tried."""
    # here, not at the top: the eval module brings torch, which a report needs nowhere else
    from steiner.evaluate.accuracy import read_outputs

    for path in reversed(_in_run_order(root, "outputs.jsonl")):
        if path.parent.name.split("-")[0] in ("cap", "extend"):
            continue
        for line, rec in read_outputs(path).values():
            outputs = rec.get("outputs") if isinstance(rec.get("outputs"), list) else []
            out = next(
                (
                    o
                    for o in outputs
                    if isinstance(o, dict) and o.get("correct") and o.get("n_backtracks")
                ),
                None,
            )
            if out is None:
                continue
            try:
                trace = _ShownOutput.model_validate(out).trace
            except ValidationError as exc:
                why = f"line {line}: {_first_problem(exc)}"
                skipped.append((path, f"not a Steiner outputs.jsonl: {why}"))
                break
            lines = [f"## Example trace with a backtrack ({_rel(path.parent, root)})", ""]
            question = _md_text(str(rec.get("question", "")))
            lines += [f"Problem {_md_code(str(rec['id']))}: {question}", ""]
            for i, step in enumerate(trace.steps):
                decision = trace.decisions[i] if i < len(trace.decisions) else "-"
                name, thought, summary, reflection = map(
                    _md_text, (step.name, step.thought, step.summary, step.reflection)
                )
                lines.append(
                    f"{i + 1}. **{name}** — {thought} → {summary} (*{reflection}*) → "
                    f"{_md_code(decision)}"
                )
            return lines + ["", f"Answer: {_md_code(trace.answer)} (correct)", ""]
    return []


def _stage_seconds(record: dict[str, Any]) -> str:
    if record.get("ran_beside_steiner_sft"):
        return f"{record['train_seconds']} (ran beside steiner-sft)"
    if "seconds_all_attempts" in record:  # resumed: earlier attempts crashed or were stopped
        return f"{record['seconds_all_attempts']} (the last attempt: {record['seconds']})"
    return str(record["seconds"])


def _train_seconds(summary: dict[str, Any]) -> str:
    every = summary.get("train_seconds_all_runs", summary["train_seconds"])
    if every != summary["train_seconds"]:
        return f"{every} (this run: {summary['train_seconds']})"
    return str(summary["train_seconds"])


def _tokens_per_s(summary: dict[str, Any]) -> str:
    """This run's rate, or, when this run resumed a finished model and trained nothing, the
    rate over all its runs (the model's, not a 0 from a re-run that only loaded it)."""
    rate = summary["tokens_per_s"]
    every = summary.get("train_seconds_all_runs", 0)
    if rate == 0 and summary["tokens_seen"] > 0 and every > 0:
        return f"{summary['tokens_seen'] / every:.1f} (all runs)"
    return str(rate)


def build_report(run_dir: str | Path) -> dict[str, Path]:
    root = Path(run_dir)
    if not root.is_dir():
        raise InputError(root, None, "expected a run directory")
    lines = [f"# Steiner report: {_md_text(root.name)}", ""]
    found = 0
    skipped: list[tuple[Path, str]] = []
    demo = root / "demo.json"
    d = read_steiner_json(demo, "demo.json", skipped) if demo.exists() else None
    if d is not None:
        lines += [f"## Demo ({d['profile']} profile, {d['domain']} domain)", ""]
        lines += _table(
            ["target", "measured", "met"],
            [[t["target"], t["measured"], "yes" if t["met"] else "**no**"] for t in d["targets"]],
        )
        lines += _table(
            ["stage", "seconds"],
            [[r["stage"], _stage_seconds(r)] for r in d["stages"]]
            + [["total", f"{d['total_seconds']} ({d['total_seconds'] / 60:.1f} min)"]],
        )
        found += 1
    synth = [
        (p, s)
        for p in _in_run_order(root, "stats*.json")
        if "teacher-cache" not in p.parts
        and (s := read_steiner_json(p, "stats.json", skipped)) is not None
    ]
    if synth:
        lines += ["## Synthesis", ""]
        rows = []
        for p, s in synth:
            rows.append(
                [
                    _rel(p.parent, root),
                    s["dags"],
                    s["paths"],
                    s["mean_steps"],
                    s["mean_reasoning_tokens"],
                    ", ".join(f"{k}: {v}" for k, v in s["backtrack_histogram"].items()),
                    s.get("teacher_faults") or "none",
                ]
            )
        lines += _table(
            [
                "run",
                "DAGs",
                "paths",
                "mean steps",
                "mean reasoning tokens",
                "backtracks (n: paths)",
                "teacher faults",
            ],
            rows,
        )
        found += len(rows)
    training = [
        (p, s)
        for p in _in_run_order(root, "training_summary.json")
        if (s := read_steiner_json(p, "training_summary.json", skipped)) is not None
    ]
    if training:
        lines += ["## Training", ""]
        rows = []
        # a column for the held-out loss only where a run had one (train sft --eval_data)
        held_out = any(s.get("final_eval_loss") is not None for _, s in training)
        for p, s in training:
            first, last = s.get("first_loss"), s.get("final_loss")
            evaluated = s.get("final_eval_loss")
            rows.append(
                [
                    _rel(p.parent, root),
                    s["stage"],
                    s["steps"],
                    s["tokens_seen"],
                    _tokens_per_s(s),
                    f"{first:.3f}" if first else "-",
                    f"{last:.3f}" if last else "-",
                    *([f"{evaluated:.3f}" if evaluated is not None else "-"] if held_out else []),
                    _train_seconds(s),
                ]
            )
        lines += _table(
            [
                "model",
                "stage",
                "steps",
                "tokens",
                "tokens/s",
                "first loss",
                "final loss",
                *(["held-out loss"] if held_out else []),
                "seconds",
            ],
            rows,
        )
        found += len(rows)
    rl_runs = [
        (p, s)
        for p in _in_run_order(root, "rl_summary.json")
        if (s := read_steiner_json(p, "rl_summary.json", skipped)) is not None
    ]
    if rl_runs:
        lines += ["## RL", "", "Means over the first and the last fifth of the steps.", ""]
        rows = []
        for p, s in rl_runs:
            trend = {
                key: first_and_last_fifth(s["history"], key)
                for key in ("mean_reward", "accuracy", "mean_steps", "mean_backtracks")
            }
            seconds = s.get("train_seconds")
            rows.append(
                [
                    _rel(p.parent, root),
                    s["history"][-1]["step"],
                    *(f"{first:.3f} → {last:.3f}" for first, last in trend.values()),
                    f"{seconds:.1f}" if seconds is not None else "-",
                ]
            )
        header = ["model", "steps", "mean reward", "accuracy", "steps a trace", "backtracks"]
        lines += _table([*header, "seconds (last run)"], rows)
        found += len(rows)
    metrics = [
        (p, m)
        for p in _in_run_order(root, "metrics.json")
        if p.parent.name.split("-")[0] not in ("cap", "extend")
        and (m := read_steiner_json(p, "metrics.json", skipped)) is not None
    ]
    if metrics:
        lines += ["## Accuracy", ""]
        rows = []
        for p, m in metrics:
            lo, hi = m["pass@1_ci95"]
            extra = ", ".join(f"{k} {100 * m[k]:.1f}%" for k in sampled_keys(m))
            rows.append(
                [
                    _rel(p.parent, root),
                    f"{m['correct']}/{m['n']}",
                    f"{100 * m['pass@1']:.1f}%",
                    f"[{100 * lo:.1f}, {100 * hi:.1f}]",
                    extra or "-",
                    m["mean_steps"],
                    m["mean_backtracks"],
                    m["mean_reasoning_tokens"],
                    f"{100 * m['format_error_rate']:.1f}%",
                    "-" if (cut := m.get("length_cut_rate")) is None else f"{100 * cut:.1f}%",
                ]
            )
        lines += _table(
            [
                "eval",
                "correct",
                "pass@1",
                "95% CI",
                "sampling",
                "steps",
                "backtracks",
                "reasoning tokens",
                "format errors",
                "cut at length",
            ],
            rows,
        )
        found += len(rows)
    for p in _in_run_order(root, "scale.json"):
        if (s := read_steiner_json(p, "scale.json", skipped)) is None:
            continue
        lines += [f"## Inference-time scaling ({_rel(p.parent, root)})", ""]
        lines += _table(
            ["mode", "budget", "accuracy", "mean reasoning tokens", "mean steps", "control"],
            [
                [
                    r["mode"],
                    r["budget"],
                    f"{100 * r['accuracy']:.1f}%",
                    r["mean_reasoning_tokens"],
                    r["mean_steps"],
                    f"{100 * r['control']:.0f}%",
                ]
                for r in s["rows"]
            ],
        )
        lines += _table(
            ["mode", "Control", "Scaling (acc/step)", "Performance", "monotone"],
            [
                [
                    mode,
                    f"{100 * v['control']:.0f}%",
                    f"{v['scaling']:.4f}",
                    f"{100 * v['performance']:.1f}%",
                    "yes" if v["monotone"] else "no",
                ]
                for mode, v in s["metrics"].items()
            ],
        )
        if (p.parent / "scale.png").exists():
            lines += [f"![scaling]({_rel(p.parent / 'scale.png', root)})", ""]
        found += 1
    for p in _in_run_order(root, "latency.json"):
        if (s := read_steiner_json(p, "latency.json", skipped)) is None:
            continue
        lines += [
            f"## Latency probe ({_rel(p.parent, root)})",
            "",
            f"seconds ≈ {s['intercept_s']:.4f} + {1000 * s['seconds_per_token']:.3f} ms × "
            "completion tokens, "
            f"R² = {s['r2']:.3f} over {s['n']} requests.",
            "",
        ]
        if (p.parent / "latency.png").exists():
            lines += [f"![latency]({_rel(p.parent / 'latency.png', root)})", ""]
        found += 1
    example = example_trace(root, skipped)
    if example:
        lines += example
        found += 1
    read = (
        "stats.json, training_summary.json, rl_summary.json, metrics.json, scale.json or "
        "latency.json"
    )
    if not found and not skipped:
        # A page saying "nothing" for a mistyped directory would look like success.
        raise InputError(
            root, None, f"nothing to report; expected a run directory with a {read} under it"
        )
    if not found:
        lines += [
            f"Nothing to report yet: no {read} under this directory.",
            "",
        ]
    if skipped:
        lines += ["## Files not read", ""]
        lines += _table(["file", "why"], [[_rel(p, root), why] for p, why in skipped])
    md_path, html_path = root / "report.md", root / "report.html"
    text = "\n".join(lines)
    write_lines(md_path, [text])
    import markdown

    body = markdown.markdown(text, extensions=["tables"])
    write_lines(
        html_path,
        [
            f"<!doctype html><meta charset='utf-8'><title>{html.escape(root.name)}</title>"
            "<style>body{font-family:sans-serif;max-width:60em;margin:auto}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}</style>"
            f"{body}"
        ],
    )
    return {"markdown": md_path, "html": html_path, "skipped": [p for p, _ in skipped]}
