"""``fedlora compare``: one config, several methods, identical inputs; resumable, finished runs skipped.

    plan = plan_compare(load_config("compare-default"), ["fedit", "flora", "florist"], thresholds=[0.8, 0.9])
    for run in plan.runs: run.status   # new / finished / resume / restart

Each method's run is the base config with only ``method.name`` (and FLoRIST's ``method.threshold``) and
``output_dir = <compare dir>/<label>`` changed, so every run shares the client split, initial weights, data order
and seed (the engine records a fingerprint of those inputs; the report checks it). Every config is validated
before anything trains: an unknown method or one the config does not allow (e.g. heterogeneous ranks with
FFA-LoRA) fails first.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from fedlora.config import ConfigError, RunConfig, validate
from fedlora.methods import METHODS

Status = Literal["new", "finished", "resume", "restart"]


class CompareError(ValueError):
    """A comparison that cannot start; the message names the method, folder or option and the valid choices."""


@dataclass(frozen=True)
class PlannedRun:
    label: str  # folder name inside the comparison folder, e.g. "fedit", "florist-0.9"
    config: RunConfig
    status: Status
    reason: str = ""

    @property
    def run_dir(self) -> Path:
        return Path(self.config.output_dir)


@dataclass
class ComparePlan:
    output_dir: Path
    runs: list[PlannedRun]
    skipped: dict[str, str] = field(default_factory=dict)  # method -> why (only with "all")


def method_label(name: str, threshold: float | None = None) -> str:
    """``fedit``; ``florist-0.9`` (FLoRIST is labelled with its threshold)."""
    return f"{name}-{threshold:g}" if name == "florist" and threshold is not None else name


def parse_methods(text: str | Sequence[str]) -> tuple[list[str], bool]:
    """Method names (deduplicated, in order) and whether the user asked for ``all``."""
    items = [m.strip().lower() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    if items == ["all"]:
        return list(METHODS), True
    unknown = [m for m in items if m not in METHODS]
    if unknown:
        raise CompareError(f"unknown method(s) {', '.join(unknown)} in --methods; valid: {', '.join(METHODS)} or all")
    if not items:
        raise CompareError(f"--methods is empty; valid: {', '.join(METHODS)} or all")
    return list(dict.fromkeys(items)), False


def parse_thresholds(text: str | Sequence[float] | None) -> list[float] | None:
    if text is None:
        return None
    raw = text.split(",") if isinstance(text, str) else list(text)
    values = []
    for item in raw:
        if isinstance(item, str) and not item.strip():
            continue
        try:
            value = float(item)
        except ValueError:
            raise CompareError(f"--thresholds expects numbers in (0, 1] separated by commas, got {item!r}") from None
        if not 0 < value <= 1:
            raise CompareError(f"--thresholds: FLoRIST's threshold must lie in (0, 1], got {value:g}")
        values.append(value)
    if not values:
        raise CompareError("--thresholds is empty; give e.g. 0.8,0.9,0.99")
    return list(dict.fromkeys(values))


def method_configs(
    base: RunConfig, methods: Sequence[str], thresholds: Sequence[float] | None, output_dir: Path, *, skip_invalid: bool
) -> tuple[dict[str, RunConfig], dict[str, str]]:
    """One validated config per label; invalid combinations raise (or are skipped with a reason for ``all``)."""
    if thresholds is not None and "florist" not in methods:
        raise CompareError("--thresholds applies to florist, which is not among --methods")
    configs: dict[str, RunConfig] = {}
    skipped: dict[str, str] = {}
    errors: list[str] = []
    for name in methods:
        taus: list[float | None] = list(thresholds or [base.method.threshold]) if name == "florist" else [None]
        for tau in taus:
            label = method_label(name, tau)
            data = base.model_dump(mode="json")
            data["method"]["name"] = name
            if tau is not None:
                data["method"]["threshold"] = tau
            data["output_dir"] = str(output_dir / label)
            try:
                configs[label] = validate(data)
            except ConfigError as err:
                reason = str(err).removeprefix("invalid configuration:\n  ").removeprefix("config: ")
                reason = reason.replace("\n  ", "; ")
                if skip_invalid:
                    skipped[label] = reason
                else:
                    errors.append(f"{label}: {reason}")
    if errors:
        valid = [n for n in METHODS if _accepts(base, n)]
        raise CompareError(
            "these methods cannot run this config (nothing was trained):\n  "
            + "\n  ".join(errors)
            + f"\nmethods that accept it: {', '.join(valid)}"
        )
    if not configs:
        raise CompareError("no method can run this config: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    return configs, skipped


def _accepts(base: RunConfig, name: str) -> bool:
    data = base.model_dump(mode="json")
    data["method"]["name"] = name
    try:
        validate(data)
    except ConfigError:
        return False
    return True


def config_differences(saved: dict[str, Any], wanted: dict[str, Any], ignore: Sequence[str] = ()) -> list[str]:
    """Dotted keys whose values differ between two config dicts (``ignore``: dotted keys left out)."""
    out: list[str] = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        if prefix in ignore:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted({*a, *b}):
                walk(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)
        elif a != b:
            out.append(prefix)

    walk(saved, wanted, "")
    return out


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``; a broken line is an error naming the file and line."""
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CompareError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or "round" not in record:
            raise CompareError(f"{path}:{number}: a metrics record must be an object with a 'round'")
        records.append(record)
    return records


