import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from steiner.demo import MODELS, DemoSettings, run_demo, take_both_cores


def tiny_settings() -> DemoSettings:
    return DemoSettings(
        train_problems=40,
        heldout_problems=8,
        cpt_documents=200,
        cpt_steps=3,
        sft_steps=6,
        verify_sft_steps=2,
        batch_size=8,
        rl_steps=2,
        rl_prompts_per_step=2,
        rl_group_size=2,
        max_new_tokens=48,
        scale_budgets=[1, 2],
        scale_limit=4,
        latency_requests=3,
    )


def write_sft_evals(root, shortcut: int, steiner: int) -> None:
    """A run directory with the two SFTs' held-out results (of 300), as the card reads them."""
    from steiner.evaluate.metrics import wilson_interval

    (root / ".stages").mkdir()
    (root / ".stages" / "problems.done").write_text(json.dumps({"train": 60000}))
    for model, correct in (("shortcut-sft", shortcut), ("steiner-sft", steiner)):
        (root / "eval" / model).mkdir(parents=True)
        metrics = {"pass@1": correct / 300, "pass@1_ci95": list(wilson_interval(correct, 300))}
        (root / "eval" / model / "metrics.json").write_text(json.dumps(metrics))


@pytest.mark.parametrize(
    ("domain", "problems", "shortcut", "flagged"),
    [
        ("graph", None, 1, True),  # 0.3 %: the seed-1 baseline that never learned the edges
        ("graph", None, 85, False),  # 28.3 %: its interval reaches the arm guess's 33.3 %
        ("graph", "mine.jsonl", 1, False),  # other graphs, other degrees: no floor known
        ("countdown", None, 1, False),
    ],
)
def test_report_card_says_when_the_shortcut_baseline_never_learned(
    tmp_path, domain, problems, shortcut, flagged
):
    from steiner.demo import arm_guess_rate, targets

    write_sft_evals(tmp_path, shortcut=shortcut, steiner=297)
    [sft] = targets(tmp_path, arm_guess_rate(DemoSettings(domain=domain, degree=3), problems))
    assert sft["measured"].startswith(f"{100 * (297 - shortcut) / 300:+.1f} (both trained")
    assert ("it did not learn the edges, so this gap overstates" in sft["measured"]) is flagged
    assert sft["met"] is True  # the note does not change the verdict


@pytest.mark.parametrize(("shortcut", "neither"), [(0, True), (85, False)])
def test_report_card_says_when_the_steiner_sft_never_learned(tmp_path, shortcut, neither):
    from steiner.demo import arm_guess_rate, targets

    # seed 2 on one CPU: the walks' look-up formed after the profile's steps (0.3 % held-out)
    write_sft_evals(tmp_path, shortcut=shortcut, steiner=1)
    [sft] = targets(tmp_path, arm_guess_rate(DemoSettings(degree=3), None))
    assert "the Steiner SFT is under the 33.3 %" in sft["measured"]
    assert "so this run compares nothing" in sft["measured"]
    assert ("nor did the shortcut SFT" in sft["measured"]) is neither
    assert "overstates" not in sft["measured"] and sft["met"] is False


