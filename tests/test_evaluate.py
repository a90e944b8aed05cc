import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from steiner.evaluate.metrics import (
    majority,
    pass_at_k,
    sampled_rates,
    scaling_metrics,
    wilson_interval,
)


def test_scaling_metrics_on_a_hand_made_table():
    rows = [
        {"budget": 1, "accuracy": 0.2, "control": 1.0},
        {"budget": 2, "accuracy": 0.4, "control": 1.0},
        {"budget": 4, "accuracy": 0.5, "control": 0.5},
    ]
    m = scaling_metrics(rows)
    # slopes: (0.4-0.2)/1 = 0.2, (0.5-0.2)/3 = 0.1, (0.5-0.4)/2 = 0.05 -> mean 0.35/3
    assert m["scaling"] == pytest.approx(0.35 / 3)
    assert m["control"] == pytest.approx(2.5 / 3)
    assert m["performance"] == 0.5 and m["monotone"] is True
    assert (
        scaling_metrics(rows + [{"budget": 8, "accuracy": 0.1, "control": 1}])["monotone"] is False
    )


def test_wilson_and_majority():
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-3) and hi == pytest.approx(0.7634, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert majority(["B", None, "A", "B", "A"]) == "B" and majority([None, ""]) is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=8), st.data())
def test_pass_at_k_is_the_chance_that_k_drawn_samples_hold_a_right_one(samples, data):
    from itertools import combinations

    k = data.draw(st.integers(1, len(samples)))
    draws = list(combinations(range(len(samples)), k))
    expected = sum(any(samples[i] for i in draw) for draw in draws) / len(draws)
    assert pass_at_k(len(samples), sum(samples), k) == pytest.approx(expected)


def test_k_samples_give_the_mean_sample_and_the_pass_at_j_curve():
    """Before, k samples gave maj@k and pass@k only: not a sample's own accuracy (what papers
    on reasoning models call pass@1 at a temperature) nor pass@j below k."""
    rates = sampled_rates([[True, False, False, False], [True] * 4, [False] * 4])
    assert list(rates) == ["avg@4", "pass@2", "pass@4"]
    assert rates["avg@4"] == round((1 / 4 + 1 + 0) / 3, 4)
    assert rates["pass@2"] == round((1 / 2 + 1 + 0) / 3, 4)  # one right in 4: 1 - C(3,2)/C(4,2)
    assert rates["pass@4"] == round(2 / 3, 4)
    assert list(sampled_rates([[True] * 5])) == ["avg@5", "pass@2", "pass@4", "pass@5"]
    assert list(sampled_rates([[False] * 2])) == ["avg@2", "pass@2"]


