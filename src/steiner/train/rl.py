"""``steiner train rl``: policy optimisation with DAG step rewards (process-supervised GRPO).

A compact loop on ``accelerate`` rather than TRL's GRPOTrainer: GRPOTrainer computes one
advantage per sequence inside private methods, and the per-token advantages of process
supervision would mean overriding them (fragile across TRL releases). Each step samples
``group_size`` completions for each of ``prompts_per_step`` problems, scores every step against
the problem's DAG, turns the group into per-token advantages, and takes one clipped
policy-gradient step (one update per batch, so the ratio is 1 and clipping is inactive; with
``beta`` > 0 a k3 KL term to the reference model is added).

Sampling is ``model.generate`` with the step budget's format rules, or, with ``use_vllm``,
TRL's own vLLM backend (``VLLMGeneration``: an engine colocated on the training GPUs, or a
``trl vllm-serve`` server), whose engine applies the same rules through ``StepBudgetVLLM``.
Under ``accelerate launch`` every process takes its share of each step's prompts and gradients
are averaged across processes.
"""

from __future__ import annotations

import argparse
import inspect
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any
from unittest.mock import patch

import torch
from accelerate import Accelerator
from accelerate.utils import extract_model_from_parallel, gather_object
from transformers import AutoModelForCausalLM, AutoTokenizer

from steiner.dag import read_dags
from steiner.domains import get_domain, load_shortcuts
from steiner.format import STEP_END, Trace, parse, reasoning_token_ids
from steiner.infer.adapters import is_adapter_checkpoint, save_token_rows
from steiner.infer.budget import Budget, TokenIds
from steiner.infer.generate import (
    chat_prompt,
    count_prompt_tokens,
    position_limit,
    question_chat,
)
from steiner.infer.hf import StepBudgetLogitsProcessor
from steiner.infer.vllm_budget import VLLM_PROCESSOR
from steiner.io import (
    InputError,
    check_at_least,
    check_checkpoint_inputs,
    check_logger_names,
    check_model_dir,
    check_seed,
    check_share,
    expand_home,
    file_digest,
    last_checkpoint,
    local_path,
    sole_writer,
    source_digests,
    write_json,
)
from steiner.train.model import add_lora, check_lora_settings, model_dtype
from steiner.train.rewards import RewardWeights, Scored, process_advantages, score_trace


