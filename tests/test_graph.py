import json
import re
import subprocess
import sys

import pytest

from steiner.dag import compute_stats, read_dags
from steiner.domains import graph as gr
from steiner.domains import load_problems, load_shortcuts, shortcut_trace
from steiner.format import Decision, parse, render
from steiner.synth.paths import PathSettings
from steiner.synth.run import SynthConfig, run_synth


def steiner(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "steiner.cli", *args], capture_output=True, text=True
    )


def test_generator_is_deterministic_and_builds_path_stars(tmp_path):
    a = list(gr.generate_problems(50, seed=3))
    b = list(gr.generate_problems(50, seed=3))
    assert a == b and a != list(gr.generate_problems(50, seed=4))
    for p in a:
        kids = gr.children_of(p["edges"])
        labels = {n for e in p["edges"] for n in e}
        assert len(labels) == 13 and labels <= set(range(60))  # 1 + D*L distinct labels
        assert len(kids[p["start"]]) == 3  # D arms leave the center
        leaves = [n for n, ks in kids.items() if not ks]
        assert len(leaves) == 3 and p["goal"] in leaves
        path = gr.parse_path(p["answer"])
        assert path is not None and len(path) == 5 and path[0] == p["start"]
        # the question lists every edge once, in a shuffled order
        shown = p["question"].split("Edges: ")[1].split()
        assert sorted(shown) == sorted(f"{u}>{v}" for u, v in p["edges"])
    orders = [p["question"].split("Edges: ")[1] for p in a]
    canonical = [" ".join(f"{u}>{v}" for u, v in p["edges"]) for p in a]
    assert sum(o != c for o, c in zip(orders, canonical, strict=True)) > 40
    # the CLI writes the same bytes twice
    for name in ("x.jsonl", "y.jsonl"):
        args = ["graph", "generate", "--count", "20", "--seed", "9", "--out", str(tmp_path / name)]
        assert steiner(*args, "--shortcut").returncode == 0
    assert (tmp_path / "x.jsonl").read_bytes() == (tmp_path / "y.jsonl").read_bytes()


def test_random_dags_have_a_reachable_goal():
    for p in gr.generate_problems(100, kind="dag", degree=3, arm_length=3, nodes=40, seed=1):
        path = gr.shortest_path(p["edges"], p["start"], p["goal"])
        assert path is not None and len(path) >= 2
        assert gr.check_answer(p["edges"], p["start"], p["goal"], p["answer"])
        assert not gr.children_of(p["edges"])[p["goal"]]  # a sink
        assert p["start"] not in {v for _, v in p["edges"]}  # nothing leads back to the start


def test_checker_accepts_solver_paths_and_rejects_wrong_ones():
    problems = [*gr.generate_problems(100, seed=5), *gr.generate_problems(100, kind="dag")]
    for p in problems:
        edges, s, g = p["edges"], p["start"], p["goal"]
        path = gr.shortest_path(edges, s, g)
        assert path is not None
        for sep in (">", " -> ", ", ", " "):
            assert gr.check_answer(edges, s, g, sep.join(map(str, path)))
        bad = {
            "wrong edge": [s, *path[2:]],  # skips a node: s -> path[2] is no edge
            "wrong end": path[:-1],
            "repeated node": [*path, path[-1]],
            "wrong start": path[1:],
        }
        for why, nodes in bad.items():
            result = gr.check_answer(edges, s, g, ">".join(map(str, nodes)))
            assert not result, why
    p = next(gr.generate_problems(1, seed=0))
    for text in ("", "first 3 then 4", "__import__('os')", "1>2; 3", "9" * 3000):
        assert not gr.check_answer(p["edges"], p["start"], p["goal"], text)


