"""``steiner synth``: shortcut records in; DAGs, reasoning paths and stats out.

Resumable: problems are processed in chunks; after each chunk the new DAG and path lines are
appended and fsynced, then one line goes into a journal with the byte sizes of both files.
A re-run truncates both files to the last journalled sizes (dropping a half-written chunk)
and continues with the next problem. Every random choice is seeded from (seed, problem id),
so an interrupted and resumed run writes the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from steiner.dag import Dag, Observation, build_dag
from steiner.domains import get_domain, load_shortcuts, walk_shortcut
from steiner.domains.base import Domain
from steiner.io import (
    InputError,
    derived_seed,
    settings_differences,
    sole_writer,
    write_json,
)
from steiner.synth.cluster import cluster_texts
from steiner.synth.paths import PathSettings, default_token_count, sample_paths, tokenizer_counter
from steiner.synth.teachers import Job, OpenAISettings, OpenAITeacher, OracleTeacher, StepOut


@dataclass
class SynthConfig:
    shortcut: str = ""
    out: str = "runs/synth"
    teacher: str = "oracle"  # oracle | openai
    domain: str | None = None  # default: the records' "domain" field
    truncations: int = 3  # M truncation points per problem
    attempts: int = 4  # K recompletions per truncation point
    max_forward: int = 8  # steps a teacher (oracle or openai) may propose after a truncation point
    cluster_threshold: float = 0.25  # cosine distance (text domains only)
    step_separator: str = "\n"  # splits a text domain's chain of thought into steps
    tokenizer: str | None = None  # count tokens with this HF tokenizer (default: approximate)
    seed: int = 0
    shard: str | None = None  # "i/N": this process handles problems i, i+N, i+2N, ...
    limit: int | None = None  # only the first N problems of the file
    chunk_size: int = 64
    workers: int = 1  # processes for the oracle teacher
    paths: PathSettings = field(default_factory=PathSettings)
    openai: OpenAISettings = field(default_factory=OpenAISettings)

    def _resumable(self) -> dict[str, Any]:
        """What must match for a re-run to continue a run: not the worker count, the output
        directory, the chunk size or the teacher's concurrency."""
        d = asdict(self)
        for k in ("workers", "out", "chunk_size"):
            d.pop(k)
        d["openai"].pop("concurrency")
        # OpenAISettings once kept its own copy of max_forward, always equal to this one;
        # journals record it, so it stays in the record for them to keep resuming
        d["openai"]["max_forward"] = self.max_forward
        return d

    def resume_settings(self) -> dict[str, Any]:
        """The settings a re-run must match, flat (``paths.p_wrong``) and as JSON gives them
        back, so that they compare equal with the journal's copy."""
        flat: dict[str, Any] = {}
        for key, value in self._resumable().items():
            if isinstance(value, dict):
                flat.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                flat[key] = value
        return json.loads(json.dumps(flat))

    def fingerprint(self) -> str:
        """A hash of those settings: journals written before they kept the settings
        themselves are matched by it alone."""
        d = self._resumable()
        if d["limit"] is None:  # so runs from before the field existed still resume
            d.pop("limit")
        if d["paths"]["revisit_dead"] == 0:  # the same for this one
            d["paths"].pop("revisit_dead")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def parse_shard(shard: str | None) -> tuple[int, int]:
    if not shard:
        return 0, 1
    try:
        i, n = (int(x) for x in shard.split("/"))
    except ValueError:
        raise InputError("--shard", None, f"expected i/N, got {shard!r}") from None
    if not 0 <= i < n:
        raise InputError("--shard", None, f"expected 0 <= i < N, got {shard!r}")
    return i, n


def output_paths(cfg: SynthConfig) -> dict[str, Path]:
    i, n = parse_shard(cfg.shard)
    suffix = f"-{i:05d}-of-{n:05d}" if n > 1 else ""
    out = Path(cfg.out)
    return {
        "dags": out / f"dags{suffix}.jsonl",
        "paths": out / f"paths{suffix}.jsonl",
        "stats": out / f"stats{suffix}.json",
        "journal": out / f".journal{suffix}.jsonl",
    }


def plan_jobs(problem: dict[str, Any], cfg: SynthConfig) -> list[Job]:
    """M truncation points (kept-step counts, sampled without replacement) x K attempts."""
    steps = problem["steps"]
    rng = random.Random(derived_seed(cfg.seed, problem["id"], "cuts"))
    cuts = sorted(rng.sample(range(len(steps)), min(cfg.truncations, len(steps))))
    return [
        Job(problem, steps[:cut], derived_seed(cfg.seed, problem["id"], cut, k))
        for cut in cuts
        for k in range(cfg.attempts)
    ]


