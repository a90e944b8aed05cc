import json
import random
import re
import subprocess
import sys
from fractions import Fraction
from itertools import combinations

import pytest

from steiner.domains import countdown as cd


def brute_force_solvable(nums: list[int], target: int) -> bool:
    """Independent of the solver: no memo, no canonical states, ordered pairs, Fractions."""
    values = [Fraction(n) for n in nums]
    if len(values) == 1:
        return values[0] == target
    for i, j in combinations(range(len(values)), 2):
        rest = [v for k, v in enumerate(values) if k not in (i, j)]
        for a, b in ((values[i], values[j]), (values[j], values[i])):
            if a < b:
                continue
            results = [a + b, a - b, a * b]
            if b != 0 and (a / b).denominator == 1:
                results.append(a / b)
            for r in results:
                if brute_force_solvable([*rest, r], target):
                    return True
    return False


def test_solver_agrees_with_brute_force_on_2000_pairs():
    rng = random.Random(1234)
    agree = solvable = 0
    for i in range(2000):
        n = 3 if i % 2 else 4
        nums = [rng.randint(1, 25) for _ in range(n)]
        target = rng.randint(1, 60)
        expected = brute_force_solvable(nums, target)
        assert cd.is_solvable(nums, target) == expected, (nums, target)
        assert (cd.solve(nums, target) is not None) == expected
        agree += 1
        solvable += expected
    assert agree == 2000 and 300 < solvable < 1900  # both outcomes well represented


def test_every_solution_is_distinct_valid_and_checker_accepts_it():
    rng = random.Random(7)
    for _ in range(150):
        nums = [rng.randint(1, 30) for _ in range(4)]
        target = rng.choice(sorted(cd.final_values(cd.state_key(nums))))
        sols = cd.all_solutions(nums, target)
        assert sols and len({tuple(s) for s in sols}) == len(sols)
        for steps in sols:
            assert len(steps) == len(nums) - 1
            assert cd.check_answer(nums, target, "\n".join(map(str, steps))), steps
            assert cd.check_answer(nums, target, cd.solution_expression(nums, steps)), steps


def test_known_problem():
    sols = cd.all_solutions([3, 7, 25, 50], 79)
    assert [str(s) for s in sols[0]] == ["7-3=4", "25+4=29", "50+29=79"]
    assert len(sols) == 18
    assert cd.solve([3, 7, 25, 50], 81) is None
    assert cd.state_key([50, 3, 25, 3]) == (3, 3, 25, 50)


def test_reachable_states_includes_start_and_finals():
    states = cd.reachable_states([2, 3, 4])
    assert (2, 3, 4) in states and (24,) in states and (9,) in states
    assert all(len(s) in (1, 2, 3) for s in states)


@pytest.mark.parametrize(
    "answer",
    [
        "(50+25)+(7-3)",
        "50 + 25 + 7 - 3",
        "(50 × 1) + 25 + 7 - 3",
        "7-3=4\n50+25=75\n75+4=79",
        "7 - 3 = 4; 25 + 50 = 75; 4 + 75 = 79",
    ],
)
def test_checker_accepts(answer):
    nums = [3, 7, 25, 50, 1] if "×" in answer else [3, 7, 25, 50]
    assert cd.check_answer(nums, 79, answer), cd.check_answer(nums, 79, answer).reason


@pytest.mark.parametrize(
    "answer, reason",
    [
        ("(50+25)+(7+3)", "evaluates to 85"),  # wrong
        ("50+25+7-3+3", "must use each"),  # reuses 3
        ("50+25+4", "must use each"),  # misses numbers
        ("7-3=4\n50+25=75\n75+3=78", "not available"),  # reuses a consumed number
        ("7-3=4\n50+25=75", "ends with"),  # does not finish
        ("7-3=5\n50+25=75\n75+5=80", "wrong arithmetic"),
        ("(50/3)*3+25+7-3-3", "illegal operation 50/3"),  # non-integer division
        ("9/2=4", "illegal step"),
        ("3-7+50+25+4", "illegal operation 3-7"),  # negative intermediate
        ("__import__('os').system('true')", "unexpected"),  # code is data, never run
        ("2**5", "only + - * /"),
        ("", "empty"),
        ("(" * 500 + "1" + ")" * 500, ""),
    ],
)
def test_checker_rejects(answer, reason):
    result = cd.check_answer([3, 7, 25, 50], 79, answer)
    assert not result
    assert reason in result.reason


def test_generator_is_seeded_and_only_solvable():
    a = list(cd.generate_problems(300, n_numbers=4, seed=3))
    b = list(cd.generate_problems(300, n_numbers=4, seed=3))
    c = list(cd.generate_problems(300, n_numbers=4, seed=4))
    assert a == b and a != c
    for p in a:
        assert 10 <= p["target"] <= 100 and all(1 <= n <= 50 for n in p["nums"])
        assert cd.check_answer(p["nums"], p["target"], p["answer"])
        assert set(p) >= {"id", "domain", "question", "answer", "meta", "nums", "target"}
    assert len({p["id"] for p in a}) == 300


