"""Pure table assembly: from run records to rows (dicts), the Pareto front, FLoRIST's rank matrix, the inputs check.

No I/O and no plotting here, so every number of the report is testable against hand-computed values.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fedlora.engine.fingerprint import COMPONENTS, fingerprint_differences
from fedlora.report.runs import RunData

#: the results table's fixed columns (task accuracies ``acc_<task>`` are inserted after ``clients``)
COLUMNS = (
    "label",
    "method",
    "threshold",
    "ranks",
    "rounds",
    "clients",
    "accuracy",
    "accuracy_stderr",
    "base_accuracy",
    "eval_loss",
    "base_eval_loss",
    "train_loss",
    "uplink_bytes_per_round",
    "downlink_bytes_per_round",
    "setup_uplink_bytes",
    "setup_downlink_bytes",
    "uplink_bytes",
    "downlink_bytes",
    "total_bytes",
    "florist_rank_mean",
    "florist_rank_min",
    "florist_rank_max",
    "florist_rank_sum",
    "stacked_rank",
    "energy_kept_mean",
    "wall_seconds",
)


def last_eval(run: RunData, key: str) -> Any:
    """The latest training round's evaluation value ``key`` (``eval_loss``, ``tasks``, ``accuracy``), or None."""
    for record in reversed(run.rounds):
        value = (record.get("eval") or {}).get(key)
        if value is not None:
            return value
    return None


def task_names(runs: Sequence[RunData]) -> list[str]:
    """Tasks evaluated by any run, in first-seen order."""
    names: dict[str, None] = {}
    for run in runs:
        for name in last_eval(run, "tasks") or {}:
            names.setdefault(name, None)
    return list(names)


def ranks_text(config: dict[str, Any]) -> str:
    lora = config.get("lora", {})
    if lora.get("heterogeneous"):
        return "[" + ",".join(str(r) for r in lora.get("local_ranks", [])) + "]"
    return str(lora.get("r", ""))


def accuracy_stderr(tasks: dict[str, Any]) -> float | None:
    """Standard error of the macro-averaged accuracy from the binomial error of each task's questions."""
    variances = []
    for result in tasks.values():
        n, p = result.get("num_questions"), result.get("accuracy")
        if not n or p is None:
            return None
        variances.append(p * (1 - p) / n)
    return math.sqrt(sum(variances)) / len(variances) if variances else None


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def run_row(run: RunData, tasks: Sequence[str] = ()) -> dict[str, Any]:
    """One results row: accuracy per task and on average, losses, bytes per round and in total, ranks, time."""
    rounds, setup = run.rounds, run.setup
    final_tasks = last_eval(run, "tasks") or {}
    base_eval = setup.get("eval") or {}
    up_rounds = [r.get("uplink_bytes", 0) for r in rounds]
    down_rounds = [r.get("downlink_bytes", 0) for r in rounds]
    setup_up, setup_down = setup.get("uplink_bytes", 0), setup.get("downlink_bytes", 0)
    row: dict[str, Any] = {
        "label": run.label,
        "method": run.method,
        "threshold": run.threshold,
        "ranks": ranks_text(run.config),
        "rounds": len(rounds),
        "clients": run.config.get("data", {}).get("num_clients"),
    }
    for task in tasks:
        row[f"acc_{task}"] = final_tasks[task]["accuracy"] if task in final_tasks else None
    florist = run.method == "florist"  # FlexLoRA's records carry SVD ranks too; only FLoRIST's are kept ranks
    final_ranks = rounds[-1].get("global_ranks") if rounds and florist else None
    energy = rounds[-1].get("energy_kept") if rounds and florist else None
    row.update(
        accuracy=last_eval(run, "accuracy"),
        accuracy_stderr=accuracy_stderr(final_tasks),
        base_accuracy=base_eval.get("accuracy"),
        eval_loss=last_eval(run, "eval_loss"),
        base_eval_loss=base_eval.get("eval_loss"),
        train_loss=rounds[-1].get("train_loss") if rounds else None,
        uplink_bytes_per_round=_mean(up_rounds),
        downlink_bytes_per_round=_mean(down_rounds),
        setup_uplink_bytes=setup_up,
        setup_downlink_bytes=setup_down,
        uplink_bytes=setup_up + sum(up_rounds),
        downlink_bytes=setup_down + sum(down_rounds),
        total_bytes=setup_up + setup_down + sum(up_rounds) + sum(down_rounds),
        florist_rank_mean=_mean(list(final_ranks.values())) if final_ranks else None,
        florist_rank_min=min(final_ranks.values()) if final_ranks else None,
        florist_rank_max=max(final_ranks.values()) if final_ranks else None,
        florist_rank_sum=sum(final_ranks.values()) if final_ranks else None,
        stacked_rank=sum(c.get("rank", 0) for c in rounds[-1].get("clients", [])) if final_ranks else None,
        energy_kept_mean=_mean(list(energy.values())) if energy else None,
        wall_seconds=run.seconds,
    )
    return row


def results_rows(runs: Sequence[RunData]) -> tuple[list[str], list[dict[str, Any]]]:
    """The results table: its columns (fixed ones plus ``acc_<task>``) and one row per run."""
    tasks = task_names(runs)
    columns = list(COLUMNS)
    at = columns.index("clients") + 1
    columns[at:at] = [f"acc_{t}" for t in tasks]
    return columns, [run_row(run, tasks) for run in runs]


