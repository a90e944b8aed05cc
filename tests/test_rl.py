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
