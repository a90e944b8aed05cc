"""Countdown (Stream-of-Search rules).

Numbers are combined pairwise with + - * and exact /, the larger number first, until one
number is left; every number is used exactly once and the problem is solved when that last
number equals the target. A state is the sorted multiset of remaining numbers.
"""

from __future__ import annotations

import ast
import random
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

State = tuple[int, ...]

OPS = ("+", "-", "*", "/")
DOMAIN = "countdown"
# The exact solver visits every state, and their number grows factorially: 7 numbers took up
# to 28 s and 0.9 GB per problem here, 8 numbers 34 s to minutes, 9 more than a minute and
# several GB. Records and `countdown solve` are refused beyond this.
MAX_NUMBERS = 7


@dataclass(frozen=True)
class Op:
    """One step: ``a op b = result`` with ``a >= b``."""

    a: int
    op: str
    b: int
    result: int

    def __str__(self) -> str:
        return f"{self.a}{self.op}{self.b}={self.result}"


def apply_op(a: int, op: str, b: int) -> int | None:
    """The result of ``a op b`` under the rules (a >= b), or None when the move is illegal."""
    if a < b:
        return None
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        return a // b if b != 0 and a % b == 0 else None
    return None


def state_key(nums: Any) -> State:
    """Canonical key of a state: the sorted multiset of remaining numbers."""
    return tuple(sorted(int(n) for n in nums))


def moves(state: State) -> Iterator[tuple[Op, State]]:
    """Every legal move from a state, in a fixed order, with the state it leads to."""
    n = len(state)
    seen: set[tuple[int, int]] = set()
    for i in range(n):
        for j in range(i + 1, n):
            small, big = state[i], state[j]  # state is sorted, so state[j] >= state[i]
            if (big, small) in seen:
                continue
            seen.add((big, small))
            rest = state[:i] + state[i + 1 : j] + state[j + 1 :]
            for op in OPS:
                result = apply_op(big, op, small)
                if result is not None:
                    yield Op(big, op, small, result), state_key(rest + (result,))


@lru_cache(maxsize=1 << 20)
def final_values(state: State) -> frozenset[int]:
    """Every number a state can end as (memoised: sub-states recur across problems)."""
    if len(state) == 1:
        return frozenset(state)
    out: set[int] = set()
    for _, child in moves(state):
        out |= final_values(child)
    return frozenset(out)


def is_solvable(nums: Any, target: int) -> bool:
    return target in final_values(state_key(nums))


def solve(nums: Any, target: int) -> list[Op] | None:
    """One solution (the first in move order), or None. Every solution has len(nums)-1 steps,
    so any solution is a shortest one."""
    state = state_key(nums)
    if target not in final_values(state):
        return None
    steps: list[Op] = []
    while len(state) > 1:
        for op, child in moves(state):
            if target in final_values(child):
                steps.append(op)
                state = child
                break
    return steps


def all_solutions(nums: Any, target: int) -> list[list[Op]]:
    """All distinct solutions (distinct sequences of steps), pruned by reachability."""

    def walk(state: State) -> Iterator[list[Op]]:
        if len(state) == 1:
            if state[0] == target:
                yield []
            return
        for op, child in moves(state):
            if target in final_values(child):
                for rest in walk(child):
                    yield [op, *rest]

    return list(walk(state_key(nums)))


def reachable_states(nums: Any) -> set[State]:
    """Every state reachable from the start (the start included)."""
    seen = {state_key(nums)}
    frontier = list(seen)
    while frontier:
        state = frontier.pop()
        for _, child in moves(state):
            if child not in seen:
                seen.add(child)
                frontier.append(child)
    return seen


def solution_expression(nums: Any, steps: list[Op]) -> str:
    """Fold solution steps into one arithmetic expression, e.g. ``(50+25)+(7-3)``."""
    pool: list[tuple[int, str]] = [(int(n), str(n)) for n in nums]

    def take(value: int) -> str:
        i = next(i for i, (v, _) in enumerate(pool) if v == value)
        return pool.pop(i)[1]

    for s in steps:
        a_expr, b_expr = take(s.a), take(s.b)
        pool.append((s.result, f"({a_expr}{s.op}{b_expr})"))
    if len(pool) != 1:
        raise ValueError("the steps do not use every number")
    # The last step's parentheses wrap the whole expression; drop them.
    return pool[0][1][1:-1] if steps else pool[0][1]


# ---------------------------------------------------------------- checking answers


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


_EQUATION_RE = re.compile(r"^\s*(\d+)\s*([-+*/])\s*(\d+)\s*=\s*(\d+)\s*$")
_MAX_ANSWER_CHARS = 2000


