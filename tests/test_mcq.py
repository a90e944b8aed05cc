import csv
import json

import pytest

from steiner.domains.mcq import extract_letter, load_mcq


def write_gpqa(path):
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(
            fh,
            [
                "Record ID",
                "Question",
                "Correct Answer",
                "Incorrect Answer 1",
                "Incorrect Answer 2",
                "Incorrect Answer 3",
            ],
        )
        w.writeheader()
        for i in range(6):
            w.writerow(
                {
                    "Record ID": f"r{i}",
                    "Question": f"What is {i}+{i}?",
                    "Correct Answer": str(2 * i),
                    "Incorrect Answer 1": str(2 * i + 1),
                    "Incorrect Answer 2": str(2 * i + 2),
                    "Incorrect Answer 3": str(2 * i + 3),
                }
            )


def test_gpqa_options_shuffle_deterministically(tmp_path):
    path = tmp_path / "gpqa.csv"
    write_gpqa(path)
    a, b, c = load_mcq(path, seed=0), load_mcq(path, seed=0), load_mcq(path, seed=1)
    assert a == b and a != c
    assert len({p["answer"] for p in a}) > 1  # the correct option does not always sit first
    for p in a:
        i = "ABCD".index(p["answer"])
        assert p["options"][i] == str(2 * int(p["id"][1:]))
        assert f"({p['answer']}) {p['options'][i]}" in p["question"]
        assert "step by step" not in p["question"].lower()  # zero-shot, no CoT instruction


def test_a_gpqa_csv_needs_no_domain_flag(tmp_path):
    from steiner.domains import load_problems

    # before: without --domain mcq a CSV was read as JSON Lines, "invalid JSON" on line 1
    for name in ("gpqa.csv", "GPQA.CSV"):
        write_gpqa(tmp_path / name)
        assert load_problems(tmp_path / name) == load_mcq(tmp_path / "gpqa.csv")
    # compressed, as Hugging Face's csv loader reads it
    import gzip

    packed = tmp_path / "gpqa.csv.gz"
    packed.write_bytes(gzip.compress((tmp_path / "gpqa.csv").read_bytes()))
    assert load_problems(packed) == load_mcq(tmp_path / "gpqa.csv")


def test_a_missing_or_non_utf8_gpqa_csv_is_one_error_line(tmp_path, monkeypatch):
    import datasets

    from steiner.io import InputError

    def hub(*args, **kwargs):
        raise AssertionError("a missing file was looked up as a dataset name")

    monkeypatch.setattr(datasets, "load_dataset", hub)
    # an MMLU-Pro file too: offline, the Hub lookup of its name took 28 s of retry lines
    for name in ("missing.csv", "missing.jsonl", "missing.parquet"):
        with pytest.raises(InputError, match="cannot open: No such file"):
            load_mcq(tmp_path / name)
    path = tmp_path / "latin1.csv"
    write_gpqa(path)
    path.write_bytes(path.read_bytes().replace(b"What", b"Wh\xe4t"))
    with pytest.raises(InputError, match="invalid UTF-8; expected a UTF-8 CSV") as err:
        load_mcq(path)
    assert err.value.path == str(path)


def test_a_short_gpqa_row_is_one_error_line(tmp_path):
    from steiner.io import InputError

    # before: AttributeError: 'NoneType' object has no attribute 'strip', as a traceback
    path = tmp_path / "gpqa.csv"
    write_gpqa(path)
    with path.open("a") as fh:
        fh.write("r9,Short?,a,b,c\n")
    lines = len(path.read_text().splitlines())
    with pytest.raises(InputError, match="GPQA column 'Incorrect Answer 3' .the row is short") as e:
        load_mcq(path)
    assert e.value.line == lines


def test_mmlu_pro_records(tmp_path):
    path = tmp_path / "mmlu.jsonl"
    path.write_text(
        json.dumps({"question_id": 7, "question": "Q?", "options": list("wxyzv"), "answer": "D"})
        + "\n"
    )
    [p] = load_mcq(path)
    assert p["id"] == "7" and p["answer"] == "D" and "(E) v" in p["question"]


@pytest.mark.parametrize("options", ["['4', '5']", ["only one"], list("ABCDEFGHIJKLMNOPQ")])
def test_mmlu_pro_options_not_a_list_of_options_is_one_error_line(tmp_path, options):
    from steiner.io import InputError

    # before: a string was one option per character, "(J) ]", and the record was asked as is
    path = tmp_path / "mmlu.jsonl"
    path.write_text(json.dumps({"question": "Q?", "options": options, "answer": "B"}) + "\n")
    with pytest.raises(InputError, match=r"mmlu\.jsonl:1: .*options must be a list of 2 to 16"):
        load_mcq(path)


@pytest.mark.parametrize(
    "text", ["C", "(C)", "The answer is C.", "**C**", "Answer: (C)", "c", "C. because 3"]
)
def test_extracts_the_letter(text):
    assert extract_letter(text, 4) == "C"


@pytest.mark.parametrize(
    "text",
    ["A or B", "(A) and (B)", "The answer is A. No, the answer is B.", "", "I don't know", "E"],
)
def test_rejects_ambiguous_or_missing(text):
    assert extract_letter(text, 4) is None


def test_a_byte_order_mark_is_not_data(tmp_path):
    # Excel and Windows editors start a UTF-8 file with one; before, the GPQA loader read a
    # column '\ufeffRecord ID', and JSON Lines said "Unexpected UTF-8 BOM"
    from steiner.domains import load_shortcuts
    from steiner.io import InputError
    from steiner.train.data import plain_texts

    plain, marked = tmp_path / "gpqa.csv", tmp_path / "gpqa-bom.csv"
    write_gpqa(plain)
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert load_mcq(marked) == load_mcq(plain)
    record = {"id": "a", "nums": [3, 4], "target": 7}
    jsonl, marked_jsonl = tmp_path / "p.jsonl", tmp_path / "p-bom.jsonl"
    jsonl.write_text(json.dumps(record) + "\n")
    marked_jsonl.write_bytes(b"\xef\xbb\xbf" + jsonl.read_bytes())
    assert load_shortcuts(marked_jsonl) == load_shortcuts(jsonl)
    text = tmp_path / "t.txt"
    text.write_bytes(b"\xef\xbb\xbfhello\n\nworld\n")
    assert plain_texts(text) == ["hello", "world"]
    # a bad byte after one is named by its place in the file, the mark counted
    text.write_bytes(b"\xef\xbb\xbfok\n\xff")
    with pytest.raises(InputError, match="invalid UTF-8 at byte 6"):
        plain_texts(text)
