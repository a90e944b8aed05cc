"""The ``steiner`` command: one verb per pipeline stage (see DESIGN.md)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from steiner import format as fmt
from steiner.domains import countdown
from steiner.io import InputError, iter_records, validate, write_jsonl

app = typer.Typer(
    help="Steiner: train language models that search inside one context.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
countdown_app = typer.Typer(
    help="The countdown domain: generate and solve problems.", no_args_is_help=True
)
format_app = typer.Typer(help="The 14-token reasoning format.", no_args_is_help=True)
app.add_typer(countdown_app, name="countdown")
app.add_typer(format_app, name="format")

console = Console(stderr=True)
out = Console()


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


@countdown_app.command("generate")
def countdown_generate(
    out_path: Annotated[Path, typer.Option("--out", help="Output JSONL file.")],
    count: Annotated[int, typer.Option(min=1, help="How many problems.")] = 1000,
    n_numbers: Annotated[int, typer.Option(min=2, max=6, help="Numbers per problem.")] = 4,
    min_number: Annotated[int, typer.Option(min=1)] = 1,
    max_number: Annotated[int, typer.Option(min=1)] = 50,
    min_target: Annotated[int, typer.Option(min=0)] = 10,
    max_target: Annotated[int, typer.Option(min=0)] = 100,
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same file.")] = 0,
    shortcut: Annotated[
        bool, typer.Option("--shortcut", help="Add the steps of one solution.")
    ] = False,
) -> None:
    """Generate solvable countdown problems (optionally as shortcut records)."""
    if min_number > max_number or min_target > max_target:
        raise typer.BadParameter("empty number or target range")
    start = time.perf_counter()
    with progress_bar() as bar:
        task = bar.add_task("generating", total=count)

        def records():
            for problem in countdown.generate_problems(
                count, n_numbers, min_number, max_number, min_target, max_target, seed
            ):
                bar.advance(task)
                yield countdown.shortcut_record(problem) if shortcut else problem

        n = write_jsonl(out_path, records())
    console.print(
        f"wrote {n} {'shortcut records' if shortcut else 'problems'} to {out_path} "
        f"in {time.perf_counter() - start:.1f}s (seed {seed})"
    )


@countdown_app.command("solve")
def countdown_solve(
    numbers: Annotated[list[int], typer.Argument(help="The numbers, e.g. 3 7 25 50.")],
    target: Annotated[int, typer.Option(help="The number to reach.")],
    limit: Annotated[int, typer.Option(help="Print at most this many solutions (0: all).")] = 20,
) -> None:
    """Print the distinct solutions of one countdown problem."""
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


class _Message(BaseModel):
    role: str
    content: str


class _ChatRecord(BaseModel):
    messages: list[_Message]


@format_app.command("check")
def format_check(
    path: Annotated[
        Path, typer.Argument(help="JSONL/Parquet file of chat records ({'messages': [...]}).")
    ],
    max_errors: Annotated[int, typer.Option(help="List at most this many errors.")] = 50,
) -> None:
    """Validate the reasoning format of every assistant message; exit 1 on any error."""
    traces = steps = backtracks = records = 0
    errors: list[str] = []
    for line, rec in iter_records(path):
        records += 1
        chat = validate(_ChatRecord, rec, path, line)
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
    for e in errors[:max_errors]:
        print(e)  # plain lines, never wrapped: they are meant for grep and editors
    if len(errors) > max_errors:
        print(f"... and {len(errors) - max_errors} more")
    table = Table(title=f"format check: {path}")
    for col in ("records", "traces", "steps", "backtracks", "errors"):
        table.add_column(col, justify="right")
    table.add_row(*map(str, (records, traces, steps, backtracks, len(errors))))
    console.print(table)
    if errors:
        raise typer.Exit(1)


@app.command("demo")
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Run directory.")] = Path("runs/demo"),
    count: Annotated[int, typer.Option(min=1)] = 200,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Interim demo: countdown problems, shortcut solutions, solver and format check.

    The full pipeline demo (synth, train, RL, eval, scale, serve, report) replaces it.
    """
    start = time.perf_counter()
    path = out_dir / "countdown-shortcut.jsonl"
    records = [countdown.shortcut_record(p) for p in countdown.generate_problems(count, seed=seed)]
    write_jsonl(path, records)
    checked = sum(
        bool(countdown.check_answer(r["nums"], r["target"], r["answer"])) for r in records
    )
    first = records[0]
    sols = countdown.all_solutions(first["nums"], first["target"])
    trace = fmt.Trace(
        steps=[
            fmt.Step(name=s, thought=s, summary=s, reflection="on track") for s in first["steps"]
        ],
        decisions=[fmt.Decision.PROCEED] * (len(first["steps"]) - 1) + [fmt.Decision.END],
        answer=first["answer"],
    )
    parsed, problems = fmt.parse(fmt.render(trace))
    table = Table(title="steiner demo (interim: foundation only)")
    table.add_column("check")
    table.add_column("result")
    table.add_row("problems generated", f"{len(records)} -> {path}")
    table.add_row("reference answers pass the checker", f"{checked}/{len(records)}")
    table.add_row(f"solutions of {first['nums']} -> {first['target']}", str(len(sols)))
    table.add_row(
        "render -> parse round trip", "ok" if parsed == trace and not problems else "FAILED"
    )
    table.add_row("wall time", f"{time.perf_counter() - start:.1f}s")
    out.print(table)
    if checked != len(records) or parsed != trace or problems:
        raise typer.Exit(1)


def main() -> None:
    """Entry point: bad input and usage errors print one line and exit 2, never a traceback."""
    try:
        rc = app(standalone_mode=False)
    except InputError as exc:
        print(f"steiner: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except typer.Abort:
        print("steiner: aborted", file=sys.stderr)
        sys.exit(130)
    except typer.TyperException as exc:  # typer's vendored click: usage and parameter errors
        ctx = getattr(exc, "ctx", None)
        cmd = ctx.command_path if ctx is not None else "steiner"
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        print(f"{cmd}: error: {message}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 2))
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