def run_status(config: RunConfig) -> tuple[Status, str]:
    """What to do with a method's run folder: train it, skip it (finished), resume it, or restart it.

    Finished means: the saved config equals this one, ``metrics.jsonl`` holds the final round and ``adapter/``
    was exported. A saved config that differs in anything but ``federation.rounds`` is an error (the folder holds
    another experiment); more rounds than saved resume the run.
    """
    run_dir = Path(config.output_dir)
    metrics_path, saved_path = run_dir / "metrics.jsonl", run_dir / "config.yaml"
    has_checkpoint = (run_dir / "checkpoint" / "state.json").is_file() or (
        run_dir / ".checkpoint-old" / "state.json"
    ).is_file()
    if not metrics_path.exists() and not has_checkpoint:
        return "new", ""
    wanted = config.model_dump(mode="json")
    if saved_path.is_file():
        saved = yaml.safe_load(saved_path.read_text()) or {}
        changed = config_differences(saved, wanted, ignore=("federation.rounds", "output_dir"))
        if changed:
            raise CompareError(
                f"{run_dir} holds a run with a different config (differs in {', '.join(changed)}); pass --overwrite "
                "to replace it or choose another --output"
            )
    if not has_checkpoint:
        return "restart", "no checkpoint yet"
    rounds = [m["round"] for m in read_metrics(metrics_path)] if metrics_path.exists() else []
    last = max(rounds, default=0)
    adapter = (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    if last >= config.federation.rounds and adapter:
        if last > config.federation.rounds:
            raise CompareError(
                f"{run_dir} ran {last} rounds but federation.rounds is {config.federation.rounds}; "
                "pass --overwrite to rerun it or choose another --output"
            )
        return "finished", f"{last} rounds"
    return "resume", f"after round {last} of {config.federation.rounds}"


def plan_compare(
    base: RunConfig,
    methods: str | Sequence[str],
    thresholds: str | Sequence[float] | None = None,
    output_dir: str | Path | None = None,
    *,
    overwrite: bool = False,
) -> ComparePlan:
    """Validate every method's config and decide per run folder what to do; nothing is written."""
    names, everything = parse_methods(methods)
    taus = parse_thresholds(thresholds)
    out = Path(output_dir if output_dir is not None else base.output_dir)
    if out.exists() and not out.is_dir():
        raise CompareError(f"--output {out} exists and is not a folder")
    configs, skipped = method_configs(base, names, taus, out, skip_invalid=everything)
    runs = []
    for label, config in configs.items():
        status, reason = ("new", "--overwrite") if overwrite else run_status(config)
        runs.append(PlannedRun(label, config, status, reason))
    return ComparePlan(out, runs, skipped)


def execute_plan(
    plan: ComparePlan,
    *,
    overwrite: bool = False,
    progress: bool = True,
    on_start: Callable[[PlannedRun], None] | None = None,
) -> dict[str, float]:
    """Train the runs that are not finished, one after another; returns this session's seconds per label.

    Each run's own wall time, across resumed sessions, is the sum of its ``metrics.jsonl`` lines' ``seconds``.
    """
    from fedlora.engine.local import Engine  # heavy imports only when training

    plan.output_dir.mkdir(parents=True, exist_ok=True)
    spent: dict[str, float] = {}
    for run in plan.runs:
        if run.status == "finished":
            continue
        if on_start is not None:
            on_start(run)
        start = time.perf_counter()
        engine = Engine(
            run.config,
            resume=run.status == "resume",
            overwrite=overwrite or run.status == "restart",
            progress=progress,
        )
        engine.run()
        spent[run.label] = time.perf_counter() - start
    return spent
