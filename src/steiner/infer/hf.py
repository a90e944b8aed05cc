"""The step budget as a transformers ``LogitsProcessor``."""

from __future__ import annotations

from typing import Any

import torch
from transformers import LogitsProcessor

from steiner.infer.budget import Budget, StepBudget, TokenIds


class StepBudgetLogitsProcessor(LogitsProcessor):
    """Pass to ``model.generate(logits_processor=[...])``. One ``Budget`` for the whole batch,
    or one per row, or one per prompt when ``num_return_sequences`` or ``num_beams`` repeat
    each prompt's row. One processor may serve several ``generate`` calls in turn: a call
    whose prompts are not the last call's starts every row afresh.

    Each call advances every row by its newest token. Beam search reorders the rows between
    calls (a row goes on from another row's beam), so when a row's tokens before the newest
    are not the ones it had, the row takes the state of the row that had them; rows that
    match none (a decoder that rewinds, as assisted decoding does) are scanned again."""

    def __init__(self, tokenizer: Any, budget: Budget | list[Budget]):
        self.ids = TokenIds.from_tokenizer(tokenizer)
        self.budget = budget
        self.core: StepBudget | None = None
        self.budgets: list[Budget] = []
        self.prompts: torch.Tensor | None = None  # the rows as the first call saw them
        self.seen: torch.Tensor | None = None  # each row's generated tokens at the last call

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.core is None or not self._same_prompts(input_ids):
            # a generate call's first position (a new call on the same prompts looks like a
            # rewind to them, and restarts below)
            self.budgets = self._row_budgets(len(input_ids))
            self.core = StepBudget(self.ids, self.budgets, scores.device)
            self.prompts = input_ids
            self.seen = input_ids[:, input_ids.shape[1] :]
            return self.core.step(None, scores)
        generated = input_ids[:, self.prompts.shape[1] :]
        # assisted decoding may ask again at the prompt's end, before any generated token
        before = generated[:, :-1] if generated.shape[1] else generated
        if not torch.equal(before, self.seen):
            self._follow(before)
        self.seen = generated
        return self.core.step(generated[:, -1] if generated.shape[1] else None, scores)

    def _same_prompts(self, input_ids: torch.Tensor) -> bool:
        """Whether ``input_ids`` go on from the prompts this processor started on (beam search
        reorders rows only among one prompt's beams, so each row keeps its prompt)."""
        assert self.prompts is not None
        rows, length = self.prompts.shape
        return (
            input_ids.shape[0] == rows
            and input_ids.shape[1] >= length
            and torch.equal(input_ids[:, :length], self.prompts)
        )

    def _row_budgets(self, rows: int) -> list[Budget]:
        if not isinstance(self.budget, list):
            return [self.budget] * rows
        if rows % len(self.budget):
            raise ValueError(
                f"{len(self.budget)} budgets for {rows} rows; expected one per row, or one per "
                "prompt"
            )
        # generate repeats each prompt's row in place (repeat_interleave), as many times
        return [b for b in self.budget for _ in range(rows // len(self.budget))]

    def _follow(self, before: torch.Tensor) -> None:
        """The rows' states for tokens ``before`` that are not simply the last call's."""
        assert self.core is not None and self.seen is not None
        if before.shape == self.seen.shape:
            # the state is a function of the generated tokens alone (the budget only picks the
            # mask), so any row with the same tokens hands over its state
            same = (before[:, None, :] == self.seen[None, :, :]).all(-1)
            if bool(same.any(1).all()):
                self.core.take_rows(same.int().argmax(1))
                return
        self.core.restart()
        for position in range(before.shape[1]):
            self.core.update(before[:, position])
