"""Per-row seeded sampling (``steiner.infer.sampling.PerRowSampler``) vs transformers' own
``generate(do_sample=True)``: tiny model, batch 16, the same number of new tokens in both.

Goal: per-row sampling costs <= 5% of generation throughput. transformers draws a whole batch
from one random stream; ours gives each row its own generator, so a seeded request or a resumed
eval does not depend on its batch. Run at the tokenizer's own vocabulary and at Qwen's 151,936
entries, where the per-row work over the vocabulary weighs most.
"""

from __future__ import annotations

import statistics
import warnings

from bench_processor import timed_generate, tokenizer
from steiner.infer.sampling import PerRowSampler
from steiner.train.model import build_model

BATCH, REPEATS = 16, 5


def measure(vocab: int | None, new_tokens: int) -> float:
    tok = tokenizer()
    model = build_model("tiny", tok, max_positions=1024).eval()
    if vocab:
        model.resize_token_embeddings(vocab, mean_resizing=False)
    prompts = [f"reach {i} with 3 7 25 50" * (1 + i % 3) for i in range(BATCH)]
    batch = tok(prompts, return_tensors="pt", padding=True)

    def run(per_row: bool) -> float:
        if per_row:
            rows = PerRowSampler([0.7] * BATCH, [0.95] * BATCH, list(range(BATCH)))
            return timed_generate(
                model, tok, batch, new_tokens, do_sample=False, top_k=None, logits_processor=[rows]
            )
        return timed_generate(
            model, tok, batch, new_tokens, do_sample=True, temperature=0.7, top_p=0.95, top_k=None
        )

    run(False), run(True)  # warm-up
    hf, ours = [], []
    for _ in range(REPEATS):
        hf.append(run(False))
        ours.append(run(True))
    h, o = statistics.median(hf), statistics.median(ours)
    tokens = BATCH * new_tokens
    size = model.config.vocab_size
    print(f"vocabulary {size:,}, batch {BATCH}, {new_tokens} new tokens, median of {REPEATS}")
    print(f"  transformers do_sample (baseline): {h:.2f} s ({tokens / h:.0f} tokens/s)")
    print(f"  PerRowSampler:                     {o:.2f} s ({tokens / o:.0f} tokens/s)")
    print(
        f"  throughput ratio {h / o:.3f}x (goal >= 0.95x: {'met' if h / o >= 0.95 else 'MISSED'})"
    )
    return h / o


def main() -> None:
    warnings.filterwarnings("ignore")
    measure(None, 256)
    measure(151_936, 48)  # about 0.25 s per token on this CPU


if __name__ == "__main__":
    main()
