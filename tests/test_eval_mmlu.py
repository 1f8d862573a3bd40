"""MMLU: the seeds' subset rule, the two prompts, FLoRA's lenient match, macro/micro accuracy, both scorers."""

from __future__ import annotations

import pytest

from fedlora.data.templates import render_prompt
from fedlora.evaluate import mmlu
from fedlora.evaluate.base import EvalError, EvalOptions
from fedlora.evaluate.mmlu import (
    MCQ,
    SUBJECTS,
    description,
    evaluate_mcq,
    flora_is_correct,
    flora_prompt,
    load_mmlu,
    load_subject,
    loglik_context,
    seeds_subset,
    seeds_subset_size,
)
from fedlora.evaluate.testing import OracleLM, answer_oracle
from fedlora.models import byte_level_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def q(question: str, answer: int = 0, subject: str = "s", choices=("w", "x", "y", "z")) -> MCQ:
    return MCQ(question, tuple(choices), answer, subject)


# ----------------------------------------------------------------------------------------------------------------
# The subset rule


@pytest.mark.parametrize(("n", "kept"), [(1, 1), (9, 1), (10, 2), (19, 2), (100, 11), (135, 14), (1534, 154)])
def test_seeds_subset_size(n, kept):
    assert seeds_subset_size(n) == kept


def test_seeds_subset_keeps_the_first_questions_of_each_subject_in_order():
    questions = [q(f"a{i}", subject="a") for i in range(25)] + [q(f"b{i}", subject="b") for i in range(9)]
    questions = questions[::2] + questions[1::2]  # interleave: order within a subject is what counts
    kept = seeds_subset(questions)
    a_order = [x.question for x in questions if x.subject == "a"]
    assert [x.question for x in kept if x.subject == "a"] == a_order[:3]  # 25 // 10 + 1
    assert [x.question for x in kept if x.subject == "b"] == [x.question for x in questions if x.subject == "b"][:1]
    assert [x for x in questions if x in kept] == kept  # input order preserved


