"""``fedlora report``: tables and plots of finished run folders, side by side."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

REPORT_HELP = """Tables and plots of finished runs, side by side.

\b
  fedlora report runs/compare-default/fedit runs/compare-default/florist-0.9 --output runs/my-report
  fedlora report runs/default                      one run: its report goes to runs/default/report

Writes report.md, results.csv, pareto.png (accuracy against total bytes), loss.png and, per FLoRIST run, a heat
map of the kept rank per module and round. Checks that all runs recorded the same inputs (seed, base weights,
client split, first batches) and warns loudly when they did not.
"""


def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run folders (each with config.yaml and metrics.jsonl).")],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Report folder (default: <common parent of the runs>/report)."),
    ] = None,
    title: Annotated[str, typer.Option("--title", help="Title of report.md.")] = "Comparison",
    partial: Annotated[bool, typer.Option("--partial", help="Also report unfinished runs, as they are.")] = False,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="Write the PNG plots.")] = True,
) -> None:
    from fedlora.commands.compare import print_summary
    from fedlora.report import load_runs, write_report

    console = Console()
    try:
        runs = load_runs(run_dirs, allow_unfinished=partial)
        out = output if output is not None else default_output(run_dirs)
        result = write_report(runs, out, title=title, plots=plots)
    except ValueError as err:
        _fail(str(err))
    print_summary(console, result)


def default_output(run_dirs: list[Path]) -> Path:
    """``<run>/report`` for one run; ``<common parent>/report`` for several."""
    if len(run_dirs) == 1:
        return run_dirs[0] / "report"
    return Path(os.path.commonpath([p.resolve() for p in run_dirs])) / "report"


def _fail(message: str, code: int = 1) -> NoReturn:
    Console(stderr=True).print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(code)
