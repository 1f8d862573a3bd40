"""``fedlora compare``: several methods on one config with identical inputs, then a side-by-side report."""

from __future__ import annotations

import logging
import shlex
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedlora.config import ConfigError, load_config

COMPARE_HELP = """Run several methods on the same clients, data order, initial weights and seed; report side by side.

\b
  fedlora compare                                       configs/compare-default.yaml, all seven methods
  fedlora compare compare-default-heter --methods fedit,flora,florist,flexlora --thresholds 0.8,0.9
  fedlora compare tiny --methods fedit,florist --output runs/cmp federation.rounds=3

Each method's run goes to <output>/<label> (FLoRIST per threshold: florist-0.9). Finished runs are skipped and
unfinished ones resumed, so the same command continues an interrupted comparison; --overwrite starts over.
The output folder receives report.md, results.csv, pareto.png (accuracy against total bytes), loss.png and a
kept-rank heat map per FLoRIST run.
"""

DEFAULT_PRESET = "compare-default"


def compare(
    ctx: typer.Context,
    methods: Annotated[
        str, typer.Option("--methods", "-m", help="Comma-separated methods, or 'all' (skips those the config rejects).")
    ] = "all",
    thresholds: Annotated[
        str | None, typer.Option("--thresholds", "-t", help="FLoRIST thresholds, e.g. 0.8,0.9,0.99 (one run each).")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Comparison folder (default: the config's output_dir).")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Rerun every method from scratch instead of skipping/resuming.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and show the plan, train nothing.")] = False,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="Write the PNG plots.")] = True,
) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    console = Console()
    from fedlora.report.compare import CompareError, execute_plan, plan_compare

    args = list(ctx.args)
    options = [a for a in args if a.startswith("-")]
    if options:  # extra args are allowed for key=value overrides, so click lets unknown options through
        _fail(f"unknown option(s) {options}; see fedlora compare --help", code=2)
    preset = DEFAULT_PRESET
    if args and "=" not in args[0]:
        preset, args = args[0], args[1:]
    stray = [a for a in args if "=" not in a]
    try:
        if stray:
            raise ConfigError(f"unexpected argument(s) {stray}; give CONFIG then key=value overrides")
        base = load_config(preset, args)
        plan = plan_compare(base, methods, thresholds, output, overwrite=overwrite)
    except (ConfigError, CompareError) as err:
        _fail(str(err), code=2)

    table = Table(title=f"fedlora compare: {plan.output_dir}")
    for col in ("run", "method", "status", ""):
        table.add_column(col)
    for run in plan.runs:
        table.add_row(run.label, run.config.method.name, run.status, run.reason)
    console.print(table)
    for label, why in plan.skipped.items():
        console.print(f"[yellow]skipped {escape(label)}:[/yellow] {escape(why)}")
    if dry_run:
        return

    try:
        execute_plan(
            plan,
            overwrite=overwrite,
            progress=not quiet,
            on_start=lambda run: console.print(f"[bold]{escape(run.label)}[/bold]: {run.status} -> {run.run_dir}"),
        )
        from fedlora.report import load_run, write_report

        runs = [load_run(run.run_dir, run.label) for run in plan.runs]
        report = write_report(
            runs,
            plan.output_dir,
            title=f"fedlora compare: {', '.join(r.label for r in plan.runs)}",
            command=command_line(preset, methods, thresholds, output, args),
            plots=plots,
            replace_folder=False,
        )
    except ValueError as err:
        _fail(str(err))
    print_summary(console, report)


def command_line(preset: str, methods: str, thresholds: str | None, output: Path | None, overrides: list[str]) -> str:
    """The command that reproduces this comparison (recorded in report.md)."""
    parts = ["fedlora", "compare", preset, "--methods", methods]
    if thresholds:
        parts += ["--thresholds", thresholds]
    if output is not None:
        parts += ["--output", str(output)]
    return " ".join(shlex.quote(p) for p in [*parts, *overrides])


def print_summary(console: Console, report) -> None:
    """The results in a console table, the inputs check (a loud warning on mismatch) and the files written."""
    from fedlora.report.writers import fmt_bytes, fmt_num, fmt_pct, fmt_seconds

    table = Table(title="results")
    for col in ("method", "accuracy %", "held-out loss", "up / round", "down / round", "total bytes", "wall time"):
        table.add_column(col, justify="left" if col == "method" else "right", no_wrap=col in ("method", "wall time"))
    for row in report.rows:
        table.add_row(
            row["label"],
            fmt_pct(row["accuracy"]),
            fmt_num(row["eval_loss"]),
            fmt_bytes(row["uplink_bytes_per_round"]),
            fmt_bytes(row["downlink_bytes_per_round"]),
            fmt_bytes(row["total_bytes"]),
            fmt_seconds(row["wall_seconds"]),
        )
    console.print(table)
    style = "green" if report.inputs.identical else "bold red"
    for line in report.inputs.lines:
        console.print(f"[{style}]{escape(line)}[/{style}]")
    console.print("wrote " + ", ".join(str(p) for p in report.files))


def _fail(message: str, code: int = 1) -> NoReturn:
    Console(stderr=True).print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(code)
