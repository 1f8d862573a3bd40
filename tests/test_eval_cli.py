"""``fedlora eval``: JSON and table output on tiny-llama, the adapter option, the lm-eval export, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fedlora.cli import app
from fedlora.evaluate import evaluate
from fedlora.models import load_model

runner = CliRunner()

MC_ROWS = [
    {"question": "Pick the fruit", "choices": ["car", "apple", "rock"], "answer": 1},
    {"question": "Pick the metal", "choices": ["iron", "wood"], "answer": "A"},
    {"question": "Pick a colour", "choices": ["dog", "red"], "answer": "red"},
]


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLORA_CACHE_DIR", str(tmp_path / "cache"))  # tiny-llama is built here in milliseconds
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def mc_file(tmp_path) -> Path:
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in MC_ROWS))
    return path


def run(*args: object):
    result = runner.invoke(app, ["eval", *map(str, args)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    return result


def test_json_output_and_output_file(tmp_path, mc_file):
    out = tmp_path / "out" / "results.json"
    result = run("--model", "tiny-llama", "--tasks", mc_file, "--json", "--batch-size", "2", "--output", out)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload == json.loads(out.read_text())
    task = payload["tasks"][str(mc_file)]
    assert task["num_questions"] == 3
    assert 0.0 <= task["accuracy"] <= 1.0
    assert task["scorer"] == "loglik" and task["protocol"].startswith("loglik")
    assert payload["model"] == "tiny-llama" and payload["adapter"] is None

    # the CLI reports what the library computes on the same model
    loaded = load_model("tiny-llama")
    (expected,) = evaluate(loaded.model, loaded.tokenizer, [str(mc_file)], batch_size=2).values()
    assert task["accuracy"] == expected.accuracy


def test_table_output_and_generate_scorer(mc_file):
    result = run("-m", "tiny-llama", "-t", mc_file, "--scorer", "generate", "--max-new-tokens", "3")
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.stdout and "FLoRA" in result.stdout


def test_adapter_is_loaded(tmp_path, mc_file):
    from peft import LoraConfig, get_peft_model

    base = load_model("tiny-llama").model
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    result = run("-m", "tiny-llama", "-a", tmp_path / "adapter", "-t", mc_file, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["adapter"] == str(tmp_path / "adapter")


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--tasks", "boolq"], 2, "--model is required"),
        (["-m", "tiny-llama"], 2, "--tasks is required; valid: mmlu"),
        (["-m", "tiny-llama", "-t", "mmlu,foo"], 2, "unknown task 'foo'; valid: mmlu, mmlu_full, boolq"),
        (["-m", "tiny-llama", "-t", "boolq", "--limit", "0"], 2, "--limit must be >= 1, got 0"),
        (["-m", "tiny-llama", "-t", "boolq", "--batch-size", "0"], 2, "--batch-size must be >= 1"),
        (["-m", "tiny-llama", "-t", "gsm8k", "--scorer", "loglik"], 2, "scorer 'loglik' does not apply"),
        (["-m", "./never/loaded", "-t", "boolq", "--template", "chatml"], 2, "unknown prompt template 'chatml'"),
        (["-m", "tiny-llama", "-t", "boolq", "-a", "/no/such/adapter"], 2, "is not a PEFT adapter folder"),
        (["-m", "./no/such/model", "-t", "boolq"], 1, "could not load model './no/such/model'"),
        (["-m", "tiny-llama", "-t", "missing.jsonl"], 1, "missing.jsonl: no such file"),
        (["--export-lm-eval", "x", "-t", "gsm8k"], 2, "no lm-eval export for gsm8k; exportable: mmlu"),
    ],
)
def test_errors_are_clear(args, code, message):
    result = run(*args)
    assert result.exit_code == code, result.output
    assert "Error:" in result.stderr and message in result.stderr, result.stderr


def test_a_file_with_missing_columns_fails_before_the_model_loads(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "choices": ["a", "b"]}) + "\n")
    result = run("-m", "./never/loaded", "-t", bad)
    assert result.exit_code == 1
    assert f"{bad}: line 1: missing field 'answer'" in result.stderr


@pytest.mark.integration
def test_export_lm_eval(tmp_path):
    target = tmp_path / "tasks"
    result = run("--export-lm-eval", target, "--tasks", "boolq,arc_challenge")
    assert result.exit_code == 0, result.output
    assert (target / "fedlora_boolq.yaml").is_file() and (target / "_fedlora_commonsense_template.yaml").is_file()
    lines = (target / "data" / "commonsense" / "arc_challenge.jsonl").read_text().splitlines()
    assert len(lines) == 299
    assert json.loads(lines[0])["context"].endswith("the correct answer is")
    assert "--include_path" in result.stdout
    # a previous export is replaced; any other non-empty folder is refused
    assert run("--export-lm-eval", target, "--tasks", "boolq").exit_code == 0
    assert not (target / "fedlora_arc_challenge.yaml").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    refused = run("--export-lm-eval", other, "--tasks", "boolq")
    assert refused.exit_code == 1 and "not an empty folder nor a previous lm-eval export" in refused.stderr
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left behind
