import json
import os
import signal
import subprocess
import sys
import time

import pytest

from steiner.dag import read_dags
from steiner.domains import countdown as cd
from steiner.domains import load_problems, load_shortcuts
from steiner.format import Decision, parse
from steiner.io import InputError
from steiner.synth.run import SynthConfig, run_synth


def steiner(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "steiner.cli", *args], capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def synth_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("synth")
    shortcut = tmp / "shortcut.jsonl"
    assert (
        steiner(
            "countdown",
            "generate",
            "--count",
            "150",
            "--seed",
            "5",
            "--shortcut",
            "--out",
            str(shortcut),
        ).returncode
        == 0
    )
    stats = run_synth(SynthConfig(shortcut=str(shortcut), out=str(tmp / "out"), seed=3))
    return tmp, stats


def test_paths_are_valid_walks_with_correct_answers(synth_run):
    tmp, stats = synth_run
    problems = {p["id"]: p for p in load_shortcuts(tmp / "shortcut.jsonl")}
    dags = {d.problem_id: d for d in read_dags(tmp / "out" / "dags.jsonl")}
    assert stats["dags"] == 150 and stats["paths"] >= 600
    paths = [json.loads(line) for line in (tmp / "out" / "paths.jsonl").read_text().splitlines()]
    assert len(paths) == stats["paths"]
    with_backtrack = 0
    for rec in paths:
        dag, problem = dags[rec["problem_id"]], problems[rec["problem_id"]]
        edges = set(dag.edges)
        ids = rec["node_ids"]
        trace, errors = parse(rec["messages"][1]["content"], strict=True)
        assert errors == [] and trace.n_steps == rec["n_steps"]
        returns = 0
        for i in range(1, len(ids)):
            if (ids[i - 1], ids[i]) in edges:
                continue
            # not an edge: a backtrack, returning to a node already on the path
            assert ids[i] in ids[: i - 1], (rec["problem_id"], ids)
            assert dag.nodes[ids[i - 1]].d_e is None  # it left a dead end
            returns += 1
        assert returns == rec["n_backtracks"] == trace.n_backtracks
        assert dag.nodes[ids[-1]].status == "answer"
        assert trace.decisions[-1] is Decision.END
        assert cd.check_answer(problem["nums"], problem["target"], trace.answer), trace.answer
        with_backtrack += returns > 0
        # the step after a backtrack names the state it returns to
        for i, d in enumerate(trace.decisions[:-1]):
            if d is Decision.BACKTRACK:
                assert trace.steps[i + 1].name.startswith("back to ")
    assert with_backtrack > len(paths) // 2
    assert len({r["messages"][1]["content"] for r in paths}) == len(paths)  # deduplicated
    assert steiner("format", "check", str(tmp / "out" / "paths.jsonl")).returncode == 0


def test_same_seed_same_files_and_workers_do_not_matter(synth_run, tmp_path):
    tmp, _ = synth_run
    run_synth(
        SynthConfig(
            shortcut=str(tmp / "shortcut.jsonl"),
            out=str(tmp_path),
            seed=3,
            workers=2,
            chunk_size=16,
        )
    )
    for name in ("dags.jsonl", "paths.jsonl", "stats.json"):
        assert (tmp_path / name).read_bytes() == (tmp / "out" / name).read_bytes(), name


