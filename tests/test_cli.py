import json
import os
import re
import signal
import stat
import subprocess
import sys
import time

import pytest

from steiner.domains import countdown as cd
from steiner.format import Decision, Step, Trace, render


def steiner(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "steiner.cli", *args], capture_output=True, text=True, cwd=cwd
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()  # one line: no blank line from a progress bar either
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0]


def test_generate_is_byte_for_byte_reproducible(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for path in (a, b):
        proc = steiner(
            "countdown",
            "generate",
            "--count",
            "400",
            "--seed",
            "1",
            "--out",
            str(path),
            "--shortcut",
        )
        assert proc.returncode == 0, proc.stderr
    assert a.read_bytes() == b.read_bytes()
    records = [json.loads(line) for line in a.read_text().splitlines()]
    assert len(records) == 400
    for r in records:
        assert cd.is_solvable(r["nums"], r["target"])
        assert cd.check_answer(r["nums"], r["target"], "\n".join(r["steps"]))


def test_solve_prints_solutions():
    proc = steiner("countdown", "solve", "3", "7", "25", "50", "--target", "79", "--limit", "0")
    assert proc.returncode == 0
    assert "18 distinct solution(s)" in proc.stdout
    assert "7-3=4, 25+4=29, 50+29=79" in proc.stdout
    assert steiner("countdown", "solve", "3", "7", "25", "50", "--target", "81").returncode == 1
    # more numbers than the exact solver takes: one line at once, not minutes and gigabytes
    proc = steiner("countdown", "solve", *map(str, range(1, 10)), "--target", "9999")
    assert proc.returncode == 2 and "expected 1 to 7 non-negative numbers" in proc.stderr
    assert "Traceback" not in proc.stderr
    # a negative number was taken for an unknown option ("No such option: -2")
    proc = steiner("countdown", "solve", "1", "-2", "--target", "3")
    assert proc.returncode == 2 and "expected 1 to 7 non-negative numbers" in proc.stderr
    # --limit -1 printed all but the last solution
    proc = steiner("countdown", "solve", "3", "7", "--target", "10", "--limit", "-1")
    assert proc.returncode == 2 and "'--limit': Input should be greater than or equal to 0" in (
        proc.stderr
    )


def write_paths(path, contents: list[str]) -> None:
    rows = [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": c}]}
        for c in contents
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


GOOD = render(
    Trace(
        [Step("a", "b", "c", "d"), Step("e", "f", "g", "h")],
        [Decision.BACKTRACK, Decision.END],
        "42",
    )
)


def test_format_check_counts_and_passes(tmp_path):
    path = tmp_path / "paths.jsonl"
    write_paths(path, [GOOD, GOOD])
    proc = steiner("format", "check", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "│       2 │      2 │     4 │          2 │      0 │" in proc.stderr


def test_format_check_reads_a_datasets_directory(tmp_path):
    # before: "cannot open: Is a directory"
    from datasets import Dataset

    path = tmp_path / "paths.jsonl"
    write_paths(path, [GOOD, GOOD.replace("42", "")])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    Dataset.from_list(rows).save_to_disk(tmp_path / "paths")
    proc = steiner("format", "check", str(tmp_path / "paths"))
    assert proc.returncode == 1 and f"{tmp_path / 'paths'}:2: empty final answer" in proc.stdout


def test_format_check_lists_errors_with_line_numbers(tmp_path):
    path = tmp_path / "paths.jsonl"
    write_paths(path, [GOOD, GOOD.replace("<|reasoning_step_end|>", "", 1), GOOD.replace("42", "")])
    proc = steiner("format", "check", str(path))
    assert proc.returncode == 1
    assert f"{path}:2: offset" in proc.stdout
    assert f"{path}:3: empty final answer" in proc.stdout
    assert f"{path}:1:" not in proc.stdout
    # --max-errors -1 listed all but the last error, then "... and 3 more"
    proc = steiner("format", "check", str(path), "--max-errors", "0")
    assert proc.returncode == 1 and proc.stdout.splitlines()[0] == "... and 2 more"
    assert_one_line_error(steiner("format", "check", str(path), "--max-errors", "-1"))


def test_format_check_of_nothing_is_no_pass(tmp_path):
    # before: a table of zeros, exit 0
    empty, no_answer = tmp_path / "empty.jsonl", tmp_path / "user-only.jsonl"
    empty.write_text("")
    no_answer.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    for path, found in ((empty, "no records"), (no_answer, "1 record(s) without one")):
        proc = steiner("format", "check", str(path))
        assert_one_line_error(proc, f"{path}: no assistant message to check ({found})")


@pytest.mark.parametrize(
    "content, needle",
    [
        (b'{"messages": []}\n{"messages": [{"role": "user"}]}\n', ":2: field 'messages.0.content'"),
        (b'{"messages": []}\n{"messages": [', ":2: truncated JSON"),
        (b'{"messages": []}\n\xff\xfe\n', ":2: invalid UTF-8"),
        (b"[1, 2]\n", ":1: expected a JSON object"),
        (b'{"text": "no messages"}\n', ":1: field 'messages': Field required"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, content, needle):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    assert_one_line_error(steiner("format", "check", str(path)), str(path), needle)


def test_unknown_flag_and_bad_values_are_one_line_exit_2(tmp_path):
    assert_one_line_error(steiner("countdown", "generate", "--out", "x", "--bogus"), "--bogus")
    assert_one_line_error(
        steiner("countdown", "generate", "--out", "x", "--count", "many"), "count"
    )
    assert_one_line_error(
        steiner("countdown", "generate", "--out", "x", "--min-target", "9", "--max-target", "1"),
        "range",
    )
    assert_one_line_error(
        steiner("format", "check", str(tmp_path / "missing.jsonl")), "missing.jsonl"
    )


def test_a_missing_model_directory_is_one_line_exit_2(tmp_path):
    # before: eval and scale handed the path to from_pretrained, which read it as a hub id
    missing = str(tmp_path / "no-model")
    problems = str(tmp_path / "p.jsonl")
    for args in (
        ("eval", "--model", missing, "--problems", problems, "--out", str(tmp_path / "e")),
        ("scale", "--model", missing, "--problems", problems, "--out", str(tmp_path / "s")),
        ("generate", "--model", missing, "a question"),
        ("serve", "--model", missing),
    ):
        assert_one_line_error(steiner(*args), "--model", "no-model", "does not exist")
    a_file = tmp_path / "p.jsonl"
    a_file.write_text("")
    assert_one_line_error(
        steiner("eval", "--model", str(a_file), "--problems", problems, "--out", "e"), "is a file"
    )


def test_serve_on_a_port_in_use_is_one_line_before_the_model_loads(tiny_model_dir):
    import socket

    # before: the model loaded, then uvicorn logged "ERROR: [Errno 98] ..." and exited 3
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = str(held.getsockname()[1])
        proc = steiner("serve", "--model", str(tiny_model_dir), "--port", port, "--max-batch", "1")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [f"steiner: error: 127.0.0.1:{port}: Address already in use"]


def test_an_output_directory_that_is_a_file_is_one_line(tmp_path):
    # before: "steiner: error: FILE: File exists" (the demo's after its banner)
    problems, a_file = tmp_path / "g.jsonl", tmp_path / "a_file"
    assert steiner("graph", "generate", "--count", "2", "--shortcut", "--out", str(problems))
    a_file.write_text("keep me\n")
    expected = f"{a_file}: a file, not a directory; expected a directory (--out)"
    for out in (a_file, a_file / "under" / "it"):
        proc = steiner("synth", "--shortcut", str(problems), "--out", str(out))
        assert_one_line_error(proc, expected)
    assert_one_line_error(steiner("demo", "--out", str(a_file)), expected)
    # before the requests (here to nothing: the error was theirs), not after the probe
    no_server = ["--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--n", "3"]
    assert_one_line_error(steiner("probe-latency", *no_server, "--out", str(a_file)), expected)
    # an endpoint that is no URL: was "nothttp: request failed: Connection error."
    no_url = ["--base-url", "nothttp", *no_server[2:], "--out", str(tmp_path / "lat")]
    assert_one_line_error(steiner("probe-latency", *no_url), "--base-url: expected an http(s) URL")
    assert a_file.read_text() == "keep me\n"


def test_help_everywhere():
    for args in ([], ["countdown"], ["graph", "generate"], ["format", "check"], ["demo"]):
        proc = steiner(*args, "--help")
        assert proc.returncode == 0 and "Usage" in proc.stdout, args


def test_demo_rejects_bad_options_in_one_line(tmp_path):
    for args, expected in (
        (["--profile", "huge"], "--profile expects quick or full"),
        (["--profile", "full", "--problems", "x.jsonl"], "--problems needs --domain"),
    ):
        proc = steiner("demo", "--out", str(tmp_path / "d"), *args)
        assert proc.returncode == 2 and expected in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    # a bad domain or problem file: one line before the banner, and no run directory (the
    # file's check was in the problems stage, after the settings record and its clock)
    graph = tmp_path / "graph.jsonl"
    assert steiner("graph", "generate", "--count", "2", "--out", str(graph)).returncode == 0
    for args, expected in (
        (["--domain", "chess"], "--domain: expected graph or countdown, got 'chess'"),
        (
            ["--domain", "countdown", "--problems", str(graph)],
            "graph.jsonl:1: a graph problem; expected a countdown one",
        ),
        # named like a file, so not a dataset name asked of the Hub (offline: a minute of
        # huggingface_hub's retry lines)
        (["--domain", "graph", "--problems", "missing.jsonl"], "missing.jsonl: cannot open"),
    ):
        assert_one_line_error(steiner("demo", "--out", "d", *args, cwd=tmp_path), expected)
        assert not (tmp_path / "d").exists()
    # a directory holding a demo with other settings is refused, not overwritten
    (tmp_path / "d").mkdir(exist_ok=True)
    (tmp_path / "d" / "demo_settings.json").write_text('{"profile": "full"}')
    proc = steiner("demo", "--out", str(tmp_path / "d"))
    assert proc.returncode == 2 and "other settings" in proc.stderr


def test_dag_show_prints_the_tree_and_writes_dot(tmp_path):
    shortcut, synth = tmp_path / "sc.jsonl", tmp_path / "synth"
    assert (
        steiner(
            "graph", "generate", "--count", "2", "--shortcut", "--out", str(shortcut)
        ).returncode
        == 0
    )
    assert steiner("synth", "--shortcut", str(shortcut), "--out", str(synth)).returncode == 0
    dag = json.loads((synth / "dags.jsonl").read_text().splitlines()[0])
    dot = tmp_path / "dag.dot"
    proc = steiner(
        "dag", "show", "--id", dag["problem_id"], str(synth / "dags.jsonl"), "--dot", str(dot)
    )
    assert proc.returncode == 0, proc.stderr
    assert f"problem {dag['problem_id']}" in proc.stdout and "answer" in proc.stdout
    text = dot.read_text()
    assert text.startswith("digraph dag {") and text.rstrip().endswith("}")
    assert text.count(" -> ") == len(dag["edges"]) and "color=green" in text
    # a question cut to fit says so (the graph's edge list lost its last edges silently)
    first_line = proc.stdout.splitlines()[0]
    assert len(dag["nodes"][0]["text"]) > 80 and "…" in proc.stdout, first_line
    # a label in DOT's own UTF-8, not JSON's \u escapes (Graphviz showed them as text)
    dag["nodes"][1] |= {"key": None, "text": "Prüfe die Kante 8→4"}
    (tmp_path / "de.jsonl").write_text(json.dumps(dag) + "\n")
    proc = steiner(
        "dag", "show", "--id", dag["problem_id"], str(tmp_path / "de.jsonl"), "--dot", str(dot)
    )
    assert proc.returncode == 0, proc.stderr
    assert '[label="Prüfe die Kante 8→4"' in dot.read_text(encoding="utf-8")
    # a wrong or missing --id names some of the ids there are
    ids = "the file has 2 DAG(s), e.g. 'graph-0-0', 'graph-0-1'"
    assert_one_line_error(
        steiner("dag", "show", "--id", "nope", str(synth / "dags.jsonl")),
        f"no DAG for id 'nope'; {ids}",
    )
    assert_one_line_error(
        steiner("dag", "show", str(synth / "dags.jsonl")), f"expected --id; {ids}"
    )
    blocker = tmp_path / "file"
    blocker.write_text("")
    for where, why in (
        (blocker / "x.dot", f"{blocker}: a file, not a directory; expected a directory (--dot)"),
        (tmp_path, f"{tmp_path}: a directory, not a file; expected a file path (--dot)"),
    ):
        # before: the file system's "File exists" / "Is a directory", exit 1, after the tree
        proc = steiner(
            "dag", "show", "--id", dag["problem_id"], str(synth / "dags.jsonl"), "--dot", str(where)
        )
        assert_one_line_error(proc, why)
        assert proc.returncode == 2 and proc.stdout == ""


def test_an_unwritable_output_file_is_one_line_before_the_work(tmp_path):
    # before: the rename's "File exists" / "Is a directory", exit 1, after generating them all
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for where, why in (
        (blocker / "g.jsonl", f"{blocker}: a file, not a directory; expected a directory"),
        (tmp_path, f"{tmp_path}: a directory, not a file; expected a file path"),
    ):
        for domain in ("graph", "countdown"):
            proc = steiner(domain, "generate", "--count", "2", "--out", str(where))
            assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
            # one line: no blank line from a progress bar either
            assert proc.stderr.splitlines() == [f"steiner: error: {why} (--out)"]
    assert blocker.read_text() == "" and sorted(tmp_path.iterdir()) == [blocker]


def test_atomic_writes_get_the_mode_a_plain_open_would(tmp_path):
    """Shared clusters: an output must be as readable as the umask allows, not mkstemp's 0600;
    overwriting a file keeps that file's mode."""
    out, kept = tmp_path / "g.jsonl", tmp_path / "kept.jsonl"
    kept.write_text("")
    kept.chmod(0o640)
    old = os.umask(0o022)  # the child inherits it
    try:
        for path in (out, kept):
            proc = steiner("graph", "generate", "--count", "2", "--out", str(path))
            assert proc.returncode == 0, proc.stderr
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert stat.S_IMODE(kept.stat().st_mode) == 0o640 and kept.read_text()


@pytest.mark.parametrize(
    "stop, line",
    # Ctrl-C exited 130 without a word: typer turns KeyboardInterrupt into a silent code
    [(signal.SIGTERM, "steiner: terminated"), (signal.SIGINT, "steiner: interrupted")],
)
def test_a_stop_unwinds_an_atomic_write_instead_of_leaving_its_temp_file(tmp_path, stop, line):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "steiner.cli", "graph", "generate", "--count", "50000000"]
        + ["--out", str(out / "g.jsonl")],
        stderr=subprocess.PIPE,
        text=True,
        # a test run started in the background inherits an ignored SIGINT
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 60
        while not list(out.glob(".g.jsonl.*.tmp")):  # the write has begun
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        proc.send_signal(stop)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + stop, stderr
    assert stderr.strip().splitlines()[-1] == line
    assert list(out.iterdir()) == []  # neither half a file nor its temp file


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_that_lands_in_a_finalizer_still_stops_the_job(stop):
    """A signal handled while a ``__del__`` runs raises there, where Python prints "Exception
    ignored" and drops it: the demo's baseline SFT trained on after the demo was killed, its
    SIGTERM lost in a regex object's ``__del__`` during a ``gc.collect`` (about one run in
    three of test_the_demos_baseline_sft_ends_when_the_demo_is_killed_outright under load)."""
    job = f"""
import os, signal, sys, time
from steiner.cli import Terminated, install_stop_handlers
install_stop_handlers()

class Finalized:
    def __del__(self):
        os.kill(os.getpid(), {int(stop)})
        for _ in range(100_000):  # the handler runs here, inside __del__
            pass

try:
    Finalized()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        time.sleep(0.01)
    print("went on")
except (Terminated, KeyboardInterrupt) as exc:
    print("stopped", type(exc).__name__)
"""
    proc = subprocess.run(
        [sys.executable, "-c", job],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    kind = "Terminated" if stop == signal.SIGTERM else "KeyboardInterrupt"
    assert proc.stdout.strip() == f"stopped {kind}", proc.stdout + proc.stderr
    assert "Exception ignored" not in proc.stderr, proc.stderr


def test_text_that_looks_like_rich_markup_is_printed_as_written(tmp_path, tiny_model_dir):
    """Paths, questions and model or teacher text are data, not rich markup. Before, a
    closing tag in them ("[/INST]", as a misconfigured teacher writes it) was a MarkupError
    traceback, and a bracketed name ("runs/[exp]/...") printed with the brackets gone."""
    run = tmp_path / "[exp]"
    run.mkdir()
    shortcut, synth = run / "sc.jsonl", run / "synth"
    proc = steiner("graph", "generate", "--count", "2", "--shortcut", "--out", str(shortcut))
    assert proc.returncode == 0, proc.stderr
    # rich wraps and centres long lines: the path is looked for with the whitespace taken out
    shown = lambda proc: "".join((proc.stdout + proc.stderr).split())  # noqa: E731
    assert f"{run}/sc.jsonl" in shown(proc), proc.stderr
    proc = steiner("synth", "--shortcut", str(shortcut), "--out", str(synth))
    assert proc.returncode == 0, proc.stderr
    assert f"{run}/synth" in shown(proc), proc.stderr
    dag = json.loads((synth / "dags.jsonl").read_text().splitlines()[0])
    dag["nodes"][1] |= {"key": None, "text": "[/INST] check [bold]8>4"}
    (tmp_path / "dag.jsonl").write_text(json.dumps(dag) + "\n")
    proc = steiner("dag", "show", "--id", dag["problem_id"], str(tmp_path / "dag.jsonl"))
    assert proc.returncode == 0, proc.stderr
    assert "[/INST] check [bold]8>4" in proc.stdout, proc.stdout
    question = "Go [/x] from [red]1 to 2"
    proc = steiner("generate", "--model", str(tiny_model_dir), "--max-new-tokens", "8", question)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == question, proc.stdout


def test_generate_reads_the_question_from_stdin_given_a_dash(tiny_model_dir):
    # a long or multi-line question, piped; before, "-" itself was the question
    args = [sys.executable, "-m", "steiner.cli", "generate", "--model", str(tiny_model_dir)]
    question = "Find a path from 1 to 2.\nEdges: 1>2"
    piped = subprocess.run(
        [*args, "--max-new-tokens", "8", "--json", "-"],
        input=question + "\n", capture_output=True, text=True,
    )  # fmt: skip
    typed = steiner("generate", "--model", str(tiny_model_dir), "--max-new-tokens", "8",
                    "--json", question)  # fmt: skip
    assert piped.returncode == 0 and typed.returncode == 0, piped.stderr + typed.stderr
    assert piped.stdout == typed.stdout
    empty = subprocess.run([*args, "-"], input="\n", capture_output=True, text=True)
    assert_one_line_error(empty, "QUESTION: expected a question, got empty text")


def test_generate_refuses_an_empty_question_before_loading_the_model(tiny_model_dir):
    # before: the model answered an empty user message (an unset shell variable, most likely)
    for question in ("", "  \n"):
        proc = steiner("generate", "--model", str(tiny_model_dir), question)
        assert_one_line_error(proc, "QUESTION: expected a question, got empty text")


def test_a_directory_without_a_model_is_one_line_for_every_command(tmp_path):
    run_dir = tmp_path / "run"  # a run directory given for the model inside it
    (run_dir / "models").mkdir(parents=True)
    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"nums": [1, 2], "target": 3}) + "\n")
    out = tmp_path / "out"
    for args in (
        ["generate", "--model", str(run_dir), "hi"],
        ["serve", "--model", str(run_dir)],
        ["eval", "--model", str(run_dir), "--problems", str(problems), "--out", str(out)],
        ["scale", "--model", str(run_dir), "--problems", str(problems), "--out", str(out)],
        ["train", "sft", "--model", str(run_dir), "--data", str(problems)]
        + ["--output_dir", str(out)],
    ):
        proc = steiner(*args)
        assert_one_line_error(proc, "expected a model directory with config.json and a tokenizer")
    assert not out.exists()


def test_a_model_without_the_reasoning_tokens_is_one_line_until_init_adds_them(tmp_path):
    """A plain pretrained model: generation raised ValueError deep in the step budget, SFT
    TRL's chat-template error; CPT would have learnt the format's strings as ordinary text.
    ``train init --from`` is the way in, and what it writes works."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from steiner.format import add_reasoning_tokens

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    special = ["<unk>", "<|im_end|>", "<pad>"]
    bpe.train_from_iterator(
        ["find a path from 1 to 2"] * 20, trainers.BpeTrainer(special_tokens=special)
    )
    plain_tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>"
    )
    plain = tmp_path / "plain"
    config = Qwen2Config(
        vocab_size=len(plain_tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
    )  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(plain)
    plain_tok.save_pretrained(plain)
    lacks = (
        "the tokenizer lacks 14 of the 14 reasoning tokens (<|reasoning_start|>, ...); "
        f"expected a Steiner model (`steiner train init --from {plain} --out DIR` adds them)"
    )
    # the commands that generate check it as they parse --model; training as it starts
    assert_one_line_error(steiner("generate", "--model", str(plain), "hi"), lacks)
    from steiner.io import InputError
    from steiner.train.config import SFTStageConfig
    from steiner.train.rl import RLStageConfig, run_rl
    from steiner.train.trainer import run_sft

    out = tmp_path / "out"
    for run, stage_config in ((run_sft, SFTStageConfig), (run_rl, RLStageConfig)):
        with pytest.raises(InputError, match=re.escape(lacks)):
            run(stage_config(model=str(plain), output_dir=str(out)))
    assert not out.exists()
    from steiner.infer.generate import generate, load
    from steiner.train.model import init_model

    # the tokens without a chat template (added by hand): transformers' ValueError at the
    # first prompt
    untemplated = tmp_path / "untemplated"
    Qwen2ForCausalLM(config).save_pretrained(untemplated)
    add_reasoning_tokens(plain_tok, set_chat_template=False)
    plain_tok.save_pretrained(untemplated)
    assert_one_line_error(
        steiner("generate", "--model", str(untemplated), "hi"),
        f"the tokenizer has no chat template; expected a Steiner model (`steiner train init "
        f"--from {untemplated} --out DIR` adds one)",
    )
    ready = tmp_path / "ready"
    init_model(ready, from_pretrained=str(plain))
    [completion] = generate(*load(ready), [[{"role": "user", "content": "hi"}]], max_new_tokens=8)
    assert completion.completion_tokens > 0


def test_a_question_past_the_models_positions_is_an_error_not_an_empty_answer(tiny_model_dir):
    proc = steiner("generate", "--model", str(tiny_model_dir), "7 " * 2100)
    # one line: transformers' "Loading weights" bar no longer stands above it
    assert_one_line_error(proc, "steiner: error: QUESTION: the prompt has ")
    assert proc.stderr.endswith(" and the model 2048 positions; expected a shorter question\n")


def test_an_impossible_step_budget_names_the_flags(tiny_model_dir):
    # before: "Invalid value: min_steps cannot exceed max_steps", the server request's fields
    model = ["generate", "--model", str(tiny_model_dir), "hi"]
    for flags, expected in (
        (["--min-steps", "3", "--max-steps", "1"], "--min-steps: expected at most --max-steps 1"),
        (["--extend-with", "more"], "--extend-with: expected model, proceed or backtrack"),
    ):
        assert_one_line_error(steiner(*model, *flags), expected)


def test_train_rl_weights_are_flat_settings(tmp_path):
    # before: --weights 3 and a YAML "weights:" mapping were parsed, then dropped unsaid
    nested = tmp_path / "rl.yaml"
    nested.write_text("weights:\n  correct: 3\n")
    expected = "--weights: not a setting; give each reward weight as its own flag or YAML key"
    for given in (["--weights", "3"], ["--config", str(nested)]):
        assert_one_line_error(
            steiner("train", "rl", "--out", str(tmp_path / "rl"), *given), expected
        )
    assert not (tmp_path / "rl").exists()
    # and --help does not offer it ("--weights WEIGHTS  not a flag (default: RewardWeights(...")
    usage = steiner("train", "rl", "--help")
    assert usage.returncode == 0 and "--correct" in usage.stdout
    assert "--weights" not in usage.stdout


def test_an_error_inside_a_progress_bar_is_still_one_line(tmp_path, tiny_model_dir):
    # eval's bar is open when the problem file is read; off a terminal it draws nothing
    missing = tmp_path / "missing.jsonl"
    proc = steiner(
        "eval", "--model", str(tiny_model_dir), "--problems", str(missing), "--out", str(tmp_path)
    )
    assert_one_line_error(proc, f"{missing}: ")


def test_generate_takes_the_budgets_step_length_cap(tiny_model_dir):
    # serve and the processors had max_step_tokens; generate had no flag for it
    def trace(*flags: str) -> dict:
        args = ["--min-steps", "2", "--max-steps", "2", "--max-new-tokens", "200", "--json"]
        proc = steiner("generate", "--model", str(tiny_model_dir), "2+2?", *args, *flags)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    free, capped = trace(), trace("--max-step-tokens", "3")
    assert len(capped["steps"]) == 2 and capped["decisions"][-1] == "end"
    # two steps of at most 3 tokens, each closed by at most 10 forced ones, and the decisions
    assert capped["reasoning_tokens"] <= 2 * (3 + 10) + 4 < free["reasoning_tokens"]
    assert_one_line_error(
        steiner("generate", "--model", str(tiny_model_dir), "2+2?", "--max-step-tokens", "0"),
        "--max-step-tokens",
    )


def test_generate_and_eval_take_top_p(tiny_model_dir, tmp_path):
    # serve had top_p; the commands sampled from the whole distribution
    def text(*flags: str) -> str:
        args = ["--max-steps", "1", "--max-step-tokens", "4", "--max-new-tokens", "40", "--json"]
        proc = steiner("generate", "--model", str(tiny_model_dir), "2+2?", *args, *flags)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout  # the parsed trace and the answer

    greedy = text()
    hot = ("--temperature", "1.5", "--seed", "1")
    # a nucleus this small holds the most likely token only: greedy, however hot
    assert text(*hot, "--top-p", "0.001") == greedy != text(*hot)
    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"nums": [3, 4], "target": 7}) + "\n")
    args = ["--model", str(tiny_model_dir), "--problems", str(problems), "--samples", "2"]
    out = tmp_path / "eval"
    flags = ("--max-new-tokens", "30", "--temperature", "1.5", "--top-p", "0.001")
    assert steiner("eval", *args, "--out", str(out), *flags).returncode == 0
    [record] = [json.loads(line) for line in (out / "outputs.jsonl").read_text().splitlines()]
    assert [s["text"] for s in record["samples"]] == [record["outputs"][0]["text"]] * 2
    assert json.loads((out / "eval_settings.json").read_text())["top_p"] == 0.001
    generate = ["generate", "--model", str(tiny_model_dir), "2+2?"]
    for command in (generate, ["eval", *args, "--out", str(out)]):
        proc = steiner(*command, "--top-p", "0")
        assert_one_line_error(proc, "--top-p")


def test_synth_eval_scale_and_serve_take_option_values_from_a_config_file(tmp_path):
    """--config FILE.yaml, as the train stages take one: keys are option names (either
    spelling), a flag on the command line wins, and every value is checked as the flag is,
    with its line in the file."""
    problems = tmp_path / "p.jsonl"
    made = steiner("countdown", "generate", "--count", "3", "--out", str(problems), "--shortcut")
    assert made.returncode == 0, made.stderr
    recipe = tmp_path / "synth.yaml"
    recipe.write_text(
        f"shortcut: {problems}\nattempts: 2\nmax-forward: 3\npaths_per_dag: 1\nlimit: 3\n"
    )
    by_file = steiner("synth", "--config", str(recipe), "--out", f"{tmp_path}/a", "--limit", "2")
    assert by_file.returncode == 0, by_file.stderr
    by_flags = steiner(
        "synth", "--shortcut", str(problems), "--attempts", "2", "--max-forward", "3",
        "--paths-per-dag", "1", "--limit", "2", "--out", str(tmp_path / "b"),
    )  # fmt: skip
    assert by_flags.returncode == 0, by_flags.stderr
    for name in ("dags.jsonl", "paths.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    settings = json.loads((tmp_path / "a" / ".journal.jsonl").read_text().splitlines()[0])
    assert settings["settings"]["attempts"] == 2 and settings["settings"]["limit"] == 2

    bad = tmp_path / "bad.yaml"
    for command, text, needles in (
        ("synth", "attempts: 2\natempts: 2\n", [":2: unknown option 'atempts'", "'attempts'?"]),
        # typer would read true as 1 and 2.5 as 2
        ("synth", "attempts: true\n", [":1: option 'attempts': expected an integer, got true"]),
        ("synth", "attempts: 2.5\n", ["option 'attempts': expected an integer, got 2.5"]),
        ("synth", "shortcut: [a, b]\n", ["option 'shortcut': expected a string"]),
        ("synth", "attempts: 0\n", [":1: option 'attempts':", "greater than or equal to 1"]),
        ("synth", "- attempts\n", ["expected a mapping of options, got list"]),
        ("eval", "model: no-such-dir\n", ["bad.yaml:1: option 'model':", "does not exist"]),
        ("scale", "limit: 0\n", ["bad.yaml:1: option 'limit':"]),
        ("serve", "port: 70000\n", ["bad.yaml:1: option 'port':"]),
    ):
        bad.write_text(text)
        assert_one_line_error(steiner(command, "--config", str(bad)), "bad.yaml", *needles)
    missing = steiner("eval", "--config", str(tmp_path / "none.yaml"))
    assert_one_line_error(missing, "none.yaml: cannot open")


def test_every_command_expands_home_in_its_paths(tmp_path, tiny_model_dir, monkeypatch):
    """Where no shell expands ~ (``--out=~/x``, a --config file's ``out: ~/x``), eval, scale,
    synth and the others made a directory named "~" in the working directory, and ``--model``
    was a missing directory, as the train stages did before io.expand_home."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    (home / "model").symlink_to(tiny_model_dir)

    def run(*args: str) -> None:
        proc = steiner(*args, cwd=work)
        assert proc.returncode == 0, proc.stderr

    run("graph", "generate", "--count", "4", "--seed", "1", "--compact", "--shortcut",
        "--out=~/g.jsonl")  # fmt: skip
    (work / "synth.yaml").write_text("shortcut: ~/g.jsonl\nout: ~/synth\nattempts: 2\n")
    run("synth", "--config", "synth.yaml", "--workers", "1")
    (home / "eval.yaml").write_text("model: ~/model\nproblems: ~/g.jsonl\nout: ~/eval\n")
    run("eval", "--config=~/eval.yaml", "--max-new-tokens", "4", "--limit", "2")
    run("scale", "--model=~/model", "--problems=~/g.jsonl", "--out=~/scale", "--budgets", "1",
        "--mode", "cap", "--max-new-tokens", "4", "--limit", "2")  # fmt: skip
    run("dag", "show", "~/synth/dags.jsonl", "--id", "graph-1-0", "--dot=~/dag.dot")
    run("format", "check", "~/synth/paths.jsonl")
    assert list(work.iterdir()) == [work / "synth.yaml"]  # no "~" made here
    for made in ("g.jsonl", "synth/dags.jsonl", "eval/metrics.json", "scale", "dag.dot"):
        assert (home / made).exists(), made
    # the check that replaced typer's exists=True names the directory it looked for
    missing = steiner("eval", "--model=~/none", "--problems=~/g.jsonl", "--out=~/e", cwd=work)
    assert_one_line_error(missing, "--model", f"'{home / 'none'}' does not exist")
