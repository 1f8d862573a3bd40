"""Evaluation: MMLU, the eight commonsense validation sets, GSM8K and MATH, offline, batched, protocol-labelled.

``evaluate(model, tokenizer, ["mmlu", "boolq"])`` returns ``{task: TaskResult}``; every result names the protocol
(scorer, prompt, matching rule) that produced it. Modules:

- :mod:`~fedlora.evaluate.scoring`: log-likelihood of continuations (batched, shared-prefix cache) and generation
  (greedy or seeded sampling);
- :mod:`~fedlora.evaluate.mmlu`, :mod:`~fedlora.evaluate.commonsense`, :mod:`~fedlora.evaluate.math`: data,
  prompts and answer rules of each task family; :mod:`~fedlora.evaluate.files`: local JSON/JSONL questions;
- :mod:`~fedlora.evaluate.tasks`: the registry and :func:`evaluate`.
"""

from fedlora.evaluate.base import SCORERS, EvalError, ProgressCallback, TaskResult
from fedlora.evaluate.scoring import ChoiceRequest, Sampling, generate_texts, loglik_choices
from fedlora.evaluate.tasks import TASK_GROUPS, TASKS, evaluate, resolve_tasks, task_scorers, valid_task_names

__all__ = [
    "SCORERS",
    "TASKS",
    "TASK_GROUPS",
    "ChoiceRequest",
    "EvalError",
    "ProgressCallback",
    "Sampling",
    "TaskResult",
    "evaluate",
    "generate_texts",
    "loglik_choices",
    "resolve_tasks",
    "task_scorers",
    "valid_task_names",
]