def shortcut_steps(domain: Domain, problem: dict[str, Any]) -> list[StepOut]:
    return [
        StepOut(text, after, status, content)
        for text, _, after, status, content in walk_shortcut(domain, problem)
    ]


def build_problem_dag(
    domain: Domain,
    problem: dict[str, Any],
    jobs: list[Job],
    results: list[list[StepOut] | None],
    threshold: float,
) -> Dag:
    shortcut = shortcut_steps(domain, problem)
    attempts = [shortcut] + [
        shortcut[: len(job.prefix)] + cont
        for job, cont in zip(jobs, results, strict=True)
        if cont is not None
    ]
    keys = [[domain.state_key(s.state) for s in a] for a in attempts]
    if all(k is not None for ks in keys for k in ks):
        clusters = keys
    else:
        flat = cluster_texts([s.text for a in attempts for s in a], threshold)
        it = iter(flat)
        clusters = [[next(it) for _ in a] for a in attempts]
    observations = [
        [Observation(c, s.text, k, s.status, s.content) for s, c, k in zip(a, cs, ks, strict=True)]
        for a, cs, ks in zip(attempts, clusters, keys, strict=True)
    ]
    root_key = domain.state_key(domain.start_state(problem))
    return build_dag(str(problem["id"]), problem["question"], observations, root_key)


def process_chunk(
    cfg: SynthConfig, problems: list[dict[str, Any]], teacher: Any = None
) -> dict[str, Any]:
    """DAG lines, path lines and counts for a chunk of problems (runs in a worker process)."""
    domain = get_domain(cfg.domain or problems[0]["domain"])
    if teacher is None:
        teacher = OracleTeacher(domain, cfg.max_forward)
    count = tokenizer_counter(cfg.tokenizer) if cfg.tokenizer else default_token_count
    plans = [plan_jobs(p, cfg) for p in problems]
    results = teacher.continue_all([j for jobs in plans for j in jobs])
    dag_lines, path_lines = [], []
    stats: Counter[str] = Counter()
    backtracks: Counter[int] = Counter()
    pos = 0
    for problem, jobs in zip(problems, plans, strict=True):
        res = results[pos : pos + len(jobs)]
        pos += len(jobs)
        stats["failed_attempts"] += sum(r is None for r in res)
        dag = build_problem_dag(domain, problem, jobs, res, cfg.cluster_threshold)
        dag_lines.append(json.dumps(dag.to_record()))
        stats["dags"] += 1
        stats["nodes"] += len(dag.nodes)
        stats["dead_end_nodes"] += sum(n.d_e is None for n in dag.nodes)
        rng = random.Random(derived_seed(cfg.seed, problem["id"], "paths"))
        paths, dropped = sample_paths(domain, problem, dag, rng, cfg.paths, count)
        for k, v in dropped.items():
            stats[f"dropped_{k}"] += v
        for rec in paths:
            path_lines.append(json.dumps(rec, ensure_ascii=False))
            stats["paths"] += 1
            stats["steps"] += rec["n_steps"]
            stats["reasoning_tokens"] += rec["reasoning_tokens"]
            stats["total_tokens"] += rec["total_tokens"]
            backtracks[rec["n_backtracks"]] += 1
    return {
        "dags": "".join(line + "\n" for line in dag_lines),
        "paths": "".join(line + "\n" for line in path_lines),
        "stats": dict(stats),
        "backtracks": {str(k): v for k, v in backtracks.items()},
        "faults": dict(teacher.faults),
        "fault_examples": dict(getattr(teacher, "fault_examples", {})),
        "requests": teacher.requests,
    }


def _read_journal(path: Path) -> list[dict[str, Any]]:
    entries = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a half-written last line: that chunk is redone
    return entries


