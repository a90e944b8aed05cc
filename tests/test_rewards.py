import pytest
import torch

from steiner.domains import countdown as cd
from steiner.domains import get_domain, load_shortcuts
from steiner.format import Decision, Step, Trace
from steiner.synth.run import SynthConfig, build_problem_dag, plan_jobs
from steiner.synth.teachers import OracleTeacher
from steiner.train.rewards import RewardWeights, process_advantages, score_trace


def test_advantages_equal_hand_computed_values():
    # sample A: steps ending at tokens 2 and 5 with rewards 1, -1; outcome 1; 7 tokens
    # sample B: one step ending at token 3 with reward 0; outcome 0; 5 tokens
    adv = process_advantages([[1.0, -1.0], [0.0]], [[2, 5], [3]], [1.0, 0.0], [7, 5])
    # group step rewards [1, -1, 0]: mean 0, std sqrt(2/3) -> [1.2247, -1.2247, 0]
    # outcomes [1, 0] -> [1, -1]
    z = 1 / (2 / 3) ** 0.5
    expected_a = [1.0, 1.0, 1.0, 1 - z, 1 - z, 1 - z, 1.0]  # t<=2: z - z + 1; 3..5: -z + 1; 6: 1
    expected_b = [-1.0] * 5
    assert torch.allclose(adv[0], torch.tensor(expected_a), atol=1e-4)
    assert torch.allclose(adv[1], torch.tensor(expected_b), atol=1e-4)


@pytest.fixture(scope="module")
def problem_and_dag(tmp_path_factory):
    path = tmp_path_factory.mktemp("rl") / "shortcut.jsonl"
    path.write_text(
        "".join(
            f'{{"id": "p{i}", "nums": {p["nums"]}, "target": {p["target"]}}}\n'
            for i, p in enumerate(cd.generate_problems(40, n_numbers=4, seed=11))
        )
    )
    domain = get_domain("countdown")
    cfg = SynthConfig(shortcut=str(path))
    for problem in load_shortcuts(path):
        jobs = plan_jobs(problem, cfg)
        dag = build_problem_dag(
            domain, problem, jobs, OracleTeacher(domain).continue_all(jobs), 0.25
        )
        dead = [v for u, v in dag.edges if u == dag.root and dag.nodes[v].d_e is None]
        if dead:
            return domain, problem, dag, dead[0]
    pytest.fail("no DAG with a dead end under the root")


def step_into(domain, problem, before, after, status, back_to=None):
    text = domain.step_between(problem, before, after)
    return Step(**domain.write_step(problem, before, text, after, status, back_to))


def test_reward_ranks_direct_over_backtrack_over_loop_over_wrong(problem_and_dag):
    domain, problem, dag, dead = problem_and_dag
    start = domain.start_state(problem)
    states = [start]
    for text in problem["steps"]:
        states.append(domain.apply_step(problem, states[-1], text))
    dead_state = domain.state_from_key(problem, dag.nodes[dead].key)
    answer = domain.final_answer(problem, problem["steps"])
    good = [
        step_into(domain, problem, a, b, "alive") for a, b in zip(states, states[1:], strict=False)
    ]
    n = len(good)
    detour = step_into(domain, problem, start, dead_state, "dead")
    back_first = step_into(domain, problem, start, states[1], "alive", back_to=start)

    direct = Trace(good, [Decision.PROCEED] * (n - 1) + [Decision.END], answer)
    one_backtrack = Trace(
        [detour, back_first, *good[1:]],
        [Decision.BACKTRACK] + [Decision.PROCEED] * (n - 1) + [Decision.END],
        answer,
    )
    loops = 5
    looping = Trace(
        [detour]
        + [step_into(domain, problem, start, dead_state, "dead", back_to=start)] * (loops - 1)
        + [back_first, *good[1:]],
        [Decision.BACKTRACK] * loops + [Decision.PROCEED] * (n - 1) + [Decision.END],
        answer,
    )
    wrong = Trace([detour], [Decision.END], "1+1")

    w = RewardWeights()
    totals = [
        score_trace(domain, problem, dag, t, w).total
        for t in (direct, one_backtrack, looping, wrong)
    ]
    assert totals[0] > totals[1] > totals[2] > totals[3], totals
    unfinished = Trace(good[:1], [Decision.PROCEED], None)
    assert score_trace(domain, problem, dag, unfinished, w).total < totals[0]


