"""Local evaluation files: a JSON array or JSON lines of questions, in one of two formats.

- **multiple choice**: ``{"question": str, "choices": [str, ...], "answer": int | "B" | "<choice text>"}`` with 2 to
  26 choices; ``answer`` is the 0-based index, the letter, or the text of the correct choice; an optional
  ``"subject"`` groups questions (accuracy is then macro-averaged over subjects). Scored like MMLU: ``loglik``
  over the letters after the lm-eval MMLU prompt, or ``generate`` with the FLoRA / FLoRIST protocol.
- **open answer**: ``{"question": str, "answer": str | number}``. Scored by generation: a numeric answer with the
  GSM8K rule (first number after ``The answer is``), any other answer with the MATH rule (last ``\\boxed{}``,
  normalised comparison); a gold answer written as ``\\boxed{...}`` is unwrapped.

The format is chosen by the first record (``choices`` present or not); every record must follow it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedlora.evaluate.base import EvalError, EvalOptions, TaskResult
from fedlora.evaluate.math import OpenQuestion, evaluate_open, last_boxed, parse_number
from fedlora.evaluate.mmlu import LETTERS, MCQ, evaluate_mcq

FORMATS = (
    "accepted formats: a JSON array or JSON lines of objects, multiple choice {question, choices: [...], answer: "
    "index | letter | choice text, subject?} or open answer {question, answer}"
)
SUFFIXES = (".json", ".jsonl")


def looks_like_file(name: str) -> bool:
    """A task name that names a local file rather than a built-in task."""
    return name.lower().endswith(SUFFIXES) or "/" in name or "\\" in name or Path(name).is_file()


def read_rows(path: Path) -> list[tuple[str, Any]]:
    """``(where, row)`` of every record of a JSON array or JSON-lines file (``where`` names it in errors)."""
    if not path.is_file():
        raise EvalError(f"{path}: no such file (a task name ending in .json/.jsonl is read as a local file); {FORMATS}")
    try:
        text = path.read_text(encoding="utf-8").lstrip("\ufeff")
    except (OSError, UnicodeDecodeError) as err:
        raise EvalError(f"{path}: cannot read as UTF-8 text: {err}") from None
    if not text.strip():
        raise EvalError(f"{path}: the file is empty; {FORMATS}")
    if text.lstrip()[0] == "[":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise EvalError(f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
        located = [(f"{path}: record {i} (0-based)", row) for i, row in enumerate(rows)]
    else:
        located = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                located.append((f"{path}: line {lineno}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise EvalError(f"{path}: malformed JSON on line {lineno}, column {err.colno}: {err.msg}") from None
    if not located:
        raise EvalError(f"{path}: no records; {FORMATS}")
    return located


def _question(row: Any, where: str) -> str:
    if not isinstance(row, dict):
        raise EvalError(f"{where}: expected a JSON object, got {type(row).__name__}; {FORMATS}")
    value = row.get("question")
    if not isinstance(value, str) or not value.strip():
        problem = "missing field 'question'" if value is None else "field 'question' must be a non-empty string"
        raise EvalError(f"{where}: {problem} (keys: {sorted(row)}); {FORMATS}")
    if "answer" not in row:
        raise EvalError(f"{where}: missing field 'answer' (keys: {sorted(row)}); {FORMATS}")
    return value


def parse_choice_row(row: Any, where: str) -> MCQ:
    question = _question(row, where)
    choices = row.get("choices")
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
        raise EvalError(f"{where}: field 'choices' must be a list of 2 to {len(LETTERS)} options; {FORMATS}")
    choices = tuple(str(c) for c in choices)
    answer = row["answer"]
    if isinstance(answer, bool):
        index = None
    elif isinstance(answer, int):
        index = answer if 0 <= answer < len(choices) else None
    elif isinstance(answer, str) and answer.strip().upper() in LETTERS[: len(choices)] and len(answer.strip()) == 1:
        index = LETTERS.index(answer.strip().upper())
    elif isinstance(answer, str) and answer in choices:
        index = choices.index(answer)
    else:
        index = None
    if index is None:
        raise EvalError(
            f"{where}: answer {answer!r} is neither an index 0-{len(choices) - 1}, a letter "
            f"{LETTERS[0]}-{LETTERS[len(choices) - 1]} nor the text of a choice"
        )
    subject = row.get("subject")
    return MCQ(question, choices, index, "" if subject is None else str(subject))


def parse_open_row(row: Any, where: str) -> OpenQuestion:
    question = _question(row, where)
    answer = row["answer"]
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or not str(answer).strip():
        raise EvalError(f"{where}: field 'answer' must be a non-empty string or a number, got {answer!r}")
    text = str(answer).strip()
    text = last_boxed(text) or text
    kind = "number" if parse_number(text) is not None else "math"
    return OpenQuestion(question, text, kind, str(row.get("subject") or ""))


def load_file(path: str | Path) -> list[MCQ] | list[OpenQuestion]:
    """The questions of a local file, multiple choice or open answer (see the module docstring)."""
    rows = read_rows(Path(path))
    first_where, first = rows[0]
    if not isinstance(first, dict):
        raise EvalError(f"{first_where}: expected a JSON object, got {type(first).__name__}; {FORMATS}")
    if "choices" in first:
        return [parse_choice_row(row, where) for where, row in rows]
    return [parse_open_row(row, where) for where, row in rows]


def evaluate_file(model: Any, tokenizer: Any, path: str, options: EvalOptions) -> TaskResult:
    """A local file's accuracy; ``options.limit`` keeps its first N questions."""
    questions = load_file(path)[: options.limit]
    if isinstance(questions[0], MCQ):
        result = evaluate_mcq(model, tokenizer, questions, options, source=str(path))  # type: ignore[arg-type]
        result.extra = {"format": "multiple choice", **result.extra}
    else:
        result = evaluate_open(model, tokenizer, questions, options, str(path))  # type: ignore[arg-type]
        result.extra = {"format": "open answer", **result.extra}
    if options.limit is not None:
        result.extra["limit"] = options.limit
    return result