def _append(path: Path, text: str) -> None:
    with path.open("a", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _process_chunk_star(args: tuple[SynthConfig, list[dict[str, Any]]]) -> dict[str, Any]:
    return process_chunk(*args)


def _default_sigterm() -> None:
    # the pool ends its forked workers with SIGTERM; the CLI's handler (an exception, so that
    # the main process unwinds) would have them unwind through the pool's own machinery
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


PROBLEMS_KEY = "problems_sha256"  # of the problems done so far, in the journal's lines


def problems_digest(problems: list[dict[str, Any]], digest: Any = None) -> Any:
    """A running SHA-256 over problem records. Resume checks the problems a journal has done
    against the file's first ones, not the file's path, as eval does with its questions."""
    digest = hashlib.sha256() if digest is None else digest
    for problem in problems:
        digest.update(json.dumps(problem, sort_keys=True, ensure_ascii=False).encode() + b"\n")
    return digest


def _hex(digest: Any) -> str:
    return digest.hexdigest()[:16]


def run_synth(cfg: SynthConfig, progress: Any = None) -> dict[str, Any]:
    """Run (or resume) synthesis; returns the stats written to stats.json."""
    problems = load_shortcuts(cfg.shortcut, cfg.domain, cfg.step_separator)
    if not problems:
        raise InputError(cfg.shortcut, None, "no records")
    # before anything is written: a later check left empty output files behind
    if cfg.teacher not in ("oracle", "openai"):
        raise InputError("--teacher", None, f"expected oracle or openai, got {cfg.teacher!r}")
    if cfg.teacher == "oracle" and (cfg.domain or problems[0]["domain"]) == "text":
        # the oracle proposes no step without a solver: every DAG was the shortcut alone
        raise InputError(
            "--teacher",
            None,
            "the oracle needs a solver and text records have none; expected --teacher openai",
        )
    if cfg.teacher == "openai":
        cfg.openai.check()
    i, n = parse_shard(cfg.shard)
    problems = problems[: cfg.limit][i::n]
    if cfg.tokenizer:
        tokenizer_counter(cfg.tokenizer)  # a bad name is one error line before any file is made
    files = output_paths(cfg)
    # one lock per shard: shards of one --out run side by side
    with sole_writer(cfg.out, "--out", files["journal"].with_suffix(".lock").name):
        return synthesize(cfg, problems, files, progress)


def synthesize(
    cfg: SynthConfig, problems: list[dict[str, Any]], files: dict[str, Path], progress: Any
) -> dict[str, Any]:
    """``run_synth`` on its shard's problems, holding the shard's files."""
    journal = _read_journal(files["journal"])
    fingerprint, settings = cfg.fingerprint(), cfg.resume_settings()
    # a run that finished no chunk (one that stopped on an unreachable teacher, say) holds
    # nothing to protect: it starts over with this command's settings
    if journal and journal[-1]["done"] > 0:
        if "settings" in journal[0]:
            defaults = SynthConfig().resume_settings()
            stored, wanted = journal[0]["settings"], settings
            if PROBLEMS_KEY in journal[0]:
                # the problems themselves are checked below, not the file's path: a moved
                # file resumes
                stored = {k: v for k, v in stored.items() if k != "shortcut"}
                wanted = {k: v for k, v in wanted.items() if k != "shortcut"}
            differences = settings_differences(stored, wanted, defaults)
        else:
            same = journal[0].get("fingerprint") == fingerprint
            differences = "" if same else "its journal, from an older Steiner, names none"
        if differences:
            raise InputError(
                files["journal"],
                1,
                f"this directory holds a run with other settings ({differences}); use a new --out",
            )
    else:
        for key in ("dags", "paths", "journal"):
            files[key].write_bytes(b"")
        first = {
            "fingerprint": fingerprint,
            "settings": settings,
            PROBLEMS_KEY: _hex(problems_digest([])),
        }
        _append(
            files["journal"],
            json.dumps(first | {"done": 0, "dags_bytes": 0, "paths_bytes": 0}) + "\n",
        )
        journal = _read_journal(files["journal"])
    last = journal[-1]
    for key in ("dags", "paths"):  # drop whatever a crash left after the last journalled chunk
        with files[key].open("r+b") as fh:
            fh.truncate(last[f"{key}_bytes"])
    done = last["done"]
    # journals from before the digest carry none: their shortcut path was compared instead
    digest = problems_digest(problems[:done]) if PROBLEMS_KEY in journal[0] else None
    if digest is not None and last.get(PROBLEMS_KEY) != _hex(digest):
        shard = f" (shard {cfg.shard})" if parse_shard(cfg.shard)[1] > 1 else ""
        raise InputError(
            files["journal"],
            len(journal),
            f"the {done} problems done here are not the first {done} of {cfg.shortcut}"
            f"{shard}: the file changed since; use a new --out",
        )
    todo = list(chunks(problems[done:], cfg.chunk_size))
    if progress is not None:
        progress(done, len(problems))

    teacher = None
    if cfg.teacher == "openai":
        domain = get_domain(cfg.domain or problems[0]["domain"])
        teacher = OpenAITeacher(
            domain, cfg.openai, Path(cfg.out) / "teacher-cache", cfg.max_forward
        )

    def results() -> Iterator[dict[str, Any]]:
        if teacher is None and cfg.workers > 1:
            import multiprocessing as mp

            with mp.get_context("fork").Pool(cfg.workers, _default_sigterm) as pool:
                yield from pool.imap(_process_chunk_star, [(cfg, c) for c in todo])
        else:
            for c in todo:
                yield process_chunk(cfg, c, teacher)

    requests = 0
    for chunk, result in zip(todo, results(), strict=True):
        if teacher is not None:  # the openai teacher's counts accumulate across chunks
            if not teacher.replies and teacher.faults:
                # a teacher that answers nothing is a setup error, not data: the chunk's DAGs
                # would all be the bare shortcuts, kept for good by the journal
                faults = ", ".join(f"{k}: {v}" for k, v in sorted(teacher.faults.items()))
                most = teacher.faults.most_common(1)[0][0]
                said = teacher.fault_examples.get(most)
                said = f"; {most}: {said}" if said else ""
                raise InputError(
                    "--base-url",
                    None,
                    f"the teacher at {cfg.openai.base_url} answered none of the "
                    f"{sum(teacher.faults.values())} calls for problems {done + 1}-"
                    f"{done + len(chunk)} ({faults}{said}); check --base-url, --model and "
                    "--api-key-env (cached failures: --retry-failed)",
                )
            result["faults"] = dict(teacher.faults)
            result["fault_examples"] = dict(teacher.fault_examples)
            result["requests"] = teacher.requests
            teacher.faults.clear()
            teacher.fault_examples.clear()
            teacher.requests = teacher.replies = 0
        _append(files["dags"], result["dags"])
        _append(files["paths"], result["paths"])
        done += len(chunk)
        entry = {
            "fingerprint": fingerprint,
            "done": done,
            **({PROBLEMS_KEY: _hex(problems_digest(chunk, digest))} if digest is not None else {}),
            "dags_bytes": files["dags"].stat().st_size,
            "paths_bytes": files["paths"].stat().st_size,
            "stats": result["stats"],
            "backtracks": result["backtracks"],
            "faults": result["faults"],
            "fault_examples": result["fault_examples"],
            "requests": result["requests"],
        }
        _append(files["journal"], json.dumps(entry) + "\n")
        requests += result["requests"]
        if progress is not None:
            progress(done, len(problems))

    stats = summarize(_read_journal(files["journal"]), len(problems))
    write_json(files["stats"], stats, sort_keys=True)
    # requests made by this invocation describe the run, not the files: not in stats.json
    return {**stats, "requests": requests}


def summarize(journal: list[dict[str, Any]], n_problems: int) -> dict[str, Any]:
    total: Counter[str] = Counter()
    backtracks: Counter[str] = Counter()
    faults: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for e in journal[1:]:
        total.update(e["stats"])
        backtracks.update(e["backtracks"])
        faults.update(e["faults"])
        for kind, said in e.get("fault_examples", {}).items():  # journals from before: none
            examples[kind] = min(examples.get(kind, said), said)
    paths = total["paths"] or 1
    return {
        "problems": n_problems,
        "dags": total["dags"],
        "paths": total["paths"],
        "mean_nodes_per_dag": round(total["nodes"] / (total["dags"] or 1), 3),
        "dead_end_nodes": total["dead_end_nodes"],
        "mean_reasoning_tokens": round(total["reasoning_tokens"] / paths, 3),
        "mean_total_tokens": round(total["total_tokens"] / paths, 3),
        "mean_steps": round(total["steps"] / paths, 3),
        "backtrack_histogram": dict(sorted(backtracks.items(), key=lambda kv: int(kv[0]))),
        "dropped": {
            k.removeprefix("dropped_"): v
            for k, v in sorted(total.items())
            if k.startswith("dropped_")
        },
        "failed_attempts": total["failed_attempts"],
        "teacher_faults": dict(sorted(faults.items())),
        "teacher_fault_examples": dict(sorted(examples.items())),
    }
