"""Batched generation with the chat template and the step budget, shared by
``steiner generate``, ``steiner serve`` and evaluation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria

from steiner.format import REASONING_END, Trace, parse, reasoning_and_answer
from steiner.infer.adapters import is_adapter_checkpoint, load_adapter_checkpoint
from steiner.infer.budget import Budget
from steiner.infer.hf import StepBudgetLogitsProcessor
from steiner.infer.sampling import PerRowSampler
from steiner.io import check_model_dir, check_reasoning_tokenizer, without_loading_bar


@dataclass
class Completion:
    text: str  # the whole assistant message
    reasoning: str  # up to and including <|reasoning_end|>
    answer: str
    trace: Trace
    format_errors: list[str]
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    finish_reason: str  # stop | length | cancelled (see ``generate``)
    extra: dict[str, Any] = field(default_factory=dict)


def per_row(value: Any, n: int) -> list[Any]:
    """A setting for each of n rows: a sequence as it is (one per row), one value for all."""
    if isinstance(value, Sequence):
        if len(value) != n:
            raise ValueError(f"{len(value)} per-row values for {n} conversations")
        return list(value)
    return [value] * n


MADE_BY = "steiner train, or save_pretrained"


def placement() -> dict[str, Any]:
    """How ``load`` places a model: on the GPUs when there are any (``device_map="auto"``
    spreads one too large for a GPU over them), in the dtype it was saved in; else on the
    CPU in fp32, where bf16 runs ~10x slower. ``CUDA_VISIBLE_DEVICES=`` keeps it on the CPU."""
    if torch.cuda.is_available():
        return {"dtype": "auto", "device_map": "auto"}
    return {"dtype": torch.float32}


def load(model_dir: str | Path) -> tuple[Any, Any]:
    """The model and tokenizer of a Steiner model directory, ready for ``generate`` (placed
    by ``placement``; eval, scale, generate and serve all load through here)."""
    check_model_dir(str(model_dir), "--model", MADE_BY, reasoning=False, adapters=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    check_reasoning_tokenizer(tokenizer, str(model_dir))  # on this one, not a second load
    tokenizer.padding_side = "left"  # decoder-only batches pad on the left
    with without_loading_bar():
        if is_adapter_checkpoint(model_dir):  # a LoRA run's checkpoint-N
            model = load_adapter_checkpoint(model_dir, tokenizer, **placement())
        else:
            model = AutoModelForCausalLM.from_pretrained(model_dir, **placement())
    model.eval()
    return model, tokenizer


def question_chat(problem: dict[str, Any]) -> list[dict[str, str]]:
    """A problem record's question as the one-turn chat that eval and RL both ask it in."""
    return [{"role": "user", "content": problem["question"]}]


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# what ``generate`` answers: a chat, or a prompt already written out as text or as token ids
# (serve's /v1/completions, where the client applied the chat template itself, as
# lm-evaluation-harness's local-completions does)
Prompt = list[dict[str, str]] | str | list[int]


def is_token_ids(prompt: Prompt) -> bool:
    """A prompt given as token ids (a chat is a list too, of messages)."""
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], int)


def prompt_token_ids(tokenizer: Any, prompts: Sequence[Prompt]) -> list[list[int]]:
    """Each prompt's ids as ``generate`` feeds them: a chat through the chat template, a text
    as it is written, token ids as they are; the texts in one tokenizer call (RL checks all
    its problems' prompts at once)."""
    texts = [
        p if isinstance(p, str) else chat_prompt(tokenizer, p)
        for p in prompts
        if not is_token_ids(p)
    ]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    return [list(p) if is_token_ids(p) else next(encoded) for p in prompts]


def count_prompt_tokens(tokenizer: Any, chats: Sequence[Prompt]) -> list[int]:
    """Each prompt's length as ``generate`` encodes it (apply_chat_template(tokenize=True)
    returns a BatchEncoding, whose len() is its number of keys, not of tokens)."""
    return [len(ids) for ids in prompt_token_ids(tokenizer, chats)]


def position_limit(model: Any) -> int | None:
    """How many positions the model has (prompt and completion together), where it says."""
    return getattr(model.config, "max_position_embeddings", None)


class StopCancelledRows(StoppingCriteria):
    """Ends the rows whose request was given up (a server's client that left), so that a batch
    of them ends at once instead of running on to its max_new_tokens. Remembers each row's
    length when it ended (the tokens after are padding)."""

    def __init__(self, cancelled: Sequence[Callable[[], bool]]):
        self.cancelled = cancelled
        self.ended_at: dict[int, int] = {}

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        for i, gone in enumerate(self.cancelled):
            if i not in self.ended_at and gone():
                self.ended_at[i] = input_ids.shape[1]
        done = [i in self.ended_at for i in range(input_ids.shape[0])]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class StopAtPositionLimit(StoppingCriteria):
    """Ends each row where it fills the model's positions, counting its own prompt, not the
    batch's padding (positions come from the attention mask). Past them a learned position
    table raises IndexError and RoPE runs on angles it was never trained at; vLLM refuses such
    requests by its max_model_len. Here the row ends with finish_reason "length"."""

    def __init__(self, prompt_lengths: torch.Tensor, start: int, limit: int):
        self.prompt_lengths, self.start, self.limit = prompt_lengths, start, limit

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        generated = input_ids.shape[1] - self.start
        return (self.prompt_lengths.to(input_ids.device) + generated) >= self.limit


