"""``steiner train rl``: policy optimisation with DAG step rewards (process-supervised GRPO).

A compact loop rather than TRL's GRPOTrainer: GRPOTrainer computes one advantage per
sequence inside private methods, and the per-token advantages of process supervision would
mean overriding them (fragile across TRL releases). Each step samples ``group_size``
completions for each of ``prompts_per_step`` problems, scores every step against the
problem's DAG, turns the group into per-token advantages, and takes one clipped
policy-gradient step (one update per batch, so the ratio is 1 and clipping is inactive; with
``beta`` > 0 a k3 KL term to the reference model is added).
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from steiner.dag import read_dags
from steiner.domains import get_domain, load_shortcuts
from steiner.format import STEP_END, parse
from steiner.infer.budget import Budget
from steiner.infer.hf import StepBudgetLogitsProcessor
from steiner.io import write_json
from steiner.train.rewards import RewardWeights, process_advantages, score_trace


@dataclass
class RLStageConfig:
    model: str = ""
    problems: str = ""  # the training problems (shortcut or problem records)
    dags: str = ""  # dags.jsonl from `steiner synth` for those problems
    output_dir: str = "runs/rl"
    steps: int = 100
    prompts_per_step: int = 4
    group_size: int = 4
    max_new_tokens: int = 256
    temperature: float = 1.0
    learning_rate: float = 1e-4
    beta: float = 0.0
    max_grad_norm: float = 1.0
    save_steps: int = 50  # checkpoint (model, optimizer, RNG states, history) every N steps
    resume: bool = True  # continue from the last checkpoint in output_dir
    seed: int = 0
    # set from the reward-weight flags by the CLI (TRL's parser takes flat dataclasses)
    weights: RewardWeights = field(default_factory=RewardWeights, metadata={"help": "not a flag"})


def _completion_ids(row: list[int], end_ids: tuple[int, ...]) -> list[int]:
    stop = next((i for i, t in enumerate(row) if t in end_ids), None)
    return row if stop is None else row[: stop + 1]


def _logprobs(
    model: Any, input_ids: torch.Tensor, attention: torch.Tensor, n_prompt: int
) -> torch.Tensor:
    logits = model(input_ids=input_ids, attention_mask=attention).logits[:, n_prompt - 1 : -1]
    return (
        torch.log_softmax(logits.float(), -1).gather(-1, input_ids[:, n_prompt:, None]).squeeze(-1)
    )


def _last_checkpoint(output_dir: str) -> Path | None:
    found = sorted(Path(output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return found[-1] if found else None


def _save_checkpoint(
    out: Path, step: int, model: Any, opt: Any, rng: random.Random, history: list[dict[str, Any]]
) -> None:
    """Written to a temporary folder, then renamed: a crash never leaves half a checkpoint."""
    import shutil

    final, tmp = out / f"checkpoint-{step}", out / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    torch.save(
        {
            "optimizer": opt.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": rng.getstate(),
            "history": history,
            "step": step,
        },
        tmp / "state.pt",
    )
    tmp.rename(final)


def run_rl(cfg: RLStageConfig, log=print) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    problems = load_shortcuts(cfg.problems)
    dags = {d.problem_id: d for d in read_dags(cfg.dags)}
    problems = [p for p in problems if p["id"] in dags]
    domain = get_domain(problems[0]["domain"])
    tok = AutoTokenizer.from_pretrained(cfg.model)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
    ref = (
        AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32).eval()
        if cfg.beta
        else None
    )
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate)
    step_end_id = tok.convert_tokens_to_ids(STEP_END)
    history: list[dict[str, Any]] = []
    first_step = 1
    last = _last_checkpoint(cfg.output_dir) if cfg.resume else None
    if last is not None:
        state = torch.load(last / "state.pt", weights_only=False)
        model.load_state_dict(
            AutoModelForCausalLM.from_pretrained(last, dtype=torch.float32).state_dict()
        )
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        rng.setstate(state["python_rng"])
        history, first_step = state["history"], state["step"] + 1
        log({"resumed_from": str(last), "step": state["step"]})
    start = time.perf_counter()
    for step in range(first_step, cfg.steps + 1):
        batch = rng.sample(problems, min(cfg.prompts_per_step, len(problems)))
        prompts = [
            tok.apply_chat_template(
                [{"role": "user", "content": p["question"]}],
                tokenize=False,
                add_generation_prompt=True,
            )
            for p in batch
            for _ in range(cfg.group_size)
        ]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        processor = StepBudgetLogitsProcessor(tok, Budget())
        model.eval()
        with torch.no_grad():
            out = model.generate(
                **enc,
                max_new_tokens=cfg.max_new_tokens,
                do_sample=True,
                temperature=cfg.temperature,
                top_k=None,
                top_p=None,
                logits_processor=[processor],
                eos_token_id=list(processor.ids.eos),
                pad_token_id=tok.pad_token_id,
            )
        n_prompt = enc["input_ids"].shape[1]
        completions = [_completion_ids(r, processor.ids.eos) for r in out[:, n_prompt:].tolist()]
        scored, ends = [], []
        for i, ids in enumerate(completions):
            problem = batch[i // cfg.group_size]
            trace, _ = parse(tok.decode(ids, skip_special_tokens=False))
            s = score_trace(domain, problem, dags[problem["id"]], trace, cfg.weights)
            step_ends = [j for j, t in enumerate(ids) if t == step_end_id][: len(s.step_rewards)]
            step_ends += [len(ids) - 1] * (len(s.step_rewards) - len(step_ends))  # a cut last step
            scored.append((s, trace))
            ends.append(step_ends)
        advantages: list[torch.Tensor] = []
        for g in range(len(batch)):
            sl = slice(g * cfg.group_size, (g + 1) * cfg.group_size)
            advantages += process_advantages(
                [s.step_rewards for s, _ in scored[sl]],
                ends[sl],
                [s.outcome for s, _ in scored[sl]],
                [len(c) for c in completions[sl]],
            )
        # one padded batch of prompt + completion, completion positions masked
        width = max(len(c) for c in completions)
        comp = torch.full((len(completions), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(completions), width)
        adv = torch.zeros(len(completions), width)
        for i, c in enumerate(completions):
            comp[i, : len(c)] = torch.tensor(c)
            mask[i, : len(c)] = 1
            adv[i, : len(c)] = advantages[i]
        input_ids = torch.cat([enc["input_ids"], comp], 1)
        attention = torch.cat([enc["attention_mask"], mask.long()], 1)
        model.train()
        logp = _logprobs(model, input_ids, attention, n_prompt)
        ratio = torch.exp(logp - logp.detach())  # one update per batch: the old policy is this one
        loss_tokens = -ratio * adv
        if ref is not None:
            with torch.no_grad():
                ref_logp = _logprobs(ref, input_ids, attention, n_prompt)
            loss_tokens = loss_tokens + cfg.beta * (
                torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
            )
        loss = (loss_tokens * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        totals = [s.total for s, _ in scored]
        traces = [t for _, t in scored]
        terms: dict[str, float] = {}
        for s, _ in scored:
            for k, v in s.terms.items():
                terms[k] = terms.get(k, 0.0) + v / len(scored)
        record = {
            "step": step,
            "loss": round(loss.item(), 4),
            "mean_reward": round(sum(totals) / len(totals), 4),
            "accuracy": round(
                sum(s.terms.get("correct", 0) > 0 for s, _ in scored) / len(scored), 4
            ),
            "mean_steps": round(sum(t.n_steps for t in traces) / len(traces), 3),
            "mean_backtracks": round(sum(t.n_backtracks for t in traces) / len(traces), 3),
            "terms": {k: round(v, 4) for k, v in sorted(terms.items())},
            "seconds": round(time.perf_counter() - start, 1),
        }
        history.append(record)
        log(record)
        if cfg.save_steps and step % cfg.save_steps == 0 and step < cfg.steps:
            _save_checkpoint(Path(cfg.output_dir), step, model, opt, rng, history)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(cfg.output_dir)
    tok.padding_side = "right"
    tok.save_pretrained(cfg.output_dir)
    summary = {"config": asdict(cfg), "history": history}
    write_json(Path(cfg.output_dir) / "rl_summary.json", summary)
    return summary
