"""Path-finding in a described directed graph (path-star by default).

A path-star graph is a center with D arms of L nodes each; the goal is the leaf of one arm.
Following an edge is trivial, but choosing the right arm up front needs planning backwards
from the goal: a model trained only on the direct path learns to follow edges and picks the
right arm about 1/D of the time (Bachmann & Nagarajan 2024). A model that searches — try an
arm, see the dead end, go back — does not need to plan.

Problem records carry ``edges`` ([[u, v], ...], directed), ``start`` and ``goal``. The
question lists the edges in a seeded shuffled order. The state of a search is the node it
stands on (its DAG key); a step follows one arm (edges until a branch point, a leaf or the
goal) or one edge (``meta.step = "edge"``). A dead end is a leaf that is not the goal: that
is all a searcher can see without knowing the way.
"""

from __future__ import annotations

import graphlib
import random
import re
from collections import deque
from collections.abc import Iterator
from typing import Any

from steiner.domains.countdown import CheckResult

DOMAIN = "graph"
KINDS = ("star", "dag")
STEP_MODES = ("arm", "edge")
STYLES = ("compact", "verbose")
WALK_SIZES = ("fixed", "mixed")  # CPT walk documents: every graph full-size, or smaller ones too

Edges = list[tuple[int, int]]


def children_of(edges: Any) -> dict[int, list[int]]:
    """Out-neighbours of every node, in edge order."""
    kids: dict[int, list[int]] = {}
    for u, v in edges:
        kids.setdefault(int(u), []).append(int(v))
        kids.setdefault(int(v), [])
    return kids


def shortest_path(edges: Any, start: int, goal: int) -> list[int] | None:
    """A shortest start→goal path (breadth-first, children in edge order), or None."""
    return _breadth_first(children_of(edges), start, goal)


def _breadth_first(kids: dict[int, list[int]], start: int, goal: int) -> list[int] | None:
    parent: dict[int, int | None] = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        if node == goal:
            path = [node]
            while parent[path[-1]] is not None:
                path.append(parent[path[-1]])  # type: ignore[arg-type]
            return path[::-1]
        for child in kids.get(node, []):
            if child not in parent:
                parent[child] = node
                queue.append(child)
    return None


def find_cycle(edges: Any) -> list[int] | None:
    """The nodes of one directed cycle (its first node repeated at the end), or None.

    Synthesis needs acyclic graphs: its oracle judges a node dead only at a leaf, and a walk
    round a cycle reaches none (it crashed writing a step that returned to its own node)."""
    # graphlib, not networkx: on 60,000 training graphs networkx took 9.7 s, graphlib's full
    # order 3.6 s, and its prepare() alone, which is what finds a cycle, 2.1 s
    before: dict[int, list[int]] = {}
    for u, v in edges:
        before.setdefault(int(v), []).append(int(u))
    try:
        graphlib.TopologicalSorter(before).prepare()
    except graphlib.CycleError as exc:
        return list(exc.args[1])
    return None


# ---------------------------------------------------------------- checking answers

_PATH_RE = re.compile(r"^\s*\d+(?:\s*(?:->|>|→|,|\s)\s*\d+)*\s*\.?\s*$")
_MAX_ANSWER_CHARS = 2000


def parse_path(text: str) -> list[int] | None:
    """Node ids of a path written ``12>45>7`` (or with ``->``, ``→``, commas, spaces)."""
    if not isinstance(text, str) or len(text) > _MAX_ANSWER_CHARS or not _PATH_RE.match(text):
        return None
    return [int(x) for x in re.findall(r"\d+", text)]


def check_answer(edges: Any, start: int, goal: int, answer: str) -> CheckResult:
    """A valid edge-by-edge path from start to goal, visiting no node twice."""
    path = parse_path(answer)
    if path is None:
        return CheckResult(False, "not a path of node ids like 3>14>15")
    if path[0] != start:
        return CheckResult(False, f"starts at {path[0]}, not {start}")
    if path[-1] != goal:
        return CheckResult(False, f"ends at {path[-1]}, not {goal}")
    if len(set(path)) != len(path):
        return CheckResult(False, "visits a node twice")
    edge_set = {(int(u), int(v)) for u, v in edges}
    for u, v in zip(path, path[1:], strict=False):
        if (u, v) not in edge_set:
            return CheckResult(False, f"no edge {u}>{v}")
    return CheckResult(True)


# ---------------------------------------------------------------- problems


