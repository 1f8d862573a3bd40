"""``fedlora aggregate``: aggregate client PEFT LoRA adapter folders into one adapter folder."""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedlora.adapter_io import AggregationResult, aggregate_adapters, check_output_folder
from fedlora.lowrank import AggregationError, normalize_weights
from fedlora.methods import METHODS, Method, get_method

# What the output folder holds, per method (printed after a run; the --help text says the same).
OUTPUT_MEANING = {
    "fedit": "the weighted averages of A and of B (zero-padded to the largest rank); inexact",
    "flora": "the exact weighted sum as FLoRA's stack (rank = sum of client ranks); merge it into the base",
    "florist": "the SVD of the exact sum truncated at energy threshold tau (--threshold, default 0.9)",
    "flexlora": "the exact sum in SVD form at its numerical rank (or capped by --rank)",
    "ffa": "the shared lora_A and the weighted average of lora_B (exact)",
    "fedex": "the exact sum: the first r columns of lora_B / rows of lora_A are FedEx's global adapter that clients "
    "continue from, the rest is the residual in SVD form",
    "fedsb": "the shared lora_A and the exact weighted average of lora_B (LoRA-SB adapters exported as LoRA)",
}
# CLI option -> the method constructor's keyword.
_METHOD_OPTIONS = {"--threshold": "threshold", "--rank": "max_rank"}


def aggregate(
    folders: Annotated[
        list[Path],
        typer.Argument(metavar="ADAPTER_DIR", help="Client adapter folders (PEFT LoRA, adapter_model.safetensors)."),
    ],
    method: Annotated[str, typer.Option("--method", "-m", help=f"One of: {', '.join(METHODS)}.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write the aggregated adapter to.")],
    threshold: Annotated[
        float | None, typer.Option(help="florist only: energy threshold tau in (0, 1] (default 0.9).")
    ] = None,
    rank: Annotated[int | None, typer.Option(help="florist/flexlora only: cap on the global rank per module.")] = None,
    weights: Annotated[
        str | None,
        typer.Option(help="Comma-separated client weights, e.g. example counts 100,300 or fractions; default uniform."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace OUTPUT if it exists and is not empty.")
    ] = False,
) -> None:
    """Aggregate client LoRA adapters into one standard PEFT LoRA adapter folder.

    Per module, the output's update B @ A is the method's global update, scaling
    folded in (lora_alpha = r; other ranks go to rank_pattern / alpha_pattern):

    fedit: averages of A and of B (zero-padded to the largest rank); inexact.

    flora: the exact weighted sum of s_k B_k A_k, as FLoRA's stack.

    florist: the exact sum's SVD, truncated at energy --threshold (and --rank).

    flexlora: the exact sum in SVD form (its rank capped by --rank).

    ffa: the shared lora_A and the averaged lora_B (exact).

    fedex: the exact sum. The first r columns of lora_B (rows of lora_A) are
    FedEx's global adapter that clients continue from; the rest is the
    residual in SVD form.

    fedsb: LoRA-SB adapters exported as LoRA (shared lora_A): lora_B averaged
    (exact).
    """
    chosen = _build_method(method, threshold=threshold, rank=rank)
    client_weights = _parse_weights(weights, len(folders))
    if any(_same_path(output, folder) for folder in folders):
        _fail(f"--output {str(output)!r} is one of the input folders; write the aggregate elsewhere", code=2)
    try:
        check_output_folder(output, overwrite)
        result = aggregate_adapters(folders, chosen, client_weights)
        result.write(output, overwrite=overwrite)
    except (ValueError, OSError) as err:
        _fail(str(err))
    _print_report(result, output)


def _build_method(name: str, threshold: float | None, rank: int | None) -> Method:
    key = name.strip().lower()
    if key not in METHODS:
        _fail(f"unknown method {name!r}; valid: {', '.join(METHODS)}", code=2)
    accepted = inspect.signature(METHODS[key]).parameters
    given = {"--threshold": threshold, "--rank": rank}
    for flag, value in given.items():
        keyword = _METHOD_OPTIONS[flag]
        if value is not None and keyword not in accepted:
            takers = [m for m, cls in METHODS.items() if keyword in inspect.signature(cls).parameters]
            _fail(f"{flag} does not apply to method {key!r}; only to: {', '.join(takers)}", code=2)
    try:
        return get_method(key, **{_METHOD_OPTIONS[flag]: value for flag, value in given.items()})
    except AggregationError as err:
        _fail(str(err), code=2)


def _parse_weights(text: str | None, num_folders: int) -> list[float] | None:
    if text is None:
        return None
    values = []
    for item in text.split(","):
        try:
            values.append(float(item.strip()))
        except ValueError:
            _fail(f"--weights: {item.strip()!r} is not a number (give e.g. 100,300 or 0.25,0.75)", code=2)
    if len(values) != num_folders:
        _fail(f"--weights gives {len(values)} weight(s) for {num_folders} adapter folder(s); give one per folder", 2)
    try:
        normalize_weights(values)
    except AggregationError as err:
        _fail(f"--weights: {err}", code=2)
    return values


def _same_path(a: Path, b: Path) -> bool:
    return a.exists() and b.exists() and a.resolve() == b.resolve()


def _fail(message: str, code: int = 1) -> NoReturn:
    Console(stderr=True, soft_wrap=True).print(f"[bold red]Error:[/bold red] [red]{escape(message)}[/red]")
    raise typer.Exit(code)


def _print_report(result: AggregationResult, output: Path) -> None:
    console = Console()
    name = result.method.name
    rows = result.rows
    energies = [r.energy_kept for r in rows if r.energy_kept is not None]
    table = Table(
        title=f"{result.method!r}: {len(result.folders)} adapters -> {len(rows)} modules",
        show_footer=True,
        title_justify="left",
    )
    table.add_column("module", footer=f"total ({len(rows)} modules)")
    table.add_column("ranks in", justify="right", footer=str(sum(sum(r.ranks_in) for r in rows)))
    table.add_column("rank out", justify="right", footer=str(sum(r.rank_out for r in rows)))
    table.add_column("energy kept", justify="right", footer=_energy(_mean(energies), prefix="mean "))
    for r in rows:
        table.add_row(r.module, ",".join(map(str, r.ranks_in)), str(r.rank_out), _energy(r.energy_kept))
    console.print(table)

    out_params, out_bytes = result.output_size()
    weights = ", ".join(f"{float(w):.4g}" for w in result.weights)
    console.print(f"weights: {weights}")
    console.print(
        f"input:  {len(result.folders)} adapters, {result.input_parameters:,} parameters "
        f"({result.input_bytes / 1e6:.2f} MB)"
    )
    ratio = out_params / result.input_parameters if result.input_parameters else math.nan
    console.print(f"output: {out_params:,} parameters ({out_bytes / 1e6:.2f} MB), {ratio:.2f}x the inputs' parameters")
    console.print(f"holds:  {OUTPUT_MEANING.get(name, 'the method global update')}")
    console.print(f"[green]wrote {escape(str(output))}[/green]")


def _energy(value: float | None, prefix: str = "") -> str:
    return "-" if value is None else f"{prefix}{value:.4f}"


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
