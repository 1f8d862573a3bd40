"""CSV and markdown writers for the tables of ``fedlora.report.table`` (strings and files, no plotting)."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

from fedlora.report.runs import RunData
from fedlora.report.table import InputsCheck, bytes_per_round, last_eval, rank_summary, task_names


def to_csv(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    """The rows as CSV text; missing values are empty cells, floats keep full precision."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})
    return out.getvalue()


def fmt_bytes(value: float | None) -> str:
    if value is None:
        return "–"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value:.0f} B"


def fmt_pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def fmt_num(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def fmt_seconds(value: float | None) -> str:
    if value is None:
        return "–"
    minutes, seconds = divmod(value, 60)
    return f"{int(minutes)} min {seconds:02.0f} s" if minutes else f"{seconds:.1f} s"


def markdown_table(header: Sequence[str], body: Sequence[Sequence[str]], align: str | None = None) -> str:
    """A GitHub markdown table; ``align`` is one letter per column (l or r), right by default except the first."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def results_markdown(runs: Sequence[RunData], rows: Sequence[dict[str, Any]]) -> str:
    """The main table: accuracy per task and average (%), losses, bytes per round and in total, wall time."""
    tasks = task_names(runs)
    header = [
        "method",
        "ranks",
        *tasks,
        "avg acc (%)",
        "held-out loss",
        "up / round",
        "down / round",
        "one-time",
        "total bytes",
        "wall time",
    ]
    body = []
    for row in rows:
        setup = (row["setup_uplink_bytes"] or 0) + (row["setup_downlink_bytes"] or 0)
        body.append(
            [
                row["label"],
                row["ranks"],
                *[fmt_pct(row.get(f"acc_{t}")) for t in tasks],
                fmt_pct(row["accuracy"]) + (f" ± {fmt_pct(row['accuracy_stderr'])}" if row["accuracy_stderr"] else ""),
                fmt_num(row["eval_loss"]),
                fmt_bytes(row["uplink_bytes_per_round"]),
                fmt_bytes(row["downlink_bytes_per_round"]),
                fmt_bytes(setup) if setup else "–",
                fmt_bytes(row["total_bytes"]),
                fmt_seconds(row["wall_seconds"]),
            ]
        )
    return markdown_table(header, body, "ll" + "r" * (len(header) - 2))


def bytes_markdown(runs: Sequence[RunData]) -> str:
    """Bytes up / down of every round (round 0 is the one-time set-up: Fed-SB's agreement on B and A)."""
    rounds, rows = bytes_per_round(runs)
    header = ["method", *[("setup" if r == 0 else f"round {r}") + " up / down" for r in rounds]]
    body = [
        [row["label"], *[f"{fmt_bytes(row['up'].get(r))} / {fmt_bytes(row['down'].get(r))}" for r in rounds]]
        for row in rows
    ]
    return markdown_table(header, body)


def ranks_markdown(runs: Sequence[RunData]) -> str:
    """FLoRIST's kept ranks per round: summary over modules and the stacked rank they were cut from."""
    header = ["method", "round", "modules", "kept rank mean", "min", "max", "sum", "stacked rank", "energy kept"]
    body = []
    for run in runs:
        for s in rank_summary(run):
            body.append(
                [
                    run.label,
                    str(s["round"]),
                    str(s["modules"]),
                    f"{s['rank_mean']:.1f}",
                    str(s["rank_min"]),
                    str(s["rank_max"]),
                    str(s["rank_sum"]),
                    str(s["stacked_rank"]),
                    fmt_num(s["energy_kept_mean"], 3),
                ]
            )
    return markdown_table(header, body) if body else ""


def setting_lines(config: dict[str, Any], scorer_used: str | None = None) -> list[str]:
    """The shared setting in a few words, from the first run's config (and the scorer its evaluation used)."""
    lora, data, fed, train, ev = (config.get(k, {}) for k in ("lora", "data", "federation", "train", "eval"))
    ranks = (
        f"heterogeneous ranks {lora.get('local_ranks')} (alpha = {lora.get('alpha_per_rank'):g} r_k)"
        if lora.get("heterogeneous")
        else f"rank {lora.get('r')} (alpha {lora.get('alpha'):g})"
    )
    steps = f"{train.get('max_steps')} steps" if train.get("max_steps") else f"{train.get('epochs')} epochs"
    partition = data.get("partition")
    if partition == "dirichlet":
        partition = f"Dirichlet alpha {data.get('dirichlet_alpha'):g}"
    tasks = ev.get("tasks") or []
    lines = [
        f"- model `{config.get('model')}`, seed {config.get('seed')}, transmitted values {config.get('comm_dtype')}",
        f"- data `{data.get('source')}` ({data.get('template')} template, cutoff {data.get('cutoff_len')} tokens), "
        f"{data.get('num_clients')} clients, {partition}",
        f"- LoRA on {', '.join(lora.get('target_modules', []))}, {ranks}",
        f"- {fed.get('rounds')} rounds, client fraction {fed.get('client_fraction'):g}; local training {steps} "
        f"of batch {train.get('batch_size')}, learning rate {train.get('learning_rate'):g}",
    ]
    if tasks:
        scorer = ev.get("scorer") or scorer_used or "each task's default scorer"
        limit = f"the first {ev.get('limit')} questions of each" if ev.get("limit") else "all questions"
        lines.append(f"- accuracy: {', '.join(tasks)} ({limit}, {scorer}); held-out loss on the fixed test sample")
    return lines


def report_markdown(
    runs: Sequence[RunData],
    rows: Sequence[dict[str, Any]],
    inputs: InputsCheck,
    images: dict[str, str],
    *,
    title: str = "Comparison",
    command: str | None = None,
    differing_keys: Sequence[str] = (),
) -> str:
    """The whole ``report.md``: setting, inputs check, results, bytes per round, FLoRIST ranks, plots."""
    parts = [f"# {title}", ""]
    if command:
        parts += ["```", command, "```", ""]
    scorers = {t.get("scorer") for t in (last_eval(runs[0], "tasks") or {}).values() if t.get("scorer")}
    parts += ["## Setting", "", *setting_lines(runs[0].config, ", ".join(sorted(scorers)) or None), ""]
    if differing_keys:
        parts += [f"**Note:** the runs' configs also differ in {', '.join(differing_keys)}.", ""]
    parts += ["## Identical inputs", ""]
    parts += [
        ("✓ " if inputs.identical else "**⚠ ") + line + ("" if inputs.identical else "**") for line in inputs.lines
    ]
    parts += ["", "## Results", "", results_markdown(runs, rows), ""]
    parts += [
        "Accuracy in % on the final global model (± the binomial standard error of the average); held-out loss on "
        "the fixed test sample; bytes per round are means over training rounds of all clients' traffic; one-time "
        "is the set-up before round 1 (Fed-SB's agreement on B and A); total bytes = up + down over the whole run.",
        "",
    ]
    base = next((r for r in rows if r["base_accuracy"] is not None or r["base_eval_loss"] is not None), None)
    if base is not None:
        parts += [
            f"Base model before training: accuracy {fmt_pct(base['base_accuracy'])} %, held-out loss "
            f"{fmt_num(base['base_eval_loss'])}.",
            "",
        ]
    parts += ["## Communication per round", "", bytes_markdown(runs), ""]
    ranks = ranks_markdown(runs)
    if ranks:
        parts += ["## FLoRIST's kept ranks", "", ranks, ""]
    if images:
        parts += ["## Plots", ""]
        parts += [f"![{caption}]({name})" for name, caption in images.items()]
        parts += [""]
    return "\n".join(parts)