def path_text(nodes: list[int], style: str = "verbose") -> str:
    """``8>4>16`` (verbose), or `` 8 4 16`` (compact): a space before every id, so that with
    a byte-level tokenizer each id is one token, the same wherever it appears, and the next
    node of a path directly follows the one it leaves (a one-token look-up in the edge list)."""
    if style == "compact":
        return "".join(f" {n}" for n in nodes)
    return ">".join(map(str, nodes))


# the compact style's mark of the goal: one more edge, `` 56 goal``, in the edge list (and at
# the end of a walk that reaches the goal), so that finding the goal is the edge look-up CPT
# teaches rather than an equality test the micro model learned late or never (README, Results)
GOAL_MARK = "goal"


def edge_list(
    edges: Any, rng: random.Random, style: str = "verbose", goal: int | None = None
) -> str:
    """``Edges: 8>55 16>7 …`` (verbose) or ``Edges: 8 55, 16 7, …`` (compact), shuffled; in
    the compact style a ``goal`` is listed as the edge `` 56 goal``."""
    if style == "compact":
        shown = [f" {u} {v}" for u, v in edges]
        if goal is not None:
            shown.append(f" {goal} {GOAL_MARK}")
        rng.shuffle(shown)
        return f"Edges:{','.join(shown)}"
    shown = [f"{u}>{v}" for u, v in edges]
    rng.shuffle(shown)
    return f"Edges: {' '.join(shown)}"


def question_text(
    edges: Any, start: int, goal: int, rng: random.Random, style: str = "verbose"
) -> str:
    return f"Find a path from {start} to {goal}. {edge_list(edges, rng, style, goal)}"


def path_star(
    rng: random.Random, degree: int, arm_length: int, nodes: int
) -> tuple[Edges, int, int]:
    """Edges (center outward), center and goal of one path-star graph."""
    labels = rng.sample(range(nodes), 1 + degree * arm_length)
    center, rest = labels[0], labels[1:]
    edges: Edges = []
    leaves = []
    for a in range(degree):
        arm = [center, *rest[a * arm_length : (a + 1) * arm_length]]
        edges += list(zip(arm, arm[1:], strict=False))
        leaves.append(arm[-1])
    return edges, center, rng.choice(leaves)


def random_dag(
    rng: random.Random, degree: int, arm_length: int, nodes: int, extra_edge_prob: float = 0.1
) -> tuple[Edges, int, int]:
    """A random DAG on ``1 + degree * arm_length`` nodes (the size of the matching path-star):
    every node gets one parent earlier in a random order (so all are reachable from the
    first), plus extra forward edges; the goal is a random sink at distance >= 2."""
    labels = rng.sample(range(nodes), 1 + degree * arm_length)
    start = labels[0]
    edges: Edges = [(labels[rng.randrange(i)], labels[i]) for i in range(1, len(labels))]
    have = set(edges)
    for i in range(len(labels)):
        for j in range(i + 1, len(labels)):
            if (labels[i], labels[j]) not in have and rng.random() < extra_edge_prob:
                edges.append((labels[i], labels[j]))
    kids = children_of(edges)
    sinks = [n for n in labels[1:] if not kids[n]]
    far = [n for n in sinks if len(_breadth_first(kids, start, n) or []) >= 3]
    return edges, start, rng.choice(far or sinks)


def make_problem(
    pid: str,
    edges: Any,
    start: int,
    goal: int,
    meta: dict | None = None,
    question_seed: int | None = None,
) -> dict:
    edges = [[int(u), int(v)] for u, v in edges]
    path = shortest_path(edges, int(start), int(goal))
    if path is None:
        raise ValueError(f"problem {pid}: {goal} is not reachable from {start}")
    meta = dict(meta or {})
    rng = random.Random(question_seed if question_seed is not None else f"{pid}:question")
    return {
        "id": pid,
        "domain": DOMAIN,
        "question": question_text(edges, int(start), int(goal), rng, meta.get("style", "")),
        "answer": path_text(path),
        "meta": meta,
        "edges": edges,
        "start": int(start),
        "goal": int(goal),
    }


