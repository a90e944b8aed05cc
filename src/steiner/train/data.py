"""Training data: chat paths for SFT, straight shortcut paths for the baseline, and the CPT
mix of plain text and rendered reasoning paths."""

from __future__ import annotations

import random
from typing import Any

from datasets import Dataset

from steiner.domains import get_domain, load_shortcuts, shortcut_trace, trace_separator
from steiner.format import render
from steiner.io import (
    InputError,
    chat_record,
    is_plain_text,
    read_text_input,
    source_rows,
)


def chat_rows(
    path: str, assistant_required: bool = False, split: str = "train"
) -> list[dict[str, Any]]:
    """``{"messages": [...]}`` rows from path records (or any chat JSONL/Parquet, or a
    ``datasets`` name or directory: its ``split``, as TRL's ``dataset_name``); with
    ``assistant_required`` each needs an assistant message (the loss is on those only).
    TRL's prompt-completion records are read as the chat they stand for (``chat_record``), so
    the loss falls on the completion, as TRL's completion-only loss puts it."""
    rows = []
    for line, rec in source_rows(path, split):
        if "messages" not in rec and ("steps" in rec or "nums" in rec or "edges" in rec):
            raise InputError(
                path, line, "expected a 'messages' list; shortcut records train with --shortcut"
            )
        chat = chat_record(rec, path, line)
        if not chat.messages:
            raise InputError(path, line, "expected a non-empty 'messages' list")
        if assistant_required and all(m.role != "assistant" for m in chat.messages):
            # TRL's words for it come with a traceback and blame the chat template
            raise InputError(
                path,
                line,
                "expected an 'assistant' message: the loss is on assistant tokens only "
                "(--assistant_only_loss false trains on whole chats)",
            )
        rows.append(chat.model_dump(include={"messages"}))
    if not rows:
        raise InputError(path, None, "no records")
    return rows


def shortcut_rows(path: str, split: str = "train") -> list[dict[str, Any]]:
    """Shortcut records rendered as one straight path each, in the same format."""
    rows = []
    for problem in load_shortcuts(path, split=split):
        trace = shortcut_trace(get_domain(problem["domain"]), problem)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": problem["question"]},
                    {"role": "assistant", "content": render(trace, trace_separator(problem))},
                ]
            }
        )
    return rows


def sft_dataset(
    path: str,
    shortcut: bool = False,
    limit_problems: int | None = None,
    assistant_required: bool = True,
    split: str = "train",
) -> Dataset:
    """Chat rows (or, with ``shortcut``, straight paths of shortcut records) to train on; a
    ``datasets`` source is read from its ``split``."""
    rows = shortcut_rows(path, split) if shortcut else chat_rows(path, assistant_required, split)
    return Dataset.from_list(rows[:limit_problems] if limit_problems else rows)


def countdown_facts(n: int, seed: int = 0, max_number: int = 100) -> list[str]:
    """A plain-text corpus of arithmetic facts under countdown's rules (larger number first,
    exact division), the kind of text a tiny model needs before it can search."""
    rng = random.Random(seed)
    facts = []
    for _ in range(n):
        a, b = sorted((rng.randint(1, max_number), rng.randint(1, max_number)), reverse=True)
        op = rng.choice("+-*/")
        if op == "/":
            b = rng.randint(1, 12)
            a = b * rng.randint(1, max(1, max_number // b))
            facts.append(f"{a}/{b}={a // b}")
        else:
            facts.append(f"{a}{op}{b}={a + b if op == '+' else a - b if op == '-' else a * b}")
    return [" ".join(facts[i : i + 8]) for i in range(0, len(facts), 8)]


def plain_texts(path: str, text_field: str = "text") -> list[str]:
    """Documents of a plain-text file (blank-line separated), or the ``text_field`` of records:
    a JSONL/JSON/Parquet file, or a ``datasets`` name or directory (its train split), as
    TRL's ``dataset_text_field`` reads a pretraining set."""
    plain = is_plain_text(path)
    if plain:
        docs = [doc.strip() for doc in read_text_input(path).split("\n\n")]
    else:
        docs = []
        for line, rec in source_rows(path, "train"):
            if not isinstance(rec.get(text_field), str):
                raise InputError(path, line, f"expected a string field {text_field!r}")
            docs.append(rec[text_field])
    docs = [doc for doc in docs if doc.strip()]
    if not docs:  # else the stage trained on its other data alone, with no word of it
        expected = (
            "documents separated by blank lines"
            if plain
            else f"records with a non-empty {text_field!r}"
        )
        raise InputError(path, None, f"no text; expected {expected}")
    return docs


def cpt_dataset(
    tokenizer: Any,
    paths: list[str],
    texts: list[str],
    reasoning_ratio: float = 0.5,
    countdown_fact_lines: int = 0,
    seed: int = 0,
    text_field: str = "text",
) -> Dataset:
    """Plain text mixed with reasoning paths (rendered with the chat template) so that about
    ``reasoning_ratio`` of the documents are paths; the larger side is subsampled.
    ``text_field`` is the field read from records in ``texts`` and the column the documents
    go in: TRL's ``dataset_text_field``, which the trainer reads them from."""
    reasoning = [
        tokenizer.apply_chat_template(row["messages"], tokenize=False)
        for path in paths
        for row in chat_rows(path)
    ]
    plain = [doc for path in texts for doc in plain_texts(path, text_field)]
    plain += countdown_facts(countdown_fact_lines, seed) if countdown_fact_lines else []
    rng = random.Random(seed)
    # the ends are all of one side: both sides were used whole there, as if unmixed
    if reasoning_ratio == 1:
        plain = []
    elif reasoning_ratio == 0:
        reasoning = []
    elif reasoning and plain:
        want_plain = round(len(reasoning) * (1 - reasoning_ratio) / reasoning_ratio)
        if want_plain <= len(plain):
            plain = rng.sample(plain, want_plain)
        else:
            want_reasoning = round(len(plain) * reasoning_ratio / (1 - reasoning_ratio))
            reasoning = rng.sample(reasoning, min(want_reasoning, len(reasoning)))
    docs = reasoning + plain
    if not docs:
        if reasoning_ratio == 1 and (texts or countdown_fact_lines):
            raise InputError("--reasoning_ratio", None, "1 keeps --paths only; none given")
        if reasoning_ratio == 0 and paths:
            raise InputError("--reasoning_ratio", None, "0 keeps --texts only; none given")
        raise InputError("steiner train cpt", None, "no data: give --paths and/or --texts")
    rng.shuffle(docs)
    return Dataset.from_dict({text_field: docs})