def test_bare_records_work_everywhere(tmp_path):
    bare = tmp_path / "bare.jsonl"
    full = list(gr.generate_problems(5, seed=2))
    bare.write_text(
        "".join(
            json.dumps({k: p[k] for k in ("id", "edges", "start", "goal")}) + "\n" for p in full
        )
    )
    for loaded in (load_shortcuts(bare), load_problems(bare)):
        assert [p["domain"] for p in loaded] == ["graph"] * 5
        for p, src in zip(loaded, full, strict=True):
            assert p["answer"] == src["answer"] and p["steps"] == [src["answer"]]
    unreachable = tmp_path / "bad.jsonl"
    unreachable.write_text(json.dumps({"id": 1, "edges": [[1, 2]], "start": 2, "goal": 1}) + "\n")
    r = steiner("synth", "--shortcut", str(unreachable), "--out", str(tmp_path / "s"))
    assert r.returncode == 2 and "bad.jsonl:1" in r.stderr and "Traceback" not in r.stderr


def test_a_problem_of_the_other_built_in_domain_says_so(tmp_path):
    # before: "field 'edges': Field required" for countdown problems given to a graph run
    # (the demo's default domain), which did not say what the file was
    from steiner.io import InputError

    graphs, numbers = tmp_path / "g.jsonl", tmp_path / "c.jsonl"
    graphs.write_text("".join(json.dumps(p) + "\n" for p in gr.generate_problems(2, seed=1)))
    numbers.write_text(json.dumps({"nums": [1, 2], "target": 3}) + "\n")
    with pytest.raises(InputError, match=r"c\.jsonl:1: a countdown problem; expected a graph one"):
        load_problems(numbers, "graph")
    with pytest.raises(InputError) as err:
        load_shortcuts(graphs, "countdown")
    assert err.value.message == (
        "a graph problem; expected a countdown one (for graph problems: --domain graph)"
    )
    assert [p["domain"] for p in load_problems(numbers, "countdown")] == ["countdown"]
    assert len(load_problems(graphs)) == 2  # no domain given: each record names its own
    r = steiner("demo", "--out", str(tmp_path / "d"), "--problems", str(numbers))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "(for countdown problems: --domain countdown)" in " ".join(r.stderr.split())


