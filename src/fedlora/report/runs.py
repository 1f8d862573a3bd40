"""Reading run folders (``config.yaml`` + ``metrics.jsonl``) into plain records; every bad input names the folder."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedlora.report.compare import CompareError, method_label, read_metrics


class ReportError(ValueError):
    """Run folders that cannot be reported; the message names the folder and what is missing."""


@dataclass
class RunData:
    """One run folder as the report sees it."""

    path: Path
    label: str
    config: dict[str, Any]  # config.yaml as saved by the engine
    metrics: list[dict[str, Any]]  # metrics.jsonl, one record per round (round 0: base evaluation, inputs)
    seconds: float | None = None  # wall time, when compare recorded it

    @property
    def method(self) -> str:
        return str(self.config.get("method", {}).get("name", "?"))

    @property
    def threshold(self) -> float | None:
        return self.config.get("method", {}).get("threshold") if self.method == "florist" else None

    @property
    def planned_rounds(self) -> int:
        return int(self.config.get("federation", {}).get("rounds", 0))

    @property
    def rounds(self) -> list[dict[str, Any]]:
        """The training rounds' records (round >= 1), in order."""
        return sorted((m for m in self.metrics if m["round"] > 0), key=lambda m: m["round"])

    @property
    def setup(self) -> dict[str, Any]:
        """Round 0: the base evaluation, the inputs' fingerprint and any one-time cost (Fed-SB's agreement)."""
        return next((m for m in self.metrics if m["round"] == 0), {})

    @property
    def finished(self) -> bool:
        return bool(self.rounds) and self.rounds[-1]["round"] >= self.planned_rounds

    @property
    def fingerprint(self) -> dict[str, Any] | None:
        return self.setup.get("inputs")


def load_run(path: str | Path, label: str | None = None, *, allow_unfinished: bool = False) -> RunData:
    """Read one run folder; a folder that is not a run (or not finished) is an error naming it."""
    run_dir = Path(path)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a folder; give run folders made by fedlora run or fedlora compare")
    missing = [name for name in ("config.yaml", "metrics.jsonl") if not (run_dir / name).is_file()]
    if missing:
        raise ReportError(
            f"{run_dir} is not a fedlora run folder: no {' or '.join(missing)} (a run folder holds config.yaml, "
            "metrics.jsonl, checkpoint/ and adapter/)"
        )
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
    except yaml.YAMLError as err:
        raise ReportError(f"{run_dir / 'config.yaml'}: not valid YAML: {err}") from None
    if not isinstance(config, dict) or "method" not in config:
        raise ReportError(f"{run_dir / 'config.yaml'} is not a fedlora run config (no 'method' section)")
    try:
        metrics = read_metrics(run_dir / "metrics.jsonl")
    except CompareError as err:
        raise ReportError(str(err)) from None
    run = RunData(run_dir, "", config, metrics, wall_seconds(metrics))
    run.label = label or method_label(run.method, run.threshold)
    if not run.rounds:
        raise ReportError(f"{run_dir} has no finished round yet (metrics.jsonl holds no round >= 1)")
    if not run.finished and not allow_unfinished:
        raise ReportError(
            f"{run_dir} is unfinished: round {run.rounds[-1]['round']} of {run.planned_rounds}; finish it with "
            "fedlora run --resume (or fedlora compare), or pass --partial to report it as it is"
        )
    return run


def load_runs(paths: Sequence[str | Path], *, allow_unfinished: bool = False) -> list[RunData]:
    """Read several run folders; labels are the folder names, made unique where two runs share one."""
    if not paths:
        raise ReportError("no run folders given")
    runs = [load_run(p, Path(p).resolve().name, allow_unfinished=allow_unfinished) for p in paths]
    seen: dict[str, int] = {}
    for run in runs:
        seen[run.label] = seen.get(run.label, 0) + 1
    for run in runs:
        if seen[run.label] > 1:  # same folder name in different places: prefix the parent folder
            run.label = f"{run.path.resolve().parent.name}/{run.label}"
    labels = [r.label for r in runs]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ReportError(f"the same run folder is given twice: {', '.join(duplicates)}")
    return runs


def wall_seconds(metrics: Sequence[dict]) -> float | None:
    """The run's wall time: the sum of its metrics lines' ``seconds`` (None for runs that did not record it)."""
    if not metrics or any("seconds" not in m for m in metrics):
        return None
    return float(sum(m["seconds"] for m in metrics))