@dataclass
class RLStageConfig:
    model: str = ""
    problems: str = ""  # the training problems (shortcut or problem records)
    dags: str = ""  # dags.jsonl from `steiner synth` for those problems
    output_dir: str = field(default="runs/rl", metadata={"aliases": ["--out"]})
    # --max_steps as TRL's trainers and `train sft/cpt` spell it
    steps: int = field(default=100, metadata={"aliases": ["--max_steps", "--max-steps"]})
    prompts_per_step: int = 4
    group_size: int = 4
    max_new_tokens: int = 256
    # completions per forward and backward pass (None: the whole step's at once); gradients
    # are summed over the parts, so the update is the same in less memory
    micro_batch_size: int | None = None
    # Defaults measured on the graph demo's SFT model (README, Results): without the KL term
    # every run collapsed (lr 1e-4 in 17 steps, 3e-5 by 100 steps: garbage node ids, 0 %);
    # at 1.0 most sampled failures are sampling noise rather than the model's own mistakes,
    # and weighing every token the same let the long failed samples push the sampled tokens
    # down overall. temperature 0.7 + beta 0.04 + per-sample averaging: +1.0 to +5.7 points.
    temperature: float = 0.7
    # sampling filters, GRPOConfig's names and defaults (1.0, 0 and 0: off). As in TRL, they
    # shape the samples only: the loss's log-probabilities are the temperature-scaled ones
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    learning_rate: float = 1e-4
    beta: float = 0.04  # k3 KL to the starting model; 0 drops the reference model
    # how token losses are averaged (TRL's names): "grpo" weighs every sample the same
    # whatever its length, "dapo" every token the same
    loss_type: str = "grpo"
    max_grad_norm: float = 1.0
    # GRPOConfig's bf16 (its default on GPUs): the forwards autocast to bf16, the weights and
    # the optimizer stay fp32, as the Trainer's mixed precision. Off by default: a CPU runs
    # bf16 ~10x slower
    bf16: bool = False
    # LoRA adapters (PEFT; TRL's ModelConfig names, SFT's defaults): the policy trains its
    # adapters only, and the KL term's reference is the same model with them off, not a
    # second copy. The run ends with the merged model; its checkpoints hold the adapter
    use_lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | None = None
    save_steps: int = 50  # checkpoint (model, optimizer, RNG states, history) every N steps
    # each step's record to experiment trackers, as GRPOConfig's report_to (accelerate's
    # trackers: wandb, tensorboard, trackio, mlflow, ...; "all": every one installed)
    report_to: list[str] = field(
        default_factory=lambda: ["none"],
        metadata={"help": "Trackers to log each step to: wandb, tensorboard, trackio, ... or all."},
    )
    resume: bool = True  # continue from the last checkpoint in output_dir
    seed: int = 0
    # generation through vLLM on GPUs; the names and defaults are those of TRL's GRPOConfig
    use_vllm: bool = False
    vllm_mode: str = "colocate"  # or "server": `trl vllm-serve` started first (README: RL)
    vllm_server_base_url: str | None = None  # server mode; None: http://0.0.0.0:8000
    vllm_gpu_memory_utilization: float = 0.3  # colocate: the share of GPU memory vLLM takes
    vllm_tensor_parallel_size: int = 1  # colocate
    # a share of steps whose groups are sampled under a forced minimum of 2..forced_min_steps
    # steps (extend mode, as `steiner scale` forces it), so that RL keeps the skill of reasoning
    # past the answer; the forced decisions are left out of the loss (model.generate only)
    forced_min_share: float = 0.0
    forced_min_steps: int = 3
    # set from the reward-weight flags by the CLI (TRL's parser takes flat dataclasses)
    weights: RewardWeights = field(
        default_factory=RewardWeights,
        metadata={"help": argparse.SUPPRESS},  # not a flag
    )

    def __post_init__(self) -> None:
        expand_home(self, ("model", "problems", "dags", "output_dir"))


def _completion_ids(row: list[int], end_ids: tuple[int, ...]) -> list[int]:
    stop = next((i for i, t in enumerate(row) if t in end_ids), None)
    return row if stop is None else row[: stop + 1]


# Any budget field switches the step-budget processor on inside vLLM; min_steps 0 asks for the
# format rules alone, as ``Budget()`` does for ``model.generate``.
FORMAT_RULES_EXTRA = {"min_steps": 0}


def vllm_generation_kwargs(
    cfg: RLStageConfig, model: Any, accelerator: Accelerator, tokenizer: Any
) -> dict[str, Any]:
    """Arguments of TRL's ``VLLMGeneration`` (TRL is pinned; a test binds them to its
    signature)."""
    if cfg.vllm_mode not in ("colocate", "server"):
        raise InputError("--vllm_mode", None, f"expected colocate or server, got {cfg.vllm_mode!r}")
    return dict(
        model=model,
        accelerator=accelerator,
        processing_class=tokenizer,
        mode=cfg.vllm_mode,
        server_base_url=cfg.vllm_server_base_url,
        tensor_parallel_size=cfg.vllm_tensor_parallel_size,
        gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        min_p=cfg.min_p,
        max_completion_length=cfg.max_new_tokens,
        logprobs=None,  # the loop recomputes log-probabilities with the training model
        generation_kwargs={
            "extra_args": dict(FORMAT_RULES_EXTRA),
            "stop_token_ids": list(TokenIds.from_tokenizer(tokenizer).eos),
        },
    )