def test_demo_runs_every_stage_writes_a_report_and_resumes(tmp_path):
    out = tmp_path / "demo"
    seen: list[tuple[str, bool]] = []
    # as the graph profiles run it: CPT's unseen tokens reset before the SFTs
    settings = replace(tiny_settings(), cpt_reset_unseen_tokens=True)
    summary = run_demo(
        out=out, settings=settings, on_stage=lambda n, r, skipped: seen.append((n, skipped))
    )
    names = [n for n, _ in seen]
    cpt = json.loads((out / "models/cpt/training_summary.json").read_text())
    assert cpt["tokens_reset"] > 0
    assert names[:4] == ["problems", "synth", "synth-verify", "init"]
    assert names[-1] == "serve-latency"
    # the Steiner SFT's last steps train on walks that verify and return to the answer
    verify_paths = [json.loads(x) for x in (out / "synth-verify" / "paths.jsonl").open()]
    assert any(p["n_backtracks"] > 0 and p["n_steps"] > 3 for p in verify_paths)
    # and only as many of them as the phase's batches take (2 steps x 8)
    assert len(verify_paths) == 16
    walks = json.loads((out / "models/steiner-sft-walks/training_summary.json").read_text())
    final = json.loads((out / "models/steiner-sft/training_summary.json").read_text())
    assert (walks["steps"], final["steps"]) == (4, 2)
    sft_stage = json.loads((out / ".stages" / "steiner-sft.done").read_text())
    assert sft_stage["steps"] == 6
    assert not any(skipped for _, skipped in seen)
    for model in MODELS:  # the three final models load with from_pretrained
        assert AutoModelForCausalLM.from_pretrained(out / "models" / model) is not None
        metrics = json.loads((out / "eval" / model / "metrics.json").read_text())
        assert metrics["n"] == 8
    # held-out problems never appear in training
    train = {line for line in (out / "data" / "train.jsonl").read_text().splitlines()}
    heldout = [json.loads(x) for x in (out / "data" / "heldout.jsonl").read_text().splitlines()]
    assert not {h["question"] for h in heldout} & {json.loads(t)["question"] for t in train}
    report = (out / "report.md").read_text()
    sections = ("## Demo", "## Synthesis", "## RL", "## Accuracy", "Inference-time scaling")
    for section in (*sections, "Latency"):
        assert section in report, section
    # the report's schemas accept every file the demo writes
    assert "## Files not read" not in report
    assert (out / "report.html").exists() and (out / "scale" / "scale.png").exists()
    assert [t["target"] for t in summary["targets"]][0].startswith("Steiner-SFT beats")
    assert "(both trained on the same 40 problems)" in summary["targets"][0]["measured"]
    # the report card checks the quick profile's time too (this tiny run is far under it)
    assert summary["targets"][-1]["target"] == "the quick profile takes <= 20 minutes"
    assert summary["targets"][-1]["met"] is True
    assert "the quick profile takes <= 20 minutes" in report

    # a crash after RL: the finished stages are skipped, the lost ones run again
    for stage in ("eval-steiner-rl", "scale", "serve-latency"):
        (out / ".stages" / f"{stage}.done").unlink()
    shutil.rmtree(out / "scale")
    seen.clear()
    run_demo(out=out, settings=settings, on_stage=lambda n, r, s: seen.append((n, s)))
    rerun = {n for n, skipped in seen if not skipped}
    assert rerun == {"eval-steiner-rl", "scale", "serve-latency"}
    assert (out / "scale" / "scale.json").exists()


def test_heldout_split_is_full_distinct_and_unseen_in_a_small_problem_space(tmp_path):
    """Countdown-3 with numbers up to 20 is a small space the training split mostly covers;
    the held-out split must still get its count, each problem once, none seen in training."""
    from steiner.demo import make_problems

    s = DemoSettings(domain="countdown", train_problems=6000, heldout_problems=150)
    result = make_problems(s, tmp_path, None)
    assert result == {"train": 6000, "heldout": 150, "heldout_seen_in_training": 0}
    rows = [json.loads(x) for x in (tmp_path / "data" / "heldout.jsonl").read_text().splitlines()]
    assert len({(tuple(sorted(r["nums"])), r["target"]) for r in rows}) == 150


def test_a_problems_file_of_graphs_is_asked_in_the_style_the_demos_models_read(tmp_path):
    """--problems takes any graph records (bare edges/start/goal, or `graph generate`'s
    default verbose style); the demo's models read the compact style of its training split
    only, so the file's graphs must reach eval asked that way."""
    from steiner.demo import make_problems
    from steiner.domains import graph

    verbose = list(graph.generate_problems(3, seed=7))
    source = tmp_path / "mine.jsonl"
    source.write_text(
        json.dumps({k: verbose[0][k] for k in ("id", "edges", "start", "goal")})
        + "\n"
        + "".join(json.dumps(p) + "\n" for p in verbose[1:])
    )
    s = DemoSettings(train_problems=20, heldout_problems=5, cpt_documents=10)
    make_problems(s, tmp_path / "run", str(source))
    train = json.loads((tmp_path / "run" / "data" / "train.jsonl").read_text().splitlines()[0])
    rows = (tmp_path / "run" / "data" / "heldout.jsonl").read_text().splitlines()
    heldout = [json.loads(x) for x in rows]
    assert [h["id"] for h in heldout] == [p["id"] for p in verbose]
    for h, p in zip(heldout, verbose, strict=True):
        assert (h["edges"], h["start"], h["goal"]) == (p["edges"], p["start"], p["goal"])
        assert h["meta"]["style"] == train["meta"]["style"] == "compact"
        assert h["meta"]["step"] == train["meta"]["step"]
        assert (
            ">" not in h["question"] and f"{p['edges'][0][0]} {p['edges'][0][1]}" in h["question"]
        )


