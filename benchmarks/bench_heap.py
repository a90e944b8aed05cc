"""Training speed with glibc's heap kept (`steiner.io.keep_freed_heap`, which the `steiner`
command calls at start) vs glibc's defaults, the quick demo's Steiner SFT shape (micro model,
graph walks, batch 32): alternating runs in fresh processes, one run.

Baseline: the same `run_sft` in a process that leaves glibc's defaults, where every step's
freed activations go back to the system and come back as fresh zeroed pages. The weights
must come out byte-identical: the allocator decides where tensors live, not their values.
"""

from __future__ import annotations

import hashlib
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

from bench_sft import STEPS, demo_shape_data, demo_shape_settings

ROUNDS = 3


def train_once(tmp: Path, keep: bool, threads: int, out: Path) -> dict:
    """One child process's run: the heap setting, then STEPS steps of SFT."""
    import torch

    from steiner.io import keep_freed_heap
    from steiner.train.config import SFTStageConfig
    from steiner.train.trainer import run_sft

    kept = keep_freed_heap() if keep else False
    torch.set_num_threads(threads)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    summary = run_sft(
        SFTStageConfig(
            output_dir=str(out),
            model=str(tmp / "init"),
            data=str(tmp / "synth" / "paths.jsonl"),
            max_steps=STEPS,
            save_strategy="no",
            disable_tqdm=True,
            **demo_shape_settings(),
        )
    )
    return {
        "kept": kept,
        "train_seconds": summary["train_seconds"],
        "page_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before,
        "weights": hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest(),
    }


def child(tmp: Path, keep: bool, threads: int, out: Path) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", str(tmp), str(int(keep)), str(threads), str(out)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        demo_shape_data(tmp)
        print(f"micro model, {STEPS} SFT steps on graph walks, batch 32; {ROUNDS} rounds")
        for threads in (1, 2):
            runs: dict[bool, list[dict]] = {False: [], True: []}
            for round_ in range(ROUNDS):
                for keep in (False, True):
                    out = tmp / f"out-{threads}-{int(keep)}-{round_}"
                    runs[keep].append(child(tmp, keep, threads, out))
            assert all(r["kept"] for r in runs[True]), "keep_freed_heap did not take effect"
            same = len({r["weights"] for r in runs[False] + runs[True]}) == 1
            base = statistics.median(r["train_seconds"] for r in runs[False])
            kept = statistics.median(r["train_seconds"] for r in runs[True])
            faults = [statistics.median(r["page_faults"] for r in runs[k]) for k in (False, True)]
            print(
                f"{threads} thread(s): glibc defaults {base:.1f} s, heap kept {kept:.1f} s "
                f"(median train seconds) = {base / kept:.3f}x faster; page faults "
                f"{faults[0]:,.0f} vs {faults[1]:,.0f}; weights byte-identical: {same}"
            )


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    if sys.argv[1:2] == ["--child"]:
        import transformers

        transformers.logging.set_verbosity_error()
        tmp, keep, threads, out = sys.argv[2:6]
        print(json.dumps(train_once(Path(tmp), keep == "1", int(threads), Path(out))))
    else:
        main()
