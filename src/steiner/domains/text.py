"""Generic text domain: problems with a chain of thought split into steps (GSM8K-style).

No exact state key: synthesis clusters its steps by sentence embeddings, and the teacher
labels steps alive/dead/answer.
"""

from __future__ import annotations

import random
import re
from fractions import Fraction
from typing import Any

DOMAIN = "text"


def split_steps(cot: str, separator: str = "\n") -> list[str]:
    return [s.strip() for s in cot.split(separator) if s.strip()]


# a number written with thousands separators: "1,000" and "12,345,678", not "1,4" or "1,2345"
_GROUPED = re.compile(r"(?<![\d,])\d{1,3}(?:,\d{3})+(?![\d,])")


def normalise_answer(text: str) -> str:
    """Lower case, no "the answer is", GSM8K's "####" or a final full stop; a number's
    thousands separators dropped ("1,000" is "1000") and any other comma read as a space,
    so "1,4" stays two numbers (dropping every comma read it as 14) and "Paris, France" is
    "Paris France"."""
    text = text.strip().lower().removeprefix("the answer is").strip().rstrip(".")
    text = re.sub(r"^####\s*", "", text)
    text = _GROUPED.sub(lambda m: m[0].replace(",", ""), text)
    return re.sub(r"\s+", " ", text.replace(",", " ")).strip()


# one level of braces inside, as in \boxed{\frac{1}{2}}
_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
# a plain number or fraction, short: Fraction of "1e999999" would build a million-digit int
_DECIMAL = r"[-+]?(?:\d{1,40}(?:\.\d{0,40})?|\.\d{1,40})"
_NUMBER = re.compile(rf"({_DECIMAL})(?:/({_DECIMAL}))?")
_LATEX_FRACTION = re.compile(rf"([-+]?)\\[dt]?frac\{{({_DECIMAL})\}}\{{({_DECIMAL})\}}")


def canonical_answer(text: str) -> str:
    """The form two answers are compared in: ``normalise_answer``, then the last
    ``\\boxed{...}``'s content, no ``$`` or Markdown ``**``, and a number as its exact value
    ("4", "4.0", "+4", "$4", "**4**" and "8/2" are all "4"; "0.5", "1/2", "1.5/3" and
    "\\frac{1}{2}" are "1/2").

    Hand-written, not math-verify: that library turns extracted expressions into sympy with
    ``parse_expr``, which runs ``eval`` on model output. ``Fraction`` reads a matched
    number's digits only."""
    text = normalise_answer(text)
    boxed = _BOXED.findall(text)
    text = (boxed[-1] if boxed else text).replace("\u2212", "-").strip().strip("$*").strip()
    latex = _LATEX_FRACTION.fullmatch(text)
    number = _NUMBER.fullmatch(f"{latex[1]}{latex[2]}/{latex[3]}" if latex else text)
    if not number:
        return text
    # each side on its own: Fraction reads "3/4" but not "1.5/2", which raised mid-eval
    value = Fraction(number[1])
    if number[2] is not None:
        if Fraction(number[2]) == 0:
            return text
        value /= Fraction(number[2])
    return str(value)


class TextDomain:
    name = DOMAIN

    def start_state(self, problem: dict) -> tuple[str, ...]:
        return ()

    def apply_step(self, problem: dict, state: tuple[str, ...], text: str) -> tuple[str, ...]:
        return (*state, text)

    def state_key(self, state: Any) -> None:
        return None

    def state_from_key(self, problem: dict, key: str) -> Any:
        raise ValueError("the text domain has no state keys")

    def label(self, problem: dict, state: Any) -> None:
        return None

    def propose_step(self, problem: dict, state: Any, rng: random.Random) -> None:
        return None  # no solver: only an LLM teacher can continue a text solution

    def step_between(self, problem: dict, before: Any, after: Any) -> str:
        raise ValueError("the text domain has no state keys")

    def write_step(self, problem, before, text, after, status, back_to=None) -> dict[str, str]:
        return {"name": text[:60], "thought": text, "summary": text[:80], "reflection": ""}

    def final_answer(self, problem: dict, texts: list[str]) -> str:
        return str(problem["answer"])

    def check_answer(self, problem: dict, answer: str) -> bool:
        return canonical_answer(answer) == canonical_answer(str(problem["answer"]))