def vllm_generation(
    cfg: RLStageConfig, model: Any, accelerator: Accelerator, tokenizer: Any
) -> Any:
    import importlib.util

    import trl.generation.vllm_generation as trl_vllm

    if importlib.util.find_spec("vllm") is None:
        raise InputError("--use_vllm", None, "vLLM is not installed (pip install vllm, on GPUs)")
    kwargs = vllm_generation_kwargs(cfg, model, accelerator, tokenizer)
    if cfg.vllm_mode == "server":
        return trl_vllm.VLLMGeneration(**kwargs)
    # TRL builds the colocated engine itself and takes no engine arguments; the step budget
    # must be passed explicitly or vLLM's async scheduling hides the sampled tokens from it
    # (see steiner.infer.vllm_budget), so TRL gets an LLM with it bound, for this call only.
    with patch.object(trl_vllm, "LLM", partial(trl_vllm.LLM, logits_processors=[VLLM_PROCESSOR])):
        return trl_vllm.VLLMGeneration(**kwargs)


def score_completion(
    tokenizer: Any,
    ids: list[int],
    eos: tuple[int, ...],
    domain: Any,
    problem: dict[str, Any],
    dag: Any,
    weights: RewardWeights,
) -> tuple[Scored, Trace]:
    """Score one sampled completion. Its end-of-turn token stays in the tokens trained on (the
    model learns to stop) but not in the text read: the checker would see the answer
    ``54 25 19 30 22<|im_end|>`` and call a right answer wrong."""
    text_ids = ids[:-1] if ids and ids[-1] in eos else ids
    trace, _ = parse(tokenizer.decode(text_ids, skip_special_tokens=False))
    return score_trace(domain, problem, dag, trace, weights), trace


def sample_completions(
    model: Any,
    tokenizer: Any,
    enc: dict[str, torch.Tensor],
    cfg: RLStageConfig,
    eos: tuple[int, ...],
    vllm: Any | None = None,
    budget: Budget | None = None,
) -> list[list[int]]:
    """Completion token ids for each prompt row of ``enc`` (left-padded; ``group_size``
    copies of each prompt in a row), each cut after its first end-of-turn token (``eos``)."""
    if vllm is not None:
        prompts = [
            ids[mask.bool()].tolist()
            for ids, mask in zip(enc["input_ids"], enc["attention_mask"], strict=True)
        ]
        _, completions, _, _ = vllm.generate(prompts, None, cfg.group_size)
        return [_completion_ids(list(c), eos) for c in completions]
    processor = StepBudgetLogitsProcessor(tokenizer, budget or Budget())
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=cfg.max_new_tokens,
            do_sample=True,
            temperature=cfg.temperature,
            # transformers' off values: None (its 0 for top_k is off too; min_p 0 is a no-op)
            top_k=cfg.top_k or None,
            top_p=cfg.top_p if cfg.top_p < 1 else None,
            min_p=cfg.min_p or None,
            logits_processor=[processor],
            eos_token_id=list(eos),
            pad_token_id=tokenizer.pad_token_id,
        )
    n_prompt = enc["input_ids"].shape[1]
    return [_completion_ids(r, eos) for r in out[:, n_prompt:].tolist()]


def forced_decisions(
    ids: list[int], step_end_id: int, min_steps: int, spaces: frozenset[int] = frozenset()
) -> list[int]:
    """Positions a minimum of ``min_steps`` sampled with ``<|reasoning_end|>`` forbidden: after
    each of the first ``min_steps - 1`` step ends, the decision and any whitespace token the
    budget let come before it (``spaces``)."""
    out = []
    for j in [j for j, t in enumerate(ids) if t == step_end_id][: max(0, min_steps - 1)]:
        k = j + 1
        while k < len(ids) and ids[k] in spaces:
            out.append(k)
            k += 1
        if k < len(ids):
            out.append(k)
    return out


