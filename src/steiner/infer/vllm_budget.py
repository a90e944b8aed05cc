"""The step budget as a vLLM V1 logits processor.

Installing this package registers ``StepBudgetVLLM`` under vLLM's ``vllm.logits_processors``
entry point, so every vLLM engine in the environment loads it (``vllm serve``, ``LLM(...)``,
``trl vllm-serve``, the engine TRL colocates for ``steiner train rl --use_vllm``); naming it
explicitly works too:

    vllm serve MODEL --logits-processors steiner.infer.vllm_budget:StepBudgetVLLM

It does nothing to a request unless the request asks for control through ``extra_args``
(OpenAI API: ``vllm_xargs``), e.g. ``{"min_steps": 4, "max_steps": 8,
"max_reasoning_tokens": 2048, "extend_with": "model"}``; ``{"min_steps": 0}`` asks for the
format rules alone. This module imports without vLLM installed; the class exists only where
vLLM does.
"""

from __future__ import annotations

from typing import Any

import torch

from steiner.infer.budget import Budget, StepBudget, TokenIds

try:
    from vllm.v1.sample.logits_processor import AdapterLogitsProcessor
except ImportError:  # vLLM is optional (CUDA-only); the core is tested everywhere
    AdapterLogitsProcessor = None


class RequestStepBudget:
    """Per-request processor: vLLM passes all output ids so far; only the new ones are fed
    to the state machine, so the cost per step stays constant."""

    def __init__(self, ids: TokenIds, budget: Budget, device: torch.device):
        self.core = StepBudget(ids, [budget], device)
        self.seen = 0

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        self.core.prepare(logits)
        for token in output_ids[self.seen :]:
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

        @classmethod
        def validate_params(cls, params: Any) -> None:
            Budget.from_extra(getattr(params, "extra_args", None))  # a bad value: ValueError

        def is_argmax_invariant(self) -> bool:
            return False  # it forces and forbids tokens

        def new_req_logits_processor(self, params: Any) -> RequestStepBudget | None:
            return request_processor(self.ids, getattr(params, "extra_args", None), self.device)
