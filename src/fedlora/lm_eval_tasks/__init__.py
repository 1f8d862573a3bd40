"""lm-evaluation-harness tasks for fedlora's offline evaluation data.

lm-eval task YAMLs read their data from files (``dataset_path: json``), so :func:`export_lm_eval_tasks` writes the
offline questions as JSON lines into ``<folder>/data/`` and one YAML per task into ``<folder>/`` (each including a
template shipped in this package), after which

    HF_DATASETS_OFFLINE=1 lm_eval --model hf --model_args pretrained=<model folder>,peft=<adapter folder> \\
        --tasks fedlora_mmlu1444 --include_path <folder>

runs offline. Task names: ``fedlora_mmlu1444`` (the seeds' subset, a group of ``fedlora_mmlu1444_<subject>``),
``fedlora_mmlu`` (all 14,042 questions), ``fedlora_<task>`` for the eight commonsense sets (group
``fedlora_commonsense``). The prompts are exactly those of ``fedlora eval --scorer loglik``, so lm-eval's ``acc``
and fedlora's ``loglik`` accuracy agree. The MMLU groups average over subjects (macro), as the seeds report.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedlora.data.commonsense import TASKS as COMMONSENSE_TASKS
from fedlora.data.templates import PromptTemplate
from fedlora.evaluate.base import EvalError
from fedlora.evaluate.commonsense import DEFAULT_TEMPLATE, load_validation, loglik_request
from fedlora.evaluate.mmlu import SUBJECTS, description, load_mmlu, load_subject
from fedlora.evaluate.tasks import resolve_tasks

TEMPLATES_DIR = Path(__file__).parent
MMLU_TEMPLATE = "_fedlora_mmlu_template.yaml"
COMMONSENSE_TEMPLATE = "_fedlora_commonsense_template.yaml"
MARKER = ".fedlora-lm-eval.json"  # marks a folder written by this module: a later export may replace it

#: fedlora task -> lm-eval task or group name.
LM_EVAL_NAMES: dict[str, str] = {
    "mmlu": "fedlora_mmlu1444",
    "mmlu_full": "fedlora_mmlu",
    **{task: f"fedlora_{task}" for task in COMMONSENSE_TASKS},
}
COMMONSENSE_GROUP = "fedlora_commonsense"


@dataclass
class ExportResult:
    folder: Path  # pass as --include_path
    tasks: dict[str, str]  # fedlora task -> lm-eval task or group name
    questions: int
    seconds: float


def _jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _yaml(path: Path, content: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(content, sort_keys=False, allow_unicode=True, width=1000), encoding="utf-8")


def _write_mmlu(tmp: Path, final: Path, subset: str) -> int:
    """Per-subject test files, the dev files for few-shot, a YAML per subject and the group YAML."""
    group = LM_EVAL_NAMES["mmlu" if subset == "seeds" else "mmlu_full"]
    questions = load_mmlu(subset)
    names = []
    for subject in SUBJECTS:
        test = [q for q in questions if q.subject == subject]
        rows = [
            {"question": q.question, "choices": list(q.choices), "answer": q.answer, "subject": subject} for q in test
        ]
        dev = [
            {"question": q.question, "choices": list(q.choices), "answer": q.answer, "subject": subject}
            for q in load_subject(subject, "dev")
        ]
        _jsonl(tmp / "data" / group / f"{subject}.jsonl", rows)
        _jsonl(tmp / "data" / "mmlu_dev" / f"{subject}.jsonl", dev)
        name = f"{group}_{subject}"
        names.append(name)
        _yaml(
            tmp / f"{name}.yaml",
            {
                "include": MMLU_TEMPLATE,
                "task": name,
                "task_alias": subject,
                "dataset_kwargs": {
                    "data_files": {
                        "test": str(final / "data" / group / f"{subject}.jsonl"),
                        "dev": str(final / "data" / "mmlu_dev" / f"{subject}.jsonl"),
                    }
                },
                "description": description(subject),
            },
        )
    _yaml(
        tmp / f"{group}.yaml",
        {
            "group": group,
            "task": names,
            "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": False}],
            "metadata": {"version": 1.0},
        },
    )
    return len(questions)


def _write_commonsense(tmp: Path, final: Path, tasks: Sequence[str], template: str | PromptTemplate) -> int:
    count = 0
    for task in tasks:
        rows = []
        for q in load_validation(task):
            request = loglik_request(task, q, template)
            labels = [c.removeprefix(" ") for c in request.continuations]
            rows.append({"context": request.context, "labels": labels, "gold": q.gold, "doc_id": q.doc_id})
        data = final / "data" / "commonsense" / f"{task}.jsonl"
        _jsonl(tmp / "data" / "commonsense" / f"{task}.jsonl", rows)
        _yaml(
            tmp / f"{LM_EVAL_NAMES[task]}.yaml",
            {
                "include": COMMONSENSE_TEMPLATE,
                "task": LM_EVAL_NAMES[task],
                "dataset_kwargs": {"data_files": {"test": str(data)}},
            },
        )
        count += len(rows)
    _yaml(
        tmp / f"{COMMONSENSE_GROUP}.yaml",
        {
            "group": COMMONSENSE_GROUP,
            "task": [LM_EVAL_NAMES[t] for t in tasks],
            "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": False}],
            "metadata": {"version": 1.0},
        },
    )
    return count


def export_lm_eval_tasks(
    folder: str | os.PathLike[str],
    tasks: str | Sequence[str] | None = None,
    *,
    template: str | PromptTemplate = DEFAULT_TEMPLATE,
) -> ExportResult:
    """Write lm-eval task YAMLs and their JSONL data for ``tasks`` (default: all of :data:`LM_EVAL_NAMES`).

    ``template`` is the instruction template of the commonsense prompts (use the one the model was trained with).
    The folder is written atomically; an existing folder is replaced only if it is empty or a previous export.
    """
    start = time.perf_counter()
    chosen = list(LM_EVAL_NAMES) if tasks is None else resolve_tasks(tasks)
    unsupported = [t for t in chosen if t not in LM_EVAL_NAMES]
    if unsupported:
        raise EvalError(f"no lm-eval export for {', '.join(unsupported)}; exportable: {', '.join(LM_EVAL_NAMES)}")
    final = Path(folder).expanduser().absolute()
    if final.exists() and (not final.is_dir() or (any(final.iterdir()) and not (final / MARKER).is_file())):
        raise EvalError(f"{final} exists and is not an empty folder nor a previous lm-eval export; choose another")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        shutil.copy(TEMPLATES_DIR / MMLU_TEMPLATE, tmp / MMLU_TEMPLATE)
        shutil.copy(TEMPLATES_DIR / COMMONSENSE_TEMPLATE, tmp / COMMONSENSE_TEMPLATE)
        questions = 0
        for subset, task in (("seeds", "mmlu"), ("full", "mmlu_full")):
            if task in chosen:
                questions += _write_mmlu(tmp, final, subset)
        commonsense = [t for t in COMMONSENSE_TASKS if t in chosen]
        if commonsense:
            questions += _write_commonsense(tmp, final, commonsense, template)
        exported = {t: LM_EVAL_NAMES[t] for t in chosen}
        (tmp / MARKER).write_text(json.dumps({"tasks": exported}, indent=1))
        tmp.chmod(0o755)
        if final.exists():
            trash = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(final, exported, questions, time.perf_counter() - start)