@pytest.mark.integration
def test_the_real_subset_has_1444_questions_over_57_subjects():
    full = load_mmlu("full")
    subset = load_mmlu("seeds")
    assert len(full) == 14_042
    assert len(subset) == 1_444
    assert sorted({x.subject for x in subset}) == sorted(SUBJECTS) and len(SUBJECTS) == 57
    for subject in ("anatomy", "professional_law", "abstract_algebra"):
        test = list(load_subject(subject))
        chosen = [x for x in subset if x.subject == subject]
        assert chosen == test[: len(test) // 10 + 1]
    assert sum(1 for x in subset if x.subject == "anatomy") == 14  # 135 test questions
    assert len(load_subject("anatomy", "dev")) == 5


# ----------------------------------------------------------------------------------------------------------------
# Prompts


def test_loglik_prompt_is_lm_evals_mmlu_prompt():
    question = q("  What is 1+1? ", 1, "high_school_math", ("1", "2", "3", "4"))
    assert description("high_school_math") == (
        "The following are multiple choice questions (with answers) about high school math.\n\n"
    )
    assert loglik_context(question) == (
        "The following are multiple choice questions (with answers) about high school math.\n\n"
        "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:"
    )
    shot = q("Pick z", 3)
    assert loglik_context(question, [shot, shot]) == (
        "The following are multiple choice questions (with answers) about high school math.\n\n"
        "Pick z\nA. w\nB. x\nC. y\nD. z\nAnswer: D\n\n"
        "Pick z\nA. w\nB. x\nC. y\nD. z\nAnswer: D\n\n"
        "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:"
    )


def test_flora_prompt_is_their_alpaca_prompt_with_the_answer_prefix():
    question = q("Which is a fruit?", 2, choices=("car", "rock", "apple", "sky"))
    expected_input = "Qusetion: Which is a fruit? Options: A. car, B. rock, C. apple, D. sky"
    assert flora_prompt(question) == (
        render_prompt("Please answer the following multiple-choice question honestly.", expected_input, "alpaca")
        + "The answer is: "
    )
    assert "### Input:\nQusetion: Which is a fruit?" in flora_prompt(question)
    assert flora_prompt(question, "commonsense").startswith("Below is an instruction")


@pytest.mark.parametrize(
    ("generation", "hit"),
    [
        ("C. apple", True),
        ("C.", True),
        ("apple", True),  # the answer text alone
        ("I think it is an apple pie", True),  # lenient: text anywhere
        ("C", False),  # a bare letter is not "C."
        ("A. car", False),
        ("Apple", False),  # case-sensitive, as theirs
        ("", False),
    ],
)
def test_flora_lenient_match(generation, hit):
    assert flora_is_correct(generation, q("Which is a fruit?", 2, choices=("car", "rock", "apple", "sky"))) is hit


def test_flora_match_cuts_the_answer_text_at_its_first_sentence_break():
    question = q("?", 0, choices=("It rains. Then it pours.", "b", "c", "d"))
    assert flora_is_correct("It rains", question)
    assert not flora_is_correct("Then it pours", question)


def test_flora_match_ignores_an_empty_answer_text():
    assert not flora_is_correct("anything", q("?", 0, choices=("", "b", "c", "d")))


# ----------------------------------------------------------------------------------------------------------------
# Scoring (fake model with known answers)

QUESTIONS = [
    q("Two plus two?", 1, "math"),
    q("Three plus three?", 3, "math"),
    q("Colour of grass?", 0, "bio"),
    q("Colour of blood?", 2, "bio"),
    q("Colour of snow?", 2, "bio"),
]


def oracle(questions, wrong: set[str] = frozenset()) -> OracleLM:
    """Answers every question right, except those in ``wrong`` (answered with the next letter)."""
    tok = byte_level_tokenizer()
    answers = {
        x.question: " " + "ABCD"[(x.answer + (x.question in wrong)) % 4] for x in questions
    }  # keyed by question text
    return OracleLM(tok, answer_oracle(answers, "Answer:"))


def test_loglik_scoring_macro_and_micro():
    model = oracle(QUESTIONS, wrong={"Colour of snow?"})
    result = evaluate_mcq(model, model.tokenizer, QUESTIONS, EvalOptions(scorer="loglik", batch_size=2))
    assert result.num_questions == 5 and result.num_correct == 4
    assert result.extra["per_subject"] == {"math": 1.0, "bio": pytest.approx(2 / 3)}
    assert result.extra["micro_accuracy"] == pytest.approx(4 / 5)
    assert result.accuracy == result.extra["macro_accuracy"] == pytest.approx((1 + 2 / 3) / 2)
    assert "macro average over subjects" in result.protocol and result.protocol.startswith("loglik")


def test_loglik_scoring_with_shots_puts_the_examples_in_the_prompt():
    shots = {"math": [q("Shot question one?", 3, "math")], "bio": [q("Shot question two?", 1, "bio")]}
    model = oracle(QUESTIONS)
    options = EvalOptions(scorer="loglik", shots=1)
    result = evaluate_mcq(model, model.tokenizer, QUESTIONS, options, shots_by_subject=shots)
    assert result.accuracy == 1.0
    assert "1-shot" in result.protocol


def test_generate_scoring_uses_floras_prompt_sampling_and_match(monkeypatch):
    seen = {}

    def fake_generate(model, tokenizer, prompts, *, max_new_tokens, batch_size, sampling, progress):
        seen.update(prompts=prompts, max_new_tokens=max_new_tokens, sampling=sampling)
        progress(len(prompts))
        return ["B. yes", "nothing", "A.", "The answer is y", "D. z"]

    monkeypatch.setattr(mmlu, "generate_texts", fake_generate)
    reports = []
    options = EvalOptions(scorer="generate", seed=7, progress=lambda done, total: reports.append((done, total)))
    result = evaluate_mcq(None, None, QUESTIONS, options)
    assert seen["prompts"] == [flora_prompt(x) for x in QUESTIONS]
    assert seen["max_new_tokens"] == 32
    assert (seen["sampling"].temperature, seen["sampling"].top_p, seen["sampling"].top_k) == (0.2, 0.6, 30)
    assert seen["sampling"].seed == 7
    # hits: "B." (gold B), miss, "A." (gold A), "y" is the gold text of C, "D." but gold C -> miss
    assert result.num_correct == 3
    assert result.extra["per_subject"] == {"math": 0.5, "bio": pytest.approx(2 / 3)}
    assert reports == [(5, 5)]


def test_unknown_subject_and_subset_are_errors():
    with pytest.raises(EvalError, match="unknown MMLU subject 'astrology'"):
        load_subject("astrology")
    with pytest.raises(EvalError, match="valid: seeds, full"):
        load_mmlu("half")