def generate_problems(
    count: int,
    degree: int = 3,
    arm_length: int = 4,
    nodes: int = 60,
    kind: str = "star",
    seed: int = 0,
    step: str = "arm",
    style: str = "verbose",
    extra_edge_prob: float = 0.1,
) -> Iterator[dict]:
    """Seeded problems; ``meta`` records how they were made and how steps are written."""
    if kind not in KINDS or step not in STEP_MODES or style not in STYLES:
        raise ValueError(f"kind in {KINDS}, step in {STEP_MODES}, style in {STYLES}")
    if degree < 1 or arm_length < 1:
        raise ValueError("degree and arm_length must be at least 1")
    if 1 + degree * arm_length > nodes:
        raise ValueError(f"{1 + degree * arm_length} graph nodes need nodes >= that many labels")
    rng = random.Random(seed)
    for i in range(count):
        if kind == "star":
            edges, start, goal = path_star(rng, degree, arm_length, nodes)
        else:
            edges, start, goal = random_dag(rng, degree, arm_length, nodes, extra_edge_prob)
        meta = {"seed": seed, "kind": kind, "degree": degree, "arm_length": arm_length}
        meta |= {"nodes": nodes, "step": step, "style": style}
        yield make_problem(
            f"graph-{seed}-{i}", edges, start, goal, meta, question_seed=rng.getrandbits(32)
        )


def walk_documents(
    count: int,
    degree: int = 3,
    arm_length: int = 4,
    nodes: int = 60,
    seed: int = 0,
    sizes: str = "fixed",
) -> Iterator[str]:
    """Plain-text documents for continual pre-training: a path-star graph described as in a
    question, then every arm walked out in a random order. Almost every token of a walk is an
    edge look-up, the skill both search and shortcut need, so a tiny model learns it from far
    fewer tokens than from solutions, where one token in four is a look-up. One leaf is the
    goal, listed as the edge `` 56 goal`` as in a compact question, and the walk of its arm
    ends with that look-up; the arms are walked in a random order, so nothing here says which
    arm to choose.

    ``sizes="mixed"`` draws each graph's arms (1..degree) and arm length (1..arm_length): a
    short edge list has few look-alikes to attend to, and a document is half as long. The
    micro model's look-up formed after 800 and ~1,100 steps of these (two inits; README)."""
    if sizes not in WALK_SIZES:
        raise ValueError(f"sizes must be one of {WALK_SIZES}, got {sizes!r}")
    rng = random.Random(seed)
    for _ in range(count):
        if sizes == "mixed":
            shape = rng.randint(1, degree), rng.randint(1, arm_length)
        else:
            shape = degree, arm_length
        edges, start, goal = path_star(rng, *shape, nodes)
        kids = children_of(edges)
        arms = [thought_text([start, *chain(kids, start, k, -1, "arm")], goal) for k in kids[start]]
        rng.shuffle(arms)
        yield f"{edge_list(edges, rng, 'compact', goal)}. Arms from {start}:{','.join(arms)}"


def thought_text(nodes: list[int], goal: int) -> str:
    """A compact walk, `` 8 4 16``, then `` goal`` where it reaches the goal: the look-up
    of the goal's edge (see GOAL_MARK)."""
    return path_text(nodes, "compact") + (f" {GOAL_MARK}" if nodes[-1] == goal else "")


def step_mode(problem: dict) -> str:
    return (problem.get("meta") or {}).get("step", "arm")


def style(problem: dict) -> str:
    return (problem.get("meta") or {}).get("style", "verbose")


def chain(kids: dict[int, list[int]], node: int, first: int, goal: int, mode: str) -> list[int]:
    """The nodes a step from ``node`` through ``first`` enters: one edge, or (arm mode) on
    while there is exactly one way on and the goal is not reached."""
    out = [first]
    if mode == "arm":
        while out[-1] != goal and len(kids.get(out[-1], [])) == 1:
            out.append(kids[out[-1]][0])
    return out


def shortcut_steps(problem: dict) -> list[str]:
    """The shortest path cut into steps (arms or edges), each written as its node chain."""
    kids = children_of(problem["edges"])
    path = _breadth_first(kids, int(problem["start"]), int(problem["goal"])) or []
    steps, i = [], 0
    while i < len(path) - 1:
        nodes = chain(kids, path[i], path[i + 1], problem["goal"], step_mode(problem))
        nodes = nodes[: len(path) - 1 - i]  # a shortest path may leave an arm's chain early
        steps.append(path_text([path[i], *nodes]))
        i += len(nodes)
    return steps


def nodes_entered(text: str, node: int) -> list[int]:
    """The node ids a step written as ``text`` enters from ``node`` (the text may repeat
    ``node`` first)."""
    nodes = [int(x) for x in re.findall(r"\d+", text or "")]
    return nodes[1:] if nodes and nodes[0] == node else nodes