def completion_batch(
    completions: list[list[int]],
    advantages: list[float],
    pad_id: int,
    step_end_id: int,
    forced_min_steps: int = 0,
    spaces: frozenset[int] = frozenset(),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The completions as one right-padded batch: token ids, which positions hold a token
    (for attention), which the loss counts (those, less the decisions a forced minimum chose:
    the processor chose "not end" there, not the policy) and each token's advantage."""
    width = max(len(c) for c in completions)
    comp = torch.full((len(completions), width), pad_id, dtype=torch.long)
    present = torch.zeros(len(completions), width)
    adv = torch.zeros(len(completions), width)
    for i, c in enumerate(completions):
        comp[i, : len(c)] = torch.tensor(c)
        present[i, : len(c)] = 1
        adv[i, : len(c)] = advantages[i]
    loss_mask = present.clone()
    for i, c in enumerate(completions):
        loss_mask[i, forced_decisions(c, step_end_id, forced_min_steps, spaces)] = 0
    return comp, present, loss_mask, adv


def _logprobs(
    model: Any, input_ids: torch.Tensor, attention: torch.Tensor, n_prompt: int, temperature: float
) -> torch.Tensor:
    """Log-probabilities of the completion tokens under the distribution they were sampled
    from (logits divided by the sampling temperature, as TRL does), so the update stays
    on-policy at any temperature.

    As in TRL's GRPO, the model computes the completion's logits only (``logits_to_keep``):
    the prompt's, a vocabulary wide each, were computed and dropped
    (``benchmarks/bench_rl_logits.py``)."""
    kept = input_ids.shape[1] - n_prompt + 1
    extra = {"logits_to_keep": kept} if _takes_logits_to_keep(model) else {}
    # a model without logits_to_keep returns every position's: the same slice holds either way
    logits = model(input_ids=input_ids, attention_mask=attention, **extra).logits[:, -kept:-1]
    logits = logits / temperature
    return (
        torch.log_softmax(logits.float(), -1).gather(-1, input_ids[:, n_prompt:, None]).squeeze(-1)
    )


def _takes_logits_to_keep(model: Any) -> bool:
    """Whether the model under its wrappers (DDP, FSDP, DeepSpeed, PEFT) takes
    ``logits_to_keep``; the wrappers' own forwards pass it on but do not name it."""
    inner = extract_model_from_parallel(model)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def chunk_loss(
    cfg: RLStageConfig,
    model: Any,
    reference: tuple[Any, Callable[[], Any]],
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    rows: slice,
    n_prompt: int,
    autocast: Callable[[], Any],
) -> torch.Tensor:
    """The step's loss over the completions ``rows`` of ``batch`` (token ids, attention,
    advantages, loss mask), as their share of the whole batch's: "grpo" weighs each sample
    1/n, "dapo" each token 1/(the batch's tokens). ``reference`` is the KL term's model and
    the context to run it in."""
    input_ids, attention, adv, mask = batch
    ids, seen = input_ids[rows], attention[rows]
    with autocast():
        logp = _logprobs(model, ids, seen, n_prompt, cfg.temperature)
    ratio = torch.exp(logp - logp.detach())  # one update per batch: the old policy is this one
    loss_tokens = -ratio * adv[rows]
    if cfg.beta:
        ref_model, context = reference
        with torch.no_grad(), autocast(), context():
            ref_logp = _logprobs(ref_model, ids, seen, n_prompt, cfg.temperature)
        loss_tokens = loss_tokens + cfg.beta * (torch.exp(ref_logp - logp) - (ref_logp - logp) - 1)
    counted = mask[rows]
    if cfg.loss_type == "grpo":
        return ((loss_tokens * counted).sum(1) / counted.sum(1)).sum() / len(mask)
    return (loss_tokens * counted).sum() / mask.sum()


SETTINGS_FILE = "rl_settings.json"


def _save_checkpoint(
    out: Path,
    step: int,
    model: Any,
    tokenizer: Any,
    opt: Any,
    rng: random.Random,
    history: list[dict[str, Any]],
    process_rng: list[dict[str, Any]],
) -> None:
    """Written to a temporary folder, then renamed: a crash never leaves half a checkpoint.
    With the tokenizer, as the Trainer's are, so that a checkpoint loads like a model (under
    LoRA, the adapter and the 14 tokens' rows, as SFT's LoRA checkpoints: see
    ``steiner.infer.adapters``)."""
    import shutil

    final, tmp = out / f"checkpoint-{step}", out / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if is_adapter_checkpoint(tmp):
        save_token_rows(model, reasoning_token_ids(tokenizer), tmp)
    tokenizer.save_pretrained(tmp)
    torch.save(
        {
            "optimizer": opt.state_dict(),
            "process_rng": process_rng,
            "python_rng": rng.getstate(),
            "history": history,
            "step": step,
        },
        tmp / "state.pt",
    )
    tmp.rename(final)


def process_rng_state() -> dict[str, Any]:
    """This process's torch generators: on a GPU, sampling draws from the GPU's generator,
    not the CPU's (a run resumed with the CPU's alone sampled other completions on a GPU)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device's: this process's
    return state


def set_process_rng(state: dict[str, Any], process_index: int) -> None:
    """Restores what ``process_rng_state`` saved for this process. A checkpoint written before
    there was one entry per process holds the CPU generator alone (``torch_rng``)."""
    saved = state.get("process_rng") or [{"torch": state["torch_rng"]}]
    mine = saved[min(process_index, len(saved) - 1)]
    torch.set_rng_state(mine["torch"])
    if "cuda" in mine and torch.cuda.is_available():
        torch.cuda.set_rng_state(mine["cuda"])


def run_rl(cfg: RLStageConfig, log=print) -> dict[str, Any]:
    check_seed(cfg.seed)
    check_model_dir(cfg.model, "--model", "steiner train sft")
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    if cfg.loss_type not in ("grpo", "dapo"):
        raise InputError("--loss_type", None, f"expected grpo or dapo, got {cfg.loss_type!r}")
    check_at_least(
        cfg,
        (
            ("steps", 1, ""),
            ("prompts_per_step", 1, ""),
            # one completion per prompt has no group to compare with: every advantage is 0
            ("group_size", 2, " (GRPO compares the completions of one prompt)"),
            ("max_new_tokens", 1, ""),
            ("save_steps", 0, " (0: no checkpoints)"),
            ("learning_rate", 0, ""),
            ("beta", 0, " (0: no KL term)"),
            # clipping to 0 zeroed every update, and a negative norm turned the gradient round
            ("max_grad_norm", 0, " (0: no clipping)"),
            ("vllm_tensor_parallel_size", 1, ""),
            ("top_k", 0, " (0: off)"),
            ("micro_batch_size", 1, ""),
        ),
    )
    check_share(cfg, ("forced_min_share", "vllm_gpu_memory_utilization", "min_p"))
    check_lora_settings(cfg)
    if not 0 < cfg.top_p <= 1:
        raise InputError("--top_p", None, f"expected > 0 and <= 1 (1: off), got {cfg.top_p}")
    # each weight is a size: the formula gives its sign, so a negative one would reward what it
    # is there to punish (a wrong answer, a dead end) without a word
    weights = [(f.name, 0, "") for f in fields(cfg.weights) if f.name != "similarity"]
    check_at_least(cfg.weights, weights)
    check_share(cfg.weights, ("similarity",))  # over 1 no step ever matches a DAG node
    if cfg.temperature <= 0:
        raise InputError("--temperature", None, f"expected > 0 (RL samples), got {cfg.temperature}")
    if cfg.forced_min_share and cfg.use_vllm:
        raise InputError("--forced_min_share", None, "expected 0 with --use_vllm")
    if cfg.forced_min_steps < 2:
        raise InputError("--forced_min_steps", None, f"expected >= 2, got {cfg.forced_min_steps}")
    trackers = check_trackers(cfg.report_to)
    # cpu: under torchrun on a machine without a GPU, as the Trainer's use_cpu does for SFT;
    # without it each process took itself for the only one, and the second stopped at the
    # output lock ("another run is writing here") unless ACCELERATE_USE_CPU was set
    accelerator = Accelerator(
        log_with=trackers or None,
        project_dir=cfg.output_dir,
        cpu=not torch.cuda.is_available(),
    )
    if cfg.prompts_per_step % accelerator.num_processes:
        raise InputError(
            "--prompts_per_step",
            None,
            f"expected a multiple of the number of processes ({accelerator.num_processes}), "
            f"got {cfg.prompts_per_step}",
        )
    with sole_writer(cfg.output_dir, "--output_dir", main_process=accelerator.is_main_process):
        return train_rl(cfg, accelerator, rng, log)


def check_trackers(names: list[str]) -> list[str]:
    """The trackers ``report_to`` names, each known to accelerate and installed: accelerate
    passes over one that is not installed with a debug line, so a run asked to log to wandb
    would log nowhere without a word."""
    from accelerate import tracking

    installed = [str(t) for t in tracking.get_available_trackers()]
    wanted = [n for n in names if n != "none"]
    if "all" in wanted:
        return installed
    check_logger_names(wanted, tracking.LOGGER_TYPE_TO_CLASS, installed)
    return list(dict.fromkeys(wanted))


def tracker_config(cfg: RLStageConfig) -> dict[str, Any]:
    """The settings as flat scalars: tensorboard's hparams take no None, list or mapping."""
    flat: dict[str, Any] = {}
    for key, value in asdict(cfg).items():
        for name, v in value.items() if isinstance(value, dict) else [(key, value)]:
            if v is not None:
                flat[name] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return flat


def question_prompt(tokenizer: Any, problem: dict[str, Any]) -> str:
    return chat_prompt(tokenizer, question_chat(problem))


def check_room_for_completions(
    tokenizer: Any, positions: int | None, problems: list[dict[str, Any]], cfg: RLStageConfig
) -> None:
    """Every prompt must leave ``max_new_tokens`` of the model's positions, as ``generate``
    holds its rows to them: past them a learned position table raises IndexError, RoPE runs
    on angles the model never saw and vLLM refuses the request, so the run would train on
    completions the model cannot write. Checked before anything is written."""
    if not positions:
        return
    lengths = count_prompt_tokens(tokenizer, [question_chat(p) for p in problems])
    longest = max(range(len(problems)), key=lengths.__getitem__)
    what = (
        f"problem {problems[longest]['id']} of {cfg.problems} has a prompt of "
        f"{lengths[longest]} tokens and {cfg.model} has {positions} positions"
    )
    if lengths[longest] >= positions:
        raise InputError(cfg.problems, None, f"{what}; expected prompts that leave it room")
    if lengths[longest] + cfg.max_new_tokens > positions:
        raise InputError(
            "--max_new_tokens",
            None,
            f"expected at most {positions - lengths[longest]} ({what}), got {cfg.max_new_tokens}",
        )


def train_rl(
    cfg: RLStageConfig, accelerator: Accelerator, rng: random.Random, log: Any
) -> dict[str, Any]:
    """``run_rl`` once its settings are checked, holding ``output_dir``."""
    # a checkpoint continues only from the same start (the KL term's reference too) and data
    inputs = {k: local_path(getattr(cfg, k)) for k in ("model", "problems", "dags")}
    inputs |= source_digests(problems=cfg.problems)  # a file or a `datasets` source
    inputs["dags_sha256"] = file_digest(cfg.dags)
    # written whole to a temporary folder, then renamed: state.pt is there when the folder is
    last = last_checkpoint(cfg.output_dir, "state.pt") if cfg.resume else None
    record = Path(cfg.output_dir, SETTINGS_FILE)
    resuming = last is not None
    problems = load_shortcuts(cfg.problems)
    dags = {d.problem_id: d for d in read_dags(cfg.dags)}
    problems = [p for p in problems if p["id"] in dags]
    if not problems:
        raise InputError(
            cfg.dags,
            None,
            f"no DAG for any problem of {cfg.problems}; expected synth's DAGs of them",
        )
    tok = AutoTokenizer.from_pretrained(cfg.model)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=model_dtype(cfg.bf16))
    check_room_for_completions(tok, position_limit(model), problems, cfg)
    # once the data have loaded: bad data stops the run before this writes anything
    check_checkpoint_inputs(record, inputs, resuming, "an RL run", accelerator.is_main_process)
    domain = get_domain(problems[0]["domain"])
    ref = (
        AutoModelForCausalLM.from_pretrained(cfg.model, dtype=model_dtype(cfg.bf16))
        .to(accelerator.device)
        .eval()
        if cfg.beta and not cfg.use_lora  # under LoRA: the policy with its adapters off
        else None
    )
    if cfg.use_lora:
        model = add_lora(model, cfg)
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate
    )
    step_end_id = tok.convert_tokens_to_ids(STEP_END)
    token_ids = TokenIds.from_tokenizer(tok)
    eos, spaces = token_ids.eos, frozenset(token_ids.spaces)
    history: list[dict[str, Any]] = []
    first_step = 1
    if last is not None:
        if is_adapter_checkpoint(last) != cfg.use_lora:
            written = "with" if is_adapter_checkpoint(last) else "without"
            raise InputError(
                last,
                None,
                f"written {written} --use_lora; expected the same setting to resume it (or "
                "--no_resume to start over)",
            )
        state = torch.load(last / "state.pt", weights_only=False)
        if cfg.use_lora:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(model, load_file(last / "adapter_model.safetensors"))
        else:
            model.load_state_dict(
                AutoModelForCausalLM.from_pretrained(last, dtype=torch.float32).state_dict()
            )
        opt.load_state_dict(state["optimizer"])
        set_process_rng(state, accelerator.process_index)
        rng.setstate(state["python_rng"])
        history, first_step = state["history"], state["step"] + 1
        log({"resumed_from": str(last), "step": state["step"]})
    model, opt = accelerator.prepare(model, opt)
    policy = accelerator.unwrap_model(model)
    vllm = None
    if cfg.use_vllm:
        vllm = vllm_generation(cfg, policy, accelerator, tok)
        vllm.sync_weights()  # the engine loaded cfg.model; a resumed run has moved on
    # tensorboard writes under output_dir/steiner-rl; a resumed run logs on from its step
    accelerator.init_trackers("steiner-rl", config=tracker_config(cfg))
    # --bf16 as torch's autocast around each forward (sampling, policy, reference), not
    # accelerate's mixed_precision: that is process-wide state, and a process that had made an
    # Accelerator already (a Trainer's, in an SFT run before) refused another setting
    bf16_autocast = partial(
        torch.autocast, accelerator.device.type, dtype=torch.bfloat16, enabled=cfg.bf16
    )
    # the KL term's reference (with beta): the starting model, or under LoRA the policy with
    # its adapters off
    reference = (policy, policy.disable_adapter) if cfg.use_lora else (ref, nullcontext)
    start = time.perf_counter()
    for step in range(first_step, cfg.steps + 1):
        batch = rng.sample(problems, min(cfg.prompts_per_step, len(problems)))
        batch = batch[accelerator.process_index :: accelerator.num_processes]
        prompts = [question_prompt(tok, p) for p in batch for _ in range(cfg.group_size)]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(
            accelerator.device
        )
        forced = 0
        if cfg.forced_min_share and rng.random() < cfg.forced_min_share:
            forced = rng.randint(2, cfg.forced_min_steps)
        model.eval()
        budget = Budget(min_steps=forced)
        with bf16_autocast():
            completions = sample_completions(policy, tok, enc, cfg, eos, vllm, budget)
        scored, ends = [], []
        for i, ids in enumerate(completions):
            problem = batch[i // cfg.group_size]
            dag = dags[problem["id"]]
            s, trace = score_completion(tok, ids, eos, domain, problem, dag, cfg.weights)
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
        comp, present, mask, adv = (
            t.to(accelerator.device)
            for t in completion_batch(
                completions, advantages, tok.pad_token_id, step_end_id, forced, spaces
            )
        )
        n_prompt = enc["input_ids"].shape[1]
        input_ids = torch.cat([enc["input_ids"], comp], 1)
        attention = torch.cat([enc["attention_mask"], present.long()], 1)
        model.train()
        batch = (input_ids, attention, adv, mask)
        # --micro_batch_size completions per forward and backward, their gradients summed: the
        # same update as the whole batch at once, in the memory of a part (a large vocabulary's
        # logits for every completion of a step did not fit)
        opt.zero_grad()
        size = cfg.micro_batch_size or len(completions)
        starts = range(0, len(completions), size)
        loss = torch.zeros(())
        for start_row in starts:
            last_chunk = start_row == starts[-1]
            # gradients are averaged across processes once, at the last part
            with nullcontext() if last_chunk else accelerator.no_sync(model):
                rows = slice(start_row, start_row + size)
                part = chunk_loss(cfg, model, reference, batch, rows, n_prompt, bf16_autocast)
                accelerator.backward(part)
            loss += part.detach().cpu()
        if cfg.max_grad_norm > 0:  # 0: no clipping, as in transformers' Trainer
            accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        if vllm is not None:
            vllm.sync_weights()
        # every process's samples, for the log (gather_object returns its input on one process)
        samples = gather_object([(s.total, s.terms, t.n_steps, t.n_backtracks) for s, t in scored])
        terms: dict[str, float] = {}
        for _, sample_terms, _, _ in samples:
            for k, v in sample_terms.items():
                terms[k] = terms.get(k, 0.0) + v / len(samples)
        record = {
            "step": step,
            "forced_min_steps": forced,
            "loss": round(loss.item(), 4),
            "mean_reward": round(sum(x[0] for x in samples) / len(samples), 4),
            "accuracy": round(sum(x[1].get("correct", 0) > 0 for x in samples) / len(samples), 4),
            "mean_steps": round(sum(x[2] for x in samples) / len(samples), 3),
            "mean_backtracks": round(sum(x[3] for x in samples) / len(samples), 3),
            "terms": {k: round(v, 4) for k, v in sorted(terms.items())},
            "seconds": round(time.perf_counter() - start, 1),
        }
        history.append(record)
        log(record)
        scalars = {k: v for k, v in record.items() if k not in ("step", "terms")}
        accelerator.log(scalars | {f"terms/{k}": v for k, v in record["terms"].items()}, step=step)
        # the last step too, as Trainer does: a re-run of a finished run then trains nothing
        # (it redid the steps after the last multiple of save_steps), and a longer --steps goes
        # on from it with the optimiser's state
        if cfg.save_steps and (step % cfg.save_steps == 0 or step == cfg.steps):
            process_rng = gather_object([process_rng_state()])
            if accelerator.is_main_process:
                _save_checkpoint(
                    Path(cfg.output_dir), step, policy, tok, opt, rng, history, process_rng
                )
            accelerator.wait_for_everyone()
    # not end_training(), which also ends the process group the saves below still wait on
    for tracker in accelerator.trackers:
        tracker.finish()
    summary = {
        "config": asdict(cfg),
        "resumed_from": str(last) if last is not None else None,
        "train_seconds": round(time.perf_counter() - start, 2),  # this run
        "history": history,
    }
    if accelerator.is_main_process:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        # under LoRA the run's model is the merged one, as SFT's, so that it loads anywhere
        (policy.merge_and_unload() if cfg.use_lora else policy).save_pretrained(cfg.output_dir)
        tok.padding_side = "right"
        tok.save_pretrained(cfg.output_dir)
        write_json(Path(cfg.output_dir) / "rl_summary.json", summary)
    accelerator.wait_for_everyone()
    return summary
