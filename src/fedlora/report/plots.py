"""Matplotlib figures of a comparison: accuracy against bytes (Pareto), loss curves, FLoRIST's kept-rank heat map."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedlora.report.runs import ReportError, RunData
from fedlora.report.table import pareto_front, rank_matrix

DPI = 110  # small PNGs that still read well in a README


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ReportError("plots need matplotlib: pip install 'fedlora[plots]'") from None
    matplotlib.use("Agg", force=True)  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    fig.clf()
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


PANELS = {  # key: (title, y label, scale to display, higher is better)
    "accuracy": ("Accuracy against communication", "average accuracy (%)", 100.0, True),
    "eval_loss": ("Held-out loss against communication", "held-out loss (lower is better)", 1.0, False),
}


def pareto_plot(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Accuracy and held-out loss (each when any run has it) against total bytes, log x; Pareto fronts dashed."""
    plt = _pyplot()
    keys = [k for k in PANELS if any(r[k] is not None and r["total_bytes"] for r in rows)]
    if not keys:
        raise ReportError("nothing to plot: no run has an accuracy or held-out loss and a byte count")
    fig, axes = plt.subplots(1, len(keys), figsize=(6.4 * len(keys), 4.6), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        _pareto_panel(ax, rows, key)
    return _save(fig, path)


def _pareto_panel(ax, rows: Sequence[dict[str, Any]], key: str) -> None:
    title, ylabel, scale, higher = PANELS[key]
    points = [r for r in rows if r[key] is not None and r["total_bytes"]]
    colors = {r["label"]: f"C{i % 10}" for i, r in enumerate(rows)}
    # runs at the same point (e.g. FedIT and FlexLoRA move the same bytes) share one label
    labels: dict[tuple[float, float], list[str]] = {}
    for row in points:
        y = row[key] * scale
        labels.setdefault((row["total_bytes"], round(y, 9)), []).append(row["label"])
        ax.scatter(row["total_bytes"], y, s=46, zorder=3, color=colors[row["label"]])
        err = row.get("accuracy_stderr") if key == "accuracy" else None
        if err:
            ax.errorbar(row["total_bytes"], y, yerr=err * scale, color=colors[row["label"]], alpha=0.3, zorder=2)
    for (x, y), names in labels.items():
        ax.annotate(", ".join(names), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=9)
    sign = 1 if higher else -1
    front = pareto_front([(r["total_bytes"], sign * r[key]) for r in points])
    if len(front) > 1:
        xs = [points[i]["total_bytes"] for i in front]
        ys = [points[i][key] * scale for i in front]
        ax.plot(xs, ys, "--", color="grey", lw=1, zorder=1, label="Pareto front")
        ax.legend(loc="best", fontsize=8)
    base = next((r[f"base_{key}"] for r in rows if r.get(f"base_{key}") is not None), None)
    if base is not None:
        ax.axhline(base * scale, color="black", lw=0.8, ls=":")
        ax.annotate(
            "base model", (0.01, base * scale), xycoords=("axes fraction", "data"), fontsize=8, va="top", ha="left"
        )
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())  # labels on the decades only: minor labels overlap
    ax.set_xlabel("total bytes sent, up + down (log scale)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)


def loss_plot(runs: Sequence[RunData], path: Path) -> Path:
    """Held-out loss at every evaluated round (round 0: the base model) and clients' mean train loss per round."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        evals = [(m["round"], m["eval"]["eval_loss"]) for m in run.metrics if (m.get("eval") or {}).get("eval_loss")]
        evals.sort()
        if evals:
            left.plot(*zip(*evals, strict=True), "o-", color=color, label=run.label)
        train = [(m["round"], m["train_loss"]) for m in run.rounds if m.get("train_loss") is not None]
        if train:
            right.plot(*zip(*train, strict=True), "o-", color=color, label=run.label)
    left.set_title("held-out loss of the global model")
    right.set_title("clients' train loss (weighted mean)")
    for ax in (left, right):
        ax.set_xlabel("round")
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    left.set_ylabel("loss")
    handles, labels = left.get_legend_handles_labels()
    if not handles:
        handles, labels = right.get_legend_handles_labels()
    if handles:
        right.legend(handles, labels, fontsize=8, loc="best")
    return _save(fig, path)


def rank_heatmap(run: RunData, path: Path) -> Path | None:
    """FLoRIST's kept rank per module (rows) and round (columns); None when the run kept no ranks (not FLoRIST)."""
    table = rank_matrix(run)
    if table is None:
        return None
    modules, rounds, matrix = table
    plt = _pyplot()
    import numpy as np

    values = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    height = min(max(3.0, 0.16 * len(modules) + 1.5), 16.0)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(rounds) + 3.2), height))
    image = ax.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(rounds)), [str(r) for r in rounds])
    step = max(1, len(modules) // 40)  # at most ~40 module names on the axis
    ax.set_yticks(range(0, len(modules), step), [_short(m) for m in modules[::step]], fontsize=7)
    ax.set_xlabel("round")
    if len(modules) * len(rounds) <= 400:
        for (y, x), v in np.ndenumerate(values):
            if not np.isnan(v):
                ax.text(x, y, f"{int(v)}", ha="center", va="center", fontsize=6, color="white")
    fig.colorbar(image, ax=ax, label="kept rank")
    ax.set_title(f"{run.label}: kept rank per module and round")
    return _save(fig, path)


def _short(module: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``3.q_proj``: enough to read the axis."""
    parts = module.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        if i + 1 < len(parts):
            return f"{parts[i + 1]}.{parts[-1]}"
    return module
