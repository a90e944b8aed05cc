"""Reading and writing record files (JSON Lines or Parquet) with one-line input errors, the
settings check that lets a resumable job continue, the per-record seeds that make a job's
output independent of how it is split into batches, chunks or resumed runs, and the guards
of a job's run: one run per output directory, a child job that ends with its parent.

Bottom layer like ``format``: imports nothing else from steiner.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import hashlib
import json
import lzma
import os
import re
import secrets
import zlib
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticCustomError

M = TypeVar("M", bound=BaseModel)


class InputError(Exception):
    """Bad input: printed by the CLI as one line ``FILE:LINE: message`` with exit code 2."""

    def __init__(self, path: str | os.PathLike, line: int | None, message: str):
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {message}")
        self.path, self.line, self.message = str(path), line, message

    def __reduce__(self) -> tuple[Any, ...]:
        # pickled with its three fields, not the formatted text: a synthesis pool worker hands
        # its InputError to the parent this way, and one rebuilt from the text hung the pool
        return (InputError, (self.path, self.line, self.message))


@contextmanager
def without_loading_bar() -> Iterator[None]:
    """transformers' "Loading weights" bar off while a model loads: the commands draw their
    own, and it stood above their one-line errors (on stderr, terminal or not)."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def open_input(path: str | os.PathLike, mode: str = "rb", **kwargs: Any) -> IO[Any]:
    """``open`` for reading an input file: one that is missing or unreadable is one
    InputError."""
    try:
        return open(path, mode, **kwargs)
    except OSError as exc:
        raise InputError(path, None, f"cannot open: {exc.strerror}") from None


# Hugging Face's json and text loaders read these compressed files as they are, by suffix
DECOMPRESSORS: dict[str, Any] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
# what a damaged or mislabelled compressed file raises while it is read
DECOMPRESS_ERRORS = (OSError, EOFError, lzma.LZMAError, zlib.error)


def expand_user(value: Any) -> Any:
    """``~`` in a path (a string or a Path, kept as such) or in each path of a list, as a shell
    would have expanded it: from a --config file or ``--flag=~/x`` none does, and a directory
    named ``~`` was made. A Hub or datasets name never starts with ``~``, so a field that may
    hold one is safe to expand; other values (None) pass as they are."""
    if isinstance(value, list):
        return [expand_user(v) for v in value]
    if isinstance(value, Path):
        return Path(os.path.expanduser(value))
    return os.path.expanduser(value) if isinstance(value, str) else value


def expand_home(cfg: Any, fields: Iterable[str]) -> None:
    """``expand_user`` on the path fields of a config, as TrainingArguments reads its
    output_dir."""
    for name in fields:
        setattr(cfg, name, expand_user(getattr(cfg, name)))


def data_suffix(path: str | os.PathLike) -> str:
    """A file's suffix once a compression suffix is set aside: ``x.jsonl.gz`` is JSON Lines."""
    p = Path(path)
    return Path(p.stem).suffix if p.suffix in DECOMPRESSORS else p.suffix


def open_decompressed(path: str | os.PathLike, mode: str = "rb", **kwargs: Any) -> IO[Any]:
    """``open_input`` that decompresses a ``.gz``, ``.bz2`` or ``.xz`` file as it reads."""
    opener = DECOMPRESSORS.get(Path(path).suffix)
    if opener is None:
        return open_input(path, mode, **kwargs)
    open_input(path).close()  # a missing file: "cannot open", as for any other input
    return opener(path, mode if "b" in mode else mode.replace("r", "rt"), **kwargs)


def read_decompressed(fh: IO[Any], path: str | os.PathLike, size: int = -1) -> Any:
    """``fh.read(size)``, with a damaged compressed file as one InputError."""
    try:
        return fh.read(size)
    except DECOMPRESS_ERRORS as exc:
        raise InputError(path, None, f"cannot decompress: {exc}") from None


