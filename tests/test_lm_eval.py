"""A client nobody here wrote: lm-evaluation-harness against `steiner serve` on loopback."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from steiner.format import REASONING_END, REASONING_START

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lm_eval"


@pytest.mark.slow
@pytest.mark.parametrize(
    "client, route, extra_args",
    [
        ("local-chat-completions", "chat/completions", "tokenized_requests=False"),
        # lm-eval finds the server's tokenizer routes, has the server template and tokenize
        # each chat, and sends token ids (with tokenized_requests=False it would send the
        # chat's messages); its --log_samples fails on this path (it hashes the chat as text)
        ("local-completions", "completions", "tokenizer_backend=auto"),
        # or with the model's own tokenizer, named
        ("local-completions", "completions", "tokenizer={model},tokenizer_backend=huggingface"),
    ],
)
def test_lm_eval_runs_a_task(tiny_model_dir, tmp_path, client, route, extra_args, wait_for_server):
    """Both of lm-eval's clients for OpenAI-compatible servers; local-completions got a 404
    before /v1/completions, and then a 400 until token-id prompts were taken, and needed a
    tokenizer named until the server had vLLM's tokenizer routes."""
    log_samples = extra_args != "tokenizer_backend=auto"
    lm_eval = shutil.which("lm_eval", path=str(Path(sys.executable).parent))
    assert lm_eval, "lm_eval is a dev dependency (pyproject [dev])"
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    (task_dir / "arith.jsonl").write_text((EXAMPLE / "arith.jsonl").read_text())
    task = (
        (EXAMPLE / "steiner_arith.yaml")
        .read_text()
        .replace("examples/lm_eval/arith.jsonl", str(task_dir / "arith.jsonl"))
        # a step budget, sent as generation kwargs, so that the tiny model's reasoning ends
        # and an answer follows it
        .replace(
            "  max_gen_toks: 64\n", "  max_gen_toks: 64\n  max_steps: 1\n  max_step_tokens: 3\n"
        )
    )
    assert "max_steps: 1" in task
    (task_dir / "steiner_arith.yaml").write_text(task)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "steiner.cli",
            "serve",
            "--model",
            str(tiny_model_dir),
            "--port",
            str(port),
            "--model-name",
            "tiny",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_server(f"http://127.0.0.1:{port}/v1/models")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        proc = subprocess.run(
            [
                lm_eval,
                "--model",
                client,
                "--model_args",
                f"model=tiny,base_url=http://127.0.0.1:{port}/v1/{route},num_concurrent=1,"
                f"max_retries=1,{extra_args.format(model=tiny_model_dir)}",
                "--tasks",
                "steiner_arith",
                "--include_path",
                str(task_dir),
                "--apply_chat_template",
                "--output_path",
                str(tmp_path / "results"),
                *(["--log_samples"] if log_samples else []),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
            cwd=tmp_path,
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "steiner_arith" in proc.stdout and "exact_match" in proc.stdout
    [results] = list((tmp_path / "results").rglob("results_*.json"))
    scores = json.loads(results.read_text())["results"]["steiner_arith"]
    assert 0.0 <= scores["exact_match,answer"] <= 1.0
    if not log_samples:
        assert "Using tokenizer remote" in proc.stderr  # the server's, found on its own
        return
    # the model's own text came back (a text completion's with its reasoning), and the task's
    # filter scored the answer after it
    [samples] = list((tmp_path / "results").rglob("samples_steiner_arith_*.jsonl"))
    logged = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(logged) == 6
    for sample in logged:
        [[said]] = sample["resps"]
        [[answer]] = sample["filtered_resps"]
        assert (REASONING_START in said) == (client == "local-completions")
        assert REASONING_END not in answer and said.endswith(answer)
        assert (REASONING_END in said) == (client == "local-completions")
