"""The openai teacher against a local HTTP server that answers well, badly, slowly or 500."""

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

BEHAVIOUR = {
    "Q-valid": "valid",
    "Q-malformed": "malformed",
    "Q-slow": "slow",
    "Q-error": "error",
    "Q-valid2": "valid",
}
# a reasoning model served without a reasoning parser: its thinking comes first in the content
THINKING = {"Q-thinks": "thinking", "Q-thinks-cut": "thinking cut"}


class FakeChat(BaseHTTPRequestHandler):
    hits = 0
    prompts: list[str] = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_POST(self):
        FakeChat.hits += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        FakeChat.prompts.append(prompt)
        known = BEHAVIOUR | THINKING
        question = next(q for q in sorted(known, key=len, reverse=True) if q in prompt)
        kind = known[question]
        if kind == "error":
            # a closing rich tag in it: the summary table printed it as markup (a traceback)
            return self.reply(500, {"error": {"message": "boom [/INST]"}})
        if kind == "slow":
            time.sleep(5)  # well past the client timeout, even on a loaded machine
            return self.reply(200, {})
        if kind == "malformed":
            content = "I think the next step is to add them."
        elif "New steps:" in prompt:  # the judge call, answer revealed
            content = json.dumps({"steps": [{"status": "answer", "reflection": "Correct."}]})
        else:
            content = json.dumps(
                {"steps": [{"name": "add", "thought": f"{question}: add 2 and 2", "summary": "4"}]}
            )
        if kind == "thinking":  # a decoy reply inside the thinking, which must not be read
            content = f'<think>\nMaybe {{"steps": []}}? No.\n</think>\n\n{content}'
        elif kind == "thinking cut":  # cut at max_tokens before the thinking ended
            content = "<think>\nFirst, 2 and 2"
        self.reply(
            200,
            {
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": "fake",
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "message": {"role": "assistant", "content": content},
                    }
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            },
        )

    def reply(self, status, obj):
        data = json.dumps(obj).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout)


@pytest.fixture()
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeChat)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    FakeChat.hits = 0
    FakeChat.prompts = []
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


def synth(shortcut, out, cache, base_url):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "steiner.cli",
            "synth",
            "--shortcut",
            str(shortcut),
            "--out",
            str(out),
            "--teacher",
            "openai",
            "--base-url",
            base_url,
            "--model",
            "fake",
            "--timeout",
            "2",
            "--max-retries",
            "0",
            "--truncations",
            "2",
            "--attempts",
            "1",
            "--cache-dir",
            str(cache),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )


def text_problems(path, questions):
    """One text problem per question, named by it (the fake server answers by the name)."""
    rows = [{"id": q, "question": q, "cot": "1+1=2\n2+2=4", "answer": "4"} for q in questions]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_faults_are_counted_and_cache_makes_rerun_free(server, tmp_path):
    shortcut = text_problems(tmp_path / "text.jsonl", BEHAVIOUR)
    first = synth(shortcut, tmp_path / "run1", tmp_path / "cache", server)
    assert first.returncode == 0, first.stderr
    stats = json.loads((tmp_path / "run1" / "stats.json").read_text())
    faults = stats["teacher_faults"]
    # two truncation points x one attempt per problem, each fault kind on its own problem
    assert faults == {"http_500": 2, "malformed": 2, "timeout": 2}
    # and why, one example of each (the server's own message for an HTTP error)
    examples = stats["teacher_fault_examples"]
    assert set(examples) == set(faults) and examples["http_500"] == "boom [/INST]"
    assert examples["malformed"].startswith("not JSON: ")
    assert "e.g. http_500" in first.stderr and "boom [/INST]" in first.stderr  # the summary
    assert stats["failed_attempts"] == 6
    assert stats["dags"] == 5 and stats["paths"] >= 5  # every problem still gets its DAG
    hits = FakeChat.hits
    assert hits == 2 * 2 * 2 + 2 + 2 + 2  # valid: propose+judge; others: one call each
    second = synth(shortcut, tmp_path / "run2", tmp_path / "cache", server)
    assert second.returncode == 0, second.stderr
    assert FakeChat.hits == hits  # zero requests: everything came from the cache
    for name in ("dags.jsonl", "paths.jsonl", "stats.json"):
        assert (tmp_path / "run1" / name).read_bytes() == (tmp_path / "run2" / name).read_bytes()
    # a damaged entry stops the run on one line that names it, instead of a traceback or a
    # quiet new call that would make the run differ from the cached one
    damaged = sorted((tmp_path / "cache").rglob("*.json"))[0]
    damaged.write_text('{"ok": true, "cont')
    third = synth(shortcut, tmp_path / "run3", tmp_path / "cache", server)
    assert third.returncode == 2 and "Traceback" not in third.stderr, third.stderr
    assert third.stderr.splitlines() == [
        f"steiner: error: {damaged}: corrupt teacher-cache entry; expected "
        '{"ok": true, "content": ...} or {"ok": false, "fault": ...}; '
        "delete it to ask the teacher again"
    ]
    assert FakeChat.hits == hits


