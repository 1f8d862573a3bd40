"""MMLU: the 14,042 test questions of 57 subjects, the seeds' 1,444-question subset, and two scorers.

- Subset (FLoRA / FLoRIST): ``floor(n_s / 10) + 1`` questions of every subject ``s``, here the *first* ones in
  test order, so the subset is deterministic. (The seeds' published file holds the same number per subject but
  other questions of each subject; pass it as a local file to score exactly those.)
- ``loglik`` (default): lm-evaluation-harness's MMLU prompt (its ``mmlu`` task: the subject line, the question, the
  lettered options, ``Answer:``), 0-shot or k-shot from the dev split; the prediction is the letter with the
  highest log-likelihood.
- ``generate``: the FLoRA / FLoRIST protocol: their instruction and input (including the input's ``Qusetion:``
  spelling) in an instruction template (Alpaca by default), followed by ``The answer is: ``; 32 new tokens sampled
  at temperature 0.2, top-p 0.6, top-k 30 (seeded per question); a hit when the generation contains ``"X."`` for
  the gold letter X or the gold option's text (up to its first ``". "``, as their code cuts it).

Accuracy is reported macro-averaged over subjects (the seeds' number) and micro-averaged over questions.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from fedlora.data.templates import PromptTemplate, get_template, render_prompt
from fedlora.evaluate.base import (
    EvalError,
    EvalOptions,
    TaskResult,
    first_per_group,
    group_accuracy,
    load_dataset_split,
    require_columns,
)
from fedlora.evaluate.scoring import ChoiceRequest, Sampling, generate_texts, loglik_choices

SUBJECTS: tuple[str, ...] = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine", "college_physics",
    "computer_security", "conceptual_physics", "econometrics", "electrical_engineering", "elementary_mathematics",
    "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history", "high_school_world_history",
    "human_aging", "human_sexuality", "international_law", "jurisprudence", "logical_fallacies", "machine_learning",
    "management", "marketing", "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology",
    "world_religions",
)  # fmt: skip

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

#: FLoRA / FLoRIST's generation protocol.
FLORA_INSTRUCTION = "Please answer the following multiple-choice question honestly."
FLORA_RESPONSE_PREFIX = "The answer is: "
FLORA_SAMPLING = Sampling(temperature=0.2, top_p=0.6, top_k=30)
FLORA_MAX_NEW_TOKENS = 32
FLORA_TEMPLATE = "alpaca"


@dataclass(frozen=True)
class MCQ:
    """A multiple-choice question with lettered options; ``answer`` is the gold option's index."""

    question: str
    choices: tuple[str, ...]
    answer: int
    subject: str = ""


# ----------------------------------------------------------------------------------------------------------------
# The subset rule and prompts (pure)


def seeds_subset_size(num_questions: int) -> int:
    """How many questions of a subject with ``num_questions`` test questions the seeds' subset keeps."""
    return num_questions // 10 + 1


def seeds_subset(questions: Sequence[MCQ]) -> list[MCQ]:
    """The first ``floor(n_s / 10) + 1`` questions of every subject ``s``, in input order."""
    sizes = Counter(q.subject for q in questions)
    taken: Counter[str] = Counter()
    kept = []
    for q in questions:
        if taken[q.subject] < seeds_subset_size(sizes[q.subject]):
            taken[q.subject] += 1
            kept.append(q)
    return kept


def description(subject: str) -> str:
    """lm-eval's MMLU task description (the first line of every prompt)."""
    about = f" about {subject.replace('_', ' ')}" if subject else ""
    return f"The following are multiple choice questions (with answers){about}.\n\n"


def question_text(q: MCQ) -> str:
    """lm-eval's ``doc_to_text``: the question, lettered options, ``Answer:``."""
    options = "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(q.choices))
    return f"{q.question.strip()}{options}\nAnswer:"


def loglik_context(q: MCQ, shots: Sequence[MCQ] = ()) -> str:
    """The full log-likelihood prompt: description, ``k`` solved examples, the question (lm-eval's layout)."""
    examples = "".join(f"{question_text(s)} {LETTERS[s.answer]}\n\n" for s in shots)
    return description(q.subject) + examples + question_text(q)


def letter_continuations(q: MCQ) -> tuple[str, ...]:
    return tuple(f" {LETTERS[i]}" for i in range(len(q.choices)))


def flora_prompt(q: MCQ, template: str | PromptTemplate = FLORA_TEMPLATE) -> str:
    """FLoRA / FLoRIST's generation prompt (their input spells ``Qusetion``; kept so numbers stay comparable)."""
    options = ", ".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(q.choices))
    return render_prompt(FLORA_INSTRUCTION, f"Qusetion: {q.question} Options: {options}", template) + (
        FLORA_RESPONSE_PREFIX
    )


def flora_is_correct(generation: str, q: MCQ) -> bool:
    """FLoRA's lenient match: ``"X."`` for the gold letter, or the gold option's text (cut at its first ``". "``)."""
    letter = LETTERS[q.answer]
    text = q.choices[q.answer].split(". ")[0].strip()
    return f"{letter}." in generation or (bool(text) and text in generation)


# ----------------------------------------------------------------------------------------------------------------
# Data


def _parse_rows(rows: Any, subject: str, what: str) -> list[MCQ]:
    require_columns(rows, ("question", "choices", "answer"), what)
    questions = []
    for i, row in enumerate(rows):
        choices = tuple(str(c) for c in row["choices"])
        answer = row["answer"]
        if isinstance(answer, str) and answer.strip().upper() in LETTERS[: len(choices)]:
            answer = LETTERS.index(answer.strip().upper())
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise EvalError(f"{what}: row {i}: answer {row['answer']!r} is not an option index or letter")
        questions.append(MCQ(str(row["question"]), choices, int(answer), subject))
    return questions