@torch.inference_mode()
def generate(
    model: Any,
    tokenizer: Any,
    conversations: Sequence[Prompt],
    budgets: list[Budget | None] | None = None,
    max_new_tokens: int = 512,
    temperature: float | Sequence[float] = 0.0,
    top_p: float | Sequence[float] = 1.0,
    seed: int | None | Sequence[int | None] = None,
    cancelled: Sequence[Callable[[], bool]] | None = None,
) -> list[Completion]:
    """One completion per conversation (a chat, or a prompt's text or token ids used as they
    are), in one batched ``generate`` call. A row whose budget
    is None still gets the format's structure (``Budget()`` has no step limits). Temperature,
    top-p and seed are one for all rows or one per row; a sampled row draws from its own seeded
    generator, so its completion does not depend on the other rows of the batch. ``cancelled``
    (one per row, asked at every token): a row whose call says True ends there, its
    completion cut where it ended, with finish_reason "cancelled"."""
    if not conversations:
        return []
    prompts = prompt_token_ids(tokenizer, conversations)
    batch = tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt")
    batch = batch.to(model.device)  # a model on a GPU takes its inputs there
    rows = [b or Budget() for b in (budgets or [None] * len(prompts))]
    limit = position_limit(model)
    prompt_lengths = batch["attention_mask"].sum(1)
    if limit and int(prompt_lengths.max()) >= limit:
        # a prompt that fills the positions is not run at all: a learned position table
        # raises IndexError on it (a traceback, for the whole batch) and RoPE would read it
        # at angles it never saw; it gets an empty answer cut by "length", as a row does
        # that fills them while it writes
        fits = [i for i, n in enumerate(prompt_lengths.tolist()) if n < limit]
        pick = lambda values: [values[i] for i in fits]  # noqa: E731
        n = len(prompts)
        answered = generate(
            model,
            tokenizer,
            pick(conversations),
            pick(rows),
            max_new_tokens,
            pick(per_row(temperature, n)),
            pick(per_row(top_p, n)),
            pick(per_row(seed, n)),
            pick(cancelled) if cancelled else None,
        )
        by_row = dict(zip(fits, answered, strict=True))
        return [
            by_row[i]
            if i in by_row
            else decode_completion(tokenizer, [], None, int(prompt_lengths[i]), False)
            for i in range(n)
        ]
    processor = StepBudgetLogitsProcessor(tokenizer, rows)
    end_ids = processor.ids.eos
    stop_cancelled = StopCancelledRows(cancelled) if cancelled else None
    criteria: list[StoppingCriteria] = [stop_cancelled] if stop_cancelled else []
    start = batch["input_ids"].shape[1]
    if limit:
        max_new_tokens = max(1, min(max_new_tokens, limit - int(prompt_lengths.min())))
        criteria.append(StopAtPositionLimit(prompt_lengths, start, limit))
    sampler = PerRowSampler(
        per_row(temperature, len(prompts)),
        per_row(top_p, len(prompts)),
        per_row(seed, len(prompts)),
    )
    out = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=False,  # the sampler draws; greedy search takes its draw
        temperature=None,
        top_p=None,
        top_k=None,
        logits_processor=[processor, sampler],
        eos_token_id=list(end_ids),
        pad_token_id=tokenizer.pad_token_id,
        stopping_criteria=criteria or None,
    )
    new = out[:, start:]
    completions = []
    for i, row in enumerate(new.tolist()):
        ended = stop_cancelled.ended_at.get(i) if stop_cancelled else None
        row = row if ended is None else row[: ended - start]
        if limit:  # the tokens after a row filled its positions are padding
            row = row[: max(0, limit - int(prompt_lengths[i]))]
        stop = next((j for j, t in enumerate(row) if t in end_ids), None)
        tokens = row if stop is None else row[:stop]
        completions.append(
            decode_completion(tokenizer, tokens, stop, int(prompt_lengths[i]), ended is not None)
        )
    return completions


def decode_completion(
    tokenizer: Any, tokens: list[int], stop: int | None, prompt_tokens: int, cancelled: bool
) -> Completion:
    """One row's completion from its tokens up to (not including) its end token, found at
    ``stop`` (None: the row ran out of tokens or positions, or was ``cancelled``)."""
    reasoning_end = tokenizer.convert_tokens_to_ids(REASONING_END)
    return completion_from_text(
        tokenizer.decode(tokens, skip_special_tokens=False),
        prompt_tokens=prompt_tokens,
        completion_tokens=len(tokens) + (stop is not None),
        reasoning_tokens=tokens.index(reasoning_end) + 1
        if reasoning_end in tokens
        else len(tokens),
        finish_reason="stop" if stop is not None else "cancelled" if cancelled else "length",
    )


def completion_from_text(
    text: str, prompt_tokens: int, completion_tokens: int, reasoning_tokens: int, finish_reason: str
) -> Completion:
    """A completion's text split into reasoning and answer and parsed, with its counts."""
    reasoning, answer = reasoning_and_answer(text)
    trace, errors = parse(text)
    return Completion(
        text=text,
        reasoning=reasoning,
        answer=answer,
        trace=trace,
        format_errors=[f"offset {e.offset}: {e.message}" for e in errors],
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        reasoning_tokens=reasoning_tokens,
        finish_reason=finish_reason,
    )
