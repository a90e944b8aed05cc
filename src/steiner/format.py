"""The Steiner reasoning format: 14 special tokens, Step/Trace, render <-> parse, chat template.

This module imports nothing else from steiner: every other part builds on it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

REASONING_START = "<|reasoning_start|>"
REASONING_END = "<|reasoning_end|>"
REASONING_PROCEED = "<|reasoning_proceed|>"
REASONING_BACKTRACK = "<|reasoning_backtrack|>"
STEP_START = "<|reasoning_step_start|>"
STEP_END = "<|reasoning_step_end|>"
NAME_START = "<|reasoning_step_name_start|>"
NAME_END = "<|reasoning_step_name_end|>"
THOUGHT_START = "<|reasoning_step_thought_start|>"
THOUGHT_END = "<|reasoning_step_thought_end|>"
SUMMARY_START = "<|reasoning_step_summary_start|>"
SUMMARY_END = "<|reasoning_step_summary_end|>"
REFLECTION_START = "<|reasoning_step_reflection_start|>"
REFLECTION_END = "<|reasoning_step_reflection_end|>"

SPECIAL_TOKENS: tuple[str, ...] = (
    REASONING_START,
    REASONING_END,
    REASONING_PROCEED,
    REASONING_BACKTRACK,
    STEP_START,
    STEP_END,
    NAME_START,
    NAME_END,
    THOUGHT_START,
    THOUGHT_END,
    SUMMARY_START,
    SUMMARY_END,
    REFLECTION_START,
    REFLECTION_END,
)

CHATML_TOKENS: tuple[str, ...] = ("<|im_start|>", "<|im_end|>")

# Field name -> (start token, end token), in the order a step writes them.
STEP_FIELDS: dict[str, tuple[str, str]] = {
    "name": (NAME_START, NAME_END),
    "thought": (THOUGHT_START, THOUGHT_END),
    "summary": (SUMMARY_START, SUMMARY_END),
    "reflection": (REFLECTION_START, REFLECTION_END),
}
_FIELD_BY_START = {start: name for name, (start, _) in STEP_FIELDS.items()}
_FIELD_BY_END = {end: name for name, (_, end) in STEP_FIELDS.items()}

_TOKEN_RE = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


class Decision(StrEnum):
    """What the walk does after a step."""

    PROCEED = "proceed"
    BACKTRACK = "backtrack"
    END = "end"


_DECISION_TOKEN = {
    Decision.PROCEED: REASONING_PROCEED,
    Decision.BACKTRACK: REASONING_BACKTRACK,
    Decision.END: REASONING_END,
}


@dataclass(frozen=True)
class Step:
    name: str = ""
    thought: str = ""
    summary: str = ""
    reflection: str = ""


@dataclass
class Trace:
    """A linear walk of a search tree.

    ``decisions[i]`` is what follows ``steps[i]``; a finished trace has one decision per step,
    only the last being ``END``. ``answer`` is None until ``<|reasoning_end|>`` was seen.
    """

    steps: list[Step] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    answer: str | None = None

    @property
    def n_steps(self) -> int:
        return len(self.steps)

    @property
    def n_backtracks(self) -> int:
        return sum(d is Decision.BACKTRACK for d in self.decisions)

    @property
    def finished(self) -> bool:
        return self.answer is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": [s.__dict__.copy() for s in self.steps],
            "decisions": [d.value for d in self.decisions],
            "answer": self.answer,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Trace:
        return cls(
            steps=[Step(**s) for s in data.get("steps", [])],
            decisions=[Decision(d) for d in data.get("decisions", [])],
            answer=data.get("answer"),
        )


class FormatError(ValueError):
    """A problem in a rendered trace, at a character offset of the text."""

    def __init__(self, offset: int, message: str):
        super().__init__(f"offset {offset}: {message}")
        self.offset = offset
        self.message = message


def render_step(step: Step, separator: str = "\n") -> str:
    parts = [STEP_START]
    for name, (start, end) in STEP_FIELDS.items():
        parts.append(f"{start}{getattr(step, name)}{end}")
    parts.append(STEP_END)
    return separator.join(parts)


def render(trace: Trace, separator: str = "\n") -> str:
    """Render a trace as an assistant message (reasoning, then the final answer).

    ``separator`` goes between tokens; "" saves a tiny model about seven tokens a step."""
    if len(trace.decisions) not in (len(trace.steps), len(trace.steps) - 1):
        raise ValueError("a trace needs one decision per step (the last may be missing)")
    parts = [REASONING_START]
    # decisions may be one short of the steps (an unfinished trace)
    for step, decision in zip(trace.steps, trace.decisions + [None], strict=False):
        parts.append(render_step(step, separator))
        if decision is not None and decision is not Decision.END:
            parts.append(_DECISION_TOKEN[decision])
    if trace.answer is not None:
        parts.append(REASONING_END)
        parts.append(trace.answer)
    return separator.join(parts)


def parse(text: str, strict: bool = False) -> tuple[Trace, list[FormatError]]:
    """Parse an assistant message into a Trace and a list of format errors.

    Lenient mode never raises, whatever the text: model output is data, so every
    problem becomes an error in the list and parsing recovers as best it can. Strict mode
    (for training data) raises the first FormatError instead.
    """
    parser = _Parser(text)
    parser.run()
    if strict and parser.errors:
        raise parser.errors[0]
    return parser.trace, parser.errors


def reasoning_and_answer(text: str) -> tuple[str, str]:
    """Split an assistant message into (reasoning part, final answer) at ``<|reasoning_end|>``."""
    head, sep, tail = text.partition(REASONING_END)
    if not sep:
        return text, ""
    return head + sep, tail.strip()


class _Parser:
    """A small state machine over the special-token stream.

    Hand-written because no library parses this token grammar with recovery and offsets.
    """

    def __init__(self, text: str):
        self.text = text
        self.trace = Trace()
        self.errors: list[FormatError] = []
        self.state = "begin"  # begin | between | step | field | after_step | answer
        # (each state has an on_<state> handler for the next token)
        self.fields: dict[str, str] = {}
        self.field: str | None = None
        self.field_start = 0

    def error(self, offset: int, message: str) -> None:
        self.errors.append(FormatError(offset, message))

    def run(self) -> None:
        text, pos = self.text, 0
        for match in _TOKEN_RE.finditer(text):
            if self.state == "answer":
                self.trace.answer = text[pos : match.start()].strip()
                self.error(match.start(), f"unexpected {match.group()} after the final answer")
                return
            self.gap(text[pos : match.start()], pos)
            self.token(match.group(), match.start())
            pos = match.end()
        if self.state == "answer":
            self.trace.answer = text[pos:].strip()
        else:
            self.gap(text[pos:], pos)
            self.finish(len(text))

    def gap(self, chunk: str, offset: int) -> None:
        """Text between two tokens: a field's content, or whitespace anywhere else."""
        if self.state == "field" or not chunk.strip():
            return
        where = offset + len(chunk) - len(chunk.lstrip())
        if self.state == "begin":
            self.error(where, f"text before {REASONING_START}")
        else:
            self.error(where, "text outside a step field")

    def token(self, tok: str, offset: int) -> None:
        handler = getattr(self, f"on_{self.state}")
        handler(tok, offset)

    def on_begin(self, tok: str, offset: int) -> None:
        self.state = "between"
        if tok != REASONING_START:
            self.error(offset, f"expected {REASONING_START}, got {tok}")
            self.on_between(tok, offset)

    def on_between(self, tok: str, offset: int) -> None:
        if tok == STEP_START:
            self.fields, self.state = {}, "step"
        elif tok == REASONING_END:
            if self.trace.steps:
                self.error(offset, f"expected {STEP_START} after a decision, got {tok}")
                self.trace.decisions[-1] = Decision.END
            self.state = "answer"
        elif tok in _FIELD_BY_START:
            self.error(offset, f"expected {STEP_START}, got {tok}")
            self.fields, self.state = {}, "step"
            self.on_step(tok, offset)
        else:
            self.error(offset, f"expected {STEP_START}, got {tok}")

    def on_step(self, tok: str, offset: int) -> None:
        if tok in _FIELD_BY_START:
            name = _FIELD_BY_START[tok]
            expected = next((f for f in STEP_FIELDS if f not in self.fields), None)
            if name != expected:
                self.error(offset, f"expected the {expected} field, got {tok}")
            self.field, self.field_start, self.state = name, offset + len(tok), "field"
        elif tok == STEP_END:
            self.close_step(offset)
        else:
            self.error(offset, f"expected a step field or {STEP_END}, got {tok}")
            self.close_step(offset)
            self.on_after_step(tok, offset)

    def on_field(self, tok: str, offset: int) -> None:
        assert self.field is not None
        self.fields[self.field] = self.text[self.field_start : offset].strip()
        end = STEP_FIELDS[self.field][1]
        self.field, self.state = None, "step"
        if tok != end:
            self.error(offset, f"expected {end}, got {tok}")
            self.on_step(tok, offset)

    def on_after_step(self, tok: str, offset: int) -> None:
        decision = {
            REASONING_PROCEED: Decision.PROCEED,
            REASONING_BACKTRACK: Decision.BACKTRACK,
            REASONING_END: Decision.END,
        }.get(tok)
        if decision is None:
            self.error(offset, f"expected a decision after {STEP_END}, got {tok}")
            self.trace.decisions.append(Decision.PROCEED)
            self.state = "between"
            self.on_between(tok, offset)
            return
        self.trace.decisions.append(decision)
        self.state = "answer" if decision is Decision.END else "between"

    def close_step(self, offset: int) -> None:
        missing = [f for f in STEP_FIELDS if f not in self.fields]
        if missing:
            self.error(offset, f"step is missing its {', '.join(missing)} field(s)")
        self.trace.steps.append(Step(**self.fields))
        self.fields, self.state = {}, "after_step"

    def finish(self, end: int) -> None:
        if self.state == "begin":
            self.error(end, f"no {REASONING_START}")
            return
        if self.state == "field":
            assert self.field is not None
            self.fields[self.field] = self.text[self.field_start : end].strip()
        if self.state in ("field", "step"):
            self.error(end, "unterminated step")
            self.trace.steps.append(Step(**self.fields))
        self.error(end, f"no {REASONING_END}: the reasoning never ended")


