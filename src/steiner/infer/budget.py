"""Step budget: control how many reasoning steps a model writes.

One implementation in pure torch, batched, with per-row settings and per-row state that is
updated from each newly generated token only (never by re-scanning the sequence). The
transformers and vLLM adapters are thin wrappers around ``StepBudget``.

Rules, per row (DESIGN.md "Step budget"):
- the first generated token is ``<|reasoning_start|>``;
- inside a step the four fields come in order (name, thought, summary, reflection): each
  start and end token is forced or allowed at its place and no other structural token is,
  so every step parses and the number of steps is the number of step-start tokens;
- after ``<|reasoning_step_end|>``: ``<|reasoning_end|>`` is forced once ``max_steps``
  steps are done; below ``min_steps`` it is forbidden and ``extend_with`` decides:
  ``proceed``/``backtrack`` force that decision, ``model`` lets the model choose between them;
  otherwise the model chooses among proceed, backtrack and end;
- after a decision, ``<|reasoning_step_start|>`` is forced;
- ``max_step_tokens`` closes a step that grew that long (the open field is ended and the rest
  follow empty); ``max_reasoning_tokens`` closes the
  current step and forces ``<|reasoning_end|>`` (it wins over ``min_steps``); closing takes
  up to 10 forced structural tokens past the cap;
- end-of-sequence tokens are forbidden while reasoning; after ``<|reasoning_end|>`` the answer
  is plain text (the 14 tokens are forbidden there);
- where a structural token is forced or chosen from a set, one whitespace-only token may come
  first (not at the first token, nor while a cap closes the step): whitespace between the
  tokens is not significant, and traces rendered with a newline between tokens (every style
  but the graph domain's compact one) put one there, so forbidding it would push such a model
  off the text it was trained on at every step boundary.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch

from steiner import format as fmt
from steiner.io import InputError

EXTEND_WITH = ("model", "proceed", "backtrack")
# the request fields of a budget (Budget.from_extra): a server body's, or vLLM's extra_args
BUDGET_FIELDS = ("min_steps", "max_steps", "max_reasoning_tokens", "max_step_tokens", "extend_with")


@dataclass(frozen=True)
class Budget:
    min_steps: int = 0
    max_steps: int | None = None
    max_reasoning_tokens: int | None = None
    max_step_tokens: int | None = None
    extend_with: str = "model"

    def __post_init__(self) -> None:
        if self.extend_with not in EXTEND_WITH:
            raise ValueError(f"extend_with must be one of {EXTEND_WITH}, got {self.extend_with!r}")
        if self.min_steps < 0 or (self.max_steps is not None and self.max_steps < 1):
            raise ValueError("min_steps must be >= 0 and max_steps >= 1")
        if self.max_steps is not None and self.min_steps > self.max_steps:
            raise ValueError("min_steps cannot exceed max_steps")

    @classmethod
    def from_extra(cls, extra: dict[str, Any] | None) -> Budget | None:
        """From request extras (vLLM extra_args / our server's body); None when no control
        was asked for."""
        extra = extra or {}
        given = {k: extra[k] for k in BUDGET_FIELDS if extra.get(k) is not None}
        if not given:
            return None
        counts = {k: v for k, v in given.items() if k != "extend_with"}
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in counts.values()):
            raise ValueError(f"step budget counts must be integers, got {counts}")
        return cls(**given)

    @classmethod
    def from_flags(
        cls,
        min_steps: int,
        max_steps: int | None,
        max_reasoning_tokens: int | None,
        extend_with: str = "model",
        max_step_tokens: int | None = None,
    ) -> Budget:
        """From a command's flags: a bad combination is one InputError naming the flags, where
        ``Budget``'s own ValueError names the fields of a server request."""
        if extend_with not in EXTEND_WITH:
            expected = f"{', '.join(EXTEND_WITH[:-1])} or {EXTEND_WITH[-1]}"
            raise InputError("--extend-with", None, f"expected {expected}, got {extend_with!r}")
        if max_steps is not None and min_steps > max_steps:
            raise InputError(
                "--min-steps", None, f"expected at most --max-steps {max_steps}, got {min_steps}"
            )
        return cls(min_steps, max_steps, max_reasoning_tokens, max_step_tokens, extend_with)


@dataclass(frozen=True)
class TokenIds:
    reasoning_start: int
    reasoning_end: int
    proceed: int
    backtrack: int
    step_start: int
    step_end: int
    eos: tuple[int, ...]
    fields: tuple[int, ...]  # inside a step, in order: 4 x (field start, field end), step end
    specials: tuple[int, ...]  # all 14
    spaces: tuple[int, ...] = ()  # tokens that decode to whitespace only

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> TokenIds:
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in fmt.SPECIAL_TOKENS}
        missing = [t for t, i in ids.items() if i is None or i == tokenizer.unk_token_id]
        if missing:
            raise ValueError(
                f"tokenizer lacks reasoning tokens {missing}: run add_reasoning_tokens"
            )
        eos = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
        return cls(
            ids[fmt.REASONING_START],
            ids[fmt.REASONING_END],
            ids[fmt.REASONING_PROCEED],
            ids[fmt.REASONING_BACKTRACK],
            ids[fmt.STEP_START],
            ids[fmt.STEP_END],
            tuple(sorted(i for i in eos if i is not None)),
            tuple(ids[t] for pair in fmt.STEP_FIELDS.values() for t in pair) + (ids[fmt.STEP_END],),
            tuple(ids.values()),
            whitespace_ids(tokenizer),
        )


