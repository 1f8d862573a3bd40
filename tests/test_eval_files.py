"""Local evaluation files: the two formats, answers given as index / letter / text, and errors naming the record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlora.evaluate import evaluate
from fedlora.evaluate.base import EvalError
from fedlora.evaluate.files import load_file
from fedlora.evaluate.math import OpenQuestion
from fedlora.evaluate.mmlu import MCQ
from fedlora.evaluate.testing import OracleLM, answer_oracle
from fedlora.models import byte_level_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


MC_ROWS = [
    {"question": "Pick the fruit", "choices": ["car", "apple", "rock"], "answer": 1, "subject": "food"},
    {"question": "Pick the metal", "choices": ["iron", "wood"], "answer": "A", "subject": "things"},
    {"question": "Pick the colour", "choices": ["red", "dog", "cat", "cow", "hen"], "answer": "red"},
]


def test_multiple_choice_file_answers_by_index_letter_or_text(tmp_path):
    questions = load_file(write_jsonl(tmp_path / "mc.jsonl", MC_ROWS))
    assert questions == [
        MCQ("Pick the fruit", ("car", "apple", "rock"), 1, "food"),
        MCQ("Pick the metal", ("iron", "wood"), 0, "things"),
        MCQ("Pick the colour", ("red", "dog", "cat", "cow", "hen"), 0, ""),
    ]


def test_a_json_array_works_too(tmp_path):
    path = tmp_path / "mc.json"
    path.write_text(json.dumps(MC_ROWS, indent=1))
    assert len(load_file(path)) == 3


def test_open_answer_file(tmp_path):
    rows = [
        {"question": "2+2?", "answer": 4},
        {"question": "Half?", "answer": "\\boxed{\\frac{1}{2}}"},
        {"question": "Name?", "answer": "Evelyn"},
    ]
    questions = load_file(write_jsonl(tmp_path / "open.jsonl", rows))
    assert questions == [
        OpenQuestion("2+2?", "4", "number"),
        OpenQuestion("Half?", "\\frac{1}{2}", "math"),
        OpenQuestion("Name?", "Evelyn", "math"),
    ]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"question": "q"}], r"line 1: missing field 'answer'"),
        ([{"answer": 1}], r"line 1: missing field 'question'"),
        ([{"question": "", "answer": 1}], "'question' must be a non-empty string"),
        ([MC_ROWS[0], {"question": "q", "answer": 0}], r"line 2: field 'choices' must be a list"),
        ([{"question": "q", "choices": ["a"], "answer": 0}], "2 to 26 options"),
        ([{"question": "q", "choices": ["a", "b"], "answer": 2}], r"answer 2 is neither an index 0-1, a letter A-B"),
        ([{"question": "q", "choices": ["a", "b"], "answer": "C"}], "neither an index"),
        ([{"question": "q", "choices": ["a", "b"], "answer": True}], "neither an index"),
        ([{"question": "q", "answer": None}], "must be a non-empty string or a number"),
        ([["not", "an", "object"]], "expected a JSON object"),
    ],
)
def test_bad_records_are_named(tmp_path, rows, message):
    with pytest.raises(EvalError, match=message):
        load_file(write_jsonl(tmp_path / "bad.jsonl", rows))


def test_bad_files(tmp_path):
    with pytest.raises(EvalError, match="no such file"):
        load_file(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(EvalError, match="empty"):
        load_file(tmp_path / "empty.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"question": "q", "answer": 1}\n{"question": \n')
    with pytest.raises(EvalError, match="malformed JSON on line 2"):
        load_file(tmp_path / "broken.jsonl")
    (tmp_path / "broken.json").write_text('[{"question": "q",]')
    with pytest.raises(EvalError, match="malformed JSON at line 1"):
        load_file(tmp_path / "broken.json")


def test_evaluate_a_multiple_choice_file_end_to_end(tmp_path):
    path = write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    answers = {"Pick the fruit": " B", "Pick the metal": " A", "Pick the colour": " B"}  # the last one wrong
    model = OracleLM(byte_level_tokenizer(), answer_oracle(answers, "Answer:"))
    (result,) = evaluate(model, model.tokenizer, [str(path)]).values()
    assert result.scorer == "loglik"
    assert (result.num_correct, result.num_questions) == (2, 3)
    assert result.extra["format"] == "multiple choice"
    assert result.accuracy == pytest.approx((1 + 1 + 0) / 3)  # macro over subjects food, things, ""
    (limited,) = evaluate(model, model.tokenizer, str(path), limit=1).values()
    assert limited.num_questions == 1 and limited.extra["limit"] == 1
