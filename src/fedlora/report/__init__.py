"""Side-by-side reports of finished runs: tables (CSV, markdown) and plots, and the ``fedlora compare`` planner.

    runs = load_runs(["runs/compare/fedit", "runs/compare/florist-0.9"])
    files = write_report(runs, "runs/compare/report")  # report.md, results.csv, rounds.csv, *.png

Tables are assembled by pure functions (``fedlora.report.table``) from ``config.yaml`` and ``metrics.jsonl``; the
files of one report are written into a temporary folder and moved into place only when all of them succeeded.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedlora.report.runs import ReportError, RunData, load_run, load_runs
from fedlora.report.table import (
    ROUND_COLUMNS,
    InputsCheck,
    check_inputs,
    config_differences_across,
    results_rows,
    round_rows,
)
from fedlora.report.writers import report_markdown, to_csv

REPORT_FILES = ("report.md", "results.csv", "rounds.csv", "pareto.png", "loss.png")


@dataclass
class Report:
    output_dir: Path
    files: list[Path]
    inputs: InputsCheck
    rows: list[dict]


def _file_label(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label)


def render_report(
    runs: Sequence[RunData], folder: Path, *, title: str = "Comparison", command: str | None = None, plots: bool = True
) -> Report:
    """Write report.md, results.csv and the plots into ``folder`` (which must exist)."""
    columns, rows = results_rows(runs)
    inputs = check_inputs(runs)
    files = []
    images: dict[str, str] = {}
    if plots:
        from fedlora.report.plots import loss_plot, pareto_plot, rank_heatmap

        files.append(pareto_plot(rows, folder / "pareto.png"))
        images["pareto.png"] = "accuracy against total bytes"
        files.append(loss_plot(runs, folder / "loss.png"))
        images["loss.png"] = "loss curves"
        for run in runs:
            name = f"ranks-{_file_label(run.label)}.png"
            if rank_heatmap(run, folder / name) is not None:
                files.append(folder / name)
                images[name] = f"{run.label}: kept rank per module and round"
    (folder / "results.csv").write_text(to_csv(columns, rows))
    (folder / "rounds.csv").write_text(to_csv(ROUND_COLUMNS, round_rows(runs)))
    text = report_markdown(
        runs,
        rows,
        inputs,
        images,
        title=title,
        command=command,
        differing_keys=config_differences_across(runs),
    )
    (folder / "report.md").write_text(text + "\n")
    files[:0] = [folder / "report.md", folder / "results.csv", folder / "rounds.csv"]
    return Report(folder, files, inputs, rows)


def write_report(
    runs: Sequence[RunData],
    output_dir: str | Path,
    *,
    title: str = "Comparison",
    command: str | None = None,
    plots: bool = True,
    replace_folder: bool = True,
) -> Report:
    """Write a report atomically: into a temporary folder beside ``output_dir``, then moved into place.

    ``replace_folder=True``: ``output_dir`` becomes the report folder (an existing report folder is replaced; a
    folder holding anything else is an error). ``False``: the files are moved into ``output_dir`` one by one,
    beside what it holds (``fedlora compare`` writes its report next to the run folders).
    """
    out = Path(output_dir)
    if replace_folder and out.exists():
        if not out.is_dir():
            raise ReportError(f"--output {out} exists and is not a folder")
        stray = [p.name for p in out.iterdir() if not _is_report_file(p.name)]
        if stray:
            raise ReportError(
                f"--output {out} holds other files ({', '.join(sorted(stray)[:5])}); choose an empty or new folder"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    if not replace_folder:
        out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.report-", dir=out.parent if replace_folder else out))
    try:
        report = render_report(runs, tmp, title=title, command=command, plots=plots)
        if replace_folder:
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        else:
            for old in out.glob("ranks-*.png"):  # heat maps of runs no longer in the comparison
                old.unlink()
            for path in report.files:
                os.replace(path, out / path.name)
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report.output_dir = out
    report.files = [out / p.name for p in report.files]
    return report


def _is_report_file(name: str) -> bool:
    return name in REPORT_FILES or (name.startswith("ranks-") and name.endswith(".png"))


__all__ = ["Report", "ReportError", "RunData", "load_run", "load_runs", "render_report", "write_report"]
