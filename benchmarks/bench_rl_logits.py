"""RL's loss log-probabilities (``steiner.train.rl._logprobs``) vs the same computation over
every position, at Qwen's 151,936-entry vocabulary: 8 completions of 256 tokens after a
64-token prompt, the policy's forward and backward and the KL reference's forward.

Goal: faster than the baseline in both passes (the prompt's share of the output layer's work
is saved; the layers below still see every position). Baseline, measured in
the same run: ``_logprobs`` as it was before it asked the model for the completion's positions
only (``logits_to_keep``, as TRL's GRPO does): the model computed the prompt's logits too and
they were dropped. Time is the median of 3 runs in one process; peak memory above the model's
(``ru_maxrss``) is measured in a fresh process per side and pass.
"""

from __future__ import annotations

import resource
import statistics
import subprocess
import sys
import time
import warnings

BATCH, PROMPT, COMPLETION, VOCAB, TEMPERATURE, REPEATS = 8, 64, 256, 151_936, 0.7, 3


def every_position_logprobs(model, input_ids, attention, n_prompt: int, temperature: float):
    logits = model(input_ids=input_ids, attention_mask=attention).logits[:, n_prompt - 1 : -1]
    logits = logits / temperature
    logp = torch.log_softmax(logits.float(), -1)
    return logp.gather(-1, input_ids[:, n_prompt:, None]).squeeze(-1)


def setup():
    from bench_processor import tokenizer
    from steiner.train.model import build_model
    from steiner.train.rl import _logprobs

    torch.manual_seed(0)
    model = build_model("tiny", tokenizer(), max_positions=1024)
    model.resize_token_embeddings(VOCAB, mean_resizing=False)
    ids = torch.randint(0, VOCAB, (BATCH, PROMPT + COMPLETION))
    sides = {"baseline": every_position_logprobs, "steiner": _logprobs}
    return model, ids, torch.ones_like(ids), sides


def one_pass(logprobs, model, ids, attention, backward: bool) -> None:
    if backward:
        logprobs(model, ids, attention, PROMPT, TEMPERATURE).sum().backward()
        model.zero_grad(set_to_none=True)
    else:
        with torch.no_grad():
            logprobs(model, ids, attention, PROMPT, TEMPERATURE)


def peak_mib(side: str, backward: bool) -> float:
    """One pass of one side in this process: peak resident memory above the model's, MiB."""
    model, ids, attention, sides = setup()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    one_pass(sides[side], model, ids, attention, backward)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def measured_mib(side: str, backward: bool) -> float:
    args = [sys.executable, __file__, side, str(int(backward))]
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    # first: a child process starts with its parent's peak (Linux keeps ru_maxrss across exec)
    passes = (True, False)
    mib = {(side, b): measured_mib(side, b) for side in ("baseline", "steiner") for b in passes}
    model, ids, attention, sides = setup()
    print(
        f"RL loss log-probabilities, {BATCH} x ({PROMPT} prompt + {COMPLETION} completion) "
        f"tokens, vocabulary {VOCAB:,}, one thread"
    )
    ratios = {}
    for backward in passes:
        name = "policy forward + backward" if backward else "reference forward"
        seconds = {}
        for side, logprobs in sides.items():
            one_pass(logprobs, model, ids, attention, backward)  # warm-up
            runs = []
            for _ in range(REPEATS):
                start = time.perf_counter()
                one_pass(logprobs, model, ids, attention, backward)
                runs.append(time.perf_counter() - start)
            seconds[side] = statistics.median(runs)
        ratios[name] = seconds["steiner"] / seconds["baseline"]
        print(f"  {name}:")
        print(
            f"    every position (baseline): {seconds['baseline']:.2f} s, "
            f"peak {mib['baseline', backward]:,.0f} MiB"
        )
        print(
            f"    steiner _logprobs:         {seconds['steiner']:.2f} s, "
            f"peak {mib['steiner', backward]:,.0f} MiB"
        )
        print(
            f"    time ratio {ratios[name]:.2f}x, "
            f"memory ratio {mib['steiner', backward] / mib['baseline', backward]:.2f}x"
        )
    met = "met" if max(ratios.values()) < 1 else "MISSED"
    print(f"time ratios {' and '.join(f'{r:.2f}x' for r in ratios.values())} (goal < 1x: {met})")


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)
    if len(sys.argv) > 1:
        print(peak_mib(sys.argv[1], sys.argv[2] == "1"))
    else:
        main()