def final_answer_of(problem: dict, texts: list[str]) -> str:
    """The whole path from the step texts of one branch (each a chain of node ids)."""
    path = [int(problem["start"])]
    for text in texts:
        path += nodes_entered(text, path[-1])
    return path_text(path, style(problem))


def shortcut_record(problem: dict) -> dict:
    return {**problem, "steps": shortcut_steps(problem)}


# ---------------------------------------------------------------- synthesis interface


class GraphDomain:
    """States are graph nodes, keys exact; the oracle picks arms at random (it does not know
    which one leads to the goal) and judges a step only by what it can see there."""

    name = DOMAIN

    def __init__(self) -> None:
        # synthesis asks for a node's children at every step of every attempt
        self._kids_cache: dict[tuple, dict[int, list[int]]] = {}

    def start_state(self, problem: dict) -> int:
        return int(problem["start"])

    def _kids(self, problem: dict) -> dict[int, list[int]]:
        key = (str(problem["id"]), problem["start"], problem["goal"], len(problem["edges"]))
        kids = self._kids_cache.get(key)
        if kids is None:
            if len(self._kids_cache) > 100_000:
                self._kids_cache.clear()
            kids = self._kids_cache[key] = children_of(problem["edges"])
        return kids

    def apply_step(self, problem: dict, state: int, text: str) -> int | None:
        """Follow the node ids written in ``text`` from ``state`` (the first may repeat the
        current node); None when an edge does not exist or nothing is written."""
        nodes = nodes_entered(text, state)
        if not nodes:
            return None
        kids = self._kids(problem)
        node = state
        for nxt in nodes:
            if nxt not in kids.get(node, []):
                return None
            node = nxt
        return node

    def state_key(self, state: int) -> str:
        return str(state)

    def state_from_key(self, problem: dict, key: str) -> int:
        return int(key)

    def label(self, problem: dict, state: int) -> str:
        if state == problem["goal"]:
            return "answer"
        return "alive" if self._kids(problem).get(state) else "dead"

    def propose_step(self, problem: dict, state: int, rng: random.Random) -> str | None:
        options = self._kids(problem).get(state, [])
        if not options:
            return None
        first = rng.choice(options)
        nodes = chain(self._kids(problem), state, first, problem["goal"], step_mode(problem))
        return path_text([state, *nodes])

    def step_between(self, problem: dict, before: int, after: int) -> str:
        path = _breadth_first(self._kids(problem), before, after)
        if path is None:
            raise ValueError(f"problem {problem['id']}: no way from {before} to {after}")
        return path_text(path)

    def write_step(
        self,
        problem: dict,
        before: int,
        text: str,
        after: int,
        status: str,
        back_to: int | None = None,
    ) -> dict[str, str]:
        nodes = nodes_entered(text, before)
        goal = problem["goal"]
        back = "" if back_to is None else f"back to {back_to}:"
        if style(problem) == "compact":
            # a tiny model's trace: a few tokens a step (the node names carry the search); the
            # thought walks on from the node the step leaves, one id token per hop, and ends
            # with `` goal`` at the goal (GOAL_MARK), which the reflection copies. The summary
            # puts the goal beside the node reached, so that comparing two adjacent tokens tells
            # it too: a micro model learned perfect look-ups but never learned to find the goal
            # in the question for that comparison (README, Results). The goal's reflection
            # names the step's first node: a walk that goes back to the goal's arm after trying
            # the others (verify walks, extend mode) copies the token after "goal" instead of
            # finding which earlier step reached it, which the micro model often got wrong
            return {
                "name": f"{back} {nodes[0]}",
                "thought": thought_text([before, *nodes], goal),
                "summary": f" {after} {goal}",
                "reflection": {"answer": f"goal {nodes[0]}", "dead": "dead", "alive": "on"}[status],
            }
        # after a backtrack the name says where the walk returned to (see DESIGN.md)
        return {
            "name": f"{back} follow {before}>{nodes[0]}".lstrip(),
            "thought": f"Follow the edges {path_text([before, *nodes])}.",
            "summary": f"at {after}",
            "reflection": {
                "answer": f"{after} is the goal.",
                "dead": f"{after} has no way on and is not the goal {goal}: a dead end; go back.",
                "alive": f"{after} has a way on; keep going.",
            }[status],
        }

    def final_answer(self, problem: dict, texts: list[str]) -> str:
        return final_answer_of(problem, texts)

    def check_answer(self, problem: dict, answer: str) -> bool:
        return bool(check_answer(problem["edges"], problem["start"], problem["goal"], answer))