# ChatML with {% generation %} markers (TRL's assistant_only_loss reads them). With
# compact_reasoning=True, every assistant turn but the last is shortened to its step
# summaries and final answer, as Steiner does in multi-turn chats; those compacted turns
# are context, not targets, so they carry no generation markers.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if compact_reasoning is defined and compact_reasoning and not loop.last %}"
    "{%- set content = message['content'] %}"
    "{{- '" + REASONING_START + "' }}"
    "{%- for part in content.split('" + SUMMARY_START + "')[1:] %}"
    "{{- '\\n' + part.split('" + SUMMARY_END + "')[0] }}"
    "{%- endfor %}"
    "{{- '\\n" + REASONING_END + "\\n' + content.split('" + REASONING_END + "')[-1].strip() }}"
    "{{- '<|im_end|>\\n' }}"
    "{%- else %}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def reasoning_token_ids(tokenizer: Any) -> list[int]:
    """The ids of the 14 reasoning tokens, in the format's order."""
    return [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]


def add_reasoning_tokens(tokenizer: Any, set_chat_template: bool = True) -> int:
    """Add the 14 reasoning tokens (and ChatML tokens if missing) to a HF tokenizer.

    Each becomes one special id that is never split or normalised. Sets the ChatML chat
    template, ``<|im_end|>`` as end-of-sequence when the tokenizer has none, and a pad
    token. Returns how many tokens were added (resize the model's embeddings by it).
    """
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    wanted = [t for t in CHATML_TOKENS + SPECIAL_TOKENS if t not in vocab]
    added = tokenizer.add_tokens(
        [AddedToken(t, special=True, normalized=False, single_word=False) for t in wanted],
        special_tokens=True,
    )
    if tokenizer.eos_token is None:
        tokenizer.eos_token = "<|im_end|>"
    if tokenizer.pad_token is None:
        if "<|endoftext|>" not in tokenizer.get_vocab():
            added += tokenizer.add_tokens(
                [AddedToken("<|endoftext|>", special=True, normalized=False)], special_tokens=True
            )
        tokenizer.pad_token = "<|endoftext|>"
    if set_chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return added
