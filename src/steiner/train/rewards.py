"""Stage 3 rewards: match a sampled trace's steps to its problem's DAG, score each step from
the matched node's statistics, score the path, and turn a group of samples into per-token
advantages (process-supervised GRPO, DeepSeekMath §4.1.3).

Defaults, and why:
- ``progress`` +1 per hop the step brings the walk closer to an answer (d_e falls): depth.
- ``dead_end`` -1 for entering a node from which no answer is reachable (d_e is null).
- ``backtrack_from_dead_end`` +0.75 when the step entering a dead end is followed by a
  backtrack, ``press_on_dead_end`` -0.5 when it is followed by proceed: breadth, done right.
- ``unmatched`` -0.25 for a step no node matches (a state the teacher never saw);
  ``invalid`` -1 for a step that breaks the domain's rules (wrong arithmetic, a number that is
  not there, a backtrack to a state never visited) or the format.
- ``repeat`` -0.5 for entering, by a forward step, a node already entered.
- path: ``correct`` +2 / ``wrong`` -1 / ``unfinished`` -2 (never reached ``<|reasoning_end|>``),
  ``length`` -0.1 per step beyond the DAG's shortest path so exploration is not free, and
  ``backtrack_loop`` -1 when backtracks exceed ``max_backtracks``.
Every weight can be set to 0 to switch a term off (ablations).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from steiner.dag import Dag
from steiner.domains.base import Domain
from steiner.format import Decision, Trace


@dataclass
class RewardWeights:
    progress: float = 1.0
    dead_end: float = 1.0
    backtrack_from_dead_end: float = 0.75
    press_on_dead_end: float = 0.5
    unmatched: float = 0.25
    invalid: float = 1.0
    repeat: float = 0.5
    correct: float = 2.0
    wrong: float = 1.0
    unfinished: float = 2.0
    length: float = 0.1
    backtrack_loop: float = 1.0
    max_backtracks: int = 3
    similarity: float = 0.75  # cosine needed to match a step to a node (no exact keys)


@dataclass
class StepMatch:
    node: int | None  # matched DAG node, None when unmatched or invalid
    invalid: bool = False
    back_to: int | None = None  # the node a backtrack returned to before this step


@dataclass
class Scored:
    step_rewards: list[float]
    outcome: float
    terms: dict[str, float] = field(default_factory=dict)  # summed per term, for logging

    @property
    def total(self) -> float:
        return sum(self.step_rewards) + self.outcome


_BACK_TO = re.compile(r"^\s*back to (.+?):")


def match_steps(
    domain: Domain, problem: dict[str, Any], dag: Dag, trace: Trace, similarity: float = 0.75
) -> list[StepMatch]:
    """Map each step of a trace to a node. Keyed domains: replay the steps from the start
    state (checking each step's rules) and look the state's key up; after a backtrack the
    step's name says which state it returns to. Other domains: the nearest node by sentence
    embedding, at least ``similarity`` cosine; a backtrack's target is matched the same way."""
    if not dag.keyed:
        from steiner.dag import nearest_nodes

        nodes = nearest_nodes(dag, [s.thought or s.name for s in trace.steps], similarity)
        out = []
        for i, (step, node) in enumerate(zip(trace.steps, nodes, strict=True)):
            back_to = None
            if (
                i > 0
                and i - 1 < len(trace.decisions)
                and trace.decisions[i - 1] is Decision.BACKTRACK
            ):
                m = _BACK_TO.match(step.name)
                back_to = nearest_nodes(dag, [m.group(1)], similarity)[0] if m else None
            out.append(StepMatch(node, invalid=not (step.thought or step.name), back_to=back_to))
        return out
    by_key = dag.by_key()
    state = domain.start_state(problem)
    visited = {domain.state_key(state)}
    out: list[StepMatch] = []
    for i, step in enumerate(trace.steps):
        back_to = None
        if i > 0 and i - 1 < len(trace.decisions) and trace.decisions[i - 1] is Decision.BACKTRACK:
            m = _BACK_TO.match(step.name)
            key = m.group(1).strip() if m else None
            if key is None or key not in visited:
                out.append(StepMatch(None, invalid=True))
                continue
            state, back_to = domain.state_from_key(problem, key), by_key.get(key)
        after = None
        for text in (step.thought, step.name):
            after = domain.apply_step(problem, state, text)
            if after is not None:
                break
        if after is None:
            out.append(StepMatch(None, invalid=True, back_to=back_to))
            continue
        key = domain.state_key(after)
        visited.add(key)
        out.append(StepMatch(by_key.get(key), back_to=back_to))
        state = after
    return out


def score_trace(
    domain: Domain, problem: dict[str, Any], dag: Dag, trace: Trace, w: RewardWeights
) -> Scored:
    matches = match_steps(domain, problem, dag, trace, w.similarity)
    nodes = dag.nodes
    terms: dict[str, float] = {}

    def add(term: str, value: float) -> float:
        terms[term] = terms.get(term, 0.0) + value
        return value

    rewards: list[float] = []
    prev_d_e = nodes[dag.root].d_e
    entered: set[int] = set()
    for i, m in enumerate(matches):
        decision = trace.decisions[i] if i < len(trace.decisions) else None
        r = 0.0
        if m.back_to is not None:
            prev_d_e = nodes[m.back_to].d_e
        if m.invalid:
            r += add("invalid", -w.invalid)
        elif m.node is None:
            r += add("unmatched", -w.unmatched)
        else:
            node = nodes[m.node]
            if m.node in entered:
                r += add("repeat", -w.repeat)
            entered.add(m.node)
            if node.d_e is None:
                r += add("dead_end", -w.dead_end)
                if decision is Decision.BACKTRACK:
                    r += add("backtrack_from_dead_end", w.backtrack_from_dead_end)
                elif decision is Decision.PROCEED:
                    r += add("press_on_dead_end", -w.press_on_dead_end)
            elif prev_d_e is not None:
                r += add("progress", w.progress * (prev_d_e - node.d_e))
            prev_d_e = node.d_e
        rewards.append(r)
    if not trace.finished:
        outcome = add("unfinished", -w.unfinished)
    elif domain.check_answer(problem, trace.answer or ""):
        outcome = add("correct", w.correct)
    else:
        outcome = add("wrong", -w.wrong)
    shortest = nodes[dag.root].d_e or 0
    outcome += add("length", -w.length * max(0, trace.n_steps - shortest))
    if trace.n_backtracks > w.max_backtracks:
        outcome += add("backtrack_loop", -w.backtrack_loop)
    return Scored(rewards, outcome, terms)


def process_advantages(
    step_rewards: list[list[float]],
    step_ends: list[list[int]],
    outcomes: list[float],
    lengths: list[int],
    eps: float = 1e-6,
) -> list[torch.Tensor]:
    """Per-token advantages for one group of G samples (process-supervised GRPO).

    All step rewards of the group are normalised together (mean 0, std 1); a token's
    advantage is the sum of the normalised rewards of the steps ending at or after it, plus
    the sample's normalised outcome reward. ``step_ends[i][j]`` is the index (into sample
    i's completion tokens) of the last token of step j; ``lengths[i]`` is the number of
    completion tokens."""
    flat = torch.tensor([r for rs in step_rewards for r in rs], dtype=torch.float32)
    mean = flat.mean() if flat.numel() else torch.tensor(0.0)
    std = flat.std(unbiased=False) if flat.numel() > 1 else torch.tensor(0.0)
    out = torch.tensor(outcomes, dtype=torch.float32)
    out_norm = (
        (out - out.mean()) / (out.std(unbiased=False) + eps) if len(outcomes) > 1 else out * 0
    )
    advantages = []
    for rs, ends, o, n in zip(step_rewards, step_ends, out_norm, lengths, strict=True):
        adv = torch.full((n,), float(o))
        for r, end in zip(rs, ends, strict=True):
            adv[: min(end, n - 1) + 1] += (r - mean) / (std + eps)
        advantages.append(adv)
    return advantages
