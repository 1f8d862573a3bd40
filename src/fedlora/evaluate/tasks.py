"""The task registry and :func:`evaluate`, the one entry point the CLI and the engine call."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fedlora.data.commonsense import TASKS as COMMONSENSE_TASKS
from fedlora.data.commonsense import task_name as commonsense_task_name
from fedlora.data.errors import DataError
from fedlora.data.templates import PromptTemplate, get_template
from fedlora.evaluate.base import (
    SCORERS,
    EvalError,
    EvalOptions,
    ProgressCallback,
    TaskResult,
    check_positive_int,
)
from fedlora.evaluate.commonsense import evaluate_commonsense
from fedlora.evaluate.files import evaluate_file, load_file, looks_like_file
from fedlora.evaluate.math import MATH_SUBJECTS, evaluate_math_task
from fedlora.evaluate.mmlu import MCQ, evaluate_mmlu

TaskRunner = Callable[[Any, Any, str, EvalOptions], TaskResult]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    description: str
    scorers: tuple[str, ...]  # the ones that apply; the first is the default
    run: TaskRunner


def _mmlu(subset: str) -> TaskRunner:
    return lambda model, tokenizer, _name, options: evaluate_mmlu(model, tokenizer, subset, options)


_MC = ("loglik", "generate")
_GEN = ("generate",)

TASKS: dict[str, TaskSpec] = {
    "mmlu": TaskSpec("mmlu", "MMLU, the seeds' 1,444-question subset (floor(n/10)+1 per subject)", _MC, _mmlu("seeds")),
    "mmlu_full": TaskSpec("mmlu_full", "MMLU, all 14,042 test questions of 57 subjects", _MC, _mmlu("full")),
    **{
        name: TaskSpec(name, f"{name} validation set, commonsense_170k format", _MC, evaluate_commonsense)
        for name in COMMONSENSE_TASKS
    },
    "gsm8k": TaskSpec("gsm8k", "GSM8K test (1,319)", _GEN, evaluate_math_task),
    "math500": TaskSpec("math500", "MATH-500", _GEN, evaluate_math_task),
    "math": TaskSpec("math", "MATH test, the seven subjects (5,000)", _GEN, evaluate_math_task),
    **{
        f"math_{s}": TaskSpec(f"math_{s}", f"MATH test, {s.replace('_', ' ')}", _GEN, evaluate_math_task)
        for s in MATH_SUBJECTS
    },
}

#: Names that stand for several tasks.
TASK_GROUPS: dict[str, tuple[str, ...]] = {"commonsense": tuple(COMMONSENSE_TASKS)}


def valid_task_names() -> str:
    return (
        f"{', '.join(TASKS)}; groups: {', '.join(TASK_GROUPS)}; or a local .json/.jsonl file "
        "(multiple choice {question, choices, answer} or open answer {question, answer})"
    )


def resolve_tasks(tasks: str | Sequence[str]) -> list[str]:
    """Task names in the order given (comma-separated string or list), groups expanded, aliases canonical,
    duplicates dropped. Unknown names raise :class:`EvalError` listing the valid ones."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    resolved: list[str] = []
    for raw in names:
        name = str(raw).strip()
        if not name:
            continue
        key = name.lower()
        if key in TASKS:
            expanded: Sequence[str] = (key,)
        elif key in TASK_GROUPS:
            expanded = TASK_GROUPS[key]
        elif looks_like_file(name):
            expanded = (name,)
        else:
            try:
                expanded = (commonsense_task_name(key),)  # aliases: socialiqa, openbookqa, arc-easy...
            except DataError:
                raise EvalError(f"unknown task {name!r}; valid: {valid_task_names()}") from None
        resolved.extend(n for n in expanded if n not in resolved)
    if not resolved:
        raise EvalError(f"no task given; valid: {valid_task_names()}")
    return resolved


def task_scorers(name: str) -> tuple[str, ...]:
    """The scorers that apply to a (resolved) task; the first is its default. Reads a local file's first record."""
    if name in TASKS:
        return TASKS[name].scorers
    return _MC if isinstance(load_file(name)[0], MCQ) else _GEN


def evaluate(
    model: Any,
    tokenizer: Any,
    tasks: str | Sequence[str],
    *,
    limit: int | None = None,
    scorer: str | None = None,
    batch_size: int = 8,
    template: str | PromptTemplate | None = None,
    shots: int = 0,
    max_new_tokens: int | None = None,
    seed: int = 0,
    progress: ProgressCallback | None = None,
) -> dict[str, TaskResult]:
    """Evaluate a causal LM (PEFT-wrapped or not) on tasks; ``{task: TaskResult}`` in the order given.

    - ``tasks``: names (see :data:`TASKS`, :data:`TASK_GROUPS`) or local JSON/JSONL files, as a list or a
      comma-separated string.
    - ``limit``: the first N questions of every task; of every subject for ``mmlu``, ``mmlu_full`` and ``math``.
    - ``scorer``: "loglik" or "generate"; None picks each task's default (loglik for multiple choice, generate for
      GSM8K / MATH / open-answer files). A scorer that does not apply to a task is an error.
    - ``template``: the prompt template of instruction-style prompts (commonsense tasks, MMLU ``generate``, math);
      None uses each protocol's own (``commonsense`` for the commonsense tasks, ``alpaca`` otherwise). Pass the
      template the model was fine-tuned with.
    - ``shots``: MMLU ``loglik`` only: the first k dev questions of the subject as solved examples.
    - ``max_new_tokens``: generation length (defaults: 32 for MMLU and commonsense, 512 for math).
    - ``seed``: MMLU ``generate`` sampling seed (per question: results do not depend on ``batch_size``).
    - ``progress(task, done, total)`` is called after every batch.

    The model is put in eval mode and returned to its previous mode afterwards. Every argument and task is
    checked before the first question runs.
    """
    check_positive_int(limit, "limit", allow_none=True)
    check_positive_int(batch_size, "batch_size")
    check_positive_int(max_new_tokens, "max_new_tokens", allow_none=True)
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0:
        raise EvalError(f"shots must be an integer >= 0, got {shots!r}")
    if scorer is not None and scorer not in SCORERS:
        raise EvalError(f"unknown scorer {scorer!r}; valid: {', '.join(SCORERS)}")
    if template is not None:
        try:
            template = get_template(template)
        except DataError as err:
            raise EvalError(str(err)) from None
    names = resolve_tasks(tasks)
    plan = []
    for name in names:
        allowed = task_scorers(name)
        chosen = scorer or allowed[0]
        if chosen not in allowed:
            raise EvalError(f"task {name!r}: scorer {chosen!r} does not apply; valid for it: {', '.join(allowed)}")
        plan.append((name, chosen))

    results: dict[str, TaskResult] = {}
    was_training = model.training
    model.eval()
    try:
        for name, chosen in plan:
            report = None if progress is None else (lambda done, total, name=name: progress(name, done, total))
            options = EvalOptions(
                scorer=chosen,  # type: ignore[arg-type]
                limit=limit,
                batch_size=batch_size,
                template=template,
                shots=shots,
                max_new_tokens=max_new_tokens,
                seed=seed,
                progress=report,
            )
            run = TASKS[name].run if name in TASKS else evaluate_file
            results[name] = run(model, tokenizer, name, options)
    finally:
        model.train(was_training)
    return results
