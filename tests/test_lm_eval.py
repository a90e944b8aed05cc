"""A client nobody here wrote: lm-evaluation-harness against `steiner serve` on loopback."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lm_eval"


@pytest.mark.slow
def test_lm_eval_local_chat_completions_runs_a_task(tiny_model_dir, tmp_path):
    lm_eval = shutil.which("lm_eval", path=str(Path(sys.executable).parent))
    assert lm_eval, "lm_eval is a dev dependency (pyproject [dev])"
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    (task_dir / "arith.jsonl").write_text((EXAMPLE / "arith.jsonl").read_text())
    task = (
        (EXAMPLE / "steiner_arith.yaml")
        .read_text()
        .replace("examples/lm_eval/arith.jsonl", str(task_dir / "arith.jsonl"))
    )
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
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        proc = subprocess.run(
            [
                lm_eval,
                "--model",
                "local-chat-completions",
                "--model_args",
                f"model=tiny,base_url=http://127.0.0.1:{port}/v1/chat/completions,num_concurrent=1,"
                "max_retries=1,tokenized_requests=False",
                "--tasks",
                "steiner_arith",
                "--include_path",
                str(task_dir),
                "--apply_chat_template",
                "--output_path",
                str(tmp_path / "results"),
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
    assert 0.0 <= scores["exact_match,none"] <= 1.0
