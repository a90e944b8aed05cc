"""The step budget as a vLLM V1 logits processor.

Name it when the engine starts:

    vllm serve MODEL --logits-processors steiner.infer.vllm_budget:StepBudgetVLLM
    LLM(MODEL, logits_processors=[VLLM_PROCESSOR])

It does nothing to a request unless the request asks for control through ``extra_args``
(OpenAI API: ``vllm_xargs``), e.g. ``{"min_steps": 4, "max_steps": 8,
"max_reasoning_tokens": 2048, "extend_with": "model"}``; ``{"min_steps": 0}`` asks for the
format rules alone. This module imports without vLLM installed; the class exists only where
vLLM does.

Installing this package also registers it under vLLM's ``vllm.logits_processors`` entry point,
so every engine loads it. But vLLM's async scheduling (on by default) shows a processor the
tokens it sampled only when some processor was passed explicitly; loaded from the entry point
alone it would see placeholders (-1) and mask blind, so it refuses instead. Named explicitly
as well, it is built twice per engine and the second copy stays idle.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from steiner.infer.budget import Budget, StepBudget, TokenIds

try:
    from vllm.v1.sample.logits_processor import AdapterLogitsProcessor
except ImportError:  # vLLM is optional (CUDA-only); the core is tested everywhere
    AdapterLogitsProcessor = None

VLLM_PROCESSOR = "steiner.infer.vllm_budget:StepBudgetVLLM"  # vLLM's <module>:<class> form
PLACEHOLDER = -1  # vLLM's stand-in for a sampled token it has not copied back yet
HIDDEN_TOKENS = (
    "the step budget cannot see the tokens vLLM sampled (async scheduling hides them from "
    "processors loaded only through the entry point): start the engine with "
    f"logits_processors=[{VLLM_PROCESSOR!r}] (vllm serve --logits-processors {VLLM_PROCESSOR}) "
    "or with async scheduling off"
)


class RequestStepBudget:
    """Per-request processor: vLLM passes all output ids so far; only the new ones are fed
    to the state machine, so the cost per step stays constant."""

    def __init__(self, ids: TokenIds, budget: Budget, device: torch.device):
        self.core = StepBudget(ids, [budget], device)
        self.seen = 0

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        self.core.prepare(logits)
        new = output_ids[self.seen :]
        if PLACEHOLDER in new:
            raise RuntimeError(HIDDEN_TOKENS)
        for token in new:
            self.core.update(torch.tensor([token], device=logits.device))
        self.seen = len(output_ids)
        return self.core.mask(logits.unsqueeze(0)).squeeze(0)


def token_ids_or_none(tokenizer: Any) -> TokenIds | None:
    """The reasoning token ids, or None for a model without them: the entry point loads this
    processor into every vLLM engine, and a plain model must still serve."""
    try:
        return TokenIds.from_tokenizer(tokenizer)
    except ValueError:
        return None


_ENGINE_PROCESSOR: dict[int, weakref.ref] = {}


def first_for_engine(vllm_config: Any, processor: Any) -> bool:
    """Whether ``processor`` is the first step-budget processor built for this engine's config
    (the entry point and an explicit ``logits_processors`` each build one; the same mask
    twice would only cost time). Weak references: a finished engine frees its slot."""
    first = _ENGINE_PROCESSOR.get(id(vllm_config))
    owner = first() if first is not None else None
    if owner is not None and owner is not processor and owner.vllm_config is vllm_config:
        return False
    _ENGINE_PROCESSOR[id(vllm_config)] = weakref.ref(processor)
    return True


def request_processor(
    ids: TokenIds | None, extra_args: dict[str, Any] | None, device: torch.device | str
) -> RequestStepBudget | None:
    """What vLLM runs for one request: None (untouched) unless ``extra_args`` asks for a
    budget; a ValueError (the request is refused) for a budget the model cannot follow."""
    budget = Budget.from_extra(extra_args)
    if budget is None:
        return None
    if ids is None:
        raise ValueError("a step budget was requested, but this model lacks the reasoning tokens")
    return RequestStepBudget(ids, budget, torch.device(device))


if AdapterLogitsProcessor is not None:

    class StepBudgetVLLM(AdapterLogitsProcessor):  # type: ignore[misc, valid-type]
        def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool):
            super().__init__(vllm_config, device, is_pin_memory)
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(vllm_config.model_config.tokenizer)
            self.ids = token_ids_or_none(tokenizer)
            self.device = device
            self.vllm_config = vllm_config
            self.active = first_for_engine(vllm_config, self)

        @classmethod
        def validate_params(cls, params: Any) -> None:
            Budget.from_extra(getattr(params, "extra_args", None))  # a bad value: ValueError

        def is_argmax_invariant(self) -> bool:
            return False  # it forces and forbids tokens

        def new_req_logits_processor(self, params: Any) -> RequestStepBudget | None:
            if not self.active:
                return None
            return request_processor(self.ids, getattr(params, "extra_args", None), self.device)
