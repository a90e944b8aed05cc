"""The step budget as a transformers ``LogitsProcessor``."""

from __future__ import annotations

from typing import Any

import torch
from transformers import LogitsProcessor

from steiner.infer.budget import Budget, StepBudget, TokenIds


class StepBudgetLogitsProcessor(LogitsProcessor):
    """Pass to ``model.generate(logits_processor=[...])``. One ``Budget`` for the whole batch,
    or one per row. The state lives in this object: use a new one per ``generate`` call."""

    def __init__(self, tokenizer: Any, budget: Budget | list[Budget]):
        self.ids = TokenIds.from_tokenizer(tokenizer)
        self.budget = budget
        self.core: StepBudget | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.core is None:
            budgets = (
                self.budget if isinstance(self.budget, list) else [self.budget] * len(input_ids)
            )
            self.core = StepBudget(self.ids, budgets, scores.device)
            return self.core.step(None, scores)
        return self.core.step(input_ids[:, -1], scores)