def steiner(*args):
    return subprocess.run(
        [sys.executable, "-m", "steiner.cli", *args], capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def problems(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "problems.jsonl"
    # bare records are enough: the domain derives question and answer
    path.write_text(
        "".join(
            json.dumps({"id": f"p{i}", "nums": [3, 4, i + 1], "target": 7 + i + 1}) + "\n"
            for i in range(5)
        )
    )
    return path


def test_eval_writes_raw_outputs_and_resumes(tiny_model_dir, problems, tmp_path):
    args = [
        "eval",
        "--model",
        str(tiny_model_dir),
        "--problems",
        str(problems),
        "--out",
        str(tmp_path),
        "--max-new-tokens",
        "40",
        "--max-steps",
        "2",
        "--samples",
        "2",
        "--batch-size",
        "4",
    ]
    proc = steiner(*args)
    assert proc.returncode == 0, proc.stderr
    lines = (tmp_path / "outputs.jsonl").read_text().splitlines()
    assert len(lines) == 5
    rec = json.loads(lines[0])
    assert isinstance(rec["correct"], bool) and rec["outputs"][0]["text"].startswith(
        "<|reasoning_start|>"
    )
    assert len(rec["samples"]) == 2 and "trace" in rec["outputs"][0]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["n"] == 5 and "maj@2" in metrics and "pass@2" in metrics
    samples = [[s["correct"] for s in json.loads(line)["samples"]] for line in lines]
    assert metrics["avg@2"] == round(sum(map(sum, samples)) / 10, 4)
    assert metrics["pass@2"] == round(sum(map(any, samples)) / 5, 4)
    assert "avg@2" in proc.stderr and "pass@2" in proc.stderr
    assert metrics["mean_steps"] <= 2
    # the share of greedy answers that ran out of tokens, beside the accuracy it lowers
    cut = [json.loads(line)["outputs"][0]["finish_reason"] == "length" for line in lines]
    assert metrics["length_cut_rate"] == sum(cut) / 5 and "length_cut_rate" in proc.stderr
    from steiner.evaluate.report import build_report

    build_report(tmp_path)
    table = (tmp_path / "report.md").read_text().split("## Accuracy")[1].splitlines()
    assert table[2].endswith(" | cut at length |")
    assert table[4].endswith(f" | {100 * sum(cut) / 5:.1f}% |")
    assert f"avg@2 {100 * metrics['avg@2']:.1f}%, pass@2" in table[4]
    assert steiner(*args).returncode == 0  # resumed: nothing left to do
    assert len((tmp_path / "outputs.jsonl").read_text().splitlines()) == 5


def test_greedy_eval_prints_pass_at_1_once(tiny_model_dir, problems, tmp_path):
    proc = steiner(
        "eval", "--model", str(tiny_model_dir), "--problems", str(problems),
        "--out", str(tmp_path), "--max-new-tokens", "20", "--limit", "2",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("pass@1") == 1, proc.stderr  # the summary table is on stderr


def test_scale_and_report(tiny_model_dir, problems, tmp_path):
    proc = steiner(
        "scale",
        "--model",
        str(tiny_model_dir),
        "--problems",
        str(problems),
        "--out",
        str(tmp_path / "scale"),
        "--budgets",
        "1,2",
        "--mode",
        "both",
        "--max-new-tokens",
        "60",
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "scale" / "scale.json").read_text())
    assert [(r["mode"], r["budget"]) for r in result["rows"]] == [
        ("cap", 1),
        ("cap", 2),
        ("extend", 1),
        ("extend", 2),
    ]
    assert all(r["control"] == 1.0 for r in result["rows"] if r["mode"] == "cap")
    assert (tmp_path / "scale" / "scale.png").stat().st_size > 1000
    assert (tmp_path / "scale" / "scale.csv").read_text().startswith("mode,budget,accuracy")
    proc = steiner("report", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    report = (tmp_path / "report.md").read_text()
    assert "Inference-time scaling" in report and "scale/scale.png" in report
    assert "<table>" in (tmp_path / "report.html").read_text()
    assert (
        steiner(
            "scale",
            "--model",
            str(tiny_model_dir),
            "--problems",
            str(problems),
            "--out",
            str(tmp_path),
            "--budgets",
            "1,x",
        ).returncode
        == 2
    )


def test_report_gives_a_resumed_finished_model_its_all_runs_rate(tmp_path):
    from steiner.evaluate.report import build_report

    summary = {"stage": "sft", "steps": 4, "first_loss": 2.0, "final_loss": 1.0}
    for name, rate, this_run, every in (("resumed", 0, 0.04, 10.0), ("fresh", 250.0, 4.0, 4.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "training_summary.json").write_text(
            json.dumps(
                summary
                | {"tokens_seen": 1000, "tokens_per_s": rate, "train_seconds": this_run}
                | {"train_seconds_all_runs": every}
            )
        )
    report = build_report(tmp_path)["markdown"].read_text()
    assert (
        "| resumed | sft | 4 | 1000 | 100.0 (all runs) | 2.000 | 1.000 | 10.0 (this run: 0.04) |"
        in report
    )
    assert "| fresh | sft | 4 | 1000 | 250.0 | 2.000 | 1.000 | 4.0 |" in report


def test_a_bar_in_a_run_directorys_name_stays_in_its_cell(tmp_path):
    # before: the | ended the cell, and the row had one column too many in report.html
    from steiner.evaluate.report import build_report

    summary = {"stage": "sft", "steps": 4, "first_loss": 2.0, "final_loss": 1.0}
    (tmp_path / "a|b").mkdir()
    (tmp_path / "a|b" / "training_summary.json").write_text(
        json.dumps(summary | {"tokens_seen": 1000, "tokens_per_s": 250.0, "train_seconds": 4.0})
    )
    html = build_report(tmp_path)["html"].read_text()
    [row] = [r for r in html.split("<tr>") if "a|b" in r]
    header = html.split("<tr>")[1]
    assert row.count("<td") == header.count("<th"), row


def test_a_report_of_one_run_directory_names_its_rows_after_it(tmp_path):
    from steiner.evaluate.report import build_report

    # before: the row and the section were named "." (the path from the root to itself)
    run = tmp_path / "sft-run"
    run.mkdir()
    summary = {"stage": "sft", "steps": 4, "first_loss": 2.0, "final_loss": 1.0}
    (run / "training_summary.json").write_text(
        json.dumps(summary | {"tokens_seen": 1000, "tokens_per_s": 250.0, "train_seconds": 4.0})
    )
    report = build_report(run)["markdown"].read_text()
    assert "| sft-run | sft | 4 |" in report and "| . |" not in report


def test_report_shows_each_rl_run_as_first_and_last_fifth_of_its_steps(tmp_path):
    from steiner.evaluate.report import build_report

    def step(n: int, reward: float) -> dict:
        return {"step": n, "mean_reward": reward, "accuracy": reward / 10}

    history = [
        step(n, reward) | {"mean_steps": 2.0, "mean_backtracks": 0.5, "terms": {}}
        for n, reward in enumerate([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0], 1)
    ]
    (tmp_path / "rl").mkdir()
    (tmp_path / "rl" / "rl_summary.json").write_text(
        json.dumps({"config": {}, "resumed_from": None, "train_seconds": 12.34, "history": history})
    )
    # one written before rl_summary.json had its time: no seconds, still a row
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "rl_summary.json").write_text(json.dumps({"history": history[:3]}))
    report = build_report(tmp_path)["markdown"].read_text()
    # ten steps: the first two (1, 2) against the last two (9, 10)
    row = "| rl | 10 | 1.500 → 9.500 | 0.150 → 0.950 | 2.000 → 2.000 | 0.500 → 0.500 | 12.3 |"
    assert row in report, report
    assert (
        "| old | 3 | 1.000 → 3.000 | 0.100 → 0.300 | 2.000 → 2.000 | 0.500 → 0.500 | - |" in report
    )


def test_report_rows_follow_the_order_the_run_wrote_them(tmp_path):
    """The demo's accuracy table read shortcut, Steiner RL, Steiner SFT (the alphabet's
    order) and its example trace came from whichever model sorted first; a synthesis run's
    backtrack counts printed as a Python dict."""
    import os

    from steiner.evaluate.report import build_report

    metrics = {"n": 4, "pass@1_ci95": [0.1, 0.9], "mean_steps": 2.0, "mean_backtracks": 1.0}
    metrics |= {"mean_reasoning_tokens": 9.0, "format_error_rate": 0.0}
    trace = {"name": "1", "thought": "t", "summary": "s", "reflection": "dead"}
    written = [("shortcut-sft", 1), ("steiner-sft", 3), ("steiner-rl", 4)]  # pipeline order
    for when, (name, correct) in enumerate(written):
        run = tmp_path / "eval" / name
        run.mkdir(parents=True)
        (run / "metrics.json").write_text(
            json.dumps(metrics | {"correct": correct, "pass@1": correct / 4})
        )
        shown = {"steps": [trace | {"name": name}], "decisions": ["end"], "answer": "4"}
        output = {"correct": True, "n_backtracks": 1, "trace": shown}
        (run / "outputs.jsonl").write_text(json.dumps({"id": name, "outputs": [output]}) + "\n")
        for f in run.iterdir():  # one second apart, in the pipeline's order
            os.utime(f, ns=(10**18 + when * 10**9,) * 2)
    (tmp_path / "synth").mkdir()
    stats = {"dags": 15, "paths": 15, "mean_steps": 2.0, "mean_reasoning_tokens": 40.0}
    stats["backtrack_histogram"] = {"0": 5, "1": 7, "2": 3}
    (tmp_path / "synth" / "stats.json").write_text(json.dumps(stats))
    report = build_report(tmp_path)["markdown"].read_text()
    rows = [line.split(" | ")[0] for line in report.splitlines() if line.startswith("| eval/")]
    assert rows == ["| eval/shortcut-sft", "| eval/steiner-sft", "| eval/steiner-rl"], report
    # the example comes from the model evaluated last: the demo's final one
    assert "## Example trace with a backtrack (eval/steiner-rl)" in report
    assert "| 0: 5, 1: 7, 2: 3 | none |" in report, report


def test_budget_labels_merge_points_that_would_print_on_each_other():
    from steiner.evaluate.scale import budget_labels

    # the demo's cap curve: budgets 3 and 4 give the same traces, budget 8 as well, 16 not
    points = [(1, 22.0, 31.5), (2, 39.8, 65.5), (3, 48.7, 98.0), (4, 49.0, 98.5), (8, 49.0, 98.5)]
    points.append((16, 80.0, 98.5))
    assert budget_labels(points, x_span=78.0, y_span=67.0) == [
        ("1", 22.0, 31.5),
        ("2", 39.8, 65.5),
        ("3-8", 48.7, 98.0),
        ("16", 80.0, 98.5),
    ]
    assert budget_labels([(1, 5.0, 50.0), (2, 5.0, 60.0)], 1.0, 10.0) == [
        ("1", 5.0, 50.0),
        ("2", 5.0, 60.0),
    ]


def test_report_on_a_directory_with_nothing_to_report_is_one_error_line(tmp_path):
    (tmp_path / "notes.txt").write_text("a mistyped run directory")
    proc = steiner("report", str(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    said = proc.stderr.replace("\n", "")  # rich wraps long lines
    assert said.startswith(f"steiner: error: {tmp_path}: nothing to report; expected ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # no empty page


def test_report_lists_files_of_other_tools_instead_of_failing_on_them(tmp_path):
    (tmp_path / "lm-eval").mkdir()
    (tmp_path / "lm-eval" / "metrics.json").write_text('{"acc": 0.5}')
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "latency.json").write_text('{"intercept_s": 0.1,')
    (tmp_path / "outputs.jsonl").write_text('{"id": "a", "answer": "4"}\n')  # not eval's
    proc = steiner("report", str(tmp_path))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    said = proc.stderr.replace("\n", "")  # rich wraps long lines
    assert "lm-eval/metrics.json" in said and "cut/latency.json" in said
    report = (tmp_path / "report.md").read_text()
    why = "not a Steiner metrics.json: field 'n': Field required"
    assert f"| lm-eval/metrics.json | {why}" in report
    assert "| cut/latency.json | not JSON: " in report and "Nothing to report yet" in report


@pytest.mark.parametrize(
    "name, record, why",
    [  # before: each was a TypeError traceback (formatting None, a string, a short list)
        (
            "latency.json",
            {"n": 3, "intercept_s": None, "seconds_per_token": 0.1, "r2": 0.5},
            "field 'intercept_s': Input should be a valid number",
        ),
        (
            "scale.json",
            {
                "rows": [
                    {"mode": "cap", "budget": 1, "accuracy": "0.5", "mean_reasoning_tokens": 9.0}
                    | {"mean_steps": 1.0, "control": 1.0}
                ],
                "metrics": {},
            },
            "field 'rows.0.accuracy': Input should be a valid number",
        ),
        (
            "metrics.json",
            {"n": 2, "correct": 1, "pass@1": 0.5, "pass@1_ci95": [0.1]}
            | {"mean_steps": 1, "mean_backtracks": 0, "mean_reasoning_tokens": 9}
            | {"format_error_rate": 0},
            "field 'pass@1_ci95.1': Field required",
        ),
        (
            "metrics.json",
            {"n": 2, "correct": 1, "pass@1": 0.5, "pass@1_ci95": [0.1, 0.9], "maj@4": "x"}
            | {"mean_steps": 1, "mean_backtracks": 0, "mean_reasoning_tokens": 9}
            | {"format_error_rate": 0},
            "'maj@4' is not a number",
        ),
        (
            "demo.json",
            {"profile": "quick", "domain": "graph", "targets": [], "total_seconds": 1.0}
            | {"stages": [{"stage": "synth"}]},
            "field 'stages.0.seconds': Field required",
        ),
        (
            "rl_summary.json",
            {"history": [{"step": 1, "mean_reward": None, "accuracy": 0.5}]},
            "field 'history.0.mean_reward': Input should be a valid number",
        ),
        (
            "rl_summary.json",
            {"history": []},
            "field 'history': List should have at least 1 item after validation, not 0",
        ),
        (  # the report's example trace: a correct answer that backtracked, step by step
            "outputs.jsonl",
            {"id": "a", "outputs": [{"correct": True, "n_backtracks": 1, "trace": {}}]},
            "line 1: field 'trace.steps': Field required",
        ),
    ],
)
def test_report_lists_a_hand_edited_file_of_the_wrong_types(tmp_path, name, record, why):
    where = name if name == "demo.json" else f"edited/{name}"  # a run's demo.json is its own
    (tmp_path / "edited").mkdir()
    (tmp_path / where).write_text(json.dumps(record) + "\n")
    proc = steiner("report", str(tmp_path))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    report = (tmp_path / "report.md").read_text()
    assert f"| {where} | not a Steiner {name}: {why} |" in report, report


def _eval_config(model, problems, out, **kw):
    from steiner.evaluate.accuracy import EvalConfig

    return EvalConfig(str(model), str(problems), str(out), max_new_tokens=24, **kw)


def test_eval_will_not_resume_with_other_settings(tiny_model_dir, problems, tmp_path):
    from steiner.evaluate.accuracy import evaluate
    from steiner.io import InputError

    out = tmp_path / "ev"
    assert evaluate(_eval_config(tiny_model_dir, problems, out, limit=2))["n"] == 2
    # another budget would answer differently: the old outputs must not pass for its own
    with pytest.raises(InputError, match="max_steps: None there, 1 here") as err:
        evaluate(_eval_config(tiny_model_dir, problems, out, limit=2, max_steps=1))
    assert err.value.path.endswith("eval_settings.json")
    # the batch size and the limit decide no output: the same eval goes on where it stopped
    m = evaluate(_eval_config(tiny_model_dir, problems, out, limit=4, batch_size=3))
    assert m["n"] == 4 and len((out / "outputs.jsonl").read_text().splitlines()) == 4
    # a cli run gets one line and exit code 2
    proc = steiner(
        "eval", "--model", str(tiny_model_dir), "--problems", str(problems),
        "--out", str(out), "--max-new-tokens", "30",
    )  # fmt: skip
    assert proc.returncode == 2 and "max_new_tokens: 24 there, 30 here" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_empty_problem_file_is_an_error_not_zero_of_zero(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    for command in ("eval", "scale"):
        out = tmp_path / command
        proc = steiner(
            command, "--model", str(tiny_model_dir), "--problems", str(empty), "--out", str(out)
        )
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert (
            proc.stderr.strip()
            == f"steiner: error: {empty}: no records; expected one problem per line"
        )
        assert not out.exists()


def test_an_impossible_budget_is_one_error_line_before_anything_is_written(
    tiny_model_dir, problems, tmp_path
):
    from steiner.evaluate.accuracy import evaluate
    from steiner.io import InputError

    out = tmp_path / "ev"
    # before: "budget: min_steps cannot exceed max_steps", the server request's field names
    with pytest.raises(InputError, match="--min-steps: expected at most --max-steps 1, got 3"):
        evaluate(_eval_config(tiny_model_dir, problems, out, min_steps=3, max_steps=1))
    with pytest.raises(InputError, match="--extend-with: expected model, proceed or backtrack"):
        evaluate(_eval_config(tiny_model_dir, problems, out, extend_with="more"))
    # k greedy samples would be k copies of pass@1, reported as maj@k and pass@k
    with pytest.raises(InputError, match="--temperature: expected > 0 with --samples 3, got 0"):
        evaluate(_eval_config(tiny_model_dir, problems, out, samples=3, temperature=0.0))
    assert not out.exists()


def test_sampled_eval_draws_the_same_samples_however_it_is_batched(
    tiny_model_dir, problems, tmp_path
):
    from steiner.evaluate.accuracy import evaluate

    def samples(out):
        lines = (out / "outputs.jsonl").read_text().splitlines()
        return {r["id"]: [s["text"] for s in r["samples"]] for r in map(json.loads, lines)}

    cfg = dict(samples=3, temperature=1.0, seed=5, max_steps=2)
    whole = evaluate(_eval_config(tiny_model_dir, problems, tmp_path / "whole", **cfg))
    out = tmp_path / "resumed"  # stopped after two problems, resumed with another batch size
    evaluate(_eval_config(tiny_model_dir, problems, out, limit=2, batch_size=1, **cfg))
    resumed = evaluate(_eval_config(tiny_model_dir, problems, out, batch_size=3, **cfg))
    assert samples(out) == samples(tmp_path / "whole")
    assert {k: v for k, v in resumed.items() if k != "config"} == {
        k: v for k, v in whole.items() if k != "config"
    }
    drawn = samples(out)
    assert len({t for texts in drawn.values() for t in texts}) > len(drawn)  # k samples differ
    other = evaluate(
        _eval_config(tiny_model_dir, problems, tmp_path / "seed6", **{**cfg, "seed": 6})
    )
    assert samples(tmp_path / "seed6") != drawn and other["n"] == 5


def test_eval_will_not_resume_on_a_changed_problem_file(tiny_model_dir, problems, tmp_path):
    from steiner.evaluate.accuracy import evaluate
    from steiner.io import InputError

    moved = tmp_path / "moved.jsonl"
    moved.write_text(problems.read_text())
    out = tmp_path / "ev"
    evaluate(_eval_config(tiny_model_dir, problems, out, limit=2))
    # the same problems under another path: nothing to redo
    assert evaluate(_eval_config(tiny_model_dir, moved, out))["n"] == 5
    records = [json.loads(line) for line in moved.read_text().splitlines()]
    records[1]["target"] += 1  # the same id, another problem
    moved.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(InputError, match="problem 'p1'") as err:
        evaluate(_eval_config(tiny_model_dir, moved, out))
    assert err.value.path.endswith("outputs.jsonl") and err.value.line == 2
    # a corrected gold answer under the same question: the verdicts stored were the old
    # answer's, and a resumed eval reported them
    text, out = tmp_path / "text.jsonl", tmp_path / "text-ev"
    rows = [{"id": "t0", "question": "How many?", "answer": "72"}]
    text.write_text(json.dumps(rows[0]) + "\n")
    evaluate(_eval_config(tiny_model_dir, text, out))
    text.write_text(json.dumps(rows[0] | {"answer": "73"}) + "\n")
    with pytest.raises(InputError, match="checked here against another answer .'72', now '73'"):
        evaluate(_eval_config(tiny_model_dir, text, out))


def test_eval_resumes_after_a_crash_cut_its_last_line(tiny_model_dir, problems, tmp_path):
    from steiner.evaluate.accuracy import evaluate
    from steiner.io import InputError

    whole = evaluate(_eval_config(tiny_model_dir, problems, tmp_path / "whole", batch_size=1))
    out = tmp_path / "cut"
    evaluate(_eval_config(tiny_model_dir, problems, out, limit=3, batch_size=1))
    outputs = out / "outputs.jsonl"
    text = outputs.read_text()
    outputs.write_text(text[: len(text) - len(text.splitlines()[-1]) // 2 - 1])  # half a line
    resumed = evaluate(_eval_config(tiny_model_dir, problems, out, batch_size=1))
    lines = outputs.read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["p0", "p1", "p2", "p3", "p4"]
    assert resumed["n"] == 5 and resumed["correct"] == whole["correct"]
    assert resumed["mean_steps"] == whole["mean_steps"]
    # a whole line that is not a record is not a crash's doing: one error, with its line
    lines[1] = "not json"
    outputs.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match="expected one output record per line") as err:
        evaluate(_eval_config(tiny_model_dir, problems, out, batch_size=1))
    assert err.value.line == 2


@pytest.mark.parametrize(
    "answer, gold, same",
    [
        ("4.0", "4", True),
        ("$4", "4", True),
        (r"so \boxed{4}", "4", True),
        ("The answer is 1,000.", "1000", True),
        ("0.5", "1/2", True),
        ("\u22124", "-4", True),
        ("Paris", "paris", True),
        ("4", "5", False),
        ("4.01", "4", False),
        ("1e3", "1000", False),  # no exponents: a short plain number or fraction only
        ("+4", "4", True),
        ("**4**", "4", True),  # Markdown bold, as chat models answer
        (r"\frac{1}{2}", "0.5", True),
        (r"\boxed{\dfrac{2}{4}}", "1/2", True),  # braces inside the box
        (r"-\frac{3}{4}", "-0.75", True),
        ("1.5/2", "3/4", True),  # raised ValueError mid-eval: Fraction reads no "1.5/2"
        ("3/0", "0", False),
        ("12,345,678", "12345678", True),
        ("1,4", "14", False),  # was True: every comma was dropped
        ("1,2345", "12345", False),  # not thousands groups
        ("1,4", "1, 4", True),
        ("Paris, France", "paris france", True),
    ],
)
def test_text_answers_compare_as_numbers_where_they_are_numbers(answer, gold, same):
    from steiner.domains.text import TextDomain
    from steiner.evaluate.accuracy import answer_key

    # before: "4.0", "$4" and "\boxed{4}" were wrong answers to 4 (string comparison)
    assert TextDomain().check_answer({"answer": gold}, answer) is same
    assert (answer_key("text", {}, answer) == answer_key("text", {}, gold)) is same


def test_gsm8k_records_read_as_solution_and_final_answer(tmp_path):
    from steiner.domains import load_problems, load_shortcuts
    from steiner.domains.text import TextDomain

    solution = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nIn all 48+24 = <<48+24=72>>72.\n"
    path = tmp_path / "gsm8k.jsonl"
    rows = [
        {"question": "How many clips?", "answer": solution + "#### 72"},
        {"question": "Kept as given", "answer": "#### 5", "cot": "a\nb"},  # a cot is the cot
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # before: no steps ("expected 'steps', 'cot' or 'solution'"), and eval's gold answer was
    # the whole solution, which no model answer equals
    gsm, kept = load_shortcuts(path)
    assert gsm["answer"] == "72"
    assert gsm["steps"] == ["Natalia sold 48/2 = 24 clips in May.", "In all 48+24 = 72."]
    assert kept["answer"] == "#### 5" and kept["steps"] == ["a", "b"]
    problem = load_problems(path)[0]
    assert TextDomain().check_answer(problem, "The answer is 72.")


def test_a_yes_no_answer_of_json_true_is_true_not_1(tmp_path):
    from steiner.domains import load_problems
    from steiner.domains.text import TextDomain

    # BoolQ's answer column is a boolean: read as 1 and 0, every "true" a model gave was wrong
    path = tmp_path / "boolq.jsonl"
    rows = [{"question": "Is 7 prime?", "answer": True}, {"question": "Is 8?", "answer": False}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    yes, no = load_problems(path)
    assert (yes["answer"], no["answer"]) == ("true", "false")
    assert TextDomain().check_answer(yes, "True") and not TextDomain().check_answer(yes, "1")
    assert TextDomain().check_answer(no, "false")


def test_a_json_number_answer_is_read_as_the_number_a_model_writes(tmp_path):
    from steiner.domains import load_problems
    from steiner.domains.text import TextDomain

    # json.loads reads 1e20 and 72.0 as floats: "1e+20" matched no written-out answer
    path = tmp_path / "numbers.jsonl"
    path.write_text(
        '{"question": "a", "answer": 1e20}\n{"question": "b", "answer": 72.0}\n'
        '{"question": "c", "answer": 0.25}\n{"question": "d", "answer": -3}\n'
    )
    big, whole, part, negative = load_problems(path)
    assert big["answer"] == "100000000000000000000"
    assert TextDomain().check_answer(big, "The answer is 100,000,000,000,000,000,000.")
    assert (whole["answer"], part["answer"], negative["answer"]) == ("72", "0.25", "-3")
    assert TextDomain().check_answer(whole, "72") and TextDomain().check_answer(part, "1/4")


def test_a_dataset_config_is_named_after_a_colon(tmp_path, monkeypatch):
    """GSM8K on the Hub has configs "main" and "socratic" and no default: it could not be
    read at all (a five-line datasets error). NAME:CONFIG names one, as load_dataset's
    second argument; a local directory with configs in its README is the same case offline."""
    from steiner.domains import load_problems
    from steiner.io import InputError

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    repo = tmp_path / "gsm8k"
    for config, answer in (("main", "72"), ("socratic", "10")):
        (repo / config).mkdir(parents=True)
        for split in ("train", "test"):
            row = {"question": f"{config} {split}?", "answer": f"So.\n#### {answer}"}
            (repo / config / f"{split}.jsonl").write_text(json.dumps(row) + "\n")
    configs = "".join(
        f"- config_name: {c}\n  data_files:\n"
        + "".join(f"  - split: {s}\n    path: {c}/{s}.jsonl\n" for s in ("train", "test"))
        for c in ("main", "socratic")
    )
    (repo / "README.md").write_text(f"---\nconfigs:\n{configs}---\n")
    [problem] = load_problems(f"{repo}:socratic")
    assert (problem["question"], problem["answer"]) == ("socratic test?", "10")
    with pytest.raises(InputError) as missing:
        load_problems(repo)
    assert str(missing.value).endswith(
        f"the dataset has configs main, socratic; name one as {repo}:main"
    )
    with pytest.raises(InputError, match="BuilderConfig 'nope' not found") as unknown:
        load_problems(f"{repo}:nope")
    assert "\n" not in str(unknown.value)
    colon = tmp_path / "a:b.jsonl"  # a file that exists is read as a file, colons and all
    colon.write_text(json.dumps({"question": "q", "answer": "1"}) + "\n")
    assert load_problems(colon)[0]["answer"] == "1"


def test_a_plot_that_fails_midway_leaves_the_last_one_whole(tmp_path, monkeypatch):
    """Plots are outputs like the rest: savefig to a path wrote in place, so a crash while
    drawing left a truncated PNG over the last run's."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from steiner.evaluate.scale import plot_scale

    rows = [
        {"mode": "cap", "budget": b, "mean_reasoning_tokens": 10.0 * b, "accuracy": b / 4}
        for b in (1, 2)
    ]
    png = tmp_path / "scale.png"
    plot_scale(rows, png)
    whole = png.read_bytes()
    assert whole.startswith(b"\x89PNG") and len(whole) > 1000
    real = FigureCanvasAgg.print_png

    @functools.wraps(real)  # savefig passes only the keywords the signature takes
    def dies_midway(self, target, *args, **kwargs):
        real(self, target, *args, **kwargs)  # the bytes are written; then the job dies
        raise KeyboardInterrupt

    monkeypatch.setattr(FigureCanvasAgg, "print_png", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        plot_scale(rows[:1], png)
    assert png.read_bytes() == whole and list(tmp_path.iterdir()) == [png]


def test_eval_and_scale_take_the_budgets_step_length_cap_and_extend_with(
    tiny_model_dir, problems, tmp_path
):
    from steiner.evaluate.accuracy import evaluate
    from steiner.io import InputError

    def run(command: str, out: Path, *flags: str) -> subprocess.CompletedProcess:
        args = ["--model", str(tiny_model_dir), "--problems", str(problems), "--out", str(out)]
        proc = steiner(command, *args, "--max-new-tokens", "120", "--limit", "2", *flags)
        assert proc.returncode == 0, proc.stderr
        return proc

    run("eval", tmp_path / "free", "--min-steps", "2", "--max-steps", "2")
    run(
        "eval",
        tmp_path / "capped",
        "--min-steps",
        "2",
        "--max-steps",
        "2",
        "--max-step-tokens",
        "3",
    )
    flags = ("--budgets", "2", "--max-step-tokens", "3", "--extend-with", "backtrack")
    run("scale", tmp_path / "scale", *flags)
    # and the decision below the minimum, which eval had fixed to the model's choice
    flags = ("--min-steps", "3", "--extend-with", "backtrack", "--max-step-tokens", "3")
    run("eval", tmp_path / "back", *flags)

    def tokens(out: Path) -> list[int]:
        records = [json.loads(line) for line in (out / "outputs.jsonl").read_text().splitlines()]
        return [r["outputs"][0]["reasoning_tokens"] for r in records]

    assert max(tokens(tmp_path / "capped")) <= 2 * (3 + 10) + 4 < max(tokens(tmp_path / "free"))
    assert max(tokens(tmp_path / "scale" / "cap-2")) <= 2 * (3 + 10) + 4
    for out, forced in ((tmp_path / "back", 2), (tmp_path / "scale" / "extend-2", 1)):
        for line in (out / "outputs.jsonl").read_text().splitlines():
            decisions = json.loads(line)["outputs"][0]["trace"]["decisions"]
            assert decisions[:forced] == ["backtrack"] * forced, decisions
    settings = json.loads((tmp_path / "capped" / "eval_settings.json").read_text())
    assert settings["max_step_tokens"] == 3
    # another cap would answer otherwise: not resumed from these outputs
    with pytest.raises(InputError, match="max_step_tokens: 3 there, 5 here"):
        kw = dict(limit=2, min_steps=2, max_steps=2, max_step_tokens=5)
        evaluate(_eval_config(tiny_model_dir, problems, tmp_path / "capped", **kw))
    for command in ("eval", "scale"):
        args = ["--model", str(tiny_model_dir), "--problems", str(problems), "--out"]
        proc = steiner(command, *args, str(tmp_path / "x"), "--extend-with", "forward")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert "--extend-with: expected model, proceed or backtrack, got 'forward'" in proc.stderr
        assert not (tmp_path / "x").exists()
    # an eval begun before the flag existed had no cap: it resumes without one
    old = tmp_path / "free" / "eval_settings.json"
    stored = json.loads(old.read_text())
    del stored["max_step_tokens"]
    old.write_text(json.dumps(stored))
    run("eval", tmp_path / "free", "--min-steps", "2", "--max-steps", "2")


def test_the_reports_example_trace_shows_model_text_as_written(tmp_path):
    """Model output and questions are data: Python-Markdown passes raw HTML through and reads
    * _ ` | as markup. Before, a step writing <script> put a script into report.html, <think>
    vanished from the page, and a*b*c printed as a, italic b, c."""
    from html.parser import HTMLParser

    from steiner.evaluate.report import build_report

    question = "Is 3 < 4, and is <b>this</b> bold?"
    step = {
        "name": "<script>alert(1)</script>",
        "thought": "a*b*c and x_1_2\n\n- not a list",
        "summary": "left|right `q`",
        "reflection": "[link](http://x) \\ done",
    }
    shown = {"steps": [step], "decisions": ["end"], "answer": "<think>7"}
    output = {"correct": True, "n_backtracks": 1, "trace": shown}
    root = tmp_path / "<i>run"  # the page's title and heading name the directory
    run = root / "eval" / "rl"
    run.mkdir(parents=True)
    (run / "outputs.jsonl").write_text(
        json.dumps({"id": "p1", "question": question, "outputs": [output]}) + "\n"
    )
    html = build_report(root)["html"].read_text()

    class Page(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tags, self.text = [], []

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)

        def handle_data(self, data):
            self.text.append(data)

    page = Page()
    page.feed(html)
    assert not {"script", "b", "think", "a", "ul", "i"} & set(page.tags), page.tags
    assert "<title>&lt;i&gt;run</title>" in html
    text = " ".join("".join(page.text).split())
    for written in ("Steiner report: <i>run", question, step["name"],
                    "a*b*c and x_1_2 - not a list", step["summary"], step["reflection"],
                    "<think>7"):  # fmt: skip
        assert written in text, (written, text)
    # an answer or id without a backtick stays inline code, as the demo's report shows it
    output["trace"]["answer"] = "33 42 <b>"
    (run / "outputs.jsonl").write_text(json.dumps({"id": "p`1", "outputs": [output]}) + "\n")
    report = build_report(root)
    assert "Problem p\\`1: " in report["markdown"].read_text()
    assert "Answer: <code>33 42 &lt;b&gt;</code> (correct)" in report["html"].read_text()


_MARKDOWN_TRAPS = list("ab 1.-+*_`[]()<>&;#!\\|~=:/\"'\n\té→") + [
    "&amp;", "&#38;", "http://x", "<b>", "-->", "<!--", "**", "__",
]  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.sampled_from(_MARKDOWN_TRAPS), min_size=1, max_size=14)
    .map("".join)
    .filter(str.strip),
    st.sampled_from([("1. **", "** — t"), ("Problem: ", ""), ("(*", "*) → `end`")]),
)
def test_model_text_renders_as_written_wherever_the_report_puts_it(text, around):
    """What the example trace writes, in each place it writes it (a list item's bold name, a
    line, an italic reflection), renders to the text itself with its whitespace collapsed.
    Found this way: an ``&amp;`` in it showed as ``&``."""
    import html
    import re

    import markdown

    from steiner.evaluate.report import _md_text

    before, after = around
    page = markdown.markdown(before + _md_text(text) + after, extensions=["tables"])
    shown = html.unescape(re.sub(r"<[^>]+>", "", page)).strip()
    ours = lambda part: re.sub(r"[*`]|^1\. ", "", part)  # noqa: E731 (our own markup, rendered)
    assert shown == (ours(before) + " ".join(text.split()) + ours(after)).strip()
