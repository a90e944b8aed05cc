"""Step-budget overhead: tiny model, batch 16, `generate` with vs without the processor.

Goal (issue 5): <= 3% overhead. Both runs generate exactly the same number of tokens
(min_new_tokens = max_new_tokens), alternate, and the median of several repeats is compared.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LogitsProcessor, PreTrainedTokenizerFast, Qwen2ForCausalLM

from steiner.format import add_reasoning_tokens
from steiner.infer.budget import Budget
from steiner.infer.hf import StepBudgetLogitsProcessor
from steiner.train.model import build_model

BATCH, NEW_TOKENS, REPEATS = 16, 512, 9


def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        ["reach 79 with 3 7 25 50 and a step"] * 50,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=tok)
    add_reasoning_tokens(hf)
    hf.padding_side = "left"
    return hf


def timed_generate(model: Any, tok: Any, batch: Any, new_tokens: int, **kwargs: Any) -> float:
    """Seconds for one seeded ``generate`` of exactly ``new_tokens`` tokens per row."""
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            **batch,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=tok.pad_token_id,
            **kwargs,
        )
    synchronize(model.device)
    return time.perf_counter() - start


def synchronize(device: torch.device) -> None:
    """Waits for a GPU's queued work, so that a clock read after it counts that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="where the model runs (e.g. cuda)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    for preset in ("tiny", "small"):
        measure(preset, torch.device(args.device))


def measure(preset: str, device: torch.device) -> None:
    tok = tokenizer()
    model: Qwen2ForCausalLM = build_model(preset, tok, max_positions=1024).to(device).eval()
    prompts = [f"reach {i} with 3 7 25 50" * (1 + i % 3) for i in range(BATCH)]
    batch = tok(prompts, return_tensors="pt", padding=True).to(device)
    budget = Budget(min_steps=4, max_steps=12, max_step_tokens=16)

    class NoOp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores

    def run(with_budget: bool | None) -> float:
        """with_budget: True = step budget, False = nothing, None = a no-op processor."""
        procs = {True: [StepBudgetLogitsProcessor(tok, budget)], False: [], None: [NoOp()]}[
            with_budget
        ]
        return timed_generate(model, tok, batch, NEW_TOKENS, do_sample=True, logits_processor=procs)

    run(False), run(True), run(None)  # warm-up
    plain, budgeted, noop = [], [], []
    for _ in range(REPEATS):
        plain.append(run(False))
        budgeted.append(run(True))
        noop.append(run(None))
    p, b, n = statistics.median(plain), statistics.median(budgeted), statistics.median(noop)
    tokens = BATCH * NEW_TOKENS
    n_params = sum(x.numel() for x in model.parameters())
    print(
        f"{preset} model ({n_params:,} parameters) on {device}, batch {BATCH}, "
        f"{NEW_TOKENS} new tokens, median of {REPEATS}"
    )
    print(f"without step budget: {p:.2f} s ({tokens / p:.0f} tokens/s)")
    print(f"with step budget:    {b:.2f} s ({tokens / b:.0f} tokens/s)")
    print(f"with a no-op processor: {n:.2f} s (what any logits processor costs in generate)")
    verdict = ("met" if b / p <= 1.03 else "MISSED") if preset == "tiny" else "reference"
    # the processor alone, timed on its own: steadier than the difference of two runs
    proc = StepBudgetLogitsProcessor(tok, budget)
    ids = torch.randint(0, len(tok), (BATCH, 32), device=device)
    scores = torch.randn(BATCH, len(tok), device=device)
    proc(ids, scores)
    calls = 3000
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        proc(ids, scores)
    synchronize(device)
    per_call = (time.perf_counter() - start) / calls
    step = p / NEW_TOKENS
    print(
        f"processor alone: {1e6 * per_call:.1f} us per generated position = "
        f"{100 * per_call / step:.1f}% of a {1e3 * step:.2f} ms decode step"
    )
    print(
        f"overhead: {100 * (b / p - 1):+.1f}% (goal <= 3%: {verdict}); "
        f"vs the no-op processor: {100 * (b / n - 1):+.1f}%"
    )


if __name__ == "__main__":
    with tempfile.TemporaryDirectory():
        main()