def test_ranges_that_reach_no_target_are_an_error_not_a_hang(tmp_path):
    import subprocess
    import sys

    # two numbers of at most 2 reach at most 4: the generator once redrew them forever
    with pytest.raises(ValueError, match="reached no target in 500-600; widen the ranges"):
        next(cd.generate_problems(3, n_numbers=2, max_number=2, min_target=500, max_target=600))
    out = tmp_path / "p.jsonl"
    args = "--n-numbers 2 --max-number 2 --min-target 500 --max-target 600 --count 3 --out"
    proc = subprocess.run(
        [sys.executable, "-m", "steiner.cli", "countdown", "generate", *args.split(), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "widen the ranges" in proc.stderr
    assert "Traceback" not in proc.stderr and not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "nums, message",
    [
        ([], "field 'nums': List should have at least 1 item"),
        ([-3, 5], "field 'nums.0': Input should be greater than or equal to 0"),
        (list(range(1, 10)), "field 'nums': List should have at most 7 items"),
        # pydantic's lax int read true as 1
        ([True, 8], "field 'nums.0': Input should be a valid integer, not a boolean"),
    ],
)
def test_records_the_solver_cannot_take_are_one_error_line(tmp_path, nums, message):
    from steiner.domains import load_problems
    from steiner.io import InputError

    # a negative number crashed synthesis deep in the solver; nine numbers ran for minutes
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"id": 0, "nums": [3, 4], "target": 7}) + "\n")
    path.write_text(path.read_text() + json.dumps({"id": 1, "nums": nums, "target": 9}) + "\n")
    with pytest.raises(InputError, match=rf"p\.jsonl:2: {re.escape(message)}"):
        load_problems(path, "countdown")


@pytest.mark.parametrize(
    "record, message",
    [
        ({"id": 1, "nums": [3, 4], "target": True}, "field 'target': Input should be a valid"),
        ({"id": True, "nums": [3, 4], "target": 7}, "field 'id': Input should be a string or"),
        ({"id": 1, "edges": [[0, 1]], "start": False, "goal": 1}, "field 'start': Input should"),
        # pydantic's unions named their first member: "field 'id.str'", "field 'answer.str'"
        ({"id": [1], "question": "q", "answer": "a"}, "field 'id': Input should be a string or"),
        ({"question": "q", "answer": ["a", "b"]}, "field 'answer': Input should be a string or"),
    ],
)
def test_a_value_of_the_wrong_type_is_one_error_line(tmp_path, record, message):
    from steiner.domains import load_problems
    from steiner.io import InputError

    # before: "target": true was the problem "reach 1", "start": false started at node 0
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(InputError, match=rf"p\.jsonl:1: {re.escape(message)}"):
        load_problems(path)


def test_shortcut_record_steps_are_a_straight_solution():
    p = next(cd.generate_problems(1, n_numbers=5, seed=9))
    rec = cd.shortcut_record(p)
    assert len(rec["steps"]) == 4
    assert cd.check_answer(p["nums"], p["target"], "\n".join(rec["steps"]))


def test_a_parquet_problem_file_reads_as_its_json_lines(tmp_path):
    import datasets

    from steiner.domains import load_shortcuts
    from steiner.io import InputError

    jsonl, parquet = tmp_path / "p.jsonl", tmp_path / "p.parquet"
    problems = cd.generate_problems(5, 3, 1, 50, 10, 100, seed=2)
    jsonl.write_text("".join(json.dumps(cd.shortcut_record(p)) + "\n" for p in problems))
    datasets.Dataset.from_json(str(jsonl)).to_parquet(str(parquet))
    assert load_shortcuts(parquet) == load_shortcuts(jsonl)
    # a missing one is the same one line as a missing JSON Lines file, not pyarrow's words
    with pytest.raises(InputError, match=r"missing\.parquet: cannot open: No such file"):
        load_shortcuts(tmp_path / "missing.parquet")
    # a process that has read one exits with its own code: read from a Python file object,
    # pyarrow's thread pool aborted the interpreter at exit in about half of such runs here
    # (exit -6, "terminate called without an active exception"), a bad file's exit 2 too
    script = (
        "import sys\nfrom steiner.io import iter_records\n"
        "sys.exit(len(list(iter_records(sys.argv[1]))))"
    )
    for _ in range(10):
        proc = subprocess.run([sys.executable, "-c", script, str(parquet)], capture_output=True)
        assert proc.returncode == 5, proc.stderr


def test_a_save_to_disk_directory_reads_as_its_json_lines(tmp_path):
    # `datasets.load_dataset` refuses one ("use load_from_disk"), which was the error line
    import datasets

    from steiner.domains import load_problems, load_shortcuts
    from steiner.io import InputError

    jsonl = tmp_path / "p.jsonl"
    problems = cd.generate_problems(5, 3, 1, 50, 10, 100, seed=2)
    jsonl.write_text("".join(json.dumps(cd.shortcut_record(p)) + "\n" for p in problems))
    ds = datasets.Dataset.from_json(str(jsonl))
    ds.save_to_disk(str(tmp_path / "plain"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "splits"))
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(tmp_path / "other"))
    expected = load_shortcuts(jsonl)
    assert load_shortcuts(tmp_path / "plain") == expected
    assert load_shortcuts(tmp_path / "splits") == expected
    assert load_problems(tmp_path / "splits") == load_problems(jsonl)
    with pytest.raises(InputError, match="expected a 'train' split; the dataset has validation"):
        load_shortcuts(tmp_path / "other")
    # eval reads the test split (it read "train", the problems a model was trained on), or
    # the one split there is; training never falls back to another split
    assert load_problems(tmp_path / "other") == load_problems(jsonl)
    datasets.DatasetDict({"train": ds, "test": ds.select([0, 1])}).save_to_disk(
        str(tmp_path / "both")
    )
    assert load_problems(tmp_path / "both") == load_problems(jsonl)[:2]
    assert load_shortcuts(tmp_path / "both") == expected
    data_files = tmp_path / "files"  # load_dataset of a directory: train.jsonl and test.jsonl
    data_files.mkdir()
    lines = jsonl.read_text().splitlines(keepends=True)
    (data_files / "train.jsonl").write_text("".join(lines))
    (data_files / "test.jsonl").write_text("".join(lines[3:]))
    assert load_problems(data_files) == load_problems(jsonl)[3:]
    assert load_shortcuts(data_files) == expected