def test_demo_problems_may_be_a_datasets_directory(tmp_path, monkeypatch):
    # load_problems reads one; the settings record's digest said "cannot open: Is a directory"
    from datasets import Dataset

    import steiner.demo as demo
    from steiner.domains import graph
    from steiner.io import InputError

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    rows = [{k: p[k] for k in ("edges", "start", "goal")} for p in graph.generate_problems(3)]
    Dataset.from_list(rows).save_to_disk(tmp_path / "mine")
    monkeypatch.setattr(demo, "run_synthesis", stop)  # the stage after the problems
    s = DemoSettings(train_problems=20, heldout_problems=5, cpt_documents=10)
    with pytest.raises(Stop):
        demo.run_stages(s, tmp_path / "run", "quick", str(tmp_path / "mine"), None)
    rows_read = (tmp_path / "run" / "data" / "heldout.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in rows_read] == ["graph-1", "graph-2", "graph-3"]
    record = json.loads((tmp_path / "run" / "demo_settings.json").read_text())
    assert len(record["problems_sha256"]) == 16
    # other graphs saved in its place: the run directory is refused, as for an edited file
    Dataset.from_list(rows[:-1]).save_to_disk(tmp_path / "mine")
    with pytest.raises(InputError, match="problems_sha256: "):
        demo.run_stages(s, tmp_path / "run", "quick", str(tmp_path / "mine"), None)


def test_cpt_walk_sizes_reach_the_cpt_text(tmp_path):
    from steiner.demo import make_problems

    def arm_counts(walk_sizes: str) -> set[int]:
        s = DemoSettings(train_problems=20, heldout_problems=5, cpt_documents=200)
        root = tmp_path / walk_sizes
        make_problems(replace(s, cpt_walk_sizes=walk_sizes), root, None)
        docs = (root / "data" / "cpt.txt").read_text().strip().split("\n\n")
        assert len(docs) == 200
        return {doc.count(",", doc.index("Arms from")) + 1 for doc in docs}

    assert arm_counts("fixed") == {3}  # the profiles' full-size walks
    assert arm_counts("mixed") == {1, 2, 3}


def test_a_run_directory_started_before_a_settings_field_existed_still_resumes():
    from dataclasses import asdict

    from steiner.demo import RETIRED_SETTINGS, DemoSettings, profile_settings
    from steiner.io import settings_differences as io_settings_differences

    def settings_differences(stored, wanted):  # as the demo's resume check compares them
        return io_settings_differences(stored, wanted, asdict(DemoSettings()), RETIRED_SETTINGS)

    wanted = {"profile": "quick", "problems": None, **asdict(profile_settings("quick", "graph"))}
    older = {k: v for k, v in wanted.items() if k != "cpt_walk_sizes"}  # before 4293f55
    assert settings_differences(older, wanted) == ""
    assert settings_differences(wanted, wanted) == ""
    # the missing field meant its default, so a command that changes it may not resume there
    mixed = wanted | {"cpt_walk_sizes": "mixed"}
    assert settings_differences(older, mixed) == "cpt_walk_sizes: 'fixed' there, 'mixed' here"
    # a graph run from before the CPT's token reset trained without it: another run
    before_reset = {k: v for k, v in wanted.items() if k != "cpt_reset_unseen_tokens"}
    assert (
        settings_differences(before_reset, wanted)
        == "cpt_reset_unseen_tokens: False there, True here"
    )
    # a run from before the Steiner SFT stopped waiting for the baseline at a fixed share of
    # its steps (solo_share) resumes: the weights never depended on that step
    assert settings_differences(wanted | {"solo_share": 0.6}, wanted) == ""
    # a real difference names every setting that differs; an unknown key counts too
    changed = settings_differences(wanted | {"seed": 1, "unknown": 3}, wanted)
    assert changed == "seed: 1 there, 0 here; unknown: 3 there, '(not set)' here"


def test_full_profile_is_larger_than_quick_in_both_domains():
    from steiner.demo import profile_settings

    sizes = ("heldout_problems", "cpt_documents", "cpt_steps", "sft_steps", "rl_steps")
    for domain in ("graph", "countdown"):
        quick, full = profile_settings("quick", domain), profile_settings("full", domain)
        assert full.domain == quick.domain == domain
        assert all(getattr(full, k) >= getattr(quick, k) for k in sizes)
        assert full.heldout_problems > quick.heldout_problems and full.rl_steps > quick.rl_steps
        assert full.verify_sft_steps < full.sft_steps  # the verify phase stays inside the SFT
    # countdown trains at the learning rate its copy formed at (graph's), not the old 3e-3
    assert profile_settings("quick", "countdown").learning_rate == DemoSettings().learning_rate


def test_steiner_sft_takes_both_cores_once_the_baseline_has_ended_and_never_waits():
    # a stand-in baseline that runs until its stdin closes
    baseline = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        callback = take_both_cores(baseline, threads=2)
        start = time.perf_counter()
        for step in range(5):  # while the baseline runs: one thread, and no waiting
            callback.on_step_begin(None, SimpleNamespace(global_step=step), None)
            assert torch.get_num_threads() == 1 and baseline.poll() is None
        assert time.perf_counter() - start < 0.5
        baseline.stdin.close()
        baseline.wait(timeout=30)
        callback.on_step_begin(None, SimpleNamespace(global_step=5), None)
        assert torch.get_num_threads() == 2  # the first step after it ended
    finally:
        baseline.kill()
        torch.set_num_threads(threads)


def test_training_gives_the_same_weights_at_any_thread_count(tiny_tokenizer):
    """What lets the Steiner SFT take both cores whenever the baseline ends: the switch step
    varies with the machine's speed, the weights must not (same command, same files)."""
    from steiner.train.model import build_model

    vocab = len(tiny_tokenizer)
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):  # the demo's walks: batch 32, rows of ~90-140 tokens, padded
        ids = torch.randint(1, vocab, (32, 140), generator=generator)
        lengths = torch.randint(90, 141, (32, 1), generator=generator)
        mask = (torch.arange(140) < lengths).long()
        batches.append((ids * mask, mask))

    def train(thread_counts: list[int]) -> torch.Tensor:
        model = build_model("micro", tiny_tokenizer, max_positions=256, seed=0)  # the demo's
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
        for n, (ids, mask) in zip(thread_counts, batches, strict=True):
            torch.set_num_threads(n)
            labels = ids.masked_fill(mask == 0, -100)
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    threads = torch.get_num_threads()
    try:
        one = train([1, 1, 1, 1])
        assert torch.equal(one, train([2, 2, 2, 2]))
        assert torch.equal(one, train([1, 1, 2, 2]))  # a switch part-way
    finally:
        torch.set_num_threads(threads)


