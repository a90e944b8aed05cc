"""The ``steiner`` command: one verb per pipeline stage (see DESIGN.md)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
import types
import typing
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from steiner import format as fmt
from steiner.domains import countdown
from steiner.io import (
    MAX_SEED,
    InputError,
    chat_record,
    check_http_url,
    check_output_dir,
    check_output_file,
    end_with_parent,
    expand_user,
    keep_freed_heap,
    source_rows,
    write_jsonl,
    write_lines,
)

app = typer.Typer(
    help="Steiner: train language models that search inside one context.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
countdown_app = typer.Typer(
    help="The countdown domain: generate and solve problems.", no_args_is_help=True
)
graph_app = typer.Typer(
    help="The graph domain: path-finding in described graphs (path-star).", no_args_is_help=True
)
format_app = typer.Typer(help="The 14-token reasoning format.", no_args_is_help=True)
app.add_typer(countdown_app, name="countdown")
app.add_typer(graph_app, name="graph")
app.add_typer(format_app, name="format")

console = Console(stderr=True)
# typer checks the range (io.MAX_SEED), so a bad seed is one error line before any stage runs
Seed = Annotated[
    int, typer.Option(min=0, max=MAX_SEED, help="Random seed; the same seed gives the same files.")
]
EvalDomain = Annotated[
    str | None, typer.Option(help="countdown | graph | text | mcq (default: from records).")
]
out = Console()


def local_main_process() -> bool:
    """Under torchrun or ``accelerate launch`` every process runs the command; the first on
    each machine draws the bar and prints the summaries, as Trainer's own bar does."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        # off a terminal (a log file, a pipe) rich draws no bar, only a blank line at the end,
        # which would stand above an error's one line
        disable=not console.is_terminal or not local_main_process(),
    )


