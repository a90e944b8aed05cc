"""Record files as Hugging Face's json loader reads them: JSON arrays and compressed files."""

import bz2
import gzip
import json
import lzma
import os
import platform

import pytest

from steiner.io import (
    InputError,
    is_record_file,
    iter_records,
    read_text_input,
    source_digest,
    source_rows,
    write_lines,
)

RECORDS = [{"nums": [3, 7, 25], "target": 29}, {"nums": [1, 2, 3], "target": 6}]


def test_a_json_array_is_read_with_the_line_each_record_starts_on(tmp_path):
    # before: "expected a JSON object, got list" for what json.dump(list) writes
    path = tmp_path / "problems.json"
    path.write_text("\n" + json.dumps(RECORDS, indent=2) + "\n")
    rows = list(iter_records(path))
    assert [rec for _, rec in rows] == RECORDS
    assert [line for line, _ in rows] == [3, 11]  # after a blank line and the "["
    one_line = tmp_path / "one-line.json"
    one_line.write_text(json.dumps(RECORDS))
    assert list(iter_records(one_line)) == [(1, RECORDS[0]), (1, RECORDS[1])]
    empty = tmp_path / "empty.json"
    empty.write_text("[ ]\n")
    assert list(iter_records(empty)) == []


@pytest.mark.parametrize(
    "text, message",
    [
        ('[\n  {"a": 1},\n  {"a": 2}\n', ":4: truncated JSON: expected ',' or ']'"),
        ('[\n  {"a": 1}\n  {"a": 2}\n]', ":3: invalid JSON: expected ',' or ']'"),
        (
            '[\n  {"a": 1},\n  {"a": }\n]',
            ":3: invalid JSON: Expecting value; expected a JSON array",
        ),
        ('[\n  {"a": 1},\n  7\n]', ":3: expected a JSON object, got int"),
        ('[{"a": 1}]\n\n{"a": 2}\n', ":3: invalid JSON: more after the JSON array's closing ']'"),
    ],
)
def test_a_bad_json_array_is_one_error_naming_its_line(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(InputError, match=rf"bad\.json{message}"):
        list(iter_records(path))


@pytest.mark.parametrize(
    "suffix, opener", [(".gz", gzip.open), (".bz2", bz2.open), (".xz", lzma.open)]
)
def test_compressed_record_and_text_files_are_read_as_they_are(tmp_path, suffix, opener):
    lines = tmp_path / f"problems.jsonl{suffix}"
    with opener(lines, "wt") as fh:
        fh.write("".join(json.dumps(rec) + "\n" for rec in RECORDS))
    assert list(iter_records(lines)) == [(1, RECORDS[0]), (2, RECORDS[1])]
    array = tmp_path / f"problems.json{suffix}"
    with opener(array, "wt") as fh:
        fh.write(json.dumps(RECORDS, indent=1))
    assert [rec for _, rec in iter_records(array)] == RECORDS
    text = tmp_path / f"walks.txt{suffix}"
    with opener(text, "wb") as fh:
        fh.write(b"\xef\xbb\xbfone walk\n\nanother\n")  # a byte-order mark is not text
    assert read_text_input(text) == "one walk\n\nanother\n"
    # a missing compressed record file is a missing file, not a dataset name for the Hub
    assert is_record_file(tmp_path / "missing.jsonl.gz")


def test_a_damaged_compressed_file_is_one_error_line(tmp_path):
    # before: "invalid UTF-8 at byte 1" for any .gz, since its bytes were read as text
    plain = tmp_path / "plain.jsonl.gz"
    plain.write_text(json.dumps(RECORDS[0]) + "\n")
    with pytest.raises(InputError, match=r"plain\.jsonl\.gz:1: cannot decompress: Not a gzip"):
        list(iter_records(plain))
    cut = tmp_path / "cut.jsonl.gz"
    whole = gzip.compress("".join(json.dumps(RECORDS[0]) + "\n" for _ in range(2000)).encode())
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InputError, match=r"cut\.jsonl\.gz:\d+: cannot decompress"):
        list(iter_records(cut))
    with pytest.raises(InputError, match=r"cut\.jsonl\.gz: cannot decompress"):
        read_text_input(cut)
    with pytest.raises(InputError, match=r"missing\.txt\.gz: cannot open"):
        read_text_input(tmp_path / "missing.txt.gz")


