"""30 RL steps with DAG step rewards raise the mean reward of a tiny SFT model (countdown-3)."""

import subprocess
import sys

import pytest

from steiner.train.config import SFTStageConfig
from steiner.train.rl import RLStageConfig, run_rl
from steiner.train.trainer import run_sft


def steiner(*args):
    proc = subprocess.run(
        [sys.executable, "-m", "steiner.cli", *args], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.mark.slow
def test_rl_raises_mean_reward(tmp_path):
    steiner(
        "countdown",
        "generate",
        "--n-numbers",
        "3",
        "--count",
        "80",
        "--seed",
        "2",
        "--shortcut",
        "--out",
        str(tmp_path / "sc.jsonl"),
    )
    steiner(
        "synth",
        "--shortcut",
        str(tmp_path / "sc.jsonl"),
        "--out",
        str(tmp_path / "synth"),
        "--paths-per-dag",
        "4",
    )
    steiner(
        "train",
        "init",
        "--preset",
        "tiny",
        "--data",
        str(tmp_path / "synth" / "paths.jsonl"),
        "--out",
        str(tmp_path / "init"),
    )
    run_sft(
        SFTStageConfig(
            output_dir=str(tmp_path / "sft"),
            model=str(tmp_path / "init"),
            data=str(tmp_path / "synth" / "paths.jsonl"),
            max_steps=200,
            learning_rate=3e-3,
            save_strategy="no",
            disable_tqdm=True,
        )
    )
    history = run_rl(
        RLStageConfig(
            model=str(tmp_path / "sft"),
            problems=str(tmp_path / "sc.jsonl"),
            dags=str(tmp_path / "synth" / "dags.jsonl"),
            output_dir=str(tmp_path / "rl"),
            steps=30,
            max_new_tokens=160,
            learning_rate=2e-4,
            seed=0,
        ),
        log=lambda record: None,
    )["history"]
    rewards = [h["mean_reward"] for h in history]
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert last > first + 0.1, (first, last)
    assert (tmp_path / "rl" / "rl_summary.json").exists() and (
        tmp_path / "rl" / "model.safetensors"
    ).exists()
    assert {"mean_reward", "accuracy", "mean_steps", "mean_backtracks", "terms"} <= set(history[0])


class Crash(Exception):
    pass


@pytest.mark.slow
def test_rl_resume_after_crash_matches_uninterrupted(tmp_path, tiny_model_dir):
    steiner(
        "countdown",
        "generate",
        "--n-numbers",
        "3",
        "--count",
        "20",
        "--seed",
        "3",
        "--shortcut",
        "--out",
        str(tmp_path / "sc.jsonl"),
    )
    steiner("synth", "--shortcut", str(tmp_path / "sc.jsonl"), "--out", str(tmp_path / "synth"))

    def cfg(out):
        return RLStageConfig(
            model=str(tiny_model_dir),
            problems=str(tmp_path / "sc.jsonl"),
            dags=str(tmp_path / "synth" / "dags.jsonl"),
            output_dir=str(tmp_path / out),
            steps=4,
            save_steps=2,
            max_new_tokens=24,
            prompts_per_step=2,
            group_size=2,
        )

    def crash_at_3(record):
        if record.get("step") == 3 and "loss" in record:
            raise Crash

    with pytest.raises(Crash):
        run_rl(cfg("a"), log=crash_at_3)
    assert (tmp_path / "a" / "checkpoint-2" / "state.pt").exists()
    resumed_log = []
    resumed = run_rl(cfg("a"), log=resumed_log.append)["history"]
    assert resumed_log[0] == {"resumed_from": str(tmp_path / "a" / "checkpoint-2"), "step": 2}
    clean = run_rl(cfg("b"), log=lambda r: None)["history"]
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(resumed) == strip(clean)