def test_a_resumed_stage_counts_the_time_of_its_interrupted_attempts(tmp_path, monkeypatch):
    from steiner import demo
    from steiner.evaluate.report import build_report

    monkeypatch.setattr(demo, "CLOCK_SECONDS", 0.05)
    stage = demo.Stage(tmp_path, "synth")

    def crash_after_a_while() -> dict:
        time.sleep(0.3)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        stage.run(crash_after_a_while)
    assert stage.done() is None
    earlier = stage.earlier_seconds()
    assert earlier >= 0.3  # the interrupted attempt's time is on the clock
    record = stage.run(lambda: time.sleep(0.1) or {"paths": 3})
    assert record["paths"] == 3 and 0.1 <= record["seconds"] < earlier
    assert record["seconds_all_attempts"] == pytest.approx(earlier + record["seconds"], abs=0.1)
    assert demo.stage_seconds(record) == record["seconds_all_attempts"]
    assert not stage.clock.exists() and stage.done() == record
    # a stage that ran once reports its one time
    assert "seconds_all_attempts" not in demo.Stage(tmp_path, "init").run(lambda: {})
    # the report card's stage table says so
    summary = {"profile": "quick", "domain": "graph", "targets": [], "total_seconds": 1.0}
    (tmp_path / "demo.json").write_text(json.dumps(summary | {"stages": [record]}))
    build_report(tmp_path)
    every, last = record["seconds_all_attempts"], record["seconds"]
    assert f"| synth | {every} (the last attempt: {last}) |" in (tmp_path / "report.md").read_text()


