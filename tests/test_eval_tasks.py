"""The task registry and ``evaluate``: names, groups, aliases, argument checks before any work, model mode."""

from __future__ import annotations

import pytest
import torch

from fedlora.evaluate import TASKS, EvalError, evaluate, resolve_tasks, task_scorers
from fedlora.evaluate import commonsense as commonsense_eval
from fedlora.evaluate.testing import OracleLM, answer_oracle
from fedlora.models import byte_level_tokenizer

EIGHT = ["boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "obqa"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_resolve_tasks_names_groups_aliases_and_order():
    assert resolve_tasks("mmlu, boolq") == ["mmlu", "boolq"]
    assert resolve_tasks(["BoolQ", "socialiqa", "openbookqa", "ARC-Easy"]) == ["boolq", "siqa", "obqa", "arc_easy"]
    assert resolve_tasks("commonsense") == EIGHT
    assert resolve_tasks("piqa,commonsense,piqa") == ["piqa"] + [t for t in EIGHT if t != "piqa"]
    assert resolve_tasks("gsm8k,math,math_algebra,my/file.jsonl") == ["gsm8k", "math", "math_algebra", "my/file.jsonl"]


@pytest.mark.parametrize("bad", ["mmlu,foo", "", " , ", "math_calculus"])
def test_unknown_tasks_list_the_valid_ones(bad):
    with pytest.raises(EvalError, match=r"valid: mmlu, mmlu_full, boolq.*groups: commonsense.*local \.json"):
        resolve_tasks(bad)


def test_every_registered_task_has_a_default_scorer():
    for name, spec in TASKS.items():
        assert spec.scorers[0] in ("loglik", "generate"), name
    assert task_scorers("mmlu") == ("loglik", "generate")
    assert task_scorers("gsm8k") == ("generate",)


class Untouchable(torch.nn.Module):
    """A model that fails if it is run: argument errors must come before any work."""

    def forward(self, *args, **kwargs):
        raise AssertionError("the model ran")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"limit": 0}, "limit must be an integer >= 1"),
        ({"limit": True}, "limit must be an integer >= 1"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
        ({"shots": -1}, "shots must be an integer >= 0"),
        ({"scorer": "vibes"}, "unknown scorer 'vibes'; valid: loglik, generate"),
        ({"template": "nope"}, "unknown prompt template 'nope'; valid: alpaca, commonsense"),
        ({"tasks": "boolq,gsm8k", "scorer": "loglik"}, "task 'gsm8k': scorer 'loglik' does not apply"),
        ({"tasks": "boolq,nonsense"}, "unknown task 'nonsense'"),
        ({"tasks": "boolq,missing.jsonl"}, "missing.jsonl: no such file"),
    ],
)
def test_bad_arguments_fail_before_any_work(kwargs, message):
    tasks = kwargs.pop("tasks", "boolq")
    with pytest.raises(EvalError, match=message):
        evaluate(Untouchable(), byte_level_tokenizer(), tasks, **kwargs)


def test_evaluate_runs_in_eval_mode_restores_the_mode_and_reports_progress(monkeypatch):
    from fedlora.data import MCQuestion

    questions = tuple(MCQuestion(f"Question number {i}?", ("yes", "no"), i % 2) for i in range(5))
    monkeypatch.setattr(commonsense_eval, "load_validation", lambda task: questions)
    answers = {q.question: " " + ("true" if q.gold == 0 else "false") for q in questions}
    model = OracleLM(byte_level_tokenizer(), answer_oracle(answers, "the correct answer is"))
    model.train()
    reports = []
    results = evaluate(model, model.tokenizer, ["boolq"], batch_size=2, progress=lambda *args: reports.append(args))
    assert results["boolq"].accuracy == 1.0
    assert model.training  # restored
    assert model.modes and not any(model.modes)  # but it ran in eval mode
    assert reports == [("boolq", 2, 5), ("boolq", 4, 5), ("boolq", 5, 5)]
    model.eval()
    evaluate(model, model.tokenizer, ["boolq"])
    assert not model.training


def test_the_mode_is_restored_after_an_error(monkeypatch):
    def boom(task):
        raise EvalError("data went missing")

    monkeypatch.setattr(commonsense_eval, "load_validation", boom)
    model = OracleLM(byte_level_tokenizer(), lambda text: None).train()
    with pytest.raises(EvalError, match="data went missing"):
        evaluate(model, model.tokenizer, ["piqa"])
    assert model.training
