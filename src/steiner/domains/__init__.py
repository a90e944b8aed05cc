"""Problem domains: where problems come from and how an answer is checked."""

from __future__ import annotations

import os
import re
from functools import partial
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    NonNegativeInt,
    field_validator,
)
from pydantic_core import PydanticCustomError

from steiner.domains.base import Domain
from steiner.domains.countdown import MAX_NUMBERS
from steiner.io import (
    InputError,
    data_suffix,
    not_a_boolean,
    source_rows,
    validate,
)


def get_domain(name: str) -> Domain:
    if name == "countdown":
        from steiner.domains.countdown import CountdownDomain

        return CountdownDomain()
    if name == "graph":
        from steiner.domains.graph import GraphDomain

        return GraphDomain()
    if name == "text":
        from steiner.domains.text import TextDomain

        return TextDomain()
    if name == "mcq":
        from steiner.domains.mcq import MCQDomain

        return MCQDomain()  # type: ignore[return-value]  # evaluation only: no synthesis
    raise InputError("--domain", None, f"expected countdown, graph, text or mcq, got {name!r}")


def load_problems(source: str | os.PathLike, domain: str | None = None) -> list[dict[str, Any]]:
    """Problems to evaluate: any record file of a domain (bare fields are enough; a text
    problem needs no steps, only a question and its answer). An empty file is an error, not
    an accuracy of 0/0. A CSV is GPQA's (the other domains' records are JSON Lines or
    Parquet), so it needs no ``--domain mcq``: it was read as JSON Lines, "invalid JSON"."""
    if domain is None and data_suffix(source).lower() == ".csv":
        domain = "mcq"
    if domain == "mcq":
        from steiner.domains.mcq import load_mcq

        problems = load_mcq(source)
    else:
        problems = load_shortcuts(source, domain, steps_required=False, split="test")
    if not problems:
        raise InputError(source, None, "no records; expected one problem per line")
    return problems


_NOT_A_BOOLEAN = BeforeValidator(partial(not_a_boolean, expected="a valid integer"))
Int = Annotated[int, _NOT_A_BOOLEAN]
Count = Annotated[NonNegativeInt, _NOT_A_BOOLEAN]


def _id_as_text(value: Any) -> str:
    # one message for any other type: pydantic's union named its first member ("id.str")
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # a pandas column of ids with a missing value is floats
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return str(value)
    raise PydanticCustomError("id_type", "Input should be a string or an integer")


Id = Annotated[str, BeforeValidator(_id_as_text)]


