"""SFT throughput: `steiner train sft` vs plain TRL SFTTrainer, same model and data, one run.

Goal (issue 4): >= 1.3x the tokens/s of TRL's SFTTrainer with its default settings (no
packing). A second part measures the quick demo's Steiner SFT shape (micro model, graph
walks, batch 32, random batches, one thread) with the model's own loss against TRL's chunked
LM head. Tokens are non-padding training tokens. Baselines, measured here:
  1. TRL defaults, with only what CPU needs (use_cpu, fp32, no reporting); TRL turns
     gradient checkpointing on by default;
  2. the same with gradient checkpointing off (isolates the batching gain);
  3. `steiner train sft` with TRL's chunked LM head (`--fused_lm_head true`), which TRL 1.16
     always uses (isolates the gain of the model's own loss on a small vocabulary).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

STEPS = 60


def steiner(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "steiner.cli", *args],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def plain_trl(model_dir: Path, paths: Path, out: Path, **overrides) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from steiner.train.data import sft_dataset

    args = SFTConfig(
        output_dir=str(out),
        max_steps=STEPS,
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        **overrides,
    )
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=args,
        train_dataset=sft_dataset(str(paths)),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    start = time.perf_counter()
    trainer.train()
    return trainer.state.num_input_tokens_seen / (time.perf_counter() - start)


def ours(
    model_dir: Path, paths: Path, out: Path, fused_lm_head: bool | None = None, **overrides
) -> float:
    from steiner.train.config import SFTStageConfig
    from steiner.train.trainer import run_sft

    summary = run_sft(
        SFTStageConfig(
            output_dir=str(out),
            model=str(model_dir),
            data=str(paths),
            max_steps=STEPS,
            save_strategy="no",
            disable_tqdm=True,
            fused_lm_head=fused_lm_head,
            **overrides,
        )
    )
    return summary["tokens_per_s"]


def demo_shape_data(tmp: Path) -> Path:
    """The quick demo's graph walks of 3,000 problems and its micro model (``tmp/init``)."""
    from dataclasses import replace

    from steiner.demo import make_problems, profile_settings, run_synthesis
    from steiner.train.model import init_model

    s = replace(profile_settings("quick", "graph"), train_problems=3000, cpt_documents=100)
    make_problems(s, tmp, None)
    run_synthesis(s, tmp)
    paths = tmp / "synth" / "paths.jsonl"
    init_model(tmp / "init", s.preset, [str(paths)], split_digits=False, max_positions=2048)
    return paths


def demo_shape_settings() -> dict:
    """The quick demo's Steiner SFT settings, less those each benchmark run sets itself."""
    from steiner.demo import profile_settings, train_kwargs

    ours_sets = ("max_steps", "disable_tqdm", "save_steps")
    kwargs = train_kwargs(profile_settings("quick", "graph"), STEPS)
    return {k: v for k, v in kwargs.items() if k not in ours_sets}


def demo_shape(tmp: Path) -> tuple[float, float]:
    """tokens/s of the quick demo's Steiner SFT settings: chunked head, then own loss."""
    import torch

    paths = demo_shape_data(tmp)
    settings = demo_shape_settings()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the demo's Steiner SFT beside the baseline
    try:
        return tuple(
            ours(tmp / "init", paths, tmp / f"walks-{fused}", fused_lm_head=fused, **settings)
            for fused in (True, False)
        )
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        steiner(
            "countdown",
            "generate",
            "--count",
            "500",
            "--seed",
            "0",
            "--shortcut",
            "--out",
            str(tmp / "shortcut.jsonl"),
        )
        steiner("synth", "--shortcut", str(tmp / "shortcut.jsonl"), "--out", str(tmp / "synth"))
        paths = tmp / "synth" / "paths.jsonl"
        steiner("train", "init", "--preset", "tiny", "--data", str(paths), "--out", str(tmp / "m"))
        base = plain_trl(tmp / "m", paths, tmp / "a")
        base_no_ckpt = plain_trl(tmp / "m", paths, tmp / "b", activation_checkpointing=False)
        mine_chunked = ours(tmp / "m", paths, tmp / "d", fused_lm_head=True)
        mine = ours(tmp / "m", paths, tmp / "c")
        walks_chunked, walks_own = demo_shape(tmp / "demo")
    print(f"model: tiny preset; data: {paths.name} of 500 countdown-4 problems; {STEPS} steps each")
    print(f"TRL SFTTrainer, default settings:              {base:8.0f} tokens/s")
    print(f"TRL SFTTrainer, defaults without checkpointing: {base_no_ckpt:8.0f} tokens/s")
    print(f"steiner train sft, TRL's chunked LM head:       {mine_chunked:8.0f} tokens/s")
    print(f"steiner train sft:                             {mine:8.0f} tokens/s")
    print(
        f"ratio vs TRL defaults: {mine / base:.2f}x (goal >= 1.3x: "
        f"{'met' if mine / base >= 1.3 else 'MISSED'}); "
        f"vs defaults without checkpointing: {mine / base_no_ckpt:.2f}x; "
        f"vs the chunked LM head: {mine / mine_chunked:.2f}x"
    )
    print("quick demo's Steiner SFT shape (micro model, graph walks, batch 32, one thread):")
    print(f"  TRL's chunked LM head: {walks_chunked:8.0f} tokens/s")
    print(f"  the model's own loss:  {walks_own:8.0f} tokens/s")
    print(f"  ratio: {walks_own / walks_chunked:.2f}x")


if __name__ == "__main__":
    main()