_WHITESPACE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def whitespace_ids(tokenizer: Any) -> tuple[int, ...]:
    """Ids of the tokens that decode to whitespace only (newline, space, ...), once per tokenizer:
    decoding a 150k vocabulary takes a moment, and a processor is built per generate call."""
    try:
        return _WHITESPACE[tokenizer]
    except (KeyError, TypeError):
        pass
    vocab = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(vocab)], skip_special_tokens=False)
    out = tuple(i for i, text in enumerate(texts) if text and not text.strip())
    try:
        _WHITESPACE[tokenizer] = out
    except TypeError:  # an object without weak references: not cached
        pass
    return out


# Automaton states: BEGIN, OUTSIDE (after <|reasoning_start|>), 9 positions inside a step
# (even: the next field's start is due, odd: inside a field; the last: the step end is due),
# AFTER_STEP, AFTER_DECISION, ANSWER; then a twin of each, the same state right after a
# whitespace token (so that "no second whitespace" costs no extra per-token operation).
_BEGIN, _OUTSIDE, _F0, _AFTER_STEP, _AFTER_DECISION, _ANSWER = 0, 1, 2, 11, 12, 13
_N_STATES = 14
_REASONING_STATES = range(_OUTSIDE, _ANSWER)
_BIG = 1 << 40  # "no limit"
# Token classes: other, the 14 special tokens in TokenIds order, end of sequence, whitespace.
_OTHER, _EOS, _SPACE = 0, 15, 16
_N_CLASSES = 17
# Flag bits of a row when choosing its mask.
_CAPPED, _BELOW_MIN, _AT_MAX, _LONG_STEP = 1, 2, 4, 8
# 22 masks, then copies of the 17 force and keep masks that also allow whitespace tokens
_LENIENT, _FORCING = 22, 17


