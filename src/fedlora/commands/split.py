"""``fedlora split``: partition a dataset across clients and write the seeds' folder layout."""

from __future__ import annotations

from collections import Counter
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedlora.data import DataError, category_counts, load_records_spec, partition, write_client_folder

_MAX_CATEGORY_COLUMNS = 12


class Scheme(StrEnum):
    iid = "iid"
    dirichlet = "dirichlet"
    shards = "shards"


class Style(StrEnum):
    alpaca = "alpaca"
    dolly = "dolly"


def _print_error(message: str) -> None:
    # soft_wrap: long paths in messages stay on one line (copyable); the terminal wraps them
    Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {escape(message)}")


def _usage_error(message: str) -> typer.Exit:
    _print_error(message)
    return typer.Exit(code=2)


def _scheme_options(
    scheme: str, alpha: float | None, min_size: int | None, shards_per_client: int | None, holdout: int | None
) -> dict[str, Any]:
    """The options of ``scheme`` with their defaults; an option given for another scheme is a usage error."""
    given = {"--alpha": alpha, "--min-size": min_size, "--shards-per-client": shards_per_client}
    uses = {"iid": (), "dirichlet": ("--alpha", "--min-size"), "shards": ("--shards-per-client",)}[scheme]
    stray = [name for name, value in given.items() if value is not None and name not in uses]
    if stray:
        verb = "does" if len(stray) == 1 else "do"
        raise _usage_error(f"{', '.join(stray)} {verb} not apply to --scheme {scheme}")
    if alpha is not None and not alpha > 0:  # also rejects nan
        raise _usage_error(f"--alpha must be > 0, got {alpha}")
    if scheme == "dirichlet":
        options = {
            "alpha": 0.5 if alpha is None else alpha,
            "min_size": 40 if min_size is None else min_size,
            "holdout_per_category": 10 if holdout is None else holdout,
        }
    elif scheme == "shards":
        options = {"shards_per_client": 2 if shards_per_client is None else shards_per_client}
        options["holdout_per_category"] = holdout or 0
    else:
        options = {"holdout_per_category": holdout or 0}
    return options


def _count_matrix(clients: list[list[dict]], heldout: list[dict]) -> tuple[list[str], list[str], list[list[int]]]:
    """(row labels, column labels, counts): rows are clients, the held-out test set and all; columns are the
    largest categories (by name), the rest lumped together, and the total."""
    totals = category_counts([r for shard in clients for r in shard] + heldout)
    ranked = [c for c, _ in sorted(totals.items(), key=lambda kv: (-kv[1], str(kv[0])))]
    shown = sorted(ranked[:_MAX_CATEGORY_COLUMNS], key=str)
    columns = ["(none)" if c is None else str(c) for c in shown]
    if len(ranked) > len(shown):
        columns.append(f"{len(ranked) - len(shown)} other")
    columns.append("total")

    def counts_row(counts: Counter) -> list[int]:
        cells = [counts.get(c, 0) for c in shown]
        if len(ranked) > len(shown):
            cells.append(sum(n for c, n in counts.items() if c not in shown))
        return [*cells, sum(counts.values())]

    labels = [str(k) for k in range(len(clients))]
    matrix = [counts_row(category_counts(shard)) for shard in clients]
    if heldout:
        labels.append("test")
        matrix.append(counts_row(category_counts(heldout)))
    labels.append("all")
    matrix.append(counts_row(totals))
    return labels, columns, matrix


def _table(corner: str, rows: list[str], columns: list[str], matrix: list[list[int]], clients: int) -> Table:
    table = Table(title="Examples per client and category", box=box.SIMPLE_HEAD)
    table.add_column(corner, no_wrap=True)
    for name in columns:
        table.add_column(name, justify="right", no_wrap=True, min_width=len(name))
    for i, (label, cells) in enumerate(zip(rows, matrix, strict=True)):
        table.add_row(label, *(f"{n:,}" for n in cells), end_section=i == clients - 1)
    return table


def _print_sizes(console: Console, clients: list[list[dict]], heldout: list[dict]) -> None:
    """Clients as rows; transposed when that is too wide for the terminal and the transpose fits."""
    rows, columns, matrix = _count_matrix(clients, heldout)
    table = _table("client", rows, columns, matrix, len(clients))
    wide = Console(width=10_000)
    width = wide.measure(table).maximum
    if width > console.width:
        transposed = _table("category", columns, rows, [list(c) for c in zip(*matrix, strict=True)], len(columns) - 1)
        if wide.measure(transposed).maximum <= console.width:
            table, width = transposed, console.width
    # never truncate a count: a table wider than the terminal is printed whole and left to wrap
    Console(width=max(width, console.width)).print(table)


def split(
    input: Annotated[
        str, typer.Argument(metavar="INPUT", help="A JSON/JSONL file, a Hugging Face dataset id, or 'commonsense'.")
    ],
    clients: Annotated[int, typer.Option("--clients", "-k", min=1, help="Number of clients K.")],
    scheme: Annotated[Scheme, typer.Option(help="How to partition: iid, dirichlet (the seeds'), shards.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write (the seeds' layout).")],
    alpha: Annotated[float | None, typer.Option(help="Dirichlet concentration > 0 (dirichlet; default 0.5).")] = None,
    category_field: Annotated[str, typer.Option(help="Raw field read as the category.")] = "category",
    min_size: Annotated[
        int | None, typer.Option(min=0, help="Smallest client size, redrawing until met (dirichlet; default 40).")
    ] = None,
    holdout_per_category: Annotated[
        int | None,
        typer.Option(min=0, help="Examples per category held out as global_test.json (default 10 dirichlet, else 0)."),
    ] = None,
    shards_per_client: Annotated[int | None, typer.Option(min=1, help="Shards per client (shards; default 2).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 42,
    tasks: Annotated[
        str | None, typer.Option(help="commonsense only: comma list of tasks (default all eight).")
    ] = None,
    max_per_task: Annotated[
        int | None, typer.Option(min=1, help="commonsense only: a seeded subset of at most this many per task.")
    ] = None,
    style: Annotated[Style, typer.Option(help="Field names written: alpaca (input/output) or dolly.")] = Style.alpaca,
    overwrite: Annotated[bool, typer.Option(help="Replace OUTPUT if it exists.")] = False,
) -> None:
    """Partition INPUT across K clients and write local_training_{k}.json (+ global_test.json) into OUTPUT."""
    console = Console()
    options = _scheme_options(scheme.value, alpha, min_size, shards_per_client, holdout_per_category)
    try:
        if output.exists() and not overwrite and (not output.is_dir() or any(output.iterdir())):
            raise DataError(f"{output}: already exists; pass --overwrite to replace it")
        loaded = load_records_spec(
            input, category_field=category_field, tasks=tasks, max_per_task=max_per_task, seed=seed
        )
        console.print(
            f"Loaded {len(loaded.records):,} records from {escape(loaded.source)} ({loaded.kind}) "
            f"in {loaded.seconds:.2f} s"
        )
        parts = partition(loaded.records, scheme.value, clients, seed=seed, **options)
        write_client_folder(output, parts.clients, parts.heldout, overwrite=overwrite, style=style.value)
    except DataError as err:
        _print_error(str(err))
        raise typer.Exit(code=1) from None
    _print_sizes(console, parts.clients, parts.heldout)
    test_note = f" and global_test.json ({len(parts.heldout)})" if parts.heldout else ""
    console.print(f"Wrote {clients} client files{test_note} to {escape(str(output))}")