def test_sigkill_then_rerun_equals_uninterrupted(tmp_path):
    shortcut = tmp_path / "shortcut.jsonl"
    assert (
        steiner(
            "countdown",
            "generate",
            "--count",
            "3000",
            "--seed",
            "2",
            "--shortcut",
            "--out",
            str(shortcut),
        ).returncode
        == 0
    )
    args = [
        sys.executable,
        "-m",
        "steiner.cli",
        "synth",
        "--shortcut",
        str(shortcut),
        "--chunk-size",
        "25",
        "--seed",
        "1",
    ]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [*args, "--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    journal = killed / ".journal.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline:
        if journal.exists() and len(journal.read_text().splitlines()) >= 4:
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = json.loads(journal.read_text().splitlines()[-1])["done"]
    assert 0 < done < 3000, "the run must be killed mid-way"
    assert not (killed / "stats.json").exists()
    assert subprocess.run([*args, "--out", str(killed)], capture_output=True).returncode == 0
    clean = tmp_path / "clean"
    assert subprocess.run([*args, "--out", str(clean)], capture_output=True).returncode == 0
    for name in ("dags.jsonl", "paths.jsonl", "stats.json"):
        assert (killed / name).read_bytes() == (clean / name).read_bytes(), name
    # a third run has nothing left to do and changes nothing
    assert subprocess.run([*args, "--out", str(clean)], capture_output=True).returncode == 0
    assert (clean / "paths.jsonl").read_bytes() == (killed / "paths.jsonl").read_bytes()


def test_text_domain_records_split_cot(tmp_path):
    path = tmp_path / "gsm.jsonl"
    path.write_text(
        json.dumps({"question": "2+3*4?", "cot": "3*4=12\n2+12=14", "answer": "14"}) + "\n"
    )
    [rec] = load_shortcuts(path)
    assert (
        rec["domain"] == "text" and rec["steps"] == ["3*4=12", "2+12=14"] and rec["id"] == "text-1"
    )


def test_records_without_ids_are_named_by_their_place_in_the_file(tmp_path):
    # Hugging Face's countdown sets (e.g. Countdown-Tasks-3to4) are Parquet with only `nums`
    # and `target`; the demo issue names graph files of `edges`/`start`/`goal`. Both were
    # "field 'id': Field required"
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"target": [29, 6], "nums": [[3, 7, 25], [1, 2, 3]]})
    pq.write_table(table, tmp_path / "countdown.parquet")
    problems = load_problems(tmp_path / "countdown.parquet")
    assert [p["id"] for p in problems] == ["countdown-1", "countdown-2"]
    assert problems[1]["domain"] == "countdown" and problems[1]["target"] == 6

    graphs = tmp_path / "graphs.jsonl"
    bare = {"edges": [[1, 2], [2, 3], [1, 4]], "start": 1}
    graphs.write_text(
        json.dumps({**bare, "goal": 3}) + "\n" + json.dumps({**bare, "goal": 4}) + "\n"
    )
    out = tmp_path / "synth"
    run_synth(SynthConfig(shortcut=str(graphs), out=str(out), seed=0))
    dags = [json.loads(line) for line in (out / "dags.jsonl").read_text().splitlines()]
    assert [d["problem_id"] for d in dags] == ["graph-1", "graph-2"]
    # an own id that is another record's derived one is one error line, not a silent merge
    graphs.write_text(
        json.dumps({**bare, "goal": 3, "id": "graph-2"})
        + "\n"
        + json.dumps({**bare, "goal": 4})
        + "\n"
    )
    with pytest.raises(InputError, match=r"graphs\.jsonl:2: duplicate id 'graph-2'"):
        load_problems(graphs)


def test_a_teacher_that_cannot_synthesize_is_one_line_before_anything_is_written(tmp_path):
    # text records under the oracle gave each DAG the shortcut alone (it proposes no step
    # without a solver), and an unknown teacher left empty output files behind
    path = tmp_path / "gsm.jsonl"
    path.write_text(
        json.dumps({"question": "2+3*4?", "cot": "3*4=12\n2+12=14", "answer": "14"}) + "\n"
    )
    out = tmp_path / "synth"
    with pytest.raises(InputError, match="text records have none; expected --teacher openai"):
        run_synth(SynthConfig(shortcut=str(path), out=str(out)))
    with pytest.raises(InputError, match="expected oracle or openai, got 'llm'"):
        run_synth(SynthConfig(shortcut=str(path), out=str(out), teacher="llm"))
    assert not out.exists()


def test_a_text_problem_without_steps_is_evaluated_but_not_synthesized(tmp_path, tiny_model_dir):
    """A test set of questions and answers (no solutions) is what eval takes; synthesis
    needs the steps to truncate."""
    from steiner.domains import load_problems

    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"id": "q1", "question": "2+3*4?", "answer": 14}) + "\n")
    [problem] = load_problems(path)
    assert problem["domain"] == "text" and problem["answer"] == "14" and "steps" not in problem
    with pytest.raises(InputError, match="expected 'steps', 'cot' or 'solution'"):
        load_shortcuts(path)
    out = tmp_path / "eval"
    proc = steiner(
        "eval",
        "--model",
        str(tiny_model_dir),
        "--problems",
        str(path),
        "--out",
        str(out),
        "--max-new-tokens",
        "8",
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "metrics.json").read_text())["n"] == 1