def options_from_config(ctx: typer.Context, path: Path | None) -> Path | None:
    """``--config FILE.yaml`` for a command's options, as the train stages take one: each key
    is an option's name (``max_forward`` or ``max-forward``) and gives it a value where the
    command line does not (click's ``default_map``: flag > file > default). Each value is
    checked here, strictly and with its line in the file: typer's own conversion would take
    ``true`` as 1, 2.5 as 2 and a list as its text."""
    if path is None:
        return None
    path = expand_user(path)
    import yaml

    try:
        given, lines = read_yaml_with_lines(path)
    except OSError as exc:
        raise InputError(path, None, f"cannot open: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise InputError(path, None, "not UTF-8 text; expected a YAML mapping of options") from None
    except yaml.YAMLError as exc:
        raise invalid_yaml(exc, str(path), "options") from None
    if given is None:
        return path  # an empty file sets nothing
    if not isinstance(given, dict):
        raise InputError(path, None, f"expected a mapping of options, got {type(given).__name__}")
    params = {p.name: p for p in ctx.command.params if p.name not in ("config", "help")}
    defaults: dict[str, Any] = {}

    def eager_first(item: tuple[Any, Any]) -> bool:
        # an eager option's value first, as click reads it first: --base-url's turns
        # --model's directory check off
        return not getattr(params.get(str(item[0]).replace("-", "_")), "is_eager", False)

    for key, value in sorted(given.items(), key=eager_first):
        line = lines.get(key)
        name = str(key).replace("-", "_")
        param = params.get(name)
        if param is None:
            import difflib

            near = difflib.get_close_matches(name, params, n=1)
            hint = f"did you mean '{near[0]}'? " if near else ""
            raise InputError(
                path, line, f"unknown option '{key}'; {hint}`{ctx.command_path} --help` lists them"
            )
        if value is None:
            continue  # null: the option's default
        kind = param.type_descriptor.annotation
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:  # text and paths: a YAML number is its text
            ok = isinstance(value, (str, int, float)) and not isinstance(value, bool)
            value = str(value) if ok else value
        if not ok:
            expected = {bool: "true or false", int: "an integer", float: "a number"}
            raise InputError(
                path,
                line,
                f"option '{key}': expected {expected.get(kind, 'a string')}, "
                f"got {json.dumps(value, default=str)}",
            )
        try:
            param.process_value(ctx, value)  # the flag's own checks: ranges, paths, callbacks
        except typer.TyperException as exc:  # BadParameter's message, without its flag
            message = getattr(exc, "message", None) or str(exc)
            raise InputError(path, line, f"option '{key}': {message}") from None
        defaults[name] = value
        if param.is_eager:
            ctx.params.setdefault(name, value)  # for the callbacks checked after it
    ctx.default_map = (ctx.default_map or {}) | defaults
    return path


# each path option takes expand_user as its callback: typer has no path type to extend, and a
# callback runs on the flag's, the config file's and the default's value alike

# each command with a recipe's worth of options takes its values from a YAML file as well
ConfigFile = Annotated[
    Path | None,
    typer.Option(
        "--config",
        is_eager=True,  # read before the other options, so that they find its values
        callback=options_from_config,
        help="YAML file of option values (max_forward: 4); a flag given here overrides it.",
    ),
]


def write_generated(
    out_path: Path, problems: Any, count: int, to_shortcut: Any, shortcut: bool
) -> int:
    """Write generated problems (as shortcut records with ``shortcut``) under a progress bar;
    returns how many were written."""
    check_output_file(out_path, "--out")
    with progress_bar() as bar:
        task = bar.add_task("generating", total=count)

        def records():
            for problem in problems:
                bar.advance(task)
                yield to_shortcut(problem) if shortcut else problem

        return write_jsonl(out_path, records())


@countdown_app.command("generate")
def countdown_generate(
    out_path: Annotated[
        Path, typer.Option("--out", help="Output JSONL file.", callback=expand_user)
    ],
    count: Annotated[int, typer.Option(min=1, help="How many problems.")] = 1000,
    n_numbers: Annotated[int, typer.Option(min=2, max=6, help="Numbers per problem.")] = 4,
    min_number: Annotated[int, typer.Option(min=1)] = 1,
    max_number: Annotated[int, typer.Option(min=1)] = 50,
    min_target: Annotated[int, typer.Option(min=0)] = 10,
    max_target: Annotated[int, typer.Option(min=0)] = 100,
    seed: Seed = 0,
    shortcut: Annotated[
        bool, typer.Option("--shortcut", help="Add the steps of one solution.")
    ] = False,
) -> None:
    """Generate solvable countdown problems (optionally as shortcut records)."""
    if min_number > max_number or min_target > max_target:
        raise typer.BadParameter("empty number or target range")
    start = time.perf_counter()
    problems = countdown.generate_problems(
        count, n_numbers, min_number, max_number, min_target, max_target, seed
    )
    try:
        n = write_generated(out_path, problems, count, countdown.shortcut_record, shortcut)
    except ValueError as exc:  # ranges that reach no target
        raise typer.BadParameter(str(exc)) from None
    console.print(
        f"wrote {n} {'shortcut records' if shortcut else 'problems'} to {escape(str(out_path))} "
        f"in {time.perf_counter() - start:.1f}s (seed {seed})"
    )


# a negative number is a bad number, not an unknown option: the solver's own check says why
@countdown_app.command("solve", context_settings={"ignore_unknown_options": True})
def countdown_solve(
    numbers: Annotated[list[int], typer.Argument(help="The numbers, e.g. 3 7 25 50.")],
    target: Annotated[int, typer.Option(help="The number to reach.")],
    limit: Annotated[
        int, typer.Option(min=0, help="Print at most this many solutions (0: all).")
    ] = 20,
) -> None:
    """Print the distinct solutions of one countdown problem."""
    if len(numbers) > countdown.MAX_NUMBERS or min(numbers) < 0:
        raise typer.BadParameter(
            f"expected 1 to {countdown.MAX_NUMBERS} non-negative numbers "
            "(the exact solver's cost grows factorially)",
            param_hint="'NUMBERS...'",
        )
    solutions = countdown.all_solutions(numbers, target)
    if not solutions:
        out.print(f"{' '.join(map(str, numbers))} -> {target}: no solution")
        raise typer.Exit(1)
    shown = solutions if limit == 0 else solutions[:limit]
    for steps in shown:
        out.print(
            f"{', '.join(map(str, steps))}    [{countdown.solution_expression(numbers, steps)}]"
        )
    out.print(
        f"{len(solutions)} distinct solution(s)"
        + (f", {len(shown)} shown" if len(shown) < len(solutions) else "")
    )


@graph_app.command("generate")
def graph_generate(
    out_path: Annotated[
        Path, typer.Option("--out", help="Output JSONL file.", callback=expand_user)
    ],
    count: Annotated[int, typer.Option(min=1, help="How many problems.")] = 1000,
    degree: Annotated[int, typer.Option(min=1, help="Arms of the star (D).")] = 3,
    arm_length: Annotated[int, typer.Option(min=1, help="Nodes per arm (L).")] = 4,
    nodes: Annotated[int, typer.Option(min=2, help="Node labels are drawn from 0..N-1.")] = 60,
    kind: Annotated[str, typer.Option(help="star (path-star) | dag (random DAG).")] = "star",
    step: Annotated[str, typer.Option(help="A step follows one arm or one edge.")] = "arm",
    compact: Annotated[
        bool, typer.Option("--compact", help="Few-token step texts for tiny models.")
    ] = False,
    extra_edge_prob: Annotated[
        float, typer.Option(min=0, max=1, help="dag: chance of each extra forward edge.")
    ] = 0.1,
    seed: Seed = 0,
    shortcut: Annotated[
        bool, typer.Option("--shortcut", help="Add the steps of the shortest path.")
    ] = False,
) -> None:
    """Generate graph path-finding problems (optionally as shortcut records)."""
    from steiner.domains import graph

    if kind not in graph.KINDS:
        raise typer.BadParameter(f"--kind expects star or dag, got {kind!r}")
    if step not in graph.STEP_MODES:
        raise typer.BadParameter(f"--step expects arm or edge, got {step!r}")
    if 1 + degree * arm_length > nodes:
        raise typer.BadParameter(
            f"--nodes must be at least 1 + degree * arm-length = {1 + degree * arm_length}"
        )
    start = time.perf_counter()
    style = "compact" if compact else "verbose"
    problems = graph.generate_problems(
        count, degree, arm_length, nodes, kind, seed, step, style, extra_edge_prob
    )
    n = write_generated(out_path, problems, count, graph.shortcut_record, shortcut)
    console.print(
        f"wrote {n} {'shortcut records' if shortcut else 'problems'} ({kind}, D={degree}, "
        f"L={arm_length}, N={nodes}) to {escape(str(out_path))} "
        f"in {time.perf_counter() - start:.1f}s (seed {seed})"
    )


@format_app.command("check")
def format_check(
    path: Annotated[
        str,
        typer.Argument(
            help="Chat records ({'messages': [...]}, or TRL's prompt/completion): a "
            "JSONL/JSON/Parquet file, or a datasets name or directory (its train split).",
            callback=expand_user,
        ),
    ],
    max_errors: Annotated[int, typer.Option(min=0, help="List at most this many errors.")] = 50,
) -> None:
    """Validate the reasoning format of every assistant message; exit 1 on any error."""
    traces = steps = backtracks = records = 0
    errors: list[str] = []
    for line, rec in source_rows(path, "train"):
        records += 1
        chat = chat_record(rec, path, line)
        for msg in chat.messages:
            if msg.role != "assistant":
                continue
            trace, problems = fmt.parse(msg.content)
            traces += 1
            steps += trace.n_steps
            backtracks += trace.n_backtracks
            msgs = [f"offset {e.offset}: {e.message}" for e in problems]
            if trace.finished and not trace.answer:
                msgs.append("empty final answer")
            errors += [f"{path}:{line}: {m}" for m in msgs]
    if not traces:  # a check of nothing is not a pass
        found = f"{records} record(s) without one" if records else "no records"
        raise InputError(path, None, f"no assistant message to check ({found})")
    for e in errors[:max_errors]:
        print(e)  # plain lines, never wrapped: they are meant for grep and editors
    if len(errors) > max_errors:
        print(f"... and {len(errors) - max_errors} more")
    table = Table(title=f"format check: {escape(str(path))}")
    for col in ("records", "traces", "steps", "backtracks", "errors"):
        table.add_column(col, justify="right")
    table.add_row(*map(str, (records, traces, steps, backtracks, len(errors))))
    console.print(table)
    if errors:
        raise typer.Exit(1)


def unescape_separator(text: str) -> str:
    """``--step-separator`` as typed, with backslash escapes read (``\\n`` is a newline).
    Characters past Latin-1 are escaped first: ``unicode_escape`` reads bytes as Latin-1, so
    UTF-8 bytes of "。" came back as three other characters."""
    try:
        separator = text.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError as exc:  # a lone backslash at the end, \x without hex digits
        raise typer.BadParameter(
            f"{exc.reason} in '{text}'", param_hint="--step-separator"
        ) from None
    if not separator:
        raise typer.BadParameter("expected a non-empty string", param_hint="--step-separator")
    return separator


@app.command("synth")
def synth(
    shortcut: Annotated[
        str,
        typer.Option(
            help="Shortcut records: a JSONL/JSON/Parquet file or a datasets name/dir.",
            callback=expand_user,
        ),
    ],
    out: Annotated[Path, typer.Option(help="Output directory.", callback=expand_user)] = Path(
        "runs/synth"
    ),
    teacher: Annotated[
        str, typer.Option(help="oracle (offline, needs a solver) or openai.")
    ] = "oracle",
    domain: Annotated[
        str | None, typer.Option(help="countdown | graph | text (default: from records).")
    ] = None,
    truncations: Annotated[int, typer.Option(min=1, help="M truncation points per problem.")] = 3,
    attempts: Annotated[int, typer.Option(min=1, help="K recompletions per truncation point.")] = 4,
    max_forward: Annotated[int, typer.Option(min=1, help="Steps a teacher proposes.")] = 8,
    paths_per_dag: Annotated[int, typer.Option(min=1)] = 5,
    p_wrong: Annotated[
        float, typer.Option(min=0, max=1, help="Chance to take a wrong branch.")
    ] = 0.5,
    branch_choice: Annotated[
        str,
        typer.Option(help="p_wrong | uniform (pick among untried branches, dead or alive)."),
    ] = "p_wrong",
    verify_after_answer: Annotated[
        float,
        typer.Option(min=0, max=1, help="Chance a path tries the other branches after success."),
    ] = 0.0,
    return_to_answer: Annotated[
        bool,
        typer.Option(help="A verifying path then walks the answer's branch again, ending on it."),
    ] = False,
    return_again: Annotated[
        float,
        typer.Option(min=0, max=1, help="Chance of each further return (up to --max-returns)."),
    ] = 0.0,
    max_returns: Annotated[int, typer.Option(min=1)] = 3,
    revisit_dead: Annotated[
        float,
        typer.Option(min=0, max=1, help="Chance a return first walks a tried dead branch again."),
    ] = 0.0,
    max_detours: Annotated[int, typer.Option(min=0)] = 2,
    max_detour_depth: Annotated[int, typer.Option(min=1)] = 3,
    max_reasoning_tokens: Annotated[int, typer.Option(min=1)] = 4096,
    max_total_tokens: Annotated[int, typer.Option(min=1)] = 8192,
    tokenizer: Annotated[
        str | None, typer.Option(help="HF tokenizer dir for token counts.", callback=expand_user)
    ] = None,
    cluster_threshold: Annotated[
        # cosine distance runs from 0 (same direction) to 2 (opposite)
        float, typer.Option(min=0.0, max=2.0, help="Cosine distance (text domains).")
    ] = 0.25,
    step_separator: Annotated[str, typer.Option(help="Splits a text chain of thought.")] = "\n",
    seed: Seed = 0,
    shard: Annotated[
        str | None, typer.Option(help="i/N: handle every N-th problem from i.")
    ] = None,
    limit: Annotated[
        int | None, typer.Option(min=1, help="Only the first N problems of the file.")
    ] = None,
    chunk_size: Annotated[int, typer.Option(min=1, help="Problems per atomic write.")] = 64,
    workers: Annotated[int, typer.Option(min=1, help="Processes (oracle teacher).")] = 1,
    base_url: Annotated[
        str, typer.Option(help="openai teacher: endpoint.")
    ] = "http://127.0.0.1:8000/v1",
    model: Annotated[str, typer.Option(help="openai teacher: model name.")] = "default",
    api_key_env: Annotated[
        str, typer.Option(help="openai teacher: env var with the key.")
    ] = "OPENAI_API_KEY",
    concurrency: Annotated[
        int, typer.Option(min=1, help="openai teacher: requests in flight.")
    ] = 8,
    timeout: Annotated[float, typer.Option(help="openai teacher: seconds per request.")] = 60.0,
    max_retries: Annotated[int, typer.Option(min=0, help="openai teacher: retries (backoff).")] = 3,
    temperature: Annotated[float, typer.Option(help="openai teacher: sampling temperature.")] = 0.7,
    cache_dir: Annotated[
        str | None, typer.Option(help="openai teacher: reply cache.", callback=expand_user)
    ] = None,
    retry_failed: Annotated[
        bool, typer.Option(help="openai teacher: re-ask cached failures.")
    ] = False,
    config: ConfigFile = None,
) -> None:
    """Truncate-and-recomplete synthesis: DAGs, backtracking paths and stats (resumable)."""
    from steiner.synth.paths import PathSettings
    from steiner.synth.run import SynthConfig, output_paths, run_synth
    from steiner.synth.teachers import OpenAISettings

    if branch_choice not in ("p_wrong", "uniform"):
        raise typer.BadParameter(
            f"--branch-choice expects p_wrong or uniform, got {branch_choice!r}"
        )
    cfg = SynthConfig(
        shortcut=shortcut,
        out=str(out),
        teacher=teacher,
        domain=domain,
        truncations=truncations,
        attempts=attempts,
        max_forward=max_forward,
        cluster_threshold=cluster_threshold,
        step_separator=unescape_separator(step_separator),
        tokenizer=tokenizer,
        seed=seed,
        shard=shard,
        limit=limit,
        chunk_size=chunk_size,
        workers=workers,
        paths=PathSettings(
            paths_per_dag=paths_per_dag,
            p_wrong=p_wrong,
            branch_choice=branch_choice,
            verify_after_answer=verify_after_answer,
            return_to_answer=return_to_answer,
            return_again=return_again,
            max_returns=max_returns,
            revisit_dead=revisit_dead,
            max_detours=max_detours,
            max_detour_depth=max_detour_depth,
            max_reasoning_tokens=max_reasoning_tokens,
            max_total_tokens=max_total_tokens,
        ),
        openai=OpenAISettings(
            base_url=base_url,
            model=model,
            api_key_env=api_key_env,
            concurrency=concurrency,
            timeout=timeout,
            max_retries=max_retries,
            temperature=temperature,
            cache_dir=cache_dir,
            retry_failed=retry_failed,
        ),
    )
    start = time.perf_counter()
    with progress_bar() as bar:
        task = bar.add_task("synth", total=None)

        def report(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        stats = run_synth(cfg, progress=report)
    elapsed = time.perf_counter() - start
    files = output_paths(cfg)
    table = Table(title=f"steiner synth: {escape(str(out))}")
    table.add_column("what")
    table.add_column("value", justify="right")
    for key in (
        "problems",
        "dags",
        "paths",
        "mean_nodes_per_dag",
        "mean_steps",
        "mean_reasoning_tokens",
        "failed_attempts",
        "requests",
    ):
        table.add_row(key, str(stats[key]))
    table.add_row(
        "backtracks (n: paths)",
        ", ".join(f"{k}: {v}" for k, v in stats["backtrack_histogram"].items()),
    )
    table.add_row("dropped", ", ".join(f"{k}: {v}" for k, v in stats["dropped"].items()))
    table.add_row(
        "teacher faults",
        ", ".join(f"{k}: {v}" for k, v in stats["teacher_faults"].items()) or "none",
    )
    for kind, said in stats["teacher_fault_examples"].items():  # all in stats.json
        table.add_row(f"  e.g. {kind}", escape(shorten(said, 120)))
    rate = stats["paths"] / max(elapsed, 1e-9)  # a real teacher: well under one path a second
    digits = 0 if rate >= 10 else 2
    table.add_row("wall time", f"{elapsed:.1f}s ({rate:.{digits}f} paths/s this run)")
    names = (files[k].name for k in ("dags", "paths", "stats"))
    table.add_row("files", escape(", ".join(names)))
    console.print(table)
    if stats["dags"] and not stats["paths"]:
        # else the first word of it was `train sft`'s "no records" a stage later
        limits = {
            "reasoning_tokens": "--max-reasoning-tokens",
            "total_tokens": "--max-total-tokens",
        }
        over = [
            f"{n} over {flag}" for key, flag in limits.items() if (n := stats["dropped"].get(key))
        ]
        why = f" ({', '.join(over)})" if over else ""
        console.print(f"[bold yellow]warning:[/] no path was kept from {stats['dags']} DAGs{why}")


dag_app = typer.Typer(help="Inspect step DAGs.", no_args_is_help=True)
app.add_typer(dag_app, name="dag")


def shorten(text: str, width: int) -> str:
    """At most ``width`` characters, a cut marked with an ellipsis (a question cut silently
    read as one with fewer edges)."""
    return text if len(text) <= width else text[: width - 1] + "…"


@dag_app.command("show")
def dag_show(
    path: Annotated[Path, typer.Argument(help="dags.jsonl", callback=expand_user)],
    problem_id: Annotated[
        str | None, typer.Option("--id", help="Problem id (without it: the ids there are).")
    ] = None,
    dot: Annotated[
        Path | None, typer.Option(help="Also write Graphviz DOT here.", callback=expand_user)
    ] = None,
) -> None:
    """Print one DAG as a tree (answers and dead ends marked); --dot writes Graphviz."""
    from rich.tree import Tree

    from steiner.dag import find_dag, read_dags

    if dot is not None:
        check_output_file(dot, "--dot")
    dag = find_dag(read_dags(path), problem_id) if problem_id is not None else None
    if dag is None:
        # say which ids there are: a user who has just run synth has not seen any
        ids = [d.problem_id for d in read_dags(path)]
        some = f"{len(ids)} DAG(s), e.g. {', '.join(map(repr, ids[:3]))}" if ids else "no DAGs"
        wanted = "expected --id" if problem_id is None else f"no DAG for id {problem_id!r}"
        raise InputError(path, None, f"{wanted}; the file has {some}")
    kids = dag.children()

    def label(node_id: int) -> str:
        n = dag.node(node_id)
        tag = (
            " [green]answer[/]"
            if n.status == "answer"
            else " [red]dead end[/]"
            if n.d_e is None
            else ""
        )
        text = n.key if n.key is not None else n.text
        stats = f"e_in={n.e_in} e_out={n.e_out} d_s={n.d_s} d_e={n.d_e}"
        return f"[bold]{node_id}[/] {escape(text)} [dim]({stats})[/]{tag}"

    shown: set[int] = set()

    def grow(tree: Tree, node_id: int) -> None:
        for child in kids[node_id]:
            if child in shown:
                tree.add(f"[dim]-> {child} (shown above)[/]")
                continue
            shown.add(child)
            grow(tree.add(label(child)), child)

    question = shorten(dag.node(dag.root).text, 80)
    root = Tree(f"[bold]{dag.root}[/] problem {escape(dag.problem_id)}: {escape(question)}")
    shown.add(dag.root)
    grow(root, dag.root)
    out.print(root)
    if dot is not None:
        lines = ["digraph dag {"]
        for n in dag.nodes:
            color = "green" if n.status == "answer" else "red" if n.d_e is None else "black"
            # DOT reads UTF-8 and has no \u escapes: JSON's ASCII form showed them as text
            label = json.dumps(shorten(n.key or n.text, 40), ensure_ascii=False)
            lines.append(f"  {n.id} [label={label}, color={color}];")
        lines += [f"  {u} -> {v};" for u, v in dag.edges]
        write_lines(dot, ["\n".join(lines + ["}"]) + "\n"])
        console.print(f"wrote {escape(str(dot))}")


train_app = typer.Typer(
    help="Training stages. Each takes --config FILE.yaml and any config field as a flag "
    "(`steiner train sft --help` lists them).",
    no_args_is_help=True,
)
app.add_typer(train_app, name="train")
_PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


def parse_stage_config(config_cls: type | tuple[type, ...], args: list[str], prog: str) -> Any:
    """Parse a stage's dataclass(es) from --config YAML and flags; errors become one line."""
    import yaml
    from trl import TrlParser

    class OneLineParser(TrlParser):
        def error(self, message: str):  # argparse would print usage and exit
            raise InputError(prog, None, message)

    classes = config_cls if isinstance(config_cls, tuple) else (config_cls,)
    # TRL finds the config file only as "--config FILE"; argparse users also write the "=" form
    args = [p for a in args for p in (a.split("=", 1) if a.startswith("--config=") else [a])]
    config = args[args.index("--config") + 1] if "--config" in args[:-1] else None
    hints = [_type_hints(cls) for cls in classes] if config else []
    try:
        given = check_config_file_values(config, hints) if config else {}
        parsed = OneLineParser(classes, prog=prog).parse_args_and_config(args=args)
    except ImportError as exc:  # a setting that needs a package (--deepspeed, and the like)
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        # transformers registers its DeepSpeed config before it finds the package missing; left
        # registered, every later from_pretrained in this process fails on it
        unset_hf_deepspeed_config()
        raise missing_package_error(str(exc), prog) from None
    except UnicodeDecodeError:  # a ValueError too, which named neither the file nor the fix
        message = "not UTF-8 text; expected a YAML mapping of config fields"
        raise InputError(config, None, message) from None
    except ValueError as exc:  # unknown flags, bad YAML keys, settings that do not go together
        fields = {f.name for cls in classes for f in dataclasses.fields(cls)}
        raise unknown_fields_error(str(exc), args, prog, fields) from None
    except OSError as exc:  # the --config file
        raise InputError(exc.filename, None, f"cannot open: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise invalid_yaml(exc, prog, "config fields") from None
    one_item_lists(given, hints, parsed)
    return parsed if isinstance(config_cls, tuple) else parsed[0]


def invalid_yaml(exc: Exception, fallback: str, of: str) -> InputError:
    """A YAML parse error as one line at its place in the file (``fallback`` where yaml
    gives none)."""
    mark = getattr(exc, "problem_mark", None)
    where = (mark.name, mark.line + 1) if mark else (fallback, None)
    problem = getattr(exc, "problem", None) or str(exc)
    return InputError(*where, f"invalid YAML: {problem}; expected a mapping of {of}")


def read_yaml_with_lines(path: str | Path) -> tuple[Any, dict[str, int]]:
    """A YAML file's document and, if it is a mapping, each key's line (1-based), for error
    lines that point into the file. yaml.safe_load's own steps, keeping the node tree; yaml
    reads the encoding, and its errors name the file."""
    import yaml

    with open(path, "rb") as fh:
        loader = yaml.SafeLoader(fh)
        try:
            root = loader.get_single_node()
            given = loader.construct_document(root) if root is not None else None
        finally:
            loader.dispose()
    if not isinstance(given, dict):
        return given, {}
    keys = [k for k, _ in root.value if isinstance(k, yaml.ScalarNode)]
    return given, {k.value: k.start_mark.line + 1 for k in keys}


def check_config_file_values(path: str, hints: list[dict[str, Any]]) -> dict[str, Any]:
    """The --config file's fields, each checked against its annotation (``hints``: each
    config class's). TRL's parser hands the
    YAML's values to argparse as defaults, and argparse converts and checks only string
    defaults: ``max_steps: true`` trained one step, ``max_steps: 2.5`` went on as a float, and
    ``output_dir: 2024`` ended in a TypeError traceback. A value of the wrong type is one error
    line, with its line in the file."""
    from pydantic import TypeAdapter, ValidationError

    given, lines = read_yaml_with_lines(path)
    if not isinstance(given, dict):
        return {}  # TRL's parser refuses it in its own words
    for key, value in given.items():
        hint = next((h[key] for h in hints if key in h), None)
        if isinstance(value, str) or not _plain(hint):  # argparse reads it, or not a value
            continue
        try:
            TypeAdapter(hint).validate_python(value, strict=True)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in (key, *err["loc"]) if not isinstance(p, type))
            got = json.dumps(value, default=str)
            message = f"field '{where}': {err['msg']}, got {got}"
            raise InputError(path, lines.get(key), message) from None
    return given


def one_item_lists(given: dict[str, Any], hints: list[dict[str, Any]], parsed: Any) -> None:
    """A --config string for a list field is a one-item list, as the flag gives: argparse
    left ``paths: walks.jsonl`` a string, read one file per character."""
    if not given:  # no --config, or an empty one (and then no hints)
        return
    for fields, config in zip(hints, parsed, strict=True):
        for key, value in given.items():
            listed = key in fields and typing.get_origin(_without_none(fields[key])) is list
            if listed and isinstance(value, str) and getattr(config, key, None) == value:
                setattr(config, key, [value])


def _plain(hint: Any) -> bool:
    """Whether a field's annotation is made of plain values (numbers, strings, booleans, None,
    lists and dicts of them, unions, literals): what a YAML value can be checked against.
    Other fields (the RL stage's ``weights``, a dataclass) have their own checks."""
    if hint in (int, float, bool, str, type(None)):
        return True
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return True
    if origin in (list, dict, typing.Union, types.UnionType):
        return all(_plain(a) for a in typing.get_args(hint))
    return False


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # annotations that do not resolve here: nothing to check
        return {}


def _without_none(hint: Any) -> Any:
    """``list[str]`` of ``list[str] | None``; the hint itself otherwise."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    return args[0] if is_union and len(args) == 1 else hint


def missing_package_error(message: str, prog: str) -> InputError:
    """transformers' words for a setting whose package is missing name it inside a sentence
    of pip advice, with a traceback: say which package, in one line."""
    import re

    found = re.search(r"'([A-Za-z0-9_.\-]+)[<>=!~]", message) or re.search(
        r"named '([\w.]+)'", message
    )
    if not found:
        return InputError(prog, None, " ".join(message.split()))
    package = found.group(1)
    return InputError(
        prog, None, f"a setting needs {package}, which is not installed (pip install {package})"
    )


# Flags of older transformers/TRL releases, still in many published recipes, and what takes
# their place now: (the field that does, how to write it), as TRL_SCRIPT_FIELDS below
RENAMED_FIELDS = {
    "warmup_ratio": (("warmup_steps", "warmup_steps (a value below 1 is a share of the steps)"),),
    "evaluation_strategy": (("eval_strategy", "eval_strategy"),),
    "max_seq_length": (("max_length", "max_length"),),
    "group_by_length": (("train_sampling_strategy", "train_sampling_strategy group_by_length"),),
    "no_cuda": (("use_cpu", "use_cpu"),),
    "per_gpu_train_batch_size": (("per_device_train_batch_size", "per_device_train_batch_size"),),
    "overwrite_output_dir": (
        ("resume", "no_resume (a stage goes on from the last checkpoint in output_dir by default)"),
    ),
}

# Fields of TRL's own scripts (`trl sft|grpo --config`: ModelConfig, ScriptArguments,
# GRPOConfig) that a stage names its own way, so a TRL recipe's YAML says what to rename:
# (a field a stage may have, how to write it), the first the stage has
TRL_SCRIPT_FIELDS = {
    "model_name_or_path": (("model", "model"),),
    "dataset_name": (("data", "data"), ("texts", "texts"), ("problems", "problems")),
    "dataset_config": (
        ("data", "data NAME:CONFIG"),
        ("texts", "texts NAME:CONFIG"),
        ("problems", "problems NAME:CONFIG"),
    ),
    "use_peft": (("use_lora", "use_lora"),),
    "num_generations": (("group_size", "group_size"),),
    # GRPO's batch counts completions; RL's step samples prompts_per_step x group_size
    "per_device_train_batch_size": (
        ("prompts_per_step", "prompts_per_step (a step samples it times group_size completions)"),
    ),
    "max_completion_length": (("max_new_tokens", "max_new_tokens"),),
}


def unknown_fields_error(message: str, args: list[str], prog: str, fields: set[str]) -> InputError:
    """TRL's words for unknown fields name its parser and its own API (``Please ... set
    `fail_with_unknown_args=False``); say instead which fields, where, and where the list
    is, and, for a field an older transformers or TRL had or a TRL script names otherwise,
    what takes its place among ``fields`` (the config's)."""
    import ast
    import re

    found = re.match(
        r"(Unknown arguments from config file|Some specified arguments)[^\[]*(\[.*\])", message
    )
    if not found:  # transformers' own checks write lists over several lines
        return InputError(prog, None, " ".join(message.split()))
    words = [str(a) for a in ast.literal_eval(found.group(2))]  # a list literal of TRL's
    names = [a for a in words if a.startswith("--")] or words  # flags, not their values
    in_file = found.group(1).startswith("Unknown")
    dashes = "" if in_file else "--"

    def uses(table: dict[str, tuple[tuple[str, str], ...]]) -> str:
        said = []
        for name in names:
            ours = table.get(name.lstrip("-").replace("-", "_"), ())
            how = next((how for field, how in ours if field in fields), None)
            if how:
                said.append(f"for {name.lstrip('-') if in_file else name} use {dashes}{how}")
        return "; ".join(said)

    hints = [
        f"{text} ({why})"
        for text, why in (
            (uses(RENAMED_FIELDS), "newer transformers and TRL renamed or dropped them"),
            (uses(TRL_SCRIPT_FIELDS), "Steiner's names for fields of TRL's scripts"),
        )
        if text
    ]
    hint = "; ".join([*hints, f"`{prog} --help` lists them"])
    if in_file:
        config = args[args.index("--config") + 1] if "--config" in args[:-1] else prog
        listed = ", ".join(n.lstrip("-") for n in names)
        return InputError(config, None, f"unknown config field(s) {listed}; {hint}")
    return InputError(prog, None, f"unknown option(s) {', '.join(names)}; {hint}")


def print_training_summary(summary: dict[str, Any], output_dir: str) -> None:
    if not local_main_process():
        return
    table = Table(title=f"steiner train {summary['stage']}: {escape(str(output_dir))}")
    table.add_column("what")
    table.add_column("value", justify="right")
    # examples whose prompt fills --max_length, which TRL leaves out
    dropped = ["examples_dropped"] if summary.get("examples_dropped") else []
    held_out = ["final_eval_loss"] if summary.get("final_eval_loss") is not None else []
    for key in (
        "examples",
        *dropped,
        "steps",
        "tokens_seen",
        "tokens_per_s",
        "first_loss",
        "final_loss",
        "mean_train_loss",  # the only loss of a run shorter than --logging_steps
        *held_out,
        "train_seconds",
        "resumed_from",
    ):
        value = summary[key]
        table.add_row(
            key,
            f"{value:.4f}" if isinstance(value, float) and "loss" in key else escape(str(value)),
        )
        if key == "examples" and summary.get("max_length") != summary.get("max_length_asked"):
            asked = summary.get("max_length_asked")
            table.add_row(
                "max_length", f"{summary['max_length']} (the model's positions; asked {asked})"
            )
    console.print(table)


@train_app.command("init", context_settings=_PASS_THROUGH, add_help_option=False)
def train_init(ctx: typer.Context) -> None:
    """Create a model: --preset tiny|small|base --data FILE --out DIR, or --from DIR."""
    from steiner.train.config import InitConfig
    from steiner.train.model import PRESETS, init_model

    cfg = parse_stage_config(InitConfig, ctx.args, "steiner train init")
    if cfg.preset not in PRESETS and not cfg.from_pretrained:
        raise InputError(
            "--preset", None, f"expected one of {', '.join(PRESETS)}, got {cfg.preset!r}"
        )
    if not cfg.from_pretrained and not cfg.data:
        raise InputError("--data", None, "a from-scratch model needs --data to train its tokenizer")
    summary = init_model(
        cfg.output_dir,
        cfg.preset,
        cfg.data,
        cfg.from_pretrained,
        cfg.vocab_size,
        cfg.split_digits,
        cfg.max_positions,
        cfg.seed,
    )
    console.print(
        f"{escape(summary['origin'])}: {summary['parameters']:,} parameters, vocabulary "
        f"{summary['vocab_size']}, saved to {escape(str(cfg.output_dir))}"
    )


@train_app.command("cpt", context_settings=_PASS_THROUGH, add_help_option=False)
def train_cpt(ctx: typer.Context) -> None:
    """Continual pre-training: --model DIR --paths paths.jsonl [--texts FILE] --output_dir DIR."""
    from steiner.train.config import CPTStageConfig
    from steiner.train.trainer import run_cpt

    cfg = parse_stage_config(CPTStageConfig, ctx.args, "steiner train cpt")
    print_training_summary(run_cpt(cfg), cfg.output_dir)


@train_app.command("sft", context_settings=_PASS_THROUGH, add_help_option=False)
def train_sft(ctx: typer.Context) -> None:
    """SFT on chat paths: --model DIR --data paths.jsonl --output_dir DIR [--shortcut]."""
    from steiner.train.config import SFTStageConfig
    from steiner.train.trainer import run_sft

    cfg = parse_stage_config(SFTStageConfig, ctx.args, "steiner train sft")
    print_training_summary(run_sft(cfg), cfg.output_dir)


@train_app.command("rl", context_settings=_PASS_THROUGH, add_help_option=False)
def train_rl(ctx: typer.Context) -> None:
    """RL with DAG step rewards: --model DIR --problems FILE --dags dags.jsonl --output_dir DIR."""
    from steiner.train.rewards import RewardWeights
    from steiner.train.rl import RLStageConfig, run_rl

    cfg, weights = parse_stage_config((RLStageConfig, RewardWeights), ctx.args, "steiner train rl")
    if cfg.weights != RewardWeights():
        # the config's field, set from the flat flags below: a --weights flag or a YAML
        # "weights:" mapping was parsed into it and then dropped without a word
        raise InputError(
            "--weights",
            None,
            "not a setting; give each reward weight as its own flag or YAML key (--correct 2)",
        )
    cfg.weights = weights
    with progress_bar() as bar:
        task = bar.add_task("rl", total=cfg.steps)

        def log(record: dict) -> None:
            bar.update(task, completed=record["step"])
            if not local_main_process():
                return
            if "resumed_from" in record:
                resumed = escape(str(record["resumed_from"]))
                console.print(f"resumed from {resumed} (step {record['step']})")
            elif record["step"] % 10 == 0 or record["step"] == cfg.steps:
                console.print({k: v for k, v in record.items() if k != "terms"})

        summary = run_rl(cfg, log=log)
    print_rl_summary(summary, cfg.output_dir)


def print_rl_summary(summary: dict[str, Any], output_dir: str) -> None:
    """The first and last fifth of the steps side by side (a resumed run's history holds the
    steps before it too)."""
    from steiner.evaluate.metrics import fifth, first_and_last_fifth

    if not local_main_process():
        return
    history = summary["history"]
    k = fifth(len(history))  # the columns' heading says what first_and_last_fifth averages
    table = Table(title=f"steiner train rl: {escape(str(output_dir))}")
    table.add_column("what")
    table.add_column(f"first {k} steps", justify="right")
    table.add_column(f"last {k} steps", justify="right")
    for key in ("mean_reward", "accuracy", "mean_steps", "mean_backtracks"):
        first, last = first_and_last_fifth(history, key)
        table.add_row(key, f"{first:.3f}", f"{last:.3f}")
    table.add_section()
    table.add_row("steps", str(history[-1]["step"]), "")
    table.add_row("train_seconds", str(summary["train_seconds"]), "")
    table.add_row("resumed_from", escape(str(summary["resumed_from"])), "")
    console.print(table)


def model_directory(ctx: typer.Context, path: Path) -> Path:
    """Checked when the command line is parsed: before a progress bar, a banner or a file.
    With ``--base-url`` (eval, scale) it is the name a server serves the model under."""
    from steiner.infer.generate import MADE_BY
    from steiner.io import check_model_dir

    if ctx.params.get("base_url"):  # read first: the option is eager
        return path

    # here, not with typer's exists=True, which checks before a callback can expand ~
    path = expand_user(path)
    if not path.exists():
        raise typer.BadParameter(f"dir '{path}' does not exist.")
    if not path.is_dir():
        raise typer.BadParameter(f"dir '{path}' is a file.")
    try:
        check_model_dir(str(path), "--model", MADE_BY, adapters=True)
    except InputError as exc:
        raise typer.BadParameter(exc.message) from None
    return path


# every command that loads a local model: typer checks the directory, so a wrong path is one
# error line instead of a hub lookup's traceback
ModelDirectory = Annotated[
    Path,
    typer.Option(
        help="Model directory (with --base-url: the served model's name).",
        callback=model_directory,
    ),
]
# eval and scale against a server instead of a local model (steiner.infer.remote)
BaseUrl = Annotated[
    str | None,
    typer.Option(
        is_eager=True,  # before --model, whose check it turns off
        help="An OpenAI-compatible server (steiner serve, or vllm serve with StepBudgetVLLM) "
        "that serves --model: http://host:8000/v1.",
    ),
]
ApiKeyEnv = Annotated[str, typer.Option(help="With --base-url: the API key's variable.")]


MaxStepTokens = Annotated[
    int | None,
    typer.Option(min=1, help="Close a step that grew this many tokens (the rest of it empty)."),
]


def top_p_share(value: float) -> float:
    # (0, 1] as serve, vLLM and the OpenAI API take it: 0 would keep no token
    if not 0 < value <= 1:
        raise typer.BadParameter(f"expected a share above 0 and at most 1, got {value}")
    return value


TopP = Annotated[
    float,
    typer.Option(
        callback=top_p_share, help="Nucleus sampling: the most likely tokens of this mass."
    ),
]
ExtendWith = Annotated[
    str,
    typer.Option(
        help="Below --min-steps: model (its choice of proceed or backtrack) | proceed | "
        "backtrack (forced)."
    ),
]


@app.command("generate")
def generate_cmd(
    model: ModelDirectory,
    question: Annotated[
        str, typer.Argument(help="The question (one user message); - reads it from stdin.")
    ],
    min_steps: Annotated[int, typer.Option(min=0)] = 0,
    max_steps: Annotated[int | None, typer.Option(min=1)] = None,
    max_reasoning_tokens: Annotated[int | None, typer.Option(min=1)] = None,
    max_step_tokens: MaxStepTokens = None,
    extend_with: ExtendWith = "model",
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 1024,
    temperature: Annotated[float, typer.Option(min=0)] = 0.0,
    top_p: TopP = 1.0,
    seed: Seed = 0,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the parsed trace as JSON.")
    ] = False,
) -> None:
    """Answer one question and print the reasoning as a tree (or --json)."""
    from rich.tree import Tree

    from steiner.format import Decision
    from steiner.infer.budget import Budget
    from steiner.infer.generate import count_prompt_tokens, generate, load, position_limit

    if question == "-":  # a long or multi-line question, piped or from a file
        question = sys.stdin.read().strip()
    if not question.strip():  # an unset shell variable, most likely: not worth a model load
        raise InputError("QUESTION", None, "expected a question, got empty text")
    budget = Budget.from_flags(
        min_steps, max_steps, max_reasoning_tokens, extend_with, max_step_tokens
    )
    m, tok = load(model)
    messages = [{"role": "user", "content": question}]
    # as serve refuses it: past the model's positions the answer was silently empty
    [prompt_tokens] = count_prompt_tokens(tok, [messages])
    positions = position_limit(m)
    if positions and prompt_tokens >= positions:
        raise InputError(
            "QUESTION",
            None,
            f"the prompt has {prompt_tokens} tokens and the model {positions} positions; "
            "expected a shorter question",
        )
    [done] = generate(
        m,
        tok,
        [messages],
        [budget],
        max_new_tokens,
        temperature,
        top_p,
        seed=seed,
    )
    if as_json:
        print(
            json.dumps(
                {
                    **done.trace.to_dict(),
                    "format_errors": done.format_errors,
                    "reasoning_tokens": done.reasoning_tokens,
                    "completion_tokens": done.completion_tokens,
                    "finish_reason": done.finish_reason,
                },
                ensure_ascii=False,
            )
        )
        return
    tree = Tree(f"[bold]{escape(question)}[/]")
    for i, step in enumerate(done.trace.steps):
        decision = done.trace.decisions[i] if i < len(done.trace.decisions) else None
        backtracked = decision is Decision.BACKTRACK
        node = tree.add(
            f"[bold {'red' if backtracked else 'cyan'}]{i + 1}. {escape(step.name)}[/]"
            + ("  [red]<- backtrack[/]" if backtracked else "")
        )
        node.add(f"[dim]summary:[/] {escape(step.summary)}")
        node.add(f"[dim]reflection:[/] {escape(step.reflection)}")
    tree.add(f"[bold green]answer:[/] {escape(done.answer)}")
    out.print(tree)
    console.print(
        f"{done.trace.n_steps} steps, {done.trace.n_backtracks} backtracks, "
        f"{done.reasoning_tokens} reasoning tokens, {len(done.format_errors)} format errors"
    )


@app.command("serve")
def serve_cmd(
    model: ModelDirectory,
    host: Annotated[str, typer.Option(help="Bind address (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    model_name: Annotated[
        str | None, typer.Option(help="Name served (default: directory name).")
    ] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Requests batched into one generate.")] = 16,
    max_tokens_limit: Annotated[int, typer.Option(min=1)] = 4096,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="STEINER_API_KEY",
            help="Require this key (Authorization: Bearer KEY) on /v1, as vllm serve --api-key.",
            show_default=False,
        ),
    ] = None,
    config: ConfigFile = None,
) -> None:
    """OpenAI-compatible server: POST /v1/chat/completions and /v1/completions (stream too),
    GET /v1/models, /health, and vLLM's /tokenize, /detokenize, /tokenizer_info."""
    from steiner.infer.server import ServerSettings, check_address, serve

    check_address(host, port)
    keyed = " (API key required)" if api_key else ""
    console.print(f"serving {escape(str(model))} on http://{escape(host)}:{port}/v1{keyed}")
    serve(
        ServerSettings(
            str(model), model_name, max_batch, max_tokens_limit=max_tokens_limit, api_key=api_key
        ),
        host,
        port,
    )


@app.command("eval")
def eval_cmd(
    model: ModelDirectory,
    problems: Annotated[
        str,
        typer.Option(
            help="Problems (countdown/graph/text records, GPQA CSV, MMLU-Pro): a file or a "
            "datasets name/dir.",
            callback=expand_user,
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(help="Output directory (outputs.jsonl, metrics.json).", callback=expand_user),
    ],
    domain: EvalDomain = None,
    samples: Annotated[
        int, typer.Option(min=1, help="k samples for maj@k, avg@k and pass@2..k.")
    ] = 1,
    min_steps: Annotated[int, typer.Option(min=0)] = 0,
    max_steps: Annotated[int | None, typer.Option(min=1)] = None,
    max_reasoning_tokens: Annotated[int | None, typer.Option(min=1)] = None,
    max_step_tokens: MaxStepTokens = None,
    extend_with: ExtendWith = "model",
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 1024,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    temperature: Annotated[float, typer.Option(min=0, help="For the k samples.")] = 0.7,
    top_p: TopP = 1.0,
    limit: Annotated[int | None, typer.Option(min=1, help="First N problems only.")] = None,
    seed: Seed = 0,
    base_url: BaseUrl = None,
    api_key_env: ApiKeyEnv = "OPENAI_API_KEY",
    config: ConfigFile = None,
) -> None:
    """Accuracy (pass@1, maj@k, avg@k, pass@2..k), steps, backtracks, format errors; raw outputs."""
    from steiner.evaluate.accuracy import EvalConfig, evaluate

    cfg = EvalConfig(
        str(model),
        problems,
        str(out),
        domain,
        samples,
        temperature,
        min_steps,
        max_steps,
        max_reasoning_tokens,
        extend_with,
        max_new_tokens,
        batch_size,
        seed,
        limit,
        max_step_tokens,
        top_p,
        base_url,
        api_key_env,
    )
    with progress_bar() as bar:
        task = bar.add_task("eval", total=None)
        m = evaluate(cfg, progress=lambda d, t: bar.update(task, completed=d, total=t))
    table = Table(title=escape(f"steiner eval: {model} on {problems}"))
    table.add_column("metric")
    table.add_column("value", justify="right")
    lo, hi = m["pass@1_ci95"]
    table.add_row(
        "pass@1",
        f"{100 * m['pass@1']:.1f}% ({m['correct']}/{m['n']}, 95% CI {100 * lo:.1f}-{100 * hi:.1f})",
    )
    from steiner.evaluate.metrics import sampled_keys

    for key in sampled_keys(m):
        table.add_row(key, f"{100 * m[key]:.1f}%")
    for key in (
        "mean_steps",
        "mean_backtracks",
        "mean_reasoning_tokens",
        "format_error_rate",
        "length_cut_rate",
    ):
        table.add_row(key, str(m[key]))
    if m["prompt_too_long_rate"]:  # rare, and then the reason for the cut answers
        table.add_row("prompt_too_long_rate", str(m["prompt_too_long_rate"]))
    console.print(table)


@app.command("scale")
def scale_cmd(
    model: ModelDirectory,
    problems: Annotated[str, typer.Option(help="Problem file.", callback=expand_user)],
    out: Annotated[Path, typer.Option(help="Output directory.", callback=expand_user)],
    budgets: Annotated[str, typer.Option(help="Comma-separated step budgets.")] = "1,2,4,8,16",
    mode: Annotated[str, typer.Option(help="cap | extend | both")] = "both",
    domain: EvalDomain = None,
    max_step_tokens: MaxStepTokens = None,
    extend_with: Annotated[
        str,
        typer.Option(
            help="In extend mode, below the budget: model (its choice of proceed or "
            "backtrack) | proceed | backtrack (forced)."
        ),
    ] = "model",
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 1024,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    limit: Annotated[int | None, typer.Option(min=1)] = None,
    base_url: BaseUrl = None,
    api_key_env: ApiKeyEnv = "OPENAI_API_KEY",
    config: ConfigFile = None,
) -> None:
    """Accuracy and reasoning tokens per step budget; Control, Scaling, Performance; a plot."""
    from steiner.evaluate.accuracy import EvalConfig
    from steiner.evaluate.scale import MODES, run_scale
    from steiner.infer.budget import Budget

    try:
        levels = sorted({int(b) for b in budgets.split(",") if b.strip()})
    except ValueError:
        raise typer.BadParameter(
            f"--budgets expects integers like 1,2,4, got {budgets!r}"
        ) from None
    if not levels or levels[0] < 1:
        raise typer.BadParameter("--budgets must be positive integers")
    modes = list(MODES) if mode == "both" else [mode]
    if any(m not in MODES for m in modes):
        raise typer.BadParameter(f"--mode expects cap, extend or both, got {mode!r}")
    Budget.from_flags(0, None, None, extend_with)  # a bad --extend-with before the model loads
    base = EvalConfig(
        str(model),
        problems,
        str(out),
        domain,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        limit=limit,
        max_step_tokens=max_step_tokens,
        extend_with=extend_with,
        base_url=base_url,
        api_key_env=api_key_env,
    )
    with progress_bar() as bar:
        task = bar.add_task("scale", total=len(levels) * len(modes))
        result = run_scale(base, levels, modes, progress=lambda d, t: bar.update(task, completed=d))
    table = Table(title=escape(f"steiner scale: {model}"))
    for col in ("mode", "budget", "accuracy", "reasoning tokens", "steps", "control"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        table.add_row(
            r["mode"],
            str(r["budget"]),
            f"{100 * r['accuracy']:.1f}%",
            str(r["mean_reasoning_tokens"]),
            str(r["mean_steps"]),
            f"{100 * r['control']:.0f}%",
        )
    console.print(table)
    for m, v in result["metrics"].items():
        console.print(
            f"{m}: Control {100 * v['control']:.0f}%, Scaling {v['scaling']:.4f}/step, "
            f"Performance {100 * v['performance']:.1f}%, monotone: {v['monotone']}"
        )
    console.print(escape(f"wrote {out / 'scale.json'}, {out / 'scale.csv'}, {out / 'scale.png'}"))


@app.command("probe-latency")
def probe_latency_cmd(
    base_url: Annotated[
        str, typer.Option(help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    ],
    model: Annotated[str, typer.Option(help="Model name at that endpoint.")],
    n: Annotated[int, typer.Option(min=3, help="Requests.")] = 50,
    out: Annotated[Path, typer.Option(help="Output directory.", callback=expand_user)] = Path(
        "runs/latency"
    ),
    concurrency: Annotated[int, typer.Option(min=1)] = 1,
    max_tokens: Annotated[int, typer.Option(min=8)] = 512,
    api_key_env: Annotated[str, typer.Option()] = "OPENAI_API_KEY",
    seed: Seed = 0,
) -> None:
    """Completion tokens vs request seconds: linear fit, R², scatter plot."""
    import os

    import openai

    from steiner.evaluate.latency import probe, save_probe

    check_http_url(base_url, "--base-url")
    check_output_dir(out, "--out")  # before the requests, which may take minutes
    try:
        with progress_bar() as bar:
            task = bar.add_task("probe", total=n)
            records = probe(
                base_url,
                model,
                n,
                concurrency,
                max_tokens,
                os.environ.get(api_key_env) or "none",
                seed,
                progress=lambda d, t: bar.update(task, completed=d),
            )
    except openai.OpenAIError as exc:
        raise InputError(base_url, None, f"request failed: {exc}") from None
    s = save_probe(records, out)
    console.print(
        f"{s['n']} requests: seconds ≈ {s['intercept_s']:.4f} + "
        f"{1000 * s['seconds_per_token']:.3f} ms "
        f"× tokens, R² = {s['r2']:.3f}; wrote {escape(str(out / 'latency.png'))}"
    )


@app.command("report")
def report_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run directory.", callback=expand_user)],
) -> None:
    """Gather a run directory into report.md and report.html."""
    from steiner.evaluate.report import build_report

    paths = build_report(run_dir)
    console.print(escape(f"wrote {paths['markdown']} and {paths['html']}"))
    if paths["skipped"]:
        names = ", ".join(str(p) for p in paths["skipped"][:3])
        more = f" and {len(paths['skipped']) - 3} more" if len(paths["skipped"]) > 3 else ""
        console.print(escape(f"not read (not Steiner's files; why: in the report): {names}{more}"))


@app.command("demo")
def demo(
    profile: Annotated[
        str, typer.Option(help="quick (graph; 19-27 min measured on 2 CPU cores) | full (hours).")
    ] = "quick",
    domain: Annotated[
        str | None, typer.Option(help="graph | countdown (default: graph; full runs both).")
    ] = None,
    out_dir: Annotated[
        Path, typer.Option("--out", help="Run directory.", callback=expand_user)
    ] = Path("runs/demo"),
    problems: Annotated[
        str | None,
        typer.Option(help="Held-out problem file to evaluate on instead.", callback=expand_user),
    ] = None,
    seed: Seed = 0,
) -> None:
    """The whole pipeline: problems, synth, init/CPT/SFT, shortcut baseline, RL, eval, scale,
    serve + latency probe, report card (resumes from the last finished stage)."""
    import datasets
    import transformers

    from steiner.demo import PROFILES, check_demo_inputs, run_demo

    # one display: the stage lines and the trainers' loss lines, not a progress bar for every
    # dataset map, weight load and shard write
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    if profile not in PROFILES:
        raise typer.BadParameter(f"--profile expects quick or full, got {profile!r}")
    domains = [domain] if domain else (["graph", "countdown"] if profile == "full" else ["graph"])
    if problems and len(domains) > 1:
        raise typer.BadParameter("--problems needs --domain (the file is of one domain)")
    check_demo_inputs(profile, domains, problems)
    check_output_dir(out_dir, "--out")
    for name in domains:
        run_dir = out_dir / name if len(domains) > 1 else out_dir
        console.rule(escape(f"steiner demo: {profile} profile, {name} domain -> {run_dir}"))

        def on_stage(stage: str, record: dict[str, Any], skipped: bool) -> None:
            shown = {k: v for k, v in record.items() if k not in ("stage", "seconds")}
            note = "done earlier" if skipped else f"{record['seconds']:.1f}s"
            console.print(f"[bold]{stage:<20}[/] {note:>12}  [dim]{escape(json.dumps(shown))}[/]")

        summary = run_demo(profile, name, run_dir, problems, seed, on_stage=on_stage)
        table = Table(title=escape(f"steiner demo ({name}): {run_dir / 'report.md'}"))
        table.add_column("target")
        table.add_column("measured")
        table.add_column("met")
        for t in summary["targets"]:
            table.add_row(t["target"], t["measured"], "yes" if t["met"] else "[red]no[/]")
        if profile != "quick":  # the quick profile's targets include its time
            table.add_row("wall time", f"{summary['total_seconds'] / 60:.1f} min", "")
        out.print(table)


class Terminated(SystemExit):
    """SIGTERM, raised where the process is, so that it unwinds as Ctrl-C does."""


def raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(128 + signum)


def stop_again_if_swallowed(unraisable: Any, default: Any = sys.unraisablehook) -> None:
    """``sys.unraisablehook``: a stop (SIGTERM's Terminated, or Ctrl-C) whose handler ran
    inside a ``__del__`` or another finalizer is printed as "Exception ignored" and lost
    there, and the job went on as if never stopped (the demo's baseline trained on after the
    demo was killed: caught in a regex object's ``__del__`` during accelerate's
    ``gc.collect``). The signal is sent again a moment later, from a thread: sent from here,
    its handler ran in this hook, where an exception is dropped too."""
    import threading

    stops = {Terminated: signal.SIGTERM, KeyboardInterrupt: signal.SIGINT}
    for kind, signum in stops.items():
        if isinstance(unraisable.exc_value, kind):
            threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
            return
    default(unraisable)


def install_stop_handlers() -> None:
    """SIGTERM unwinds the job as Ctrl-C does, and neither is lost in a finalizer."""
    # Python's default SIGTERM (`timeout`, `kill`, a cluster scheduler) ends the process
    # without running `finally`: atomic writes left their temp files behind, the demo's
    # baseline process outlived it, and a stage's clock lost its last seconds
    signal.signal(signal.SIGTERM, raise_terminated)
    sys.unraisablehook = stop_again_if_swallowed


def main() -> None:
    """Entry point: bad input and usage errors print one line and exit 2, and file-system
    errors one line and exit 1, never a traceback."""
    install_stop_handlers()
    end_with_parent()
    keep_freed_heap()
    try:
        rc = app(standalone_mode=False)
    except Terminated as exc:
        print("steiner: terminated", file=sys.stderr)
        sys.exit(exc.code)
    except InputError as exc:
        print(f"steiner: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except typer.Abort:
        print("steiner: aborted", file=sys.stderr)
        sys.exit(130)
    except OSError as exc:  # the file system: an --out that cannot be made, a full disk
        what = exc.strerror or (str(exc).splitlines() or [type(exc).__name__])[0]
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"steiner: error: {where}{what}", file=sys.stderr)
        sys.exit(1)
    except typer.TyperException as exc:  # typer's vendored click: usage and parameter errors
        ctx = getattr(exc, "ctx", None)
        cmd = ctx.command_path if ctx is not None else "steiner"
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        print(f"{cmd}: error: {message}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 2))
    if rc == 130:
        # typer turns Ctrl-C's KeyboardInterrupt into a silent exit code of 130 (no command
        # returns one itself); one line, as SIGTERM's "terminated"
        print("steiner: interrupted", file=sys.stderr)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
