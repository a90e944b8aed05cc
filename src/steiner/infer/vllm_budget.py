"""The step budget as a vLLM V1 logits processor.

    vllm serve MODEL --logits-processors steiner.infer.vllm_budget:StepBudgetVLLM

Each request asks for control through ``extra_args`` (OpenAI API: ``vllm_xargs``), e.g.
``{"min_steps": 4, "max_steps": 8, "max_reasoning_tokens": 2048, "extend_with": "model"}``.
This module imports without vLLM installed; the class exists only where vLLM does.
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


if AdapterLogitsProcessor is not None:

    class StepBudgetVLLM(AdapterLogitsProcessor):  # type: ignore[misc, valid-type]
        def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool):
            super().__init__(vllm_config, device, is_pin_memory)
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(vllm_config.model_config.tokenizer)
            self.ids = TokenIds.from_tokenizer(tokenizer)
            self.device = device

        def is_argmax_invariant(self) -> bool:
            return False  # it forces and forbids tokens

        def new_req_logits_processor(self, params: Any) -> RequestStepBudget | None:
            budget = Budget.from_extra(getattr(params, "extra_args", None))
            return None if budget is None else RequestStepBudget(self.ids, budget, self.device)