def test_bad_shortcut_file_is_one_line_exit_2(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "a", "nums": [1, 1], "target": 97}\n')
    proc = steiner("synth", "--shortcut", str(path), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{path}:1: [1, 1] cannot reach 97" in proc.stderr
    proc = steiner(
        "synth", "--shortcut", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


def test_limit_synthesizes_the_first_problems_only(synth_run, tmp_path):
    tmp, _ = synth_run
    out = tmp_path / "first40"
    args = ["synth", "--shortcut", str(tmp / "shortcut.jsonl"), "--out", str(out)]
    result = steiner(*args, "--seed", "3", "--limit", "40")
    assert result.returncode == 0, result.stderr
    # the same DAGs as the full run's first 40: a problem's randomness does not depend on
    # how many come after it
    full = (tmp / "out" / "dags.jsonl").read_text().splitlines()
    assert (out / "dags.jsonl").read_text().splitlines() == full[:40]
    # a limit is a setting of the run: another one cannot continue it
    assert steiner(*args, "--seed", "3", "--limit", "60").returncode != 0


def test_a_run_that_keeps_no_path_says_why(synth_run, tmp_path):
    # before: a summary with "paths 0" and exit 0, and "no records" only from `train sft`
    tmp, _ = synth_run
    args = ["synth", "--shortcut", str(tmp / "shortcut.jsonl"), "--out", str(tmp_path / "o")]
    result = steiner(*args, "--limit", "5", "--max-reasoning-tokens", "1")
    assert result.returncode == 0, result.stderr
    said = " ".join(result.stderr.split())
    assert "warning: no path was kept from 5 DAGs (" in said
    assert " over --max-reasoning-tokens)" in said
    kept = steiner(*args[:-1], str(tmp_path / "kept"), "--limit", "5")
    assert kept.returncode == 0 and "warning" not in kept.stderr


def half_finished_run(synth_run, out) -> list[dict]:
    """A run as it stands after its first chunk of 64 problems: a finished run whose journal is
    cut back to its first two lines (a re-run truncates the files to what they record)."""
    tmp, _ = synth_run
    # started from Python and continued from the CLI below: their defaults must agree
    run_synth(SynthConfig(shortcut=str(tmp / "shortcut.jsonl"), out=str(out), seed=3))
    journal = out / ".journal.jsonl"
    entries = [json.loads(line) for line in journal.read_text().splitlines()[:2]]
    assert entries[1]["done"] == 64 and (out / "stats.json").exists()
    (out / "stats.json").unlink()
    return entries


def rewrite_journal(out, entries: list[dict]) -> None:
    (out / ".journal.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))


def test_a_run_started_before_a_setting_existed_resumes_and_another_seed_is_named(
    synth_run, tmp_path
):
    tmp, _ = synth_run
    entries = half_finished_run(synth_run, tmp_path)
    # as an older Steiner wrote it: without a setting added since, so another hash too
    del entries[0]["settings"]["paths.max_returns"]
    entries[0]["fingerprint"] = "0123456789abcdef"
    rewrite_journal(tmp_path, entries)
    args = ["synth", "--shortcut", str(tmp / "shortcut.jsonl"), "--out", str(tmp_path)]
    assert steiner(*args, "--seed", "3").returncode == 0
    for name in ("dags.jsonl", "paths.jsonl", "stats.json"):
        assert (tmp_path / name).read_bytes() == (tmp / "out" / name).read_bytes(), name
    # the missing setting meant its default: another value of it may not continue the run
    proc = steiner(*args, "--seed", "3", "--max-returns", "2")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "(paths.max_returns: 3 there, 2 here)" in proc.stderr
    proc = steiner(*args, "--seed", "4")
    assert proc.returncode == 2 and "(seed: 3 there, 4 here)" in proc.stderr


def test_a_journal_without_settings_resumes_by_its_hash_alone(synth_run, tmp_path):
    tmp, _ = synth_run
    entries = half_finished_run(synth_run, tmp_path)
    del entries[0]["settings"]  # as Steiner wrote journals before they held the settings
    rewrite_journal(tmp_path, entries)
    args = ["synth", "--shortcut", str(tmp / "shortcut.jsonl"), "--out", str(tmp_path)]
    proc = steiner(*args, "--seed", "4")
    assert proc.returncode == 2 and "other settings" in proc.stderr
    assert steiner(*args, "--seed", "3").returncode == 0
    assert (tmp_path / "paths.jsonl").read_bytes() == (tmp / "out" / "paths.jsonl").read_bytes()


def test_a_moved_problem_file_resumes_and_an_edited_one_is_refused(synth_run, tmp_path):
    tmp, _ = synth_run
    lines = (tmp / "shortcut.jsonl").read_text().splitlines(keepends=True)
    moved = tmp_path / "elsewhere" / "problems.jsonl"
    moved.parent.mkdir()
    moved.write_text("".join(lines))
    out = tmp_path / "moved"
    rewrite_journal(out, half_finished_run(synth_run, out))
    assert (
        steiner("synth", "--shortcut", str(moved), "--out", str(out), "--seed", "3").returncode == 0
    )
    for name in ("dags.jsonl", "paths.jsonl", "stats.json"):
        assert (out / name).read_bytes() == (tmp / "out" / name).read_bytes(), name
    # a problem among those done was edited: the DAGs written for it would no longer match
    edited = tmp_path / "edited.jsonl"
    edited.write_text("".join([lines[1], lines[0], *lines[2:]]))
    out = tmp_path / "edited"
    rewrite_journal(out, half_finished_run(synth_run, out))
    proc = steiner("synth", "--shortcut", str(edited), "--out", str(out), "--seed", "3")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert ".journal.jsonl:2:" in proc.stderr and "the file changed since" in proc.stderr
    # a journal from before the check names no digest: its path is compared, as it was
    out = tmp_path / "old"
    entries = half_finished_run(synth_run, out)
    for entry in entries:
        del entry["problems_sha256"]
    rewrite_journal(out, entries)
    proc = steiner("synth", "--shortcut", str(moved), "--out", str(out), "--seed", "3")
    assert proc.returncode == 2 and "shortcut: " in proc.stderr


def test_a_tokenizer_that_cannot_load_is_one_line_before_any_file(tmp_path):
    shortcut = tmp_path / "sc.jsonl"
    assert (
        steiner(
            "graph", "generate", "--count", "2", "--shortcut", "--out", str(shortcut)
        ).returncode
        == 0
    )
    missing, out = tmp_path / "no-tokenizer", tmp_path / "synth"
    proc = steiner(
        "synth", "--shortcut", str(shortcut), "--out", str(out), "--tokenizer", str(missing)
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"steiner: error: --tokenizer: cannot load '{missing}'" in proc.stderr
    assert not out.exists()
    # a relative name that is no directory is looked up in the Hub cache only: no request,
    # so no retry lines from huggingface_hub above the one error line
    proc = steiner("synth", "--shortcut", str(shortcut), "--out", str(out), "--tokenizer", "tok-x")
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "steiner: error: --tokenizer: cannot load 'tok-x'" in proc.stderr


def test_a_second_run_into_a_held_out_is_one_line_and_shards_run_side_by_side(
    synth_run, tmp_path, lock_held_elsewhere
):
    tmp, _ = synth_run
    out = tmp_path / "out"
    lock_held_elsewhere(out / ".journal.lock")  # a run of this command is still going
    proc = steiner("synth", "--shortcut", str(tmp / "shortcut.jsonl"), "--out", str(out))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()  # one line: no blank line from a progress bar either
    assert lines == [
        f"steiner: error: {out}: another run is writing here (--out); wait for it to end "
        "or use another --out"
    ]
    assert os.listdir(out) == [".journal.lock"]  # it wrote nothing beside the other run
    # another shard of the same --out holds its own lock
    stats = run_synth(
        SynthConfig(shortcut=str(tmp / "shortcut.jsonl"), out=str(out), shard="1/2", limit=6)
    )
    assert stats["dags"] == 3 and (out / "dags-00001-of-00002.jsonl").exists()


def _raise_input_error(line: int) -> None:
    raise InputError("problems.jsonl", line, "expected a problem")


def test_an_input_error_in_a_pool_worker_reaches_the_parent_whole():
    import multiprocessing as mp

    # the worker pickles the exception for the parent; rebuilt from its formatted text it
    # failed with a TypeError in the pool's result thread, and the pool waited forever
    with mp.get_context("fork").Pool(1) as pool, pytest.raises(InputError) as caught:
        pool.map_async(_raise_input_error, [7]).get(timeout=60)
    assert (caught.value.path, caught.value.line) == ("problems.jsonl", 7)
    assert str(caught.value) == "problems.jsonl:7: expected a problem"
