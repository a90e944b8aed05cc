"""RL throughput: `steiner train rl` (DAG step rewards) vs TRL GRPOTrainer with an outcome-only
reward, same tiny SFT model and prompts, 16 completions per step (4 prompts x 4), one run.

Goal (issue 7): >= 0.8x TRL's samples/s (step rewards should cost little). Both sides use
our RL defaults for what they share (KL term, sampling temperature, per-sample loss), so the
ratio measures the step rewards and the loop, not a setting.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

STEPS, PROMPTS, GROUP, MAX_NEW = 10, 4, 4, 160


def steiner(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "steiner.cli", *args],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def main() -> None:
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from steiner.domains import get_domain, load_shortcuts
    from steiner.format import reasoning_and_answer
    from steiner.train.config import SFTStageConfig
    from steiner.train.rl import RLStageConfig, run_rl
    from steiner.train.trainer import run_sft

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
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
            str(tmp / "sc.jsonl"),
        )
        steiner("synth", "--shortcut", str(tmp / "sc.jsonl"), "--out", str(tmp / "synth"))
        steiner(
            "train",
            "init",
            "--preset",
            "tiny",
            "--data",
            str(tmp / "synth" / "paths.jsonl"),
            "--out",
            str(tmp / "init"),
        )
        run_sft(
            SFTStageConfig(
                output_dir=str(tmp / "sft"),
                model=str(tmp / "init"),
                data=str(tmp / "synth" / "paths.jsonl"),
                max_steps=150,
                save_strategy="no",
                disable_tqdm=True,
            )
        )
        problems = {p["question"]: p for p in load_shortcuts(tmp / "sc.jsonl")}
        domain = get_domain("countdown")

        def outcome(prompts, completions, **kwargs):
            out = []
            for prompt, completion in zip(prompts, completions, strict=True):
                problem = problems[prompt[-1]["content"]]
                _, answer = reasoning_and_answer(completion[0]["content"])
                out.append(1.0 if domain.check_answer(problem, answer) else 0.0)
            return out

        dataset = Dataset.from_list(
            [{"prompt": [{"role": "user", "content": q}]} for q in problems]
        )
        defaults = RLStageConfig()
        args = GRPOConfig(
            output_dir=str(tmp / "trl"),
            max_steps=STEPS,
            per_device_train_batch_size=PROMPTS * GROUP,
            num_generations=GROUP,
            max_completion_length=MAX_NEW,
            use_cpu=True,
            bf16=False,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            logging_steps=1000,
            activation_checkpointing=False,
            learning_rate=2e-4,
            beta=defaults.beta,
            temperature=defaults.temperature,
            loss_type=defaults.loss_type,
        )
        trainer = GRPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(tmp / "sft"),
            reward_funcs=[outcome],
            args=args,
            train_dataset=dataset,
            processing_class=AutoTokenizer.from_pretrained(tmp / "sft", padding_side="left"),
        )
        start = time.perf_counter()
        trainer.train()
        trl_rate = STEPS * PROMPTS * GROUP / (time.perf_counter() - start)
        start = time.perf_counter()
        run_rl(
            RLStageConfig(
                model=str(tmp / "sft"),
                problems=str(tmp / "sc.jsonl"),
                dags=str(tmp / "synth" / "dags.jsonl"),
                output_dir=str(tmp / "rl"),
                steps=STEPS,
                prompts_per_step=PROMPTS,
                group_size=GROUP,
                max_new_tokens=MAX_NEW,
                learning_rate=2e-4,
                save_steps=0,
            ),
            log=lambda r: None,
        )
        ours_rate = STEPS * PROMPTS * GROUP / (time.perf_counter() - start)
    print(f"TRL GRPOTrainer, outcome-only reward: {trl_rate:.1f} samples/s")
    print(f"steiner train rl, DAG step rewards:   {ours_rate:.1f} samples/s")
    ratio = ours_rate / trl_rate
    print(f"ratio: {ratio:.2f}x (goal >= 0.8x: {'met' if ratio >= 0.8 else 'MISSED'})")


if __name__ == "__main__":
    main()