@pytest.mark.parametrize(
    "edges, message",
    [
        ([[1, 2], [2, 1], [2, 3]], r"field 'edges': a cycle (1>2>1|2>1>2); expected a directed"),
        ([[1, 1], [1, 3]], r"field 'edges': a cycle 1>1;"),
        ([[-1, 2], [2, 3]], r"field 'edges\.0\.0': Input should be greater than or equal to 0"),
        # was a one-node DAG, its root counted as a dead end, and no path
        ([[3, 4]], r"field 'goal': 3 is the start; expected another node"),
    ],
)
def test_graphs_synthesis_cannot_walk_are_one_error_line(tmp_path, edges, message):
    # a cycle crashed synthesis writing a step back to its own node; a negative id crashed it
    # reading the shortcut path (answers are read as runs of digits); start == goal has no step
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps({"id": 1, "edges": edges, "start": edges[0][0], "goal": 3}) + "\n")
    r = steiner("synth", "--shortcut", str(path), "--out", str(tmp_path / "s"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert re.search(rf"g\.jsonl:1: {message}", r.stderr), r.stderr
    assert not (tmp_path / "s").exists()


def test_steps_by_arm_or_edge_and_compact_traces():
    p = next(gr.generate_problems(1, seed=7, step="edge", style="compact"))
    rec = gr.shortcut_record(p)
    assert len(rec["steps"]) == 4  # one edge a step
    arm = gr.shortcut_record(next(gr.generate_problems(1, seed=7)))
    assert len(arm["steps"]) == 1 and arm["steps"][0] == arm["answer"]
    domain = gr.GraphDomain()
    trace = shortcut_trace(domain, rec)
    assert domain.check_answer(rec, trace.answer)
    compact = render(trace, "")
    assert "\n" not in compact
    parsed = parse(compact)[0]  # fields come back stripped of the spaces before each id
    assert [s.thought for s in parsed.steps] == [s.thought.strip() for s in trace.steps]
    assert parsed.answer == trace.answer.strip() == " ".join(rec["answer"].split(">"))
    # the goal's reflection names the step's first node, here the goal itself (a step an edge)
    assert [s.reflection for s in trace.steps] == ["on", "on", "on", f"goal {rec['goal']}"]
    # a compact thought that reaches the goal ends with its edge's look-up, `` goal``
    assert [s.thought.split()[-1] == gr.GOAL_MARK for s in trace.steps] == [False] * 3 + [True]
    listed = [e.split() for e in rec["question"].split("Edges:")[1].split(",")]
    assert listed.count([str(rec["goal"]), gr.GOAL_MARK]) == 1  # and the question lists it
    assert len(listed) == len(rec["edges"]) + 1
    # each summary is the node reached, then the goal it is compared with
    reached = [gr.nodes_entered(s.thought, -1)[-1] for s in trace.steps]
    assert [s.summary.split() for s in trace.steps] == [[str(n), str(rec["goal"])] for n in reached]
    # a step may repeat the node it starts from, and must follow real edges
    assert domain.apply_step(rec, rec["start"], rec["steps"][0]) is not None
    assert domain.apply_step(rec, rec["start"], f"{rec['goal']}") is None


@pytest.fixture(scope="module")
def graph_synth(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("graph-synth")
    shortcut = tmp / "shortcut.jsonl"
    args = ["graph", "generate", "--count", "200", "--seed", "4", "--shortcut", "--compact"]
    assert steiner(*args, "--out", str(shortcut)).returncode == 0
    cfg = SynthConfig(
        shortcut=str(shortcut),
        out=str(tmp / "out"),
        attempts=12,
        seed=1,
        paths=PathSettings(branch_choice="uniform"),
    )
    return tmp, run_synth(cfg)


def test_synth_on_200_graphs_gives_search_dags_and_valid_paths(graph_synth):
    tmp, stats = graph_synth
    problems = {p["id"]: p for p in load_shortcuts(tmp / "shortcut.jsonl")}
    dags = list(read_dags(tmp / "out" / "dags.jsonl"))
    assert stats["dags"] == 200 and stats["failed_attempts"] == 0
    for dag in dags:
        # the same checks as countdown's DAGs: stats recomputed from the edges agree
        fresh = {n.id: (n.e_in, n.e_out, n.d_s, n.d_e) for n in compute_stats(dag).nodes}
        assert fresh == {n.id: (n.e_in, n.e_out, n.d_s, n.d_e) for n in dag.nodes}
        problem = problems[dag.problem_id]
        answers = [n for n in dag.nodes if n.status == "answer"]
        assert [n.key for n in answers] == [str(problem["goal"])]
        assert dag.nodes[dag.root].d_e == 1  # one arm away
        for n in dag.nodes:
            if n.id != dag.root and n.status != "answer":
                assert n.d_e is None and n.status == "dead"  # leaves of the other arms
    assert sum(len(d.nodes) == 4 for d in dags) > 190  # 12 attempts find all 3 arms
    hist = stats["backtrack_histogram"]
    assert set(hist) == {"0", "1", "2"} and min(hist.values()) > 150
    paths = [json.loads(x) for x in (tmp / "out" / "paths.jsonl").read_text().splitlines()]
    domain = gr.GraphDomain()
    for rec in paths:
        trace, _ = parse(rec["messages"][1]["content"], strict=True)
        problem = problems[rec["problem_id"]]
        assert domain.check_answer(problem, trace.answer)
        for i, d in enumerate(trace.decisions):
            step = trace.steps[i]
            # a step is an arm: the goal's reflection names the arm's first node, as its name does
            expected = "dead" if d is Decision.BACKTRACK else f"goal {step.name.split()[-1]}"
            assert step.reflection == expected
    assert steiner("format", "check", str(tmp / "out" / "paths.jsonl")).returncode == 0


def verifying_walks(graph_synth, **settings):
    """(problem, DAG, trace, arms) of a verifying walk of each of the first 50 synthesized DAGs."""
    import random as rnd

    from steiner.synth.paths import render_walk, sample_walk

    tmp, _ = graph_synth
    problems = {p["id"]: p for p in load_shortcuts(tmp / "shortcut.jsonl")}
    settings = PathSettings(branch_choice="uniform", verify_after_answer=1.0, **settings)
    rng, domain = rnd.Random(0), gr.GraphDomain()
    for dag in list(read_dags(tmp / "out" / "dags.jsonl"))[:50]:
        problem = problems[dag.problem_id]
        trace = render_walk(domain, problem, dag, sample_walk(dag, rng, settings))
        yield problem, dag, trace, len(gr.children_of(problem["edges"])[problem["start"]])


def verdicts(trace) -> list[str]:
    """Each step's reflection without the arm a goal's names: "goal", "dead" or "on"."""
    return [s.reflection.split()[0] for s in trace.steps]


def test_verifying_walks_go_on_past_the_goal_and_still_answer_it(graph_synth):
    domain = gr.GraphDomain()
    goal_not_last = 0
    for problem, dag, trace, arms in verifying_walks(graph_synth):
        assert trace.n_steps == len(dag.nodes) - 1 == arms  # every arm the DAG knows, once
        assert trace.decisions[-1] is Decision.END and domain.check_answer(problem, trace.answer)
        reflections = verdicts(trace)
        assert reflections.count("goal") == 1 and reflections.count("dead") == arms - 1
        goal_not_last += reflections[-1] != "goal"
    assert goal_not_last > 20  # most verifying walks end on a dead arm, answering the goal's


@pytest.mark.parametrize("return_again", [0.0, 0.5, 1.0])
def test_verifying_walks_return_to_the_answer_and_end_on_it(graph_synth, return_again):
    domain = gr.GraphDomain()
    returns_seen = set()
    goal_last = 0
    walks = verifying_walks(graph_synth, return_to_answer=True, return_again=return_again)
    for problem, _, trace, arms in walks:
        reflections = verdicts(trace)
        assert reflections[-1] == "goal" and trace.decisions[-1] is Decision.END
        # the last step is the answer (its thought ends with the goal's look-up)
        assert f"{trace.answer} {gr.GOAL_MARK}" == trace.steps[-1].thought
        assert domain.check_answer(problem, trace.answer)
        # every arm once, then the goal's arm again one to three times, even when the goal's
        # arm was the last one tried (extend mode forces steps past it)
        returns = trace.n_steps - arms
        assert 1 <= returns <= 3 and reflections.count("goal") == 1 + returns
        assert reflections[-returns:] == ["goal"] * returns
        assert all(s.name.startswith("back to") for s in trace.steps[-returns:])
        # a return names the arm that the goal's first reflection names
        found = trace.steps[reflections.index("goal")].reflection
        assert all(s.reflection == found for s in trace.steps[-returns:])
        assert found == f"goal {trace.steps[-1].name.split()[-1]}"
        returns_seen.add(returns)
        goal_last += reflections[arms - 1] == "goal"
    assert goal_last > 5  # walks that found the goal last are among them
    assert returns_seen == {0.0: {1}, 0.5: {1, 2, 3}, 1.0: {3}}[return_again]


def test_verifying_walks_may_walk_a_dead_arm_again_before_each_return(graph_synth):
    domain = gr.GraphDomain()
    walks = verifying_walks(graph_synth, return_to_answer=True, return_again=1.0, revisit_dead=1.0)
    for problem, _, trace, arms in walks:
        steps, reflections = trace.steps, verdicts(trace)
        # every arm once, then three times a dead arm walked again and the goal's arm
        assert trace.n_steps == arms + 3 * 2
        first_walks = {s.thought: s.reflection for s in steps[:arms]}
        for dead, goal in zip(steps[arms::2], steps[arms + 1 :: 2], strict=True):
            assert first_walks[dead.thought] == "dead" and dead.reflection == "dead"
            assert dead.name.startswith("back to")
            assert goal.reflection == f"goal {goal.name.split()[-1]}"  # names the arm it walks
        assert reflections.count("goal") == 4 and reflections[-1] == "goal"
        assert f"{trace.answer} {gr.GOAL_MARK}" == steps[-1].thought
        assert domain.check_answer(problem, trace.answer)


def test_synth_cli_passes_the_return_settings_on(graph_synth, tmp_path):
    tmp, _ = graph_synth
    out = tmp_path / "synth"
    args = ["synth", "--shortcut", str(tmp / "shortcut.jsonl"), "--out", str(out), "--limit", "20"]
    args += ["--attempts", "12", "--seed", "1", "--paths-per-dag", "1", "--branch-choice"]
    args += ["uniform", "--verify-after-answer", "1", "--return-to-answer", "--return-again"]
    assert steiner(*args, "1", "--max-returns", "2", "--revisit-dead", "1").returncode == 0
    rows = [json.loads(line) for line in (out / "paths.jsonl").open()]
    problems = {p["id"]: p for p in load_shortcuts(tmp / "shortcut.jsonl")}
    assert len(rows) == 20
    for row in rows:
        problem = problems[row["problem_id"]]
        arms = len(gr.children_of(problem["edges"])[problem["start"]])
        # every arm, then twice a dead arm again and the goal's arm again
        assert row["n_steps"] == arms + 2 * 2


def parse_walk_document(doc: str) -> tuple[list[tuple[int, ...]], int, list[list[int]]]:
    """The edges, start and walked arms of one CPT walk document, after checking that one leaf
    is marked the goal in the edge list and at the end of its arm's walk, as in a question."""
    edge_text, arm_text = doc.split(". Arms from ")
    pairs = [e.split() for e in edge_text.removeprefix("Edges:").split(",")]
    goals = [int(u) for u, v in pairs if v == gr.GOAL_MARK]
    edges = [(int(u), int(v)) for u, v in pairs if v != gr.GOAL_MARK]
    start, arm_list = arm_text.split(":")
    arms = arm_list.split(",")
    walked = [gr.parse_path(a.removesuffix(f" {gr.GOAL_MARK}")) for a in arms]
    assert len(goals) == 1 and not gr.children_of(edges)[goals[0]]  # one leaf is the goal
    # and only its arm's walk ends with the mark
    ends = [w[-1] for w, a in zip(walked, arms, strict=True) if a.endswith(f" {gr.GOAL_MARK}")]
    assert ends == goals
    return edges, int(start), walked


def test_walk_documents_walk_every_arm_along_real_edges():
    docs = list(gr.walk_documents(30, seed=1))
    assert docs == list(gr.walk_documents(30, seed=1))
    for doc in docs:
        edges, start, walked = parse_walk_document(doc)
        assert len(walked) == 3 and all(w[0] == start and len(w) == 5 for w in walked)
        assert {(u, v) for w in walked for u, v in zip(w, w[1:], strict=False)} == set(edges)


def test_mixed_walk_documents_hold_smaller_graphs_walked_the_same_way():
    docs = list(gr.walk_documents(300, seed=2, sizes="mixed"))
    assert docs == list(gr.walk_documents(300, seed=2, sizes="mixed"))
    shapes = set()
    for doc in docs:
        edges, start, walked = parse_walk_document(doc)
        lengths = {len(w) - 1 for w in walked}
        assert len(lengths) == 1 and all(w[0] == start for w in walked)
        assert {(u, v) for w in walked for u, v in zip(w, w[1:], strict=False)} == set(edges)
        shapes.add((len(walked), lengths.pop()))
    # every shape from one arm of one node to the full-size graph
    assert shapes == {(d, a) for d in range(1, 4) for a in range(1, 5)}
    with pytest.raises(ValueError, match="sizes"):
        next(gr.walk_documents(1, sizes="tiny"))
