"""Sampling with a random generator per row, as a transformers ``LogitsProcessor``.

``model.generate(do_sample=True)`` draws every row's token from one global random stream, so a
row's sample depends on which other rows share its batch: the same seeded request gives another
answer when a server batches it with another one, and a resumed eval gives other samples than an
uninterrupted one. transformers has no per-row generator, so this processor samples each row
with its own ``torch.Generator`` (seeded per row, like vLLM's ``SamplingParams.seed``) and hands
``generate`` a score row whose only finite entry is the drawn token; run with
``do_sample=False``, greedy search then takes exactly that token. Temperature and top-p use
transformers' own warpers, on the rows that share them together.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LogitsProcessor, TemperatureLogitsWarper, TopPLogitsWarper


class PerRowSampler(LogitsProcessor):
    """Put it last in ``logits_processor`` (after anything that masks tokens) and call
    ``generate`` with ``do_sample=False``. A row with temperature 0 is left as it is (greedy).
    A sampled row's seed of None draws one from torch's global generator, so
    ``torch.manual_seed`` still makes such a run repeatable. Use a new one per ``generate``."""

    def __init__(
        self,
        temperatures: Sequence[float],
        top_ps: Sequence[float],
        seeds: Sequence[int | None],
    ):
        if not len(temperatures) == len(top_ps) == len(seeds):
            raise ValueError("one temperature, top_p and seed per row")
        self.n_rows = len(seeds)
        self.seeds = [
            (int(torch.randint(0, 2**62, ())) if s is None else s) if t > 0 else None
            for t, s in zip(temperatures, seeds, strict=True)
        ]
        # rows that share their settings are warped together (usually one group in all)
        groups: dict[tuple[float, float], list[int]] = {}
        for i, (t, p) in enumerate(zip(temperatures, top_ps, strict=True)):
            if t > 0:
                groups.setdefault((t, p), []).append(i)
        self.groups = [
            (rows, [TemperatureLogitsWarper(t)] + ([TopPLogitsWarper(p)] if p < 1.0 else []))
            for (t, p), rows in groups.items()
        ]
        self.sampled = [i for rows, _ in self.groups for i in rows]  # in group order
        self.all_rows = self.sampled == list(range(self.n_rows))
        self.whole = self.all_rows and len(self.groups) == 1  # warp the scores without a copy
        # made at the first call, on the scores' device
        self.generators: list[torch.Generator] = []
        self.group_rows: list[torch.Tensor] = []
        self.sampled_rows = torch.tensor([])

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if len(scores) != self.n_rows:
            raise ValueError(f"{len(scores)} rows, but sampling settings for {self.n_rows}")
        if not self.sampled:
            return scores
        device = scores.device
        if not self.generators:
            self.generators = [
                torch.Generator(device).manual_seed(self.seeds[i]) for i in self.sampled
            ]
            self.group_rows = [torch.tensor(r, device=device) for r, _ in self.groups]
            self.sampled_rows = torch.tensor(self.sampled, device=device)
        parts = []
        for (_, warpers), rows in zip(self.groups, self.group_rows, strict=True):
            part, ids = (scores, input_ids) if self.whole else (scores[rows], input_ids[rows])
            for warp in warpers:
                part = warp(ids, part)
            parts.append(part)
        warped = parts[0] if len(parts) == 1 else torch.cat(parts)
        # Inverse-CDF sampling: one uniform number from each row's own generator, and the
        # search over the vocabulary for all rows at once (a torch.multinomial call per row
        # cost a quarter of the throughput; benchmarks/bench_sampling.py).
        uniform = torch.cat([torch.rand(1, generator=g, device=device) for g in self.generators])
        cdf = torch.softmax(warped.float(), dim=-1).cumsum(dim=-1)
        # right=True: the first token whose cumulative mass passes the draw, so a token of
        # probability 0 (an empty interval) is never drawn
        tokens = torch.searchsorted(cdf, (uniform * cdf[:, -1]).unsqueeze(1), right=True)
        tokens = tokens.clamp(max=scores.shape[-1] - 1).squeeze(1)
        # every row sampled (the usual case): no need to copy the scores
        out = torch.full_like(scores, float("-inf")) if self.all_rows else scores.clone()
        out[self.sampled_rows] = float("-inf")
        out[self.sampled_rows, tokens] = 0.0
        return out
