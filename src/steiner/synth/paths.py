"""Sample reasoning paths from a DAG, with wrong branches followed by backtracks, and render
them in the 14-token format."""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from steiner.dag import Dag
from steiner.domains import trace_separator
from steiner.domains.base import Domain
from steiner.format import Decision, Step, Trace, reasoning_and_answer, render


@dataclass
class PathSettings:
    paths_per_dag: int = 5
    p_wrong: float = 0.5  # at a branch point with an untried dead branch, take it this often
    # "p_wrong": take an untried dead branch with probability p_wrong; "uniform": pick
    # uniformly among the untried branches, dead or alive, as a search that cannot tell them
    # apart would (path-star: the goal's arm is first, second, ... equally often)
    branch_choice: str = "p_wrong"
    # chance that a walk, once at the answer, goes back to try the untried dead branches of
    # its branch points before ending (teaches that reasoning past success is harmless)
    verify_after_answer: float = 0.0
    return_to_answer: bool = False
    # chance of each further return after the first (up to max_returns): rows that keep
    # walking the answer's branch, for a minimum of steps past the last untried branch
    return_again: float = 0.0
    max_returns: int = 3
    # chance that each return is preceded by walking a dead branch again (judged dead again):
    # when only the answer's branch is ever walked twice, "walked before" alone reads as "the
    # answer", and a model forced past its last branch (extend mode) re-walked a dead arm and
    # called it the goal (README, Results)
    revisit_dead: float = 0.0
    max_detours: int = 2
    max_detour_depth: int = 3
    max_reasoning_tokens: int = 4096
    max_total_tokens: int = 8192
    tries_per_path: int = 4  # walks drawn per wanted path before giving up (duplicates)


@dataclass
class Move:
    src: int
    dst: int
    back: bool = False  # this move starts at a node a backtrack returned to
    decision: Decision = Decision.PROCEED


def sample_walk(dag: Dag, rng: random.Random, s: PathSettings) -> list[Move] | None:
    """A walk from the root to an answer. At a node with an untried dead-end child it may
    (probability ``p_wrong``, at most ``max_detours`` times) take that child, follow it down
    to a node judged dead, a leaf or ``max_detour_depth`` steps, then backtrack to the
    branch point, which is already on the path, and go on from there.

    With ``verify_after_answer`` the walk may, once at the answer, go back and try every
    untried dead branch of the branch points on its way before it ends (the answer found
    stays the answer): traces in which reasoning goes on past success. With
    ``return_to_answer`` such a walk then goes back to the root and walks the answer's branch
    again, so that its last step is the answer, as in every other walk (also when the answer
    was the last branch tried, with nothing to verify); ``return_again`` repeats that return,
    each time with that chance, up to ``max_returns`` returns, and ``revisit_dead`` walks one of
    the dead branches tried again, as a dead end, before a return with that chance."""
    kids = dag.children()
    nodes = dag.nodes
    if nodes[dag.root].d_e is None:
        return None
    moves: list[Move] = []
    tried: set[int] = set()

    def detour(cur: int, back: bool, node: int | None = None) -> None:
        if node is None:
            node = rng.choice([c for c in kids[cur] if nodes[c].d_e is None and c not in tried])
        tried.add(node)
        moves.append(Move(cur, node, back))
        depth = 1
        while depth < s.max_detour_depth and nodes[node].status != "dead" and kids[node]:
            nxt = rng.choice(kids[node])
            moves.append(Move(node, nxt))
            node, depth = nxt, depth + 1
        moves[-1].decision = Decision.BACKTRACK

    cur, detours, back = dag.root, 0, False
    branch = [cur]
    while nodes[cur].status != "answer":
        alive = [c for c in kids[cur] if nodes[c].d_e is not None]
        dead = [c for c in kids[cur] if nodes[c].d_e is None and c not in tried]
        p = (
            len(dead) / max(1, len(dead) + len(alive))
            if s.branch_choice == "uniform"
            else s.p_wrong
        )
        if dead and detours < s.max_detours and rng.random() < p:
            detours += 1
            detour(cur, back)
            back = True
            continue
        node = rng.choice(alive)
        moves.append(Move(cur, node, back))
        cur, back = node, False
        branch.append(cur)
    if s.verify_after_answer and rng.random() < s.verify_after_answer:
        for point in branch:
            while any(nodes[c].d_e is None and c not in tried for c in kids[point]):
                moves[-1].decision = Decision.BACKTRACK
                detour(point, True)
        if s.return_to_answer:
            # the answer is read off the last step: a small model copies that far more
            # easily than a step further back (verify walks without this broke the copy).
            # A walk that found the answer last, with nothing left to verify, walks it again
            # all the same: without such rows a model forced one step past its last branch
            # (extend mode) had never seen the step that keeps its answer
            returns = 1
            while returns < s.max_returns and rng.random() < s.return_again:
                returns += 1
            # the dead branches tried at the branch points: walking one again tries nothing new
            revisits = (
                [(p, c) for p in branch for c in kids[p] if c in tried] if s.revisit_dead else []
            )
            for _ in range(returns):
                if revisits and rng.random() < s.revisit_dead:
                    moves[-1].decision = Decision.BACKTRACK
                    point, node = rng.choice(revisits)
                    detour(point, True, node)
                moves[-1].decision = Decision.BACKTRACK
                for i, (src, dst) in enumerate(zip(branch, branch[1:], strict=False)):
                    moves.append(Move(src, dst, back=i == 0))
    moves[-1].decision = Decision.END
    return moves


