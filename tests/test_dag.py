import json
import re

import networkx as nx
import pytest

from steiner.dag import Dag, Observation, build_dag


def obs(cluster, status="alive"):
    return Observation(cluster=cluster, text=f"step {cluster}", key=str(cluster), status=status)


def test_hand_made_dag_stats():
    # root -> a -> b -> ANS ; root -> c (dead end) ; a -> d -> ANS ; a -> e -> f (dead ends)
    attempts = [
        [obs("a"), obs("b"), obs("ans", "answer")],
        [obs("c", "dead")],
        [obs("a"), obs("d"), obs("ans", "answer")],
        [obs("a"), obs("e"), obs("f", "dead")],
    ]
    dag = build_dag("p1", "question?", attempts, root_key="start")
    by_key = {n.key: n for n in dag.nodes}
    expected = {  # key: (e_in, e_out, d_s, d_e)
        "start": (0, 2, 0, 3),
        "a": (1, 3, 1, 2),
        "b": (1, 1, 2, 1),
        "d": (1, 1, 2, 1),
        "ans": (2, 0, 3, 0),
        "c": (1, 0, 1, None),
        "e": (1, 1, 2, None),
        "f": (1, 0, 3, None),
    }
    for key, stats in expected.items():
        n = by_key[key]
        assert (n.e_in, n.e_out, n.d_s, n.d_e) == stats, key
    assert dag.answers == [by_key["ans"].id]
    assert by_key["c"].status == "dead" and by_key["start"].status == "root"
    assert nx.is_directed_acyclic_graph(dag.graph())
    assert Dag.from_record(dag.to_record()) == dag


def test_merging_that_closes_a_cycle_is_split():
    # clusters x and y appear in both orders: x -> y -> x would be a cycle
    attempts = [
        [obs("x"), obs("y"), obs("ans", "answer")],
        [obs("y"), obs("x"), obs("ans", "answer")],
    ]
    dag = build_dag("p2", "q", attempts)
    assert nx.is_directed_acyclic_graph(dag.graph())
    assert len(dag.nodes) == 1 + 4 + 1  # x and y split by position, one answer
    assert dag.nodes[dag.root].d_e == 3


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r["edges"].append([0, 99]), "edge names node 99, which is not there"),
        (lambda r: r.update(root=-1), "root names node -1, which is not there"),
        (lambda r: r["answers"].append(42), "answer names node 42, which is not there"),
        (lambda r: r["nodes"].pop(1), "node ids must be 0, 1, 2, ... in order"),
    ],
)
def test_a_dag_record_naming_missing_nodes_is_one_error_line(tmp_path, change, message):
    from steiner.dag import read_dags
    from steiner.io import InputError

    good = build_dag("p1", "q", [[obs("a"), obs("ans", "answer")], [obs("c", "dead")]]).to_record()
    bad = json.loads(json.dumps(good))
    change(bad)
    path = tmp_path / "dags.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    # before: an IndexError traceback where a command looked a node up (dag show, synth paths)
    with pytest.raises(InputError, match=re.escape(f"expected a dag record ({message})")) as err:
        list(read_dags(path))
    assert err.value.line == 2
