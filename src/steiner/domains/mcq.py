"""Multiple-choice questions: GPQA-Diamond and MMLU-Pro style records.

GPQA's CSV has ``Question``, ``Correct Answer``, ``Incorrect Answer 1..3``; the options are
shuffled with a fixed seed per question. MMLU-Pro records have ``question``, ``options`` (a
list) and ``answer`` (a letter). The prompt is zero-shot with no chain-of-thought
instruction, as the seed evaluated.
"""

from __future__ import annotations

import csv
import random
import re
import zlib
from pathlib import Path
from typing import Any

DOMAIN = "mcq"
LETTERS = "ABCDEFGHIJKLMNOP"


def format_question(question: str, options: list[str]) -> str:
    lines = [question.strip(), ""]
    lines += [f"({LETTERS[i]}) {opt.strip()}" for i, opt in enumerate(options)]
    return "\n".join(lines)


class MissingCell(ValueError):
    """A GPQA row shorter than the header (csv gives its missing cells as None)."""


def gpqa_record(row: dict[str, str], index: int, seed: int = 0) -> dict[str, Any]:
    def cell(column: str) -> str:
        if row[column] is None:
            raise MissingCell(column)
        return row[column]

    question, correct = cell("Question"), cell("Correct Answer").strip()
    options = [correct] + [cell(f"Incorrect Answer {i}").strip() for i in (1, 2, 3)]
    rng = random.Random(zlib.crc32(f"{seed}:{question}".encode()))
    rng.shuffle(options)
    answer = LETTERS[options.index(correct)]
    pid = row.get("Record ID") or f"gpqa-{index}"
    return {
        "id": str(pid),
        "domain": DOMAIN,
        "question": format_question(question, options),
        "answer": answer,
        "options": options,
        "meta": {"source": "gpqa"},
    }


def mmlu_pro_record(rec: dict[str, Any], index: int) -> dict[str, Any]:
    if not isinstance(rec["options"], list) or not 2 <= len(rec["options"]) <= len(LETTERS):
        # a string was read as one option per character ("['4', '5']" had 10 options)
        raise ValueError(f"options must be a list of 2 to {len(LETTERS)} options")
    options = [str(o) for o in rec["options"]]
    answer = str(rec["answer"]).strip().upper()
    if answer not in LETTERS[: len(options)]:
        raise ValueError(f"answer {answer!r} is not one of the {len(options)} option letters")
    pid = rec.get("question_id", rec.get("id", f"mmlu-pro-{index}"))
    return {
        "id": str(pid),
        "domain": DOMAIN,
        "question": format_question(rec["question"], options),
        "answer": answer,
        "options": options,
        "meta": {"source": "mmlu-pro"},
    }


def load_mcq(path: str | Path, seed: int = 0) -> list[dict[str, Any]]:
    """GPQA-Diamond CSV, or MMLU-Pro JSONL/Parquet (or a `datasets` name)."""
    from steiner.io import (
        DECOMPRESS_ERRORS,
        InputError,
        data_suffix,
        open_decompressed,
        source_rows,
    )

    path = Path(path)
    out = []
    if data_suffix(path).lower() == ".csv":
        # utf-8-sig: Excel's byte-order mark would be part of the first column's name
        with open_decompressed(path, "r", newline="", encoding="utf-8-sig") as fh:
            try:
                for i, row in enumerate(csv.DictReader(fh), start=2):
                    try:
                        out.append(gpqa_record(row, i - 1, seed))
                    except KeyError as exc:
                        raise InputError(path, i, f"expected GPQA column {exc}") from None
                    except MissingCell as exc:
                        raise InputError(
                            path, i, f"expected a cell in GPQA column '{exc}' (the row is short)"
                        ) from None
            except UnicodeDecodeError:
                # the reader decodes ahead in blocks, so the row is not known
                raise InputError(path, None, "invalid UTF-8; expected a UTF-8 CSV") from None
            except DECOMPRESS_ERRORS as exc:
                raise InputError(path, None, f"cannot decompress: {exc}") from None
        return out
    for line, rec in source_rows(path, "test"):
        try:
            out.append(mmlu_pro_record(rec, line))
        except (KeyError, ValueError, TypeError) as exc:
            raise InputError(
                path, line, f"expected MMLU-Pro fields question/options/answer ({exc})"
            ) from None
    return out


_WHOLE = re.compile(r"^\W*\(?([A-P])\)?\W*$", re.IGNORECASE)  # "C", "(C)", "**C**", "C."
_NAMED = [
    re.compile(r"answer\s*(?:is|:)?\s*\**\(?([A-P])\)?\**(?![A-Za-z])", re.IGNORECASE),
    re.compile(r"^\s*\**\(?([A-P])\)?\**[.:)]\s", re.MULTILINE),  # "C. because ..."
    re.compile(r"(?<![A-Za-z])\(([A-P])\)(?![A-Za-z])"),  # "(B)" anywhere
    re.compile(r"\*\*([A-P])\*\*"),
]


def extract_letter(text: str, n_options: int = 10) -> str | None:
    """The option letter a final answer names, or None when it names none or more than one
    (e.g. "A or B", "(A) and (B)")."""
    valid = LETTERS[:n_options]
    whole = _WHOLE.match(text.strip())
    if whole:
        letter = whole.group(1).upper()
        return letter if letter in valid else None
    named = {m.upper() for pattern in _NAMED for m in pattern.findall(text)}
    named &= set(valid)
    return named.pop() if len(named) == 1 else None


class MCQDomain:
    name = DOMAIN

    def check_answer(self, problem: dict[str, Any], answer: str) -> bool:
        return extract_letter(answer, len(problem.get("options") or LETTERS)) == problem["answer"]