_TIMES_X_RE = re.compile(r"(?<=[\d\s)])x(?=[\s\d(])")


def _normalise(text: str) -> str:
    text = text.replace("×", "*").replace("÷", "/").replace("−", "-")
    return _TIMES_X_RE.sub("*", text)


def check_answer(nums: Any, target: int, answer: str) -> CheckResult:
    """Check a final answer: one arithmetic expression, or step equations (one per line,
    or separated by ``,``/``;``). Never evaluates the text as code."""
    if not isinstance(answer, str) or not answer.strip():
        return CheckResult(False, "empty answer")
    if len(answer) > _MAX_ANSWER_CHARS:
        return CheckResult(False, "answer too long")
    text = _normalise(answer.strip())
    if "=" in text:
        return _check_equations(nums, target, text)
    return _check_expression(nums, target, text.removesuffix("."))


def _check_equations(nums: Any, target: int, text: str) -> CheckResult:
    pool = Counter(int(n) for n in nums)
    lines = [p for p in re.split(r"[\n,;]+", text) if p.strip()]
    for line in lines:
        m = _EQUATION_RE.match(line)
        if not m:
            return CheckResult(False, f"not an equation 'a op b = c': {line.strip()!r}")
        a, op, b, claimed = int(m[1]), m[2], int(m[3]), int(m[4])
        a, b = (b, a) if op in "+*" and a < b else (a, b)
        result = apply_op(a, op, b)
        if result is None:
            return CheckResult(False, f"illegal step {line.strip()!r}")
        if result != claimed:
            return CheckResult(False, f"wrong arithmetic in {line.strip()!r}")
        for x in (a, b):
            if pool[x] <= 0:
                return CheckResult(False, f"{x} is not available in {line.strip()!r}")
            pool[x] -= 1
        pool[result] += 1
    left = sorted(pool.elements())
    if left != [target]:
        return CheckResult(False, f"ends with {left}, not [{target}]")
    return CheckResult(True)


class _Invalid(Exception):
    pass