def bytes_per_round(runs: Sequence[RunData]) -> tuple[list[int], list[dict[str, Any]]]:
    """Bytes up and down of every round (round 0: one-time set-up cost), per run: ``{label, up: {r: b}, down}``."""
    all_rounds = sorted({m["round"] for run in runs for m in run.metrics})
    rows = []
    for run in runs:
        by_round = {m["round"]: m for m in run.metrics}
        rows.append(
            {
                "label": run.label,
                "up": {r: by_round[r].get("uplink_bytes", 0) for r in all_rounds if r in by_round},
                "down": {r: by_round[r].get("downlink_bytes", 0) for r in all_rounds if r in by_round},
            }
        )
    return all_rounds, rows


ROUND_COLUMNS = (
    "label",
    "round",
    "uplink_bytes",
    "downlink_bytes",
    "train_loss",
    "eval_loss",
    "accuracy",
    "kept_rank_sum",
)


def round_rows(runs: Sequence[RunData]) -> list[dict[str, Any]]:
    """One row per run and round (round 0: set-up and base evaluation): bytes, losses, accuracy, FLoRIST's ranks."""
    rows = []
    for run in runs:
        for record in sorted(run.metrics, key=lambda m: m["round"]):
            ev = record.get("eval") or {}
            ranks = record.get("global_ranks") if run.method == "florist" else None
            rows.append(
                {
                    "label": run.label,
                    "round": record["round"],
                    "uplink_bytes": record.get("uplink_bytes", 0),
                    "downlink_bytes": record.get("downlink_bytes", 0),
                    "train_loss": record.get("train_loss"),
                    "eval_loss": ev.get("eval_loss"),
                    "accuracy": ev.get("accuracy"),
                    "kept_rank_sum": sum(ranks.values()) if ranks else None,
                }
            )
    return rows


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (fewer or equal bytes AND higher or equal score, one strictly).

    ``points`` are ``(bytes, score)`` with higher score better; the front is returned in order of bytes.
    """
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def _natural_key(text: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def rank_matrix(run: RunData) -> tuple[list[str], list[int], list[list[int | None]]] | None:
    """FLoRIST's kept rank per module (rows, in layer order) and round (columns); None for other methods."""
    rounds = [r for r in run.rounds if r.get("global_ranks")]
    if not rounds or run.method != "florist":
        return None
    modules = sorted({name for r in rounds for name in r["global_ranks"]}, key=_natural_key)
    matrix = [[r["global_ranks"].get(name) for r in rounds] for name in modules]
    return modules, [r["round"] for r in rounds], matrix


def rank_summary(run: RunData) -> list[dict[str, Any]]:
    """Per round: mean, min and max kept rank over modules, the stacked rank it was cut from, mean energy kept."""
    rows = []
    for record in run.rounds:
        ranks = record.get("global_ranks")
        if not ranks or run.method != "florist":
            continue
        energy = record.get("energy_kept") or {}
        rows.append(
            {
                "round": record["round"],
                "rank_mean": sum(ranks.values()) / len(ranks),
                "rank_min": min(ranks.values()),
                "rank_max": max(ranks.values()),
                "rank_sum": sum(ranks.values()),
                "stacked_rank": sum(c.get("rank", 0) for c in record.get("clients", [])),
                "modules": len(ranks),
                "energy_kept_mean": _mean(list(energy.values())),
            }
        )
    return rows


@dataclass
class InputsCheck:
    """Whether all runs recorded the same inputs' fingerprint; ``lines`` say so in words for report and console."""

    identical: bool
    lines: list[str]


def check_inputs(runs: Sequence[RunData]) -> InputsCheck:
    """Compare the runs' recorded input fingerprints (seed, base weights, data split, eval set, first batches)."""
    fingerprints = {run.label: run.fingerprint for run in runs}
    diff = fingerprint_differences(fingerprints)
    if not diff:
        fp = runs[0].fingerprint or {}
        sizes = fp.get("client_sizes", [])
        subject = f"All {len(runs)} runs share the same inputs" if len(runs) > 1 else "A single run; its inputs"
        return InputsCheck(
            True,
            [
                f"{subject}: seed {fp.get('seed')}, base weights "
                f"`{fp.get('base_weights')}`, client split `{fp.get('data_split')}` ({len(sizes)} clients of "
                f"{', '.join(map(str, sizes))} examples), evaluation set `{fp.get('eval_set')}` and first training "
                f"batch of every client `{fp.get('first_batches')}` (SHA-256 prefixes recorded at round 0)."
            ],
        )
    reference = next((run.label for run in runs if run.fingerprint), None)
    lines = []
    if "missing" in diff:
        lines.append(
            f"WARNING: no input fingerprint recorded for {', '.join(diff.pop('missing'))} (a run from before "
            "fingerprints were recorded): identical inputs NOT verified for it."
        )
    for component in COMPONENTS:
        if component in diff:
            lines.append(
                f"WARNING: different {component.replace('_', ' ')}: {', '.join(diff[component])} vs {reference}; "
                "these runs did NOT see identical inputs, their comparison is not like for like."
            )
    return InputsCheck(False, lines)


def config_differences_across(runs: Sequence[RunData]) -> list[str]:
    """Config keys (besides method, output_dir) whose values differ between runs, e.g. ``lora.r``."""
    from fedlora.report.compare import config_differences

    keys: set[str] = set()
    first = runs[0].config
    for run in runs[1:]:
        keys.update(config_differences(first, run.config, ignore=("method", "output_dir")))
    return sorted(keys)