def walk_node_ids(dag: Dag, moves: list[Move]) -> list[int]:
    """The walk as node ids: the root, then each node entered; after a backtrack the node
    returned to appears again (it costs no step of its own)."""
    ids = [dag.root]
    for m in moves:
        if m.back:
            ids.append(m.src)
        ids.append(m.dst)
    return ids


def render_walk(domain: Domain, problem: dict[str, Any], dag: Dag, moves: list[Move]) -> Trace:
    nodes = dag.nodes
    keyed = dag.keyed
    steps: list[Step] = []
    texts: list[str] = []  # each move's step text, reused for the final answer
    for m in moves:
        src, dst = nodes[m.src], nodes[m.dst]
        # the last step of a detour is written as a dead end (a verifying walk ends on one)
        detour_end = m.decision is Decision.BACKTRACK or (
            m.decision is Decision.END and dst.d_e is None
        )
        status = "dead" if detour_end and dst.status != "answer" else dst.status
        if status == "root":
            status = "alive"
        if keyed:
            before = domain.state_from_key(problem, src.key)
            after = domain.state_from_key(problem, dst.key)
            text = domain.step_between(problem, before, after)
            content = domain.write_step(
                problem, before, text, after, status, back_to=before if m.back else None
            )
        else:
            text = dst.text
            content = {f: dst.step.get(f, "") for f in ("name", "thought", "summary", "reflection")}
            if m.back:
                where = src.step.get("summary") or src.text if m.src != dag.root else "the start"
                content["name"] = f"back to {where}: {content['name']}"
        steps.append(Step(**content))
        texts.append(text)
    branch = [texts[i] for i in successful_branch(dag, moves)]
    return Trace(
        steps=steps,
        decisions=[m.decision for m in moves],
        answer=domain.final_answer(problem, branch),
    )


def successful_branch(dag: Dag, moves: list[Move]) -> list[int]:
    """Indices of the moves from the root to the answer, every detour cut out."""
    into = {m.dst: i for i, m in enumerate(moves)}  # a node of the final branch is entered once
    answer = next(m.dst for m in reversed(moves) if dag.nodes[m.dst].status == "answer")
    node, chain = answer, []
    while node != dag.root:
        chain.append(into[node])
        node = moves[into[node]].src
    return chain[::-1]


_TOKEN_RE = re.compile(r"<\|[a-z_]+\|>|\w+|[^\w\s]")


def default_token_count(text: str) -> int:
    """Approximate tokens: special tokens, words and punctuation marks count one each."""
    return len(_TOKEN_RE.findall(text))


@lru_cache(maxsize=4)  # one load per process, not one per chunk
def tokenizer_counter(path: str) -> Callable[[str], int]:
    from transformers import AutoTokenizer

    from steiner.io import InputError

    try:
        # a directory or a name already in the Hub cache: a run never downloads, and offline
        # a name that is neither was 50 s of retry lines above the error line
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(
            "--tokenizer",
            None,
            f"cannot load {path!r} ({reason}); expected a tokenizer directory or a cached Hub name",
        ) from None
    return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])


def sample_paths(
    domain: Domain,
    problem: dict[str, Any],
    dag: Dag,
    rng: random.Random,
    s: PathSettings,
    count_tokens: Callable[[str], int] = default_token_count,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Up to ``paths_per_dag`` distinct path records and counts of what was dropped."""
    dropped = {"reasoning_tokens": 0, "total_tokens": 0, "duplicates": 0, "no_walk": 0}
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    question = problem["question"]
    q_tokens = count_tokens(question)
    for _ in range(s.paths_per_dag * s.tries_per_path):
        if len(out) == s.paths_per_dag:
            break
        moves = sample_walk(dag, rng, s)
        if moves is None:
            dropped["no_walk"] += 1
            break
        trace = render_walk(domain, problem, dag, moves)
        content = render(trace, trace_separator(problem))
        if content in seen:
            dropped["duplicates"] += 1
            continue
        seen.add(content)
        reasoning, _ = reasoning_and_answer(content)
        r_tokens = count_tokens(reasoning)
        total = q_tokens + count_tokens(content)
        if r_tokens > s.max_reasoning_tokens:
            dropped["reasoning_tokens"] += 1
            continue
        if total > s.max_total_tokens:
            dropped["total_tokens"] += 1
            continue
        out.append(
            {
                "problem_id": str(problem["id"]),
                "messages": [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": content},
                ],
                "node_ids": walk_node_ids(dag, moves),
                "n_steps": trace.n_steps,
                "n_backtracks": trace.n_backtracks,
                "reasoning_tokens": r_tokens,
                "total_tokens": total,
            }
        )
    return out, dropped