def _eval_node(node: ast.AST, leaves: list[int]) -> int:
    """Evaluate a whitelisted AST of integer + - * / under the rules (exact division, no
    negative intermediate results). Anything else in the tree is rejected."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        leaves.append(node.value)
        return node.value
    if isinstance(node, ast.BinOp):
        op = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}.get(type(node.op))
        if op is None:
            raise _Invalid("only + - * / are allowed")
        a = _eval_node(node.left, leaves)
        b = _eval_node(node.right, leaves)
        big, small = (max(a, b), min(a, b)) if op in "+*" else (a, b)
        result = apply_op(big, op, small)
        if result is None:
            raise _Invalid(f"illegal operation {a}{op}{b}")
        return result
    raise _Invalid(f"unexpected {type(node).__name__} in expression")


def _check_expression(nums: Any, target: int, text: str) -> CheckResult:
    try:
        tree = ast.parse(text, mode="eval")  # parses only; the tree is walked, never run
        leaves: list[int] = []
        value = _eval_node(tree.body, leaves)
    except _Invalid as exc:
        return CheckResult(False, str(exc))
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return CheckResult(False, "not an arithmetic expression")
    if Counter(leaves) != Counter(int(n) for n in nums):
        return CheckResult(False, f"uses {sorted(leaves)}, must use each of {sorted(nums)} once")
    if value != target:
        return CheckResult(False, f"evaluates to {value}, not {target}")
    return CheckResult(True)


# ---------------------------------------------------------------- problems


def question_text(nums: list[int], target: int) -> str:
    return (
        f"Using the numbers {', '.join(map(str, nums))}, reach {target}. "
        "Combine two numbers at a time with + - * / (larger first, exact division); "
        "use every number exactly once."
    )


def make_problem(pid: str, nums: list[int], target: int, meta: dict | None = None) -> dict:
    steps = solve(nums, target)
    if steps is None:
        raise ValueError(f"problem {pid}: {nums} cannot reach {target}")
    return {
        "id": pid,
        "domain": DOMAIN,
        "question": question_text(nums, target),
        "answer": solution_expression(nums, steps),
        "meta": meta or {},
        "nums": list(nums),
        "target": target,
    }


def shortcut_record(problem: dict) -> dict:
    """The problem plus the steps of one solution, straight, no backtracking."""
    steps = solve(problem["nums"], problem["target"])
    assert steps is not None
    return {**problem, "steps": [str(s) for s in steps]}


MAX_MISSES = 1000


def generate_problems(
    count: int,
    n_numbers: int = 4,
    min_number: int = 1,
    max_number: int = 50,
    min_target: int = 10,
    max_target: int = 100,
    seed: int = 0,
) -> Iterator[dict]:
    """Seeded solvable problems: draw numbers, then a target among the reachable values in
    range (redrawing numbers that reach none)."""
    if n_numbers < 2:
        raise ValueError("n_numbers must be at least 2")
    if min_number > max_number or min_target > max_target:
        raise ValueError("empty number or target range")
    rng = random.Random(seed)
    made = misses = 0
    while made < count:
        nums = [rng.randint(min_number, max_number) for _ in range(n_numbers)]
        reachable = sorted(
            v for v in final_values(state_key(nums)) if min_target <= v <= max_target
        )
        if not reachable:
            misses += 1
            if misses == MAX_MISSES:  # ranges that (almost) never meet would loop forever
                raise ValueError(
                    f"{MAX_MISSES} draws in a row of {n_numbers} numbers in {min_number}-"
                    f"{max_number} reached no target in {min_target}-{max_target}; widen the ranges"
                )
            continue
        misses = 0
        target = rng.choice(reachable)
        yield make_problem(f"countdown-{seed}-{made}", nums, target, {"seed": seed})
        made += 1


# ---------------------------------------------------------------- synthesis interface

_STEP_RE = re.compile(r"(\d+)\s*([-+*/×÷−x])\s*(\d+)\s*=\s*(\d+)")


def parse_step(text: str) -> Op | None:
    """The last equation ``a op b = c`` written in a step (larger operand first)."""
    found = _STEP_RE.findall(text)
    if not found:
        return None
    a, op, b, c = found[-1]
    op = {"×": "*", "x": "*", "÷": "/", "−": "-"}.get(op, op)
    a_, b_ = int(a), int(b)
    if op in "+*" and a_ < b_:
        a_, b_ = b_, a_
    return Op(a_, op, b_, int(c))


def apply_step(state: State, op: Op) -> State | None:
    """The state after a step, or None when it is illegal here (wrong arithmetic, a number
    that is not available)."""
    if apply_op(op.a, op.op, op.b) != op.result:
        return None
    rest = list(state)
    for x in (op.a, op.b):
        if x not in rest:
            return None
        rest.remove(x)
    return state_key(rest + [op.result])


def key_text(state: State) -> str:
    return " ".join(map(str, state))


class CountdownDomain:
    """Countdown for synthesis: states are remaining-number multisets, keys exact."""

    name = DOMAIN

    def __init__(self, greedy: float = 0.5):
        self.greedy = greedy  # share of proposals that move closest to the target

    def start_state(self, problem: dict) -> State:
        return state_key(problem["nums"])

    def apply_step(self, problem: dict, state: State, text: str) -> State | None:
        op = parse_step(text)
        return None if op is None else apply_step(state, op)

    def state_key(self, state: State) -> str:
        return key_text(state)

    def state_from_key(self, problem: dict, key: str) -> State:
        return tuple(int(x) for x in key.split())

    def label(self, problem: dict, state: State) -> str:
        target = problem["target"]
        if state == (target,):
            return "answer"
        return "alive" if target in final_values(state) else "dead"

    def propose_step(self, problem: dict, state: State, rng: random.Random) -> str | None:
        # The answer stays hidden: a greedy move towards the target (plausible) or a random
        # legal move, never a look-up of which moves still reach it.
        options = list(moves(state))
        if not options:
            return None
        if rng.random() < self.greedy:
            target = problem["target"]
            best = min(abs(op.result - target) for op, _ in options)
            options = [(op, child) for op, child in options if abs(op.result - target) == best]
        return str(rng.choice(options)[0])

    def step_between(self, problem: dict, before: State, after: State) -> str:
        return str(next(op for op, child in moves(before) if child == after))

    def write_step(
        self,
        problem: dict,
        before: State,
        text: str,
        after: State,
        status: str,
        back_to: State | None = None,
    ) -> dict[str, str]:
        op = parse_step(text)
        assert op is not None
        target = problem["target"]
        name = str(op) if back_to is None else f"back to {key_text(back_to)}: {op}"
        reflection = {
            "answer": f"{target} reached.",
            "alive": f"{target} can still be reached from {key_text(after)}.",
            "dead": f"{target} cannot be reached from {key_text(after)}; go back.",
        }[status]
        return {
            "name": name,
            "thought": f"Combine {op.a} and {op.b}: {op}.",
            "summary": f"left {key_text(after)}",
            "reflection": reflection,
        }

    def final_answer(self, problem: dict, texts: list[str]) -> str:
        steps = [parse_step(t) for t in texts]
        return solution_expression(problem["nums"], [s for s in steps if s is not None])

    def check_answer(self, problem: dict, answer: str) -> bool:
        return bool(check_answer(problem["nums"], problem["target"], answer))