def test_the_run_max_forward_is_what_the_teacher_asks_for(server, tmp_path):
    from steiner.synth.run import SynthConfig, run_synth
    from steiner.synth.teachers import OpenAISettings

    shortcut = tmp_path / "text.jsonl"
    row = {"id": "Q-valid", "question": "Q-valid", "cot": "1+1=2\n2+2=4", "answer": "4"}
    shortcut.write_text(json.dumps(row) + "\n")
    # one setting for the oracle and the openai teacher alike (the OpenAI settings once had
    # their own copy, which a run started from Python could leave at its default)
    cfg = SynthConfig(
        shortcut=str(shortcut),
        out=str(tmp_path / "run"),
        teacher="openai",
        truncations=1,
        attempts=1,
        max_forward=3,
        openai=OpenAISettings(base_url=server, model="fake", max_retries=0),
    )
    run_synth(cfg)
    proposals = [p for p in FakeChat.prompts if "New steps:" not in p]
    assert proposals and all("Write the next 3 step(s)" in p for p in proposals)
    # journals from before keep resuming: their settings record the OpenAI copy too
    assert cfg.resume_settings()["openai.max_forward"] == 3


def test_an_unreachable_teacher_stops_the_run_and_a_fixed_url_starts_it_over(server, tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    shortcut = text_problems(tmp_path / "text.jsonl", [q for q in BEHAVIOUR if "valid" in q])
    out, cache = tmp_path / "run", tmp_path / "cache"
    stopped = synth(shortcut, out, cache, dead)
    assert stopped.returncode == 2 and "Traceback" not in stopped.stderr
    # one line: the sentence embedder's "Loading weights" bar stood above it
    assert len(stopped.stderr.splitlines()) == 1, stopped.stderr
    assert (
        f"the teacher at {dead} answered none of the 4 calls for problems 1-2 (connection: 4; "
        "connection: " in stopped.stderr
    )
    # the example is the cause (httpx's), not the client's bare "Connection error."
    assert "Connection error." not in stopped.stderr and "; check --base-url" in (stopped.stderr)
    # no shortcut-only DAGs were kept, and no failure cached that would outlive the fix
    assert (out / "dags.jsonl").read_text() == "" and not list(cache.rglob("*.json"))
    fixed = synth(shortcut, out, cache, server)  # the same --out: nothing was done there yet
    assert fixed.returncode == 0, fixed.stderr
    stats = json.loads((out / "stats.json").read_text())
    assert stats["dags"] == 2 and stats["teacher_faults"] == {} and stats["failed_attempts"] == 0


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--base-url", "127.0.0.1:8000/v1"], "--base-url: expected an http(s) URL"),
        (["--timeout", "-1"], "--timeout: expected > 0 seconds, got -1.0"),
        (["--temperature", "3"], "--temperature: expected 0 to 2, got 3.0"),
        (["--step-separator", ""], "--step-separator: expected a non-empty string"),
        (["--step-separator", "\\"], "--step-separator: \\ at end of string"),
    ],
)
def test_teacher_settings_no_request_could_succeed_with_are_one_line(tmp_path, flags, message):
    # before: a fault per call (a timeout cached), blamed on --base-url; the separators raised
    shortcut = tmp_path / "text.jsonl"
    shortcut.write_text(json.dumps({"id": 1, "question": "q", "cot": "a\nb", "answer": "4"}) + "\n")
    args = ["synth", "--shortcut", str(shortcut), "--out", str(tmp_path / "run"), "--teacher"]
    proc = subprocess.run(
        [sys.executable, "-m", "steiner.cli", *args, "openai", *flags],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_step_separator_past_latin1_splits_as_typed(tmp_path):
    from steiner.cli import unescape_separator
    from steiner.domains import load_shortcuts

    # before: its UTF-8 bytes read as Latin-1, three other characters that never split
    assert unescape_separator("。") == "。" and unescape_separator("\\n§") == "\n§"
    shortcut = tmp_path / "zh.jsonl"
    cot = "一加一等于二。二加二等于四。"
    shortcut.write_text(json.dumps({"id": 1, "question": "q", "cot": cot, "answer": "4"}) + "\n")
    [record] = load_shortcuts(shortcut, None, unescape_separator("。"))
    assert record["steps"] == ["一加一等于二", "二加二等于四"]


def test_a_reasoning_models_thinking_before_the_reply_is_skipped(server, tmp_path):
    # before: every reply of Qwen3 or DeepSeek-R1 behind vLLM without --reasoning-parser was
    # "malformed" (not JSON), so no step of a real reasoning teacher was ever kept
    shortcut = text_problems(tmp_path / "text.jsonl", THINKING)
    run = synth(shortcut, tmp_path / "run", tmp_path / "cache", server)
    assert run.returncode == 0, run.stderr
    stats = json.loads((tmp_path / "run" / "stats.json").read_text())
    # the cut one's two attempts are malformed; the other's were read, proposal and verdict
    assert stats["teacher_faults"] == {"malformed": 2} and stats["failed_attempts"] == 2
    dags = [json.loads(line) for line in (tmp_path / "run" / "dags.jsonl").read_text().splitlines()]
    thinks = next(d for d in dags if d["problem_id"] == "Q-thinks")
    assert any(n["text"].startswith("Q-thinks: add 2 and 2") for n in thinks["nodes"])