def test_a_sampled_completion_scores_as_its_trace(problem_and_dag, tiny_tokenizer):
    """RL scores token ids that end with the end-of-turn token; the answer the checker reads
    must not carry it (it once did, and every right answer scored as wrong)."""
    from steiner.format import render
    from steiner.infer.budget import TokenIds
    from steiner.train.rl import score_completion

    domain, problem, dag, _ = problem_and_dag
    states = [domain.start_state(problem)]
    for text in problem["steps"]:
        states.append(domain.apply_step(problem, states[-1], text))
    steps = [
        step_into(domain, problem, a, b, "alive") for a, b in zip(states, states[1:], strict=False)
    ]
    decisions = [Decision.PROCEED] * (len(steps) - 1) + [Decision.END]
    direct = Trace(steps, decisions, domain.final_answer(problem, problem["steps"]))
    eos = TokenIds.from_tokenizer(tiny_tokenizer).eos
    ids = tiny_tokenizer(render(direct), add_special_tokens=False)["input_ids"]
    expected = score_trace(domain, problem, dag, direct, RewardWeights())
    for completion in (ids + [eos[0]], ids):  # stopped, or cut at max_new_tokens right there
        scored, trace = score_completion(
            tiny_tokenizer, completion, eos, domain, problem, dag, RewardWeights()
        )
        assert scored.terms["correct"] > 0 and scored.total == expected.total
        assert trace.answer == direct.answer


def test_each_term_can_be_switched_off(problem_and_dag):
    domain, problem, dag, dead = problem_and_dag
    start = domain.start_state(problem)
    dead_state = domain.state_from_key(problem, dag.nodes[dead].key)
    trace = Trace([step_into(domain, problem, start, dead_state, "dead")], [Decision.END], "1+1")
    on = score_trace(domain, problem, dag, trace, RewardWeights())
    off = score_trace(domain, problem, dag, trace, RewardWeights(dead_end=0, wrong=0, length=0))
    assert on.terms["dead_end"] == -1.0 and off.terms["dead_end"] == 0.0
    assert off.total == 0.0


def test_invalid_and_unmatched_steps(problem_and_dag):
    domain, problem, dag, _ = problem_and_dag
    bogus = Trace([Step("99+99=198", "99+99=198", "", "")], [Decision.END], "x")
    scored = score_trace(domain, problem, dag, bogus, RewardWeights())
    assert scored.terms["invalid"] == -1.0
    bad_back = Trace(
        [Step("a", "1+1=2", "", ""), Step("back to 1 2 3 4: x", "", "", "")],
        [Decision.BACKTRACK, Decision.END],
        "x",
    )
    assert score_trace(domain, problem, dag, bad_back, RewardWeights()).terms["invalid"] <= -1.0


def test_embedding_match_for_dags_without_keys():
    from steiner.dag import Observation, build_dag
    from steiner.train.rewards import match_steps

    texts = [
        "Multiply the price by the quantity to get the total cost.",
        "Subtract the discount from the total cost.",
        "The cat sat on the warm windowsill all afternoon.",
    ]
    attempts = [
        [Observation(i, t, None, "answer" if i == 1 else "alive") for i, t in enumerate(texts[:2])],
        [Observation(2, texts[2], None, "dead")],
    ]
    dag = build_dag("t", "q", attempts)
    trace = Trace(
        [
            Step("a", "Multiply price times quantity for the total cost.", "", ""),
            Step("b", "Quantum chromodynamics of gluons.", "", ""),
        ],
        [Decision.PROCEED, Decision.END],
        "x",
    )
    matches = match_steps(get_domain("text"), {"answer": "x"}, dag, trace)
    by_text = {n.text: n.id for n in dag.nodes}
    assert matches[0].node == by_text[texts[0]]
    assert matches[1].node is None  # nothing similar enough