def test_a_missing_data_file_of_a_format_datasets_reads_is_a_missing_file(tmp_path, monkeypatch):
    # before: a Hub look-up of "missing.csv", offline half a minute of retries and then
    # "Couldn't reach 'missing.csv' on the Hub"
    monkeypatch.chdir(tmp_path)  # a bare name, as typed: what datasets takes for a Hub id
    # and one written as a path: datasets said "Repo id must use alphanumeric chars" of it
    names = ("missing.csv", "missing.tsv.gz", "missing.arrow", "./gone", f"{tmp_path}/gone:main")
    for name in names:
        with pytest.raises(InputError) as err:
            list(source_rows(name, "train"))
        assert (err.value.path, err.value.message) == (
            name,
            "cannot open: No such file or directory",
        )


def test_a_datasets_directory_is_checked_by_its_files_and_a_name_by_its_name(tmp_path):
    folder = tmp_path / "problems"
    (folder / ".git").mkdir(parents=True)
    (folder / "data-00000-of-00001.arrow").write_bytes(b"rows")
    (folder / ".git" / "index").write_bytes(b"a")
    digest = source_digest(folder)
    (folder / ".git" / "index").write_bytes(b"b")  # a clone's own bookkeeping is not data
    assert source_digest(folder) == digest
    (folder / "data-00000-of-00001.arrow").write_bytes(b"other rows")
    assert source_digest(folder) != digest
    assert source_digest("openai/gsm8k") is None  # not on disk: the job compares the name
    with pytest.raises(InputError, match="missing.jsonl: cannot open"):
        source_digest(tmp_path / "missing.jsonl")


def test_a_stop_just_after_the_temp_file_is_made_leaves_nothing_behind(tmp_path, monkeypatch):
    # a Ctrl-C that landed inside mkstemp, after the file was made and before its name came
    # back, left the temp file (test_cli's stop test caught it about once in 16 runs)
    real_open = os.open

    def open_then_stop(path, flags, mode=0o777):
        os.close(real_open(path, flags, mode))
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "open", open_then_stop)
    with pytest.raises(KeyboardInterrupt):
        write_lines(tmp_path / "out.jsonl", ["x\n"])
    assert list(tmp_path.iterdir()) == []


def test_another_writers_temp_file_of_the_same_name_is_left_alone(tmp_path, monkeypatch):
    import secrets

    monkeypatch.setattr(secrets, "token_hex", lambda n: "same")
    theirs = tmp_path / ".out.jsonl.same.tmp"
    theirs.write_text("theirs")
    with pytest.raises(FileExistsError):
        write_lines(tmp_path / "out.jsonl", ["x\n"])
    assert theirs.read_text() == "theirs"


HEAP_PROBE = """
import resource, sys
from steiner.io import keep_freed_heap
kept = keep_freed_heap() if sys.argv[1] == "keep" else False
blocks = []
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):  # 64 MiB zeroed and freed, as a training step's activations
    blocks.append(bytearray(64 << 20))
    blocks.clear()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def heap_probe(mode: str, **env: str) -> tuple[bool, int]:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", HEAP_PROBE, mode],
        env={k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_freed_memory_is_reused_instead_of_faulted_in_again_and_a_users_malloc_setting_wins():
    kept, kept_faults = heap_probe("keep")
    assert kept
    _, default_faults = heap_probe("default")
    # glibc's defaults map each 64 MiB afresh: 16k page faults a time; kept, the first only
    assert kept_faults * 3 < default_faults
    kept, _ = heap_probe("keep", MALLOC_TRIM_THRESHOLD_=str(128 << 10))
    assert not kept


def test_the_steiner_command_keeps_the_heap(monkeypatch):
    from steiner import cli

    calls = []
    monkeypatch.setattr(cli, "keep_freed_heap", lambda: calls.append(True))
    monkeypatch.setattr(cli, "app", lambda standalone_mode: 0)
    monkeypatch.setattr(cli, "install_stop_handlers", lambda: None)
    with pytest.raises(SystemExit) as stop:
        cli.main()
    assert stop.value.code == 0 and calls == [True]