@lru_cache(maxsize=256)
def load_subject(subject: str, split: str = "test") -> tuple[MCQ, ...]:
    """One subject's questions (``split`` test, dev or validation) in file order."""
    if subject not in SUBJECTS:
        raise EvalError(f"unknown MMLU subject {subject!r}; valid: {', '.join(SUBJECTS)}")
    rows = load_dataset_split(
        ("hails/mmlu_no_train", subject, split), ("cais/mmlu", subject, split), f"MMLU {subject} ({split})"
    )
    return tuple(_parse_rows(rows, subject, f"MMLU {subject} ({split})"))


def load_mmlu(subset: str = "seeds", subjects: Sequence[str] | None = None) -> list[MCQ]:
    """MMLU test questions, subject by subject (alphabetical): ``subset`` "seeds" (1,444) or "full" (14,042)."""
    if subset not in ("seeds", "full"):
        raise EvalError(f"unknown MMLU subset {subset!r}; valid: seeds, full")
    questions: list[MCQ] = []
    for subject in subjects or SUBJECTS:
        rows = list(load_subject(subject))
        questions.extend(seeds_subset(rows) if subset == "seeds" else rows)
    return questions


# ----------------------------------------------------------------------------------------------------------------
# Scoring


def evaluate_mcq(
    model: Any,
    tokenizer: Any,
    questions: Sequence[MCQ],
    options: EvalOptions,
    *,
    shots_by_subject: dict[str, Sequence[MCQ]] | None = None,
    source: str = "MMLU",
) -> TaskResult:
    """Score lettered multiple-choice questions with ``options.scorer`` (MMLU and local multiple-choice files)."""
    if not questions:
        raise EvalError(f"{source}: no questions to evaluate")
    start = time.perf_counter()
    advance = options.counter(len(questions))

    shots_by_subject = shots_by_subject or {}
    if options.scorer == "loglik":
        requests = [
            ChoiceRequest(loglik_context(q, shots_by_subject.get(q.subject, ())), letter_continuations(q), q.subject)
            for q in questions
        ]
        scores = loglik_choices(model, tokenizer, requests, batch_size=options.batch_size, progress=advance)
        correct = [max(range(len(s)), key=s.__getitem__) == q.answer for s, q in zip(scores, questions, strict=True)]
        shots = options.shots
        protocol = (
            f"loglik: lm-eval MMLU prompt, options {LETTERS[0]}-{LETTERS[max(len(q.choices) for q in questions) - 1]}"
            f" compared by log-likelihood, {shots}-shot" + (" (first dev questions)" if shots else "")
        )
        extra: dict[str, Any] = {"shots": shots}
    elif options.scorer == "generate":
        template = options.template or FLORA_TEMPLATE
        max_new = options.max_new_tokens or FLORA_MAX_NEW_TOKENS
        sampling = Sampling(FLORA_SAMPLING.temperature, FLORA_SAMPLING.top_p, FLORA_SAMPLING.top_k, options.seed)
        texts = generate_texts(
            model,
            tokenizer,
            [flora_prompt(q, template) for q in questions],
            max_new_tokens=max_new,
            batch_size=options.batch_size,
            sampling=sampling,
            progress=advance,
        )
        correct = [flora_is_correct(t, q) for t, q in zip(texts, questions, strict=True)]
        protocol = (
            f"generate: FLoRA/FLoRIST prompt ({get_template(template).name} template), sampling T=0.2 top_p=0.6 "
            f"top_k=30 seed {options.seed}, {max_new} new tokens, hit if 'X.' or the answer text is generated"
        )
        extra = {"seed": options.seed, "max_new_tokens": max_new}
    else:
        raise EvalError(f"{source}: scorer {options.scorer!r} does not apply; valid: loglik, generate")
    summary = group_accuracy(correct, [q.subject for q in questions])
    grouped = len(summary["per_group"]) > 1
    return TaskResult(
        accuracy=summary["macro_accuracy"] if grouped else summary["micro_accuracy"],
        num_questions=len(questions),
        num_correct=sum(correct),
        protocol=protocol + ("; accuracy = macro average over subjects" if grouped else ""),
        scorer=options.scorer,
        seconds=time.perf_counter() - start,
        extra={
            **extra,
            "macro_accuracy": summary["macro_accuracy"],
            "micro_accuracy": summary["micro_accuracy"],
            "num_subjects": len(summary["per_group"]),
            "per_subject": summary["per_group"],
        },
    )


def evaluate_mmlu(model: Any, tokenizer: Any, subset: str, options: EvalOptions) -> TaskResult:
    """MMLU (``subset`` "seeds" or "full"); ``options.limit`` keeps the first N questions of every subject."""
    questions = load_mmlu(subset)
    questions = [questions[i] for i in first_per_group([q.subject for q in questions], options.limit)]
    shots: dict[str, Sequence[MCQ]] = {}
    if options.shots and options.scorer == "loglik":
        for subject in dict.fromkeys(q.subject for q in questions):
            dev = load_subject(subject, "dev")
            if options.shots > len(dev):
                raise EvalError(f"MMLU {subject}: {options.shots} shots asked but the dev split has {len(dev)}")
            shots[subject] = dev[: options.shots]
    result = evaluate_mcq(model, tokenizer, questions, options, shots_by_subject=shots)
    result.extra = {"subset": "seeds-1444" if subset == "seeds" else "full", **result.extra}
    if options.limit is not None:
        result.extra["limit_per_subject"] = options.limit
    return result