def read_text_input(path: str | os.PathLike) -> str:
    """The whole of a UTF-8 text input file (compressed too); one that is missing,
    unreadable or not UTF-8 is one InputError (the same words as a JSON Lines file's)."""
    with open_decompressed(path) as fh:
        return decode_input(read_decompressed(fh, path), path, None, first=True)


def decode_input(raw: bytes, path: str | os.PathLike, line: int | None, first: bool) -> str:
    """UTF-8 text of an input file (or of one of its lines); a byte-order mark at the start
    of the file (``first``; Windows editors and Excel write one) is not data: json.loads
    refused it, and a CSV's first column name began with it. Not UTF-8: one InputError naming
    the byte, counted in the file's (or line's) own bytes."""
    skip = len(codecs.BOM_UTF8) if first and raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(path, line, f"invalid UTF-8 at byte {exc.start + skip}") from None


def _lines(fh: IO[bytes], path: Path) -> Iterator[bytes]:
    lineno = 0
    try:
        for raw in fh:
            lineno += 1
            yield raw
    except DECOMPRESS_ERRORS as exc:
        raise InputError(path, lineno + 1, f"cannot decompress: {exc}") from None


_SPACE = re.compile(r"\s*")


def _json_array(text: str, path: Path, first_line: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """The objects of a file that is one JSON array (what ``json.dump`` of a list writes, and
    what Hugging Face's json loader reads too), each with the line it starts on: json.loads
    of the whole text would lose the lines that later errors name. ``text`` starts at the
    "[", on the file's line ``first_line``."""
    decoder, counted, line = json.JSONDecoder(), 0, first_line

    def line_at(pos: int) -> int:  # positions only move forward: count each newline once
        nonlocal counted, line
        line += text.count("\n", counted, pos)
        counted = pos
        return line

    pos = _SPACE.match(text, 1).end()
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            start = line_at(pos)
            try:
                obj, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                what = "truncated JSON" if exc.pos >= len(text.rstrip()) else "invalid JSON"
                raise InputError(
                    path, line_at(exc.pos), f"{what}: {exc.msg}; expected a JSON array of objects"
                ) from None
            if not isinstance(obj, dict):
                raise InputError(path, start, f"expected a JSON object, got {type(obj).__name__}")
            yield start, obj
            pos = _SPACE.match(text, pos).end()
            if text.startswith(",", pos):
                pos = _SPACE.match(text, pos + 1).end()
            elif text.startswith("]", pos):
                pos += 1
                break
            else:
                what = "truncated JSON" if pos >= len(text) else "invalid JSON"
                raise InputError(
                    path, line_at(pos), f"{what}: expected ',' or ']' in the JSON array"
                )
    pos = _SPACE.match(text, pos).end()
    if pos < len(text):
        raise InputError(
            path, line_at(pos), "invalid JSON: more after the JSON array's closing ']'"
        )


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line of a JSON Lines file, or for each
    object of a file that is one JSON array (its first character is "["), compressed or not;
    InputError on the first bad one."""
    path = Path(path)
    with open_decompressed(path) as fh:
        seen_any = False
        for lineno, raw in enumerate(_lines(fh, path), start=1):
            line = decode_input(raw, path, lineno, first=lineno == 1)
            if not line.strip():
                continue
            if not seen_any and line.lstrip().startswith("["):
                rest = decode_input(read_decompressed(fh, path), path, None, first=False)
                yield from _json_array(line.lstrip() + rest, path, lineno)
                return
            seen_any = True
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                what = "truncated JSON" if exc.pos >= len(line.rstrip()) else "invalid JSON"
                raise InputError(
                    path, lineno, f"{what}: {exc.msg}; expected one JSON object per line"
                ) from None
            if not isinstance(obj, dict):
                raise InputError(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


RECORD_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


def is_record_suffix(path: str | os.PathLike) -> bool:
    """Whether a file's name says it holds records (``x.jsonl.gz`` too), not plain text."""
    return data_suffix(path) in RECORD_FILE_SUFFIXES


def is_record_file(source: str | os.PathLike) -> bool:
    """Whether a problem source is read as a file rather than asked of ``datasets``: a missing
    path with a record-file suffix is "cannot open", not a dataset name looked up on the Hub
    (offline that was half a minute of huggingface_hub's retry lines above the error)."""
    return Path(source).is_file() or is_record_suffix(source)


def iter_records(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (row number, record) from a JSON Lines, JSON array or Parquet file (rows count
    from 1; lines for JSON)."""
    path = Path(path)
    if data_suffix(path) == ".parquet":
        try:
            import pyarrow.parquet as pq

            open_input(path).close()  # a missing file: "cannot open", as for JSON Lines
            # by its path, not a Python file object: after reading from one, pyarrow's thread
            # pool aborted the interpreter at exit now and then (exit 134, "terminate called
            # without an active exception"; apache/arrow#33975, #50482)
            table = pq.read_table(path)
        except (OSError, ValueError) as exc:
            raise InputError(path, None, f"cannot read Parquet: {exc}") from None
        yield from enumerate(table.to_pylist(), start=1)
        return
    yield from iter_jsonl(path)


def source_rows(source: str | os.PathLike, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row number, record) of a record file, or of a ``datasets`` name or directory: its
    ``split``, and for "test" (what evaluation reads) a dataset of one split whole."""
    if is_record_file(source):
        return iter_records(source)
    return dataset_rows(source, split, sole_split=split == "test")


# a missing path with one of these suffixes is a missing file, not a dataset name for the Hub
TEXT_FILE_SUFFIXES = (".txt", ".text", ".md")


def is_plain_text(source: str | os.PathLike) -> bool:
    """Whether a text source is a plain-text file (not records, not a ``datasets`` source)."""
    path = Path(source)
    return not is_record_suffix(path) and (
        path.is_file() or data_suffix(path) in TEXT_FILE_SUFFIXES
    )


def dataset_name_and_config(source: str | os.PathLike) -> tuple[str, str | None]:
    """``NAME:CONFIG`` names a dataset's config (``openai/gsm8k:main``), as ``load_dataset``'s
    second argument: a Hub dataset with several configs cannot be read without one. A path
    that exists is a path, colons and all."""
    text = str(source)
    name, colon, config = text.rpartition(":")
    if not colon or not name or not config or "/" in config or Path(text).exists():
        return text, None
    return name, config


def data_file_suffixes() -> set[str]:
    """The file suffixes ``datasets`` loads by their format (csv, tsv, txt, arrow, ...): its own
    table, so the list follows its releases."""
    from datasets.packaged_modules import _EXTENSION_TO_MODULE

    return set(_EXTENSION_TO_MODULE)


def spelled_as_path(source: str | os.PathLike) -> bool:
    """Whether a source is written as a path no Hub id can be (``/data/x``, ``./x``,
    ``../x``, ``~/x``): missing, it is a missing file, where datasets' answer was that the
    "repo id must use alphanumeric chars" (or "Couldn't find any data file", if absolute)."""
    text = str(source)
    return os.path.isabs(text) or text.startswith(("./", "../", "~")) or text in (".", "..")


def dataset_rows(
    source: str | os.PathLike, split: str, sole_split: bool = False
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row number, record) of a ``datasets`` source: a Hub name or a directory of data files
    (``load_dataset``; ``NAME:CONFIG`` for one of its configs), or a ``save_to_disk``
    directory (``load_from_disk``: load_dataset refuses one and says to use it). Not loadable:
    one InputError. With ``sole_split``, a dataset without ``split`` that has one split only
    is read from that one (a directory of data files is one "train" split)."""
    import datasets

    path = Path(source)
    name, config = dataset_name_and_config(source)
    missing_path = spelled_as_path(source) and not Path(name).exists()  # /dir:CONFIG too
    if not path.exists() and (data_suffix(path) in data_file_suffixes() or missing_path):
        # a missing x.csv is a missing file, not a Hub name: offline, the look-up was half a
        # minute of huggingface_hub's retries before "Couldn't reach 'x.csv' on the Hub"
        open_input(source).close()  # as given: Path("./x") would name it "x"
    try:
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            ds = datasets.load_from_disk(str(path))
        else:
            try:  # the one split only: a Hub dataset's others may be gigabytes
                ds = datasets.load_dataset(name, config, split=split)
            except ValueError as exc:
                if "Unknown split" not in str(exc):
                    raise
                ds = datasets.load_dataset(name, config)  # to read its sole split, or name them
    except Exception as exc:  # datasets raises many kinds; the user needs one line
        configs = []
        if "Config name is missing" in str(exc):
            try:
                configs = datasets.get_dataset_config_names(name)
            except Exception:  # the names are a hint; the error below still says what failed
                pass
        if configs:
            raise InputError(
                source,
                None,
                f"the dataset has configs {', '.join(configs)}; name one as {name}:{configs[0]}",
            ) from None
        why = " ".join(str(exc).split())  # datasets' messages run over several lines
        raise InputError(source, None, f"not a file and not a loadable dataset ({why})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds and sole_split and len(ds) == 1:
            split = next(iter(ds))
        if split not in ds:
            raise InputError(
                source, None, f"expected a {split!r} split; the dataset has {', '.join(ds)}"
            )
        ds = ds[split]
    return enumerate(ds, start=1)


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatRecord(BaseModel):
    """A chat record (DESIGN.md's path record, or any ``{"messages": [...]}`` line)."""

    messages: list[ChatMessage]


def chat_record(record: dict[str, Any], path: str | os.PathLike, line: int) -> ChatRecord:
    """A chat record, or TRL's prompt-completion record read as the chat it stands for: the
    prompt's messages, then the completion's (a text prompt is a user message, a text
    completion an assistant one)."""
    if "messages" not in record and "prompt" in record and "completion" in record:
        messages: list[Any] = []
        for field, role in (("prompt", "user"), ("completion", "assistant")):
            part = record[field]
            if isinstance(part, str):
                part = [{"role": role, "content": part}]
            if not isinstance(part, list):
                raise InputError(
                    path, line, f"field '{field}': expected text or a list of messages"
                )
            messages += part
        record = {"messages": messages}
    return validate(ChatRecord, record, path, line)


def not_a_boolean(value: Any, expected: str) -> Any:
    """``value`` as it is, unless it is JSON's true or false where a number belongs: pydantic's
    lax int and float read true as 1 (``"target": true`` was a problem reaching 1, and a
    ``"max_tokens": true`` request got a one-token answer). For a before-validator."""
    if isinstance(value, bool):
        raise PydanticCustomError("not_a_boolean", f"Input should be {expected}, not a boolean")
    return value


def validate(model: type[M], record: dict[str, Any], path: str | os.PathLike, line: int) -> M:
    """Validate a record against a pydantic model; the first problem becomes one InputError."""
    try:
        return model.model_validate(record)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "record"
        raise InputError(path, line, f"field '{field}': {err['msg']}") from None


def _current_umask() -> int:
    # os.umask can only be read by setting it; done once, at import, before any threads start.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _mode_for(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_UMASK


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """A handle on a temp file beside ``path`` that replaces it only when the block ends
    without error: a crash never leaves half a file, and an old file stays whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # named before it exists (mkstemp's way, O_EXCL), so that a stop at any point can remove
    # it: a Ctrl-C or SIGTERM landing inside mkstemp, after the file was made but before its
    # name came back, left the temp file behind
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        # the file is 0600 so far; give it the mode a plain open() would (the old file's,
        # or what the umask allows), so colleagues on a shared cluster can read our outputs.
        os.fchmod(fd, _mode_for(path))
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as fh:
            yield fh
        try:
            os.replace(tmp, path)
        except OSError as exc:  # name the user's path (a directory, say), not our temp file
            raise OSError(exc.errno, exc.strerror, str(path)) from None
    except BaseException as exc:
        # one try from the file's creation on; another writer's file of the same name (the
        # O_EXCL open refused) is not ours to remove
        if not (isinstance(exc, FileExistsError) and exc.filename == str(tmp)):
            tmp.unlink(missing_ok=True)
        raise


def write_lines(path: str | os.PathLike, lines: Iterable[str]) -> int:
    """Write text atomically (temp file + rename): a crash never leaves half a file.
    Returns how many pieces were written."""
    n = 0
    with atomic_file(path) as fh:
        for line in lines:
            fh.write(line)
            n += 1
    return n


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 120) -> None:
    """A matplotlib figure written atomically, as every other output (savefig to a path
    writes in place: a crash mid-write left a truncated PNG over the last run's)."""
    with atomic_file(path, "wb") as fh:
        fig.savefig(fh, format=Path(path).suffix.lstrip(".") or "png", dpi=dpi)


def write_json(path: str | os.PathLike, obj: Any, sort_keys: bool = False) -> None:
    """One indented JSON document, written atomically."""
    write_lines(path, [json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n"])


def write_jsonl(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> int:
    """Write records atomically (temp file + rename): a crash never leaves half a file."""
    return write_lines(path, (json.dumps(rec, ensure_ascii=False) + "\n" for rec in records))


DIGEST_SUFFIX = "_sha256"


def file_digest(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (16 hex digits): what a resumed job checks its input files
    by. Reading the file once more costs seconds against the hours of a training run."""
    digest = hashlib.sha256()
    with open_input(path) as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()[:16]


def source_digest(source: str | os.PathLike) -> str | None:
    """What a resumed job checks a problem or data source by: a file's digest, a ``datasets``
    directory's (``save_to_disk`` or a copy of a Hub repo: the names and bytes of its files,
    hidden ones such as ``.git`` aside), or None for a dataset name, which the job's record
    then compares by name. A directory was "cannot open: Is a directory" before any work."""
    path = Path(source)
    if path.is_dir():
        digest = hashlib.sha256()
        files = [
            f
            for f in path.rglob("*")
            if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts)
        ]
        for f in sorted(files):
            digest.update(f.relative_to(path).as_posix().encode() + b"\0")
            digest.update(file_digest(f).encode())
        return digest.hexdigest()[:16]
    if path.exists() or is_record_suffix(path):
        return file_digest(path)  # a missing file: "cannot open", as when it is read
    return None


def source_digests(**sources: str | os.PathLike | None) -> dict[str, str]:
    """``NAME_sha256`` entries of a job's record for the sources given: those with a digest
    (``source_digest``); a dataset name, or a source not given, has none and is compared by
    its name (``settings_differences``)."""
    digests = {f"{name}{DIGEST_SUFFIX}": source_digest(s) for name, s in sources.items() if s}
    return {key: digest for key, digest in digests.items() if digest is not None}


def settings_differences(
    stored: dict[str, Any],
    wanted: dict[str, Any],
    defaults: dict[str, Any],
    retired: Collection[str] = (),
) -> str:
    """The settings a resumable job was started with that differ from this command's, as
    ``name: X there, Y here`` ("" when it may resume). A setting added to Steiner after the job
    was started is missing from its record; the job then had the setting's default behaviour,
    so it matches when this command keeps that default (an upgrade does not strand a
    half-finished job).

    A file named by setting ``NAME`` may come with ``NAME_sha256`` (``file_digest``): then its
    content is compared, not its path, so a moved file resumes and one edited in place is
    refused; a record from before the digest compares the path as it did. A ``retired``
    setting, one Steiner no longer has, is passed over in the record."""
    stored = {k: v for k, v in stored.items() if k not in retired or k in wanted}
    wanted = dict(wanted)
    for key in [k for k in wanted if k.endswith(DIGEST_SUFFIX)]:
        if key in stored:
            stored.pop(key.removesuffix(DIGEST_SUFFIX), None)
            wanted.pop(key.removesuffix(DIGEST_SUFFIX), None)
        else:
            del wanted[key]
    differences = []
    for key in sorted(stored.keys() | wanted.keys()):
        there = stored.get(key, defaults.get(key, "(not set)"))
        here = wanted.get(key, "(not set)")
        if there != here:
            differences.append(f"{key}: {there!r} there, {here!r} here")
    return "; ".join(differences)


LOCK_FILE = ".steiner.lock"
_held: set[Path] = set()  # locks this process holds: a job may run another inside its directory


def check_output_dir(directory: str | os.PathLike, flag: str) -> None:
    """An output directory that is a file, or lies under one, is one InputError (mkdir would
    say only "File exists" or "Not a directory")."""
    directory = Path(directory).resolve()
    existing = next(p for p in (directory, *directory.parents) if p.exists())
    if not existing.is_dir():
        raise InputError(existing, None, f"a file, not a directory; expected a directory ({flag})")


def check_output_file(path: str | os.PathLike, flag: str) -> None:
    """An output file that is a directory, or lies under a file, is one InputError before the
    work (the rename at the end would say only "Is a directory" or "File exists", and only
    after the minutes of work that came before it)."""
    if Path(path).is_dir():
        raise InputError(path, None, f"a directory, not a file; expected a file path ({flag})")
    check_output_dir(Path(path).parent, flag)


@contextmanager
def sole_writer(
    directory: str | os.PathLike, flag: str, name: str = LOCK_FILE, main_process: bool = True
) -> Iterator[None]:
    """Hold a resumable job's output for one run at a time. Two runs into one directory (the
    same command in two terminals, or a run left behind by a killed parent) would both resume
    from its files and write the same records twice; the second is one error line instead.
    ``name`` tells apart jobs that share a directory (synthesis shards). Only the main process
    of a multi-process job holds it. The lock is the OS's (``filelock``: flock on Unix; where
    the file system has none, a marker naming its process, taken over once that one is dead),
    so a killed job does not leave it held."""
    from filelock import FileLock, Timeout

    path = Path(directory).resolve() / name
    if not main_process or path in _held:
        yield
        return
    check_output_dir(directory, flag)
    made = path.parent  # the directories made here, removed again if the job writes nothing
    while not made.parent.exists():
        made = made.parent
    made = made if not made.exists() else None
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path)
    try:
        lock.acquire(blocking=False)
    except Timeout:
        raise InputError(
            directory,
            None,
            f"another run is writing here ({flag}); wait for it to end or use another {flag}",
        ) from None
    _held.add(path)
    try:
        yield
    finally:
        _held.discard(path)
        lock.release()
        if made is not None and os.listdir(path.parent) == [name]:
            # a job that stopped on bad input leaves no directory behind, as before the lock
            path.unlink(missing_ok=True)
            empty = path.parent
            while empty != made.parent and not any(empty.iterdir()):
                empty.rmdir()
                empty = empty.parent


PARENT_PID_ENV = "STEINER_PARENT_PID"


def end_with_parent(poll_seconds: float = 1.0) -> None:
    """In a job started with ``PARENT_PID_ENV`` set to its parent's pid (the demo's baseline
    SFT): SIGTERM itself once that parent is gone, so that it unwinds as on a stop. A parent
    killed by SIGKILL (the OOM killer) cannot stop it, and left alone it trained on, its lock
    refusing the re-run's baseline. Polling ``getppid`` (the parent's death re-parents the
    process) works on Linux and macOS alike; ``prctl(PR_SET_PDEATHSIG)`` is Linux's only."""
    import signal
    import threading
    import time

    parent = os.environ.pop(PARENT_PID_ENV, "")  # not handed on to the job's own children
    if not parent.isdigit():
        return

    def watch() -> None:
        while os.getppid() == int(parent):
            time.sleep(poll_seconds)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="end-with-parent", daemon=True).start()


GLIBC_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_heap(bytes_kept: int = 1 << 30) -> bool:
    """Under glibc, keep freed memory in the heap for reuse instead of handing it back to the
    system; True where it was set. PyTorch on a CPU frees and asks again for the same
    megabytes at every step (activations, logits, a growing KV cache), and glibc's defaults
    return them and take fresh zeroed pages each time: 1.2 M page faults in 60 SFT steps of
    the demo's model, which trains 1.12x faster with the heap kept (benchmarks/bench_heap.py).
    The weights and outputs are the same either way. A user's own ``MALLOC_*`` settings win.
    No pip-installable library does this: jemalloc or tcmalloc need ``LD_PRELOAD`` before
    the process starts, and macOS or musl have no ``mallopt`` to call."""
    import ctypes
    import platform

    # glibc's own answer (os.confstr); musl's mallopt does nothing, macOS has none
    if platform.libc_ver()[0] != "glibc" or any(key in os.environ for key in GLIBC_MALLOC_ENV):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    # the mmap threshold too: fixing the trim threshold alone turns off glibc's adaptive
    # mmap threshold, and every allocation over 128 KiB became its own mmap (1.85x slower)
    return bool(mallopt(m_mmap_threshold, bytes_kept)) and bool(
        mallopt(m_trim_threshold, bytes_kept)
    )


def check_model_dir(
    name: str | None, flag: str, made_by: str, reasoning: bool = True, adapters: bool = False
) -> None:
    """Steiner loads models from a local directory (``save_pretrained``), never a Hub
    download: a missing one, or one without a model and tokenizer (a run directory given for
    the model inside it, say), is one error line, not transformers' traceback. With
    ``reasoning``, its tokenizer must have the 14 reasoning tokens: a plain pretrained model
    failed deep in generation or in TRL's chat-template check, and CPT would have learnt the
    format's strings as runs of ordinary tokens. With ``adapters`` (the commands that load
    through ``steiner.infer.generate.load``), a LoRA run's checkpoint is a model too."""
    if not name or not Path(name).is_dir():
        raise InputError(name or flag, None, f"expected a model directory ({made_by})")
    files = {p.name for p in Path(name).iterdir()}
    model_files = {"config.json", "adapter_config.json"} if adapters else {"config.json"}
    missing = [
        what
        for what, names in (
            ("config.json", model_files),
            ("a tokenizer", {"tokenizer.json", "tokenizer_config.json"}),
        )
        if not files & names
    ]
    if missing:
        raise InputError(
            name, None, f"expected a model directory with {' and '.join(missing)} ({made_by})"
        )
    if reasoning:
        from transformers import AutoTokenizer

        check_reasoning_tokenizer(AutoTokenizer.from_pretrained(name), name)


def check_reasoning_tokenizer(tokenizer: Any, name: str) -> None:
    """The model directory ``name``'s tokenizer has the 14 reasoning tokens and a chat
    template, or one error line says which is missing and how to add it."""
    from steiner.format import SPECIAL_TOKENS

    vocab = tokenizer.get_vocab()
    lacking = [t for t in SPECIAL_TOKENS if t not in vocab]
    fix = f"expected a Steiner model (`steiner train init --from {name} --out DIR` adds"
    if lacking:
        raise InputError(
            name,
            None,
            f"the tokenizer lacks {len(lacking)} of the 14 reasoning tokens ({lacking[0]}, "
            f"...); {fix} them)",
        )
    if not tokenizer.chat_template:  # every prompt is a chat; transformers' ValueError
        raise InputError(name, None, f"the tokenizer has no chat template; {fix} one)")


def local_path(name: str) -> str:
    """A file or directory as one absolute path however a command spells it; a name that is
    not on disk (a Hub model id) as it is."""
    return str(Path(name).resolve()) if name and Path(name).exists() else name


def check_resume_record(
    path: str | os.PathLike,
    wanted: dict[str, Any],
    defaults: dict[str, Any],
    what: str,
    remedy: str,
    retired: Collection[str] = (),
    write: bool = True,
) -> None:
    """Refuse to continue a job whose record (``path``) holds other settings than ``wanted``,
    as one InputError naming each difference; a job without a record gets one (``write``: the
    process that may write it), so a directory from before records existed resumes as it did."""
    path = Path(path)
    if path.exists():
        differences = settings_differences(json.loads(path.read_text()), wanted, defaults, retired)
        if differences:
            message = f"this directory holds {what} with other settings ({differences})"
            raise InputError(path, None, f"{message}; {remedy}")
    elif write:
        write_json(path, wanted)


def last_checkpoint(output_dir: str | os.PathLike, marker: str) -> Path | None:
    """The newest ``checkpoint-N`` in ``output_dir`` that holds ``marker``, the file its writer
    writes last: a checkpoint cut short by a kill while it was written is passed over."""
    if not os.path.isdir(output_dir):
        return None
    done = [
        path
        for path in Path(output_dir).glob("checkpoint-*")
        if path.name.removeprefix("checkpoint-").isdigit() and (path / marker).is_file()
    ]
    return max(done, key=lambda p: int(p.name.removeprefix("checkpoint-"))) if done else None


def check_checkpoint_inputs(
    record: str | os.PathLike, inputs: dict[str, Any], resuming: bool, what: str, main: bool
) -> None:
    """A training run that continues a checkpoint must start from the same ``inputs`` (its
    model and data) as the run that wrote it; a fresh run writes them down (``main``: the
    process that may)."""
    if resuming:
        remedy = "use a new --output_dir, or --no_resume to start it over"
        check_resume_record(record, inputs, {}, what, remedy, write=main)
    elif main:
        write_json(record, inputs)


MAX_SEED = 2**32 - 1  # numpy's range, which transformers' set_seed needs


def check_seed(seed: int) -> None:
    """A seed out of range is one error line, not numpy's traceback mid-stage."""
    if not 0 <= seed <= MAX_SEED:
        raise InputError("--seed", None, f"expected 0 to {MAX_SEED}, got {seed}")


def check_at_least(config: Any, rules: Iterable[tuple[str, float, str]]) -> None:
    """Each ``(field, least, why)``: a setting below its least value (None: unset, allowed) is
    one error line before a stage starts, not a library's traceback mid-stage or, worse, a
    run that trains nothing and exits 0."""
    for name, least, why in rules:
        value = getattr(config, name)
        if value is not None and value < least:
            raise InputError(f"--{name}", None, f"expected >= {least}{why}, got {value}")


def check_share(config: Any, names: Iterable[str]) -> None:
    """Each named setting is a share from 0 to 1 (None: unset, allowed), or one error line."""
    for name in names:
        value = getattr(config, name)
        if value is not None and not 0 <= value <= 1:
            raise InputError(f"--{name}", None, f"expected a share from 0 to 1, got {value}")


def check_http_url(url: str, flag: str) -> None:
    """An endpoint that is no http(s) URL is one error line before any request (each request
    failed with a bare "Connection error")."""
    from urllib.parse import urlparse

    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        expected = "expected an http(s) URL such as http://127.0.0.1:8000/v1"
        raise InputError(flag, None, f"{expected}, got {url!r}")


def derived_seed(*parts: Any) -> int:
    """A seed from a job's seed and a record's identity (``seed, problem id, ...``), so each
    record draws the same numbers whatever else is processed with it."""
    return zlib.crc32(":".join(map(str, parts)).encode())


def check_logger_names(names: list[str], known: Iterable[str], installed: list[str]) -> None:
    """Each of ``names`` (``--report_to``) among ``known`` and ``installed``, or one error line."""
    known = sorted(known)
    for name in names:
        if name not in known:
            raise InputError(
                "--report_to",
                None,
                f"expected none, all or one of {', '.join(known)}; got {name!r}",
            )
        if name not in installed:
            raise InputError(
                "--report_to",
                None,
                f"{name} is not installed; pip install it, or use --report_to none",
            )