class _CountdownRecord(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: Id | None = None  # Hugging Face's countdown sets have only nums and target
    # the rules combine non-negative numbers (larger first), and the solver's cost bounds
    # how many: a negative number crashed synthesis, nine numbers ran for minutes
    nums: list[Count] = Field(min_length=1, max_length=MAX_NUMBERS)
    target: Int
    steps: list[str] | None = None


class _GraphRecord(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: Id | None = None
    # answers are read as runs of digits (12>45>7), so a negative id could never be answered
    edges: list[tuple[Count, Count]]
    start: Count
    goal: Count
    steps: list[str] | None = None


class _TextRecord(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: Id | None = None
    question: str
    answer: str
    steps: list[str] | None = None
    cot: str | None = None
    solution: str | None = None

    @field_validator("answer", mode="before")
    @classmethod
    def answer_as_text(cls, answer: Any) -> str:
        # a yes/no dataset's JSON true/false (BoolQ's answer column) is the answer "true":
        # a lax int read it as 1, and every "true" a model answered was marked wrong
        if isinstance(answer, bool):
            return str(answer).lower()
        # a JSON number written 1e20 is a float, whose str is "1e+20": no model's
        # "100000000000000000000" matched it. A whole float is written as its integer (up to
        # canonical_answer's 40 digits); any other number as Python writes it
        if isinstance(answer, float) and answer.is_integer() and abs(answer) < 1e40:
            return str(int(answer))
        if isinstance(answer, int | float):
            return str(answer)
        if not isinstance(answer, str):
            raise PydanticCustomError("answer_type", "Input should be a string or a number")
        return answer


_GSM8K_FINAL = "\n####"
_GSM8K_CALCULATOR = re.compile(r"<<[^<>]*>>")


def gsm8k_answer(answer: str) -> tuple[str, str]:
    """GSM8K's own ``answer`` field, the worked solution and then ``#### 72``, as the final
    answer and the solution (its calculator notes ``<<48/2=24>>`` dropped: they are an artefact
    of how the data was written, not reasoning a teacher should copy). Without this a GSM8K
    file had no steps, and eval compared whole solutions with model answers."""
    solution, _, final = answer.rpartition(_GSM8K_FINAL)
    return final.strip(), _GSM8K_CALCULATOR.sub("", solution)


def built_in_domain_by_fields(rec: dict[str, Any]) -> str | None:
    """The built-in domain a record's fields make it (countdown's ``nums``, graph's
    ``edges``), whatever it says it is."""
    if "nums" in rec:
        return "countdown"
    return "graph" if "edges" in rec else None


def guess_domain(rec: dict[str, Any]) -> str:
    if rec.get("domain"):
        return str(rec["domain"])
    return built_in_domain_by_fields(rec) or "text"


def record_id(given: str | None, domain: str, place: int) -> str:
    """A record's own id, or ``<domain>-<place>`` for a record without one (``place``: 1 for the
    file's first record): its place in the file is what names it, so the DAGs, paths and
    eval outputs made from it join back to it. Not its line: a JSON array may hold several
    records on one."""
    return given if given is not None else f"{domain}-{place}"


def shortcut_from_record(
    rec: dict[str, Any],
    domain: str,
    path: str | os.PathLike,
    line: int,
    separator: str = "\n",
    steps_required: bool = True,
    *,
    place: int,
) -> dict[str, Any]:
    """A shortcut record (DESIGN.md schema) from a full or bare record of the domain; with
    ``steps_required=False``, a text record without steps is a problem record (for eval).
    ``place`` (the record's number in its file) names a record without an id."""
    if domain == "countdown":
        from steiner.domains import countdown

        r = validate(_CountdownRecord, rec, path, line)
        pid = record_id(r.id, domain, place)
        try:
            problem = countdown.make_problem(pid, r.nums, r.target, rec.get("meta"))
        except ValueError:
            raise InputError(path, line, f"{r.nums} cannot reach {r.target}") from None
        problem = {**rec, **problem, "id": pid}
        if r.steps is None:
            return countdown.shortcut_record(problem)
        if not countdown.check_answer(r.nums, r.target, "\n".join(r.steps)):
            raise InputError(path, line, "field 'steps': not a solution of the problem")
        return {**problem, "steps": r.steps}
    if domain == "graph":
        from steiner.domains import graph

        r = validate(_GraphRecord, rec, path, line)
        if r.start == r.goal:
            # no step to take: synthesis made a one-node DAG, no path, and a "dead end"
            raise InputError(
                path, line, f"field 'goal': {r.goal} is the start; expected another node"
            )
        cycle = graph.find_cycle(r.edges)
        if cycle:
            raise InputError(
                path,
                line,
                f"field 'edges': a cycle {graph.path_text(cycle)}; expected a directed "
                "acyclic graph (a path-star or a DAG)",
            )
        pid = record_id(r.id, domain, place)
        try:
            problem = graph.make_problem(pid, r.edges, r.start, r.goal, rec.get("meta"))
        except ValueError:
            raise InputError(path, line, f"goal {r.goal} is not reachable from {r.start}") from None
        # a record's own question (with its edge order) is kept; bare records get one
        problem = {**problem, **rec, "id": pid, "domain": "graph"}
        problem["edges"] = [[u, v] for u, v in r.edges]
        if r.steps is None:
            return graph.shortcut_record(problem)
        if not graph.check_answer(
            r.edges, r.start, r.goal, graph.final_answer_of(problem, r.steps)
        ):
            raise InputError(path, line, "field 'steps': not a path from start to goal")
        return {**problem, "steps": r.steps}
    if domain == "text":
        from steiner.domains.text import split_steps

        r = validate(_TextRecord, rec, path, line)
        answer, cot = r.answer, r.cot or r.solution
        if not r.steps and cot is None and _GSM8K_FINAL in answer:
            answer, cot = gsm8k_answer(answer)
        steps = r.steps or split_steps(cot or "", separator)
        if not steps and steps_required:
            raise InputError(
                path, line, "expected 'steps', 'cot' or 'solution' with at least one step"
            )
        return {
            **rec,
            "id": record_id(r.id, domain, place),
            "domain": "text",
            "question": r.question,
            "answer": answer,
            "meta": rec.get("meta") or {},
        } | ({"steps": steps} if steps else {})
    raise InputError(path, line, f"unknown domain {domain!r}")


def load_shortcuts(
    source: str | os.PathLike,
    domain: str | None = None,
    separator: str = "\n",
    steps_required: bool = True,
    split: str = "train",
) -> list[dict[str, Any]]:
    """Shortcut records from a JSONL/Parquet file, or a `datasets` name or directory (its
    ``split``; for "test", what eval reads, a dataset of one split is read whole)."""
    rows = source_rows(source, split)
    out, ids = [], set()
    for place, (line, rec) in enumerate(rows, start=1):
        if "messages" in rec and not any(k in rec for k in ("question", "nums", "edges")):
            # else the text domain's "field 'question': Field required"
            raise InputError(
                source, line, "a chat record ('messages'); expected a problem or shortcut record"
            )
        looks = built_in_domain_by_fields(rec)
        if domain in ("countdown", "graph") and looks not in (None, domain):
            # else "field 'edges': Field required", which did not say the file was of the
            # other built-in domain
            raise InputError(
                source,
                line,
                f"a {looks} problem; expected a {domain} one (for {looks} problems: "
                f"--domain {looks})",
            )
        rec = shortcut_from_record(
            rec, domain or guess_domain(rec), source, line, separator, steps_required, place=place
        )
        if rec["id"] in ids:
            raise InputError(source, line, f"duplicate id {rec['id']!r}")
        ids.add(rec["id"])
        out.append(rec)
    return out


def trace_separator(problem: dict[str, Any]) -> str:
    """What goes between the reasoning tokens of this problem's traces: nothing for the
    compact style (tiny models), a newline otherwise."""
    return "" if (problem.get("meta") or {}).get("style") == "compact" else "\n"


def walk_shortcut(domain: Domain, problem: dict[str, Any]) -> list[tuple[str, Any, Any, str, dict]]:
    """The shortcut's steps as (text, state before, state after, status, step content)."""
    from steiner.domains.base import ALIVE, ANSWER

    state = domain.start_state(problem)
    out = []
    for i, text in enumerate(problem["steps"]):
        after = domain.apply_step(problem, state, text)
        if after is None:
            raise ValueError(f"problem {problem['id']}: invalid shortcut step {text!r}")
        last = i == len(problem["steps"]) - 1
        status = domain.label(problem, after) or (ANSWER if last else ALIVE)
        out.append(
            (text, state, after, status, domain.write_step(problem, state, text, after, status))
        )
        state = after
    return out


def shortcut_trace(domain: Domain, problem: dict[str, Any]) -> Any:
    """The shortcut rendered as one straight path: every step proceeds, no backtracking."""
    from steiner.format import Decision, Step, Trace

    walk = walk_shortcut(domain, problem)
    return Trace(
        steps=[Step(**content) for *_, content in walk],
        decisions=[Decision.PROCEED] * (len(walk) - 1) + [Decision.END],
        answer=domain.final_answer(problem, [text for text, *_ in walk]),
    )
