"""``fedlora comm``: parameters and bytes each method sends per client, direction and round (no weights needed)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedlora.comm import (
    DTYPE_BYTES,
    INIT_MODES,
    PRESETS,
    TARGETS,
    CommError,
    CommResult,
    check_method,
    comm_to_dict,
    communication_cost,
)
from fedlora.methods import METHODS


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CommError(f"{option} expects integers separated by commas, got {text!r}") from None
    if not values:
        raise CommError(f"{option} is empty")
    return values


def _methods(text: str) -> tuple[list[str], bool]:
    """Method names, and whether the user asked for ``all`` (then methods that reject the ranks are skipped)."""
    if text.strip().lower() == "all":
        return list(METHODS), True
    names = [check_method(m) for m in text.split(",") if m.strip()]
    if not names:
        raise CommError(f"--method is empty; valid: {', '.join(METHODS)} or 'all'")
    return list(dict.fromkeys(names)), False


def _mparams(params: int) -> str:
    return f"{params / 1e6:,.3f}"


def _mbytes(nbytes: int) -> str:
    return f"{nbytes / 1e6:,.2f}"


def _spread(values: Sequence[int], fmt=_mparams) -> str:
    """One value when all clients agree, else ``min – max``."""
    lo, hi = min(values), max(values)
    return fmt(lo) if lo == hi else f"{fmt(lo)} – {fmt(hi)}"


def _efficiency(result: CommResult) -> str:
    eff = result.efficiency
    return "–" if eff is None else f"{eff * 1e4:.2f}e-4"


def _rank_sum(result: CommResult) -> str:
    total = result.global_rank_sum
    text = f"{total:g}"
    return f"≤ {text}" if result.global_rank_upper_bound else text


def _print_one(console: Console, result: CommResult) -> None:
    arch = result.arch
    ranks = sorted(set(result.ranks))
    rank_text = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {list(result.ranks)}"
    console.print(
        f"[bold]{escape(result.model)}[/bold] ({arch.num_layers} layers, hidden {arch.hidden_size}), "
        f"method [bold]{result.method}[/bold], {result.clients} clients, {rank_text}, {result.modules} adapted "
        f"modules, {result.dtype} ({result.bytes_per_value} bytes/value)"
    )
    per_target = Table(title="Per target module, per client per round (M parameters)")
    for col in ("target", "shape m x n", "layers", "uplink", "downlink", "global rank sum"):
        per_target.add_column(col, justify="left" if col == "target" else "right")
    for t in result.targets:
        per_target.add_row(
            t.target,
            f"{t.shape[0]} x {t.shape[1]}",
            str(t.layers),
            _spread(t.uplink_params),
            _spread(t.downlink_params),
            f"{t.global_rank_sum:g}",
        )
    console.print(per_target)

    if len(ranks) > 1:
        per_client = Table(title="Per client, per round")
        for col in ("client", "rank", "uplink (M)", "downlink (M)", "uplink MB", "downlink MB"):
            per_client.add_column(col, justify="right")
        rows = zip(result.ranks, result.uplink_params, result.downlink_params, strict=True)
        for k, (r, up, down) in enumerate(rows):
            bpv = result.bytes_per_value
            per_client.add_row(str(k), str(r), _mparams(up), _mparams(down), _mbytes(up * bpv), _mbytes(down * bpv))
        console.print(per_client)

    bpv = result.bytes_per_value
    totals = Table(title="Totals")
    for col in ("", "uplink (M)", "downlink (M)", "uplink MB", "downlink MB"):
        totals.add_column(col, justify="left" if not col else "right")
    if len(ranks) == 1:
        up, down = result.uplink_params[0], result.downlink_params[0]
        totals.add_row("each client, per round", _mparams(up), _mparams(down), _mbytes(up * bpv), _mbytes(down * bpv))
    up, down = result.round_uplink_params, result.round_downlink_params
    totals.add_row("all clients, per round", _mparams(up), _mparams(down), _mbytes(up * bpv), _mbytes(down * bpv))
    if result.one_time is not None:
        up, down = result.one_time_uplink_params, result.one_time_downlink_params
        label = f"one-time init ({result.one_time.mode}), all clients"
        totals.add_row(label, _mparams(up), _mparams(down), _mbytes(up * bpv), _mbytes(down * bpv))
    up, down = result.total_uplink_params, result.total_downlink_params
    label = f"all clients, {result.rounds} round{'s' if result.rounds > 1 else ''}" + (
        " + init" if result.one_time else ""
    )
    totals.add_row(label, _mparams(up), _mparams(down), _mbytes(up * bpv), _mbytes(down * bpv))
    console.print(totals)
    console.print(f"global rank sum {_rank_sum(result)}, efficiency 1/sum = {_efficiency(result)}")
    if result.one_time is not None and not result.one_time.federated:
        console.print("[bold red]Fed-SB pooled initialisation is not federated.[/bold red]")
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")


def _print_many(console: Console, results: list[CommResult], skipped: dict[str, str]) -> None:
    first = results[0]
    console.print(
        f"[bold]{escape(first.model)}[/bold], targets {', '.join(t.target for t in first.targets)} "
        f"({first.modules} modules), {first.clients} clients, ranks {list(first.ranks)}, {first.dtype}, "
        f"{first.rounds} round(s)"
    )
    table = Table(title="Communication per method (M parameters; MB = 10^6 bytes)")
    cols = (
        "method",
        "exact",
        "uplink/client",
        "downlink/client",
        "round, all clients",
        "round MB",
        f"{first.rounds} round(s) MB" + (" + init" if any(r.one_time for r in results) else ""),
        "global rank sum",
        "efficiency",
    )
    for col in cols:
        table.add_column(col, justify="left" if col == "method" else "right")
    for res in results:
        round_params = res.round_uplink_params + res.round_downlink_params
        total_bytes = (res.total_uplink_params + res.total_downlink_params) * res.bytes_per_value
        table.add_row(
            res.method + (f" ({res.one_time.mode} init)" if res.one_time else ""),
            "yes" if res.exact else "no",
            _spread(res.uplink_params),
            _spread(res.downlink_params),
            _mparams(round_params),
            _mbytes(round_params * res.bytes_per_value),
            _mbytes(total_bytes),
            _rank_sum(res),
            _efficiency(res),
        )
    console.print(table)
    for method, reason in skipped.items():
        console.print(f"[yellow]skipped {method}:[/yellow] {escape(reason)}")
    for res in results:
        for note in res.notes:
            console.print(f"[yellow]note ({res.method}):[/yellow] {escape(note)}")


def comm(
    model: Annotated[
        str, typer.Option("--model", "-m", help=f"A preset ({', '.join(PRESETS)}) or a config.json path / folder.")
    ],
    method: Annotated[str, typer.Option(help=f"One of {', '.join(METHODS)}, a comma list, or 'all'.")],
    targets: Annotated[
        str, typer.Option(help=f"Comma list of {', '.join(TARGETS)}, or 'all-linear'.")
    ] = "q_proj,v_proj",
    clients: Annotated[int | None, typer.Option(help="Number of clients K (default 8 with --rank).")] = None,
    rank: Annotated[int | None, typer.Option(help="The same LoRA rank on every client.")] = None,
    ranks: Annotated[str | None, typer.Option(help="One rank per client, e.g. 64,32,16,16,8,8,4,4.")] = None,
    global_rank: Annotated[
        str | None,
        typer.Option(help="FLoRIST's k*: one value, one per target, or one per module (default: its upper bound)."),
    ] = None,
    rounds: Annotated[int, typer.Option(help="Number of rounds for the totals.")] = 1,
    dtype: Annotated[str, typer.Option(help=f"Transmitted dtype: {', '.join(DTYPE_BYTES)}.")] = "fp32",
    init_mode: Annotated[
        str | None, typer.Option(help=f"Fed-SB's agreement on B and A: {', '.join(INIT_MODES)} (default seeded).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (one object, or a list for several).")] = False,
) -> None:
    """Count the parameters and bytes each client sends and receives per round, from the model's shapes."""
    console = Console()
    try:
        if rank is not None and ranks is not None:
            raise CommError("give either --rank or --ranks, not both")
        if rank is None and ranks is None:
            raise CommError("give --rank (with --clients) or --ranks (one rank per client)")
        if ranks is not None:
            client_ranks: int | list[int] = _int_list(ranks, "--ranks")
            n_clients = clients
        else:
            client_ranks, n_clients = rank, 8 if clients is None else clients
        k_star: int | list[int] | None = None
        if global_rank is not None:
            values = _int_list(global_rank, "--global-rank")
            k_star = values[0] if len(values) == 1 else values
        methods, all_methods = _methods(method)
        if k_star is not None and "florist" not in methods:
            raise CommError("--global-rank applies to florist only")
        if init_mode is not None and "fedsb" not in methods:
            raise CommError("--init-mode applies to fedsb only")

        results: list[CommResult] = []
        skipped: dict[str, str] = {}
        for name in methods:
            options = {
                "clients": n_clients,
                "rounds": rounds,
                "dtype": dtype,
                "global_rank": k_star if name == "florist" else None,
                "init_mode": init_mode if name == "fedsb" else None,
            }
            try:
                results.append(communication_cost(model, targets, name, client_ranks, **options))
            except CommError as err:
                # With 'all', methods that reject mixed ranks are reported, not fatal.
                if not (all_methods and not METHODS[name].heterogeneous and "same rank" in str(err)):
                    raise
                skipped[name] = str(err)
    except CommError as err:
        Console(stderr=True).print(f"[red]error:[/red] {escape(str(err))}")
        raise typer.Exit(code=2) from None

    if as_json:
        if len(methods) == 1:
            typer.echo(json.dumps(comm_to_dict(results[0]), indent=2))
        else:
            payload = [comm_to_dict(r) for r in results]
            payload += [{"method": name, "error": reason} for name, reason in skipped.items()]
            typer.echo(json.dumps(payload, indent=2))
    elif len(methods) == 1:
        _print_one(console, results[0])
    else:
        _print_many(console, results, skipped)
