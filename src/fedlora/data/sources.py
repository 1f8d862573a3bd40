"""One entry point for every kind of training data: built-in names, files, seeds' folders, Hugging Face ids.

A spec resolves in this order: a built-in name (``commonsense``) -> an existing local path (a JSON/JSONL file, or a
folder in the seeds' layout) -> a Hugging Face dataset id, loaded with ``datasets.load_dataset`` (which uses the
local cache first; with the hub offline and the dataset not cached, a clear error says what to use instead).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.data.commonsense import load_commonsense
from fedlora.data.errors import DataError
from fedlora.data.formats import Record, load_client_folder, load_records, normalize_records

BUILTINS = ("commonsense",)
_PATH_SUFFIXES = (".json", ".jsonl")


def load_builtin(
    name: str,
    *,
    tasks: str | Sequence[str] | None = None,
    max_per_task: int | None = None,
    seed: int = 42,
) -> list[Record]:
    """A built-in offline dataset by name; today ``commonsense`` (see :func:`fedlora.data.load_commonsense`)."""
    if name != "commonsense":
        raise DataError(f"unknown built-in dataset {name!r}; valid: {', '.join(BUILTINS)}")
    return load_commonsense(tasks=tasks, max_per_task=max_per_task, seed=seed)


@dataclass
class LoadedRecords:
    """What a spec resolved to.

    ``records`` are all training records. For a seeds' folder they are the clients' shards concatenated, and
    ``clients`` / ``test`` keep the folder's own partition (use it as is rather than re-partitioning).
    """

    records: list[Record]
    kind: str  # "builtin" | "file" | "folder" | "hub"
    source: str
    seconds: float
    clients: list[list[Record]] | None = None
    test: list[Record] | None = None


_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def _hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in _OFFLINE_VARS)


def _looks_like_path(spec: str) -> bool:
    """A local path rather than a hub id: a JSON suffix, a leading ./ / ~, a backslash, or 2+ slashes (ids have 1)."""
    return (
        spec.lower().endswith(_PATH_SUFFIXES)
        or spec.startswith((".", "/", "~"))
        or "\\" in spec
        or spec.count("/") >= 2
    )


def _load_hub(spec: str, split: str, config: str | None, category_field: str) -> list[Record]:
    alternatives = (
        "use a local JSON/JSONL file, a folder in the seeds' layout (local_training_{k}.json), or the built-in "
        "'commonsense'"
    )
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{spec!r} is not a local file, folder or built-in dataset; loading it from the Hugging Face hub needs "
            f"the 'datasets' package (pip install 'fedlora[hf]'), or {alternatives}"
        ) from None
    try:
        rows = datasets.load_dataset(spec, config, split=split)
    except Exception as err:  # the hub client raises many types (connection, not found, offline, bad config)
        if _hub_offline():
            raise DataError(
                f"{spec!r} is not a local file, folder or built-in dataset, and the Hugging Face hub is offline "
                f"(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set) with no cached copy; {alternatives}"
            ) from None
        raise DataError(
            f"could not load {spec!r} (split {split!r}) from the Hugging Face hub: {type(err).__name__}: {err}; "
            f"check the id, or {alternatives}"
        ) from None
    return normalize_records(rows, f"{spec} (Hugging Face, split {split})", category_field)


def load_records_spec(
    spec: str | os.PathLike[str],
    *,
    category_field: str = "category",
    tasks: str | Sequence[str] | None = None,
    max_per_task: int | None = None,
    seed: int = 42,
    num_clients: int | None = None,
    hf_split: str = "train",
    hf_config: str | None = None,
) -> LoadedRecords:
    """Resolve ``spec`` (built-in name, JSON/JSONL file, seeds' folder, Hugging Face id) into normalised records.

    ``tasks``, ``max_per_task`` and ``seed`` apply to built-in datasets only; ``num_clients`` to folders;
    ``hf_split`` / ``hf_config`` to hub datasets. ``category_field`` names the raw field read as the category
    (built-in datasets always use the task name).
    """
    start = time.perf_counter()
    text = os.fspath(spec)
    builtin_only = {"tasks": tasks, "max_per_task": max_per_task}
    given = [k for k, v in builtin_only.items() if v is not None]
    extra: dict[str, Any] = {}
    if text in BUILTINS:
        if category_field != "category":
            raise DataError(f"built-in dataset {text!r} has its own category (the task name); drop category_field")
        records = load_builtin(text, tasks=tasks, max_per_task=max_per_task, seed=seed)
        kind = "builtin"
    else:
        if given:
            raise DataError(f"{', '.join(given)} apply only to built-in datasets ({', '.join(BUILTINS)}), not {text!r}")
        path = Path(text).expanduser()
        if path.is_dir():
            clients, test = load_client_folder(path, num_clients, category_field)
            records = [r for shard in clients for r in shard]
            extra = {"clients": clients, "test": test}
            kind = "folder"
        elif path.is_file():
            records = load_records(path, category_field)
            kind = "file"
        elif _looks_like_path(text):
            raise DataError(f"{text}: no such file or folder")
        else:
            records = _load_hub(text, hf_split, hf_config, category_field)
            kind = "hub"
    return LoadedRecords(records, kind, text, time.perf_counter() - start, **extra)