def at_the_sfts_on_two_cores(root, monkeypatch, start_baseline, run_training) -> None:
    """A demo directory whose stages before the SFTs finished, on a two-core machine (where
    the baseline runs as a process beside the Steiner SFT), with both SFTs stood in for."""
    from steiner import demo

    for name in ("problems", "synth", "synth-verify", "init", "cpt"):
        marker = demo.Stage(root, name).marker
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"stage": name, "seconds": 0.0}))
    monkeypatch.setattr(demo, "start_baseline", start_baseline)
    monkeypatch.setattr(demo, "run_training", run_training)
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_a_failed_steiner_sft_stops_the_baseline_process_beside_it(tmp_path, monkeypatch):
    started = []

    def start_baseline(s, root):  # a stand-in baseline that would train for a minute
        started.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))
        return started[0]

    def run_training(s, root, which, *callbacks):
        raise RuntimeError("out of memory")

    at_the_sfts_on_two_cores(tmp_path, monkeypatch, start_baseline, run_training)
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            run_demo(out=tmp_path, settings=tiny_settings())
        assert len(started) == 1
        # not left to train on alone, where a re-run would start a second one beside it
        assert started[0].poll() == -signal.SIGTERM
    finally:
        for process in started:
            process.kill()


def test_a_second_sigterm_while_the_baseline_winds_down_kills_it_instead_of_leaving_it():
    from steiner.cli import Terminated, raise_terminated
    from steiner.demo import stop_baseline

    # a baseline slow to unwind: it ignores the first SIGTERM for longer than the test waits
    slow = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(60)"
    )
    process = subprocess.Popen([sys.executable, "-c", slow], stdout=subprocess.PIPE, text=True)
    # its handler is installed: a fixed sleep let a slow start die of the first SIGTERM
    assert process.stdout.readline() == "ready\n"
    before = signal.signal(signal.SIGTERM, raise_terminated)  # as the CLI's main() does
    again = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    try:
        again.start()
        started = time.monotonic()
        with pytest.raises(Terminated):
            stop_baseline(process, grace_seconds=30)
        assert time.monotonic() - started < 10
        assert process.poll() == -signal.SIGKILL  # not left to train on alone
    finally:
        again.cancel()
        signal.signal(signal.SIGTERM, before)
        process.kill()
        process.wait()


def test_a_failed_baseline_process_is_one_line_with_the_last_line_of_its_log(tmp_path, monkeypatch):
    from steiner import demo
    from steiner.io import InputError

    def start_baseline(s, root):  # a stand-in baseline that stops on an error, as the CLI does
        log = root / "models" / "shortcut-sft.log"
        log.parent.mkdir(exist_ok=True)
        log.write_text("Loading weights...\nsteiner: error: runs/x: another run is writing here\n")
        return subprocess.Popen([sys.executable, "-c", "raise SystemExit(2)"])

    at_the_sfts_on_two_cores(tmp_path, monkeypatch, start_baseline, lambda *a: {"steps": 6})
    with pytest.raises(InputError) as err:
        run_demo(out=tmp_path, settings=tiny_settings())
    assert str(err.value) == (
        f"{tmp_path / 'models' / 'shortcut-sft.log'}: the shortcut-baseline SFT failed (exit 2): "
        "steiner: error: runs/x: another run is writing here"
    )
    assert demo.Stage(tmp_path, "steiner-sft").done() is not None  # what finished is kept


def test_the_scaling_stage_samples_with_the_demos_seed(tmp_path, monkeypatch):
    import steiner.evaluate.scale as scale
    from steiner.demo import run_scaling

    given = []
    monkeypatch.setattr(
        scale, "run_scale", lambda base, budgets, modes: given.append(base) or {"metrics": {}}
    )
    run_scaling(replace(tiny_settings(), seed=3), tmp_path)
    assert [base.seed for base in given] == [3]