class StepBudget:
    """Batched step-budget automaton. Call ``step(last_tokens, logits)`` once per generated
    position: ``last_tokens`` is what was sampled at the previous position (None first).

    Written as lookup tables because the rules run once per generated token: a class per
    token id, a transition per (state, class), and an additive mask per (state, flags,
    extend_with) mode, so a step costs about a dozen small tensor operations."""

    def __init__(self, ids: TokenIds, budgets: list[Budget], device: torch.device | str = "cpu"):
        self.ids = ids
        device = torch.device(device)
        self.device = device
        limit = lambda vals: torch.tensor([_BIG if v is None else v for v in vals], device=device)  # noqa: E731
        self.extend = torch.tensor(
            [EXTEND_WITH.index(b.extend_with) for b in budgets], device=device
        )
        n = len(budgets)
        self.state = torch.full((n,), _BEGIN, dtype=torch.long, device=device)
        # counters per row: steps done, tokens in the current step, reasoning tokens
        self.counters = torch.zeros(n, 3, dtype=torch.long, device=device)
        # flags = 2 + sum(w * (counter >= threshold)): below-min is "not steps >= min_steps"
        self.thresholds = torch.stack(
            [
                torch.tensor([b.min_steps for b in budgets], device=device),
                limit([b.max_steps for b in budgets]),
                limit([b.max_step_tokens for b in budgets]),
                limit([b.max_reasoning_tokens for b in budgets]),
            ],
            1,
        )
        self.flag_weights = torch.tensor([-_BELOW_MIN, _AT_MAX, _LONG_STEP, _CAPPED], device=device)
        self.counter_columns = torch.tensor([0, 0, 1, 2], device=device)
        self._build_tables()
        self._masks: torch.Tensor | None = None  # built on first use, when the vocab is known

    # ------------------------------------------------------------------ tables
    def _special_order(self) -> list[int]:
        i = self.ids
        return [
            i.reasoning_start,
            i.reasoning_end,
            i.proceed,
            i.backtrack,
            i.step_start,
            i.step_end,
            *i.fields[:8],
        ]

    def _build_tables(self) -> None:
        ids, dev = self.ids, self.device
        special = self._special_order()
        cls_of = {tok: c + 1 for c, tok in enumerate(special)}
        self.cls_of = cls_of
        RS, RE, P, B, SS, SE = (cls_of[t] for t in special[:6])
        field_cls = [cls_of[t] for t in ids.fields[:8]] + [SE]
        T = [[s for _ in range(_N_CLASSES)] for s in range(_N_STATES)]
        step_inc = [[0] * _N_CLASSES for _ in range(_N_STATES)]
        T[_BEGIN] = [_OUTSIDE] * _N_CLASSES
        for s in _REASONING_STATES:
            if _F0 <= s < _F0 + 9:  # the expected structural token moves along the step
                k = s - _F0
                T[s][field_cls[k]] = s + 1 if k < 8 else _AFTER_STEP
            T[s][SS], T[s][SE] = _F0, _AFTER_STEP
            T[s][P] = T[s][B] = _AFTER_DECISION
            T[s][RE] = _ANSWER
            step_inc[s][SE] = 1
        for s in range(_BEGIN + 1, _N_STATES):
            T[s][_SPACE] = s + _N_STATES
        # a twin leaves like its state does, and stays a twin on more whitespace (in a field)
        T += [[*row[:_SPACE], s + _N_STATES] for s, row in enumerate(T)]
        self.T = torch.tensor(T, device=dev)
        in_step = [int(_F0 <= s < _F0 + 9) for s in range(_N_STATES)]
        reasoning = [int(s in _REASONING_STATES) for s in range(_N_STATES)]
        # what each (state, token class) adds to the three counters, and which it resets
        inc = [
            [[step_inc[s][c], in_step[s], reasoning[s]] for c in range(_N_CLASSES)]
            for s in range(_N_STATES)
        ]
        self.counter_inc = torch.tensor(inc + inc, device=dev)  # twins count as their state
        self.counter_keep = torch.tensor(
            [[1, 0 if c == SS else 1, 1] for c in range(_N_CLASSES)], device=dev
        )
        # modes: one "force" mode per special token, then keep-only sets, in-field, answer;
        # modes 22 on are the force and keep modes that also allow one whitespace token
        self.mode_keep = {"ss_re": 14, "p_b": 15, "p_b_re": 16}
        self.mode_in_field = {k: _FORCING + k for k in range(4)}
        self.mode_answer = 21
        force = {tok: c for c, tok in enumerate(special)}
        mode = [[[0] * 3 for _ in range(16)] for _ in range(_N_STATES)]
        # the same, where a whitespace token may come before the structural token asked for
        spaced = [[[0] * 3 for _ in range(16)] for _ in range(_N_STATES)]
        for s in range(_N_STATES):
            for flags in range(16):
                capped, below = bool(flags & _CAPPED), bool(flags & _BELOW_MIN)
                at_max, long_step = bool(flags & _AT_MAX), bool(flags & _LONG_STEP)
                for ext in range(3):
                    if s == _BEGIN:
                        m = force[ids.reasoning_start]
                    elif s == _OUTSIDE:
                        m = (
                            force[ids.reasoning_end]
                            if capped
                            else force[ids.step_start]
                            if below
                            else self.mode_keep["ss_re"]
                        )
                    elif _F0 <= s < _F0 + 9:
                        k = s - _F0
                        expected = ids.fields[k]
                        inside = k % 2 == 1 and k < 8
                        m = (
                            self.mode_in_field[k // 2]
                            if inside and not (long_step or capped)
                            else force[expected]
                        )
                    elif s == _AFTER_STEP:
                        if capped or (at_max and not below):
                            m = force[ids.reasoning_end]
                        elif below:
                            m = (self.mode_keep["p_b"], force[ids.proceed], force[ids.backtrack])[
                                ext
                            ]
                        else:
                            m = self.mode_keep["p_b_re"]
                    elif s == _AFTER_DECISION:
                        m = force[ids.reasoning_end] if capped else force[ids.step_start]
                    else:
                        m = self.mode_answer
                    mode[s][flags][ext] = m
                    # not at the first token (training puts none there), and not while a cap
                    # closes the step, so that closing stays within its bound
                    space_ok = m < _FORCING and s != _BEGIN and not (capped or long_step)
                    spaced[s][flags][ext] = _LENIENT + m if space_ok else m
        # a state allows one whitespace token first, its twin (right after one) does not
        self.mode = torch.tensor(spaced + mode, device=dev)

    def _build_masks(self, vocab: int, dtype: torch.dtype) -> torch.Tensor:
        ids, neg = self.ids, float("-inf")
        special = self._special_order()
        masks = torch.zeros(_LENIENT + _FORCING, vocab, dtype=dtype, device=self.device)
        for c, tok in enumerate(special):  # force one token
            masks[c].fill_(neg)
            masks[c, tok] = 0
        keep = {
            "ss_re": [ids.step_start, ids.reasoning_end],
            "p_b": [ids.proceed, ids.backtrack],
            "p_b_re": [ids.proceed, ids.backtrack, ids.reasoning_end],
        }
        for name, tokens in keep.items():
            masks[self.mode_keep[name]].fill_(neg)
            masks[self.mode_keep[name], tokens] = 0
        structural = list(ids.specials) + list(ids.eos)
        for k, m in self.mode_in_field.items():  # no structural token but the field's end
            masks[m, structural] = neg
            masks[m, ids.fields[2 * k + 1]] = 0
        masks[self.mode_answer, list(ids.specials)] = neg  # the answer is plain text
        spaces = [i for i in ids.spaces if i < vocab]
        masks[_LENIENT:] = masks[:_FORCING]
        masks[_LENIENT:, spaces] = 0
        # token id -> class, for update()
        self.token_class = torch.full((vocab,), _OTHER, dtype=torch.long, device=self.device)
        self.token_class[spaces] = _SPACE
        for tok, c in self.cls_of.items():
            self.token_class[tok] = c
        self.token_class[list(ids.eos)] = _EOS
        return masks

    # ------------------------------------------------------------------ per token
    @property
    def steps(self) -> torch.Tensor:
        return self.counters[:, 0]

    def update(self, tokens: torch.Tensor) -> None:
        """Advance every row's state by the token it just generated."""
        cls = self.token_class[tokens]
        self.counters = self.counters * self.counter_keep[cls] + self.counter_inc[self.state, cls]
        self.state = self.T[self.state, cls]

    def take_rows(self, rows: torch.Tensor) -> None:
        """Row i goes on from row ``rows[i]``'s state (beam search reorders its beams); each
        row keeps its own budget."""
        self.state = self.state[rows]
        self.counters = self.counters[rows]

    def restart(self) -> None:
        """Every row back to its first position (its tables and budget kept), to be advanced
        again from its tokens."""
        self.state = torch.full_like(self.state, _BEGIN)
        self.counters = torch.zeros_like(self.counters)

    def prepare(self, logits: torch.Tensor) -> None:
        """Build the vocabulary-sized tables once the vocabulary size is known."""
        if self._masks is None or self._masks.shape[1] != logits.shape[-1]:
            self._masks = self._build_masks(logits.shape[-1], logits.dtype)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """Apply the rules to next-token logits [rows, vocab] in place; returns them."""
        self.prepare(logits)
        # The token cap only matters while reasoning (the begin and answer modes ignore
        # flags), so "capped" is just the reasoning-token count against its limit.
        reached = self.counters[:, self.counter_columns] >= self.thresholds
        flags = _BELOW_MIN + (reached * self.flag_weights).sum(1)
        logits += self._masks[self.mode[self.state, flags, self.extend]]
        return logits

    def step(self, last_tokens: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
        self.prepare(logits)
        if last_tokens is not None:
            self.update(last_tokens.to(self.device))
        return self.mask(logits)
