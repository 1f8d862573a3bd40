"""``fedlora run``: federated fine-tuning from a YAML preset, ``key=value`` overrides, or the seeds' flags."""

from __future__ import annotations

import logging
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedlora.config import ConfigError, RunConfig, load_config, seed_flags_to_overrides

RUN_HELP = """Run federated fine-tuning.

\b
  fedlora run                                  the embedded default (configs/default.yaml)
  fedlora run configs/florist.yaml method.threshold=0.8 federation.rounds=5
  fedlora run --global_model tiny-llama --florist True --num_clients 8 --threshold 0.9   (the seeds' flags)

The run folder (output_dir) receives config.yaml, metrics.jsonl, checkpoint/ and adapter/ (a standard PEFT
LoRA adapter that reproduces the final global model on the original base model).
"""


def parse_run_args(args: list[str]) -> RunConfig:
    """``[CONFIG] [key=value ...]`` or the seeds' ``--flag value`` pairs (with an optional leading CONFIG)."""
    preset = None
    if args and "=" not in args[0] and not args[0].startswith("--"):
        preset, args = args[0], args[1:]
    if any(a.startswith("--") for a in args):  # the seeds' main.py flags
        return load_config(preset, seed_flags_to_overrides(args))  # no preset: the seeds' own defaults
    stray = [a for a in args if "=" not in a]
    if stray:
        raise ConfigError(f"unexpected argument(s) {stray}; give CONFIG then key=value overrides")
    return load_config(preset or "default", args)


def run(
    ctx: typer.Context,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in output_dir from its checkpoint.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the run in output_dir (after every input is checked).")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and print the config, train nothing.")] = False,
) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    console = Console()
    try:
        config = parse_run_args(list(ctx.args))
    except ConfigError as err:
        _fail(str(err), code=2)
    if dry_run:
        console.print(config.to_yaml())
        return
    from fedlora.engine.local import run as run_engine  # heavy imports only when training

    try:
        summary = run_engine(config, resume=resume, overwrite=overwrite, progress=not quiet)
    except ValueError as err:
        _fail(str(err))
    table = Table(title=f"fedlora run: {summary.run_dir}")
    columns = ["method", "rounds", "eval loss before", "eval loss after"]
    if summary.accuracy_before is not None or summary.accuracy_after is not None:
        columns += ["accuracy before", "accuracy after"]
    for col in (*columns, "uplink", "downlink", "wall time"):
        table.add_column(col, justify="right")
    fmt = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
    accuracy = [fmt(summary.accuracy_before), fmt(summary.accuracy_after)] if len(columns) > 4 else []
    table.add_row(
        summary.method,
        str(summary.rounds),
        fmt(summary.eval_before),
        fmt(summary.eval_after),
        *accuracy,
        f"{summary.uplink_bytes / 1e6:.2f} MB",
        f"{summary.downlink_bytes / 1e6:.2f} MB",
        f"{summary.seconds:.1f} s",
    )
    console.print(table)
    if summary.privacy is not None:  # each guarantee with the unit it protects (record or client)
        from fedlora.privacy import describe

        console.print(escape(describe(summary.privacy)))
    console.print(f"adapter: {summary.run_dir / 'adapter'}   metrics: {summary.run_dir / 'metrics.jsonl'}")


def _fail(message: str, code: int = 1) -> NoReturn:
    Console(stderr=True).print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(code)
