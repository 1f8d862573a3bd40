"""Integration: SmolLM2-135M-Instruct on a handful of real MMLU and commonsense questions, and the lm-eval bridge.

The SmolLM2 tests load the built-in model (converted once per machine, then well under a second to load) and score
a few questions; the lm-eval test runs the real ``lm_eval`` command offline on exported task files with tiny-llama
and a LoRA adapter, and compares its per-question log-likelihoods with ours. Skipped when lm-eval is not
installed (an optional extra).
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedlora.evaluate import ChoiceRequest, evaluate, loglik_choices
from fedlora.evaluate.base import EvalOptions
from fedlora.evaluate.commonsense import load_validation, loglik_request
from fedlora.evaluate.mmlu import evaluate_mcq, letter_continuations, load_subject, loglik_context
from fedlora.evaluate.scoring import loglik_reference
from fedlora.models import load_model

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def smollm2():
    loaded = load_model("smollm2-135m-instruct")
    return loaded.model, loaded.tokenizer


def real_requests() -> list[ChoiceRequest]:
    mmlu = [q for subject in ("anatomy", "astronomy") for q in load_subject(subject)[:2]]
    requests = [ChoiceRequest(loglik_context(q), letter_continuations(q), q.subject) for q in mmlu]
    requests += [loglik_request(task, load_validation(task)[0]) for task in ("piqa", "arc_challenge")]
    return requests


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batched_loglik_equals_plain_forward_passes_on_smollm2(smollm2, padding_side):
    model, tok = smollm2
    requests = real_requests()
    got = loglik_choices(model, tok, requests, batch_size=4, padding_side=padding_side)
    for request, scores in zip(requests, got, strict=True):
        reference = [loglik_reference(model, tok, request.context, c) for c in request.continuations]
        assert scores == pytest.approx(reference, abs=2e-3)


def test_a_handful_of_real_questions_with_both_scorers(smollm2):
    model, tok = smollm2
    questions = [q for subject in ("marketing", "high_school_geography") for q in load_subject(subject)[:4]]
    loglik = evaluate_mcq(model, tok, questions, EvalOptions(scorer="loglik", batch_size=8))
    generate = evaluate_mcq(model, tok, questions[:2], EvalOptions(scorer="generate", batch_size=2))
    assert loglik.num_questions == 8 and 0 <= loglik.accuracy <= 1
    assert generate.num_questions == 2 and generate.protocol.startswith("generate: FLoRA")
    again = evaluate_mcq(model, tok, questions[:2], EvalOptions(scorer="generate", batch_size=1))
    assert again.extra["per_subject"] == generate.extra["per_subject"]  # seeded per question

    results = evaluate(model, tok, ["boolq", "arc_easy"], limit=3, batch_size=4)
    assert [r.num_questions for r in results.values()] == [3, 3]
    assert all(r.scorer == "loglik" for r in results.values())
    (piqa,) = evaluate(model, tok, ["piqa"], limit=2, scorer="generate", max_new_tokens=12).values()
    assert piqa.num_questions == 2 and "no_label" in piqa.extra


# ----------------------------------------------------------------------------------------------------------------
# lm-evaluation-harness bridge


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval (optional extra) is not installed")
def test_lm_eval_runs_offline_on_the_exported_tasks_with_an_adapter(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    from fedlora.lm_eval_tasks import export_lm_eval_tasks

    os.environ.setdefault("FEDLORA_CACHE_DIR", str(tmp_path / "cache"))
    loaded = load_model("tiny-llama")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(loaded.model, lora).save_pretrained(tmp_path / "adapter")
    export = export_lm_eval_tasks(tmp_path / "tasks", ["mmlu", "boolq"])
    assert export.tasks == {"mmlu": "fedlora_mmlu1444", "boolq": "fedlora_boolq"}

    tasks = "fedlora_mmlu1444_anatomy,fedlora_boolq"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["OMP_NUM_THREADS"] = "1"  # see one_thread
    lm_eval = [sys.executable, "-m", "lm_eval"]
    command = [
        *lm_eval,
        "--model",
        "hf",
        "--model_args",
        f"pretrained={loaded.path},peft={tmp_path / 'adapter'},dtype=float32",
        "--tasks",
        tasks,
        "--include_path",
        str(export.folder),
        "--limit",
        "4",
        "--device",
        "cpu",
        "--batch_size",
        "4",
        "--log_samples",
        "--output_path",
        str(tmp_path / "out"),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    model = PeftModel.from_pretrained(load_model("tiny-llama").model, str(tmp_path / "adapter"))
    for task in tasks.split(","):
        (path,) = glob.glob(str(tmp_path / "out" / "*" / f"samples_{task}_*.jsonl"))
        samples = [json.loads(line) for line in Path(path).read_text().splitlines()]
        assert len(samples) == 4
        requests = []
        for sample in samples:
            arguments = list(sample["arguments"].values())
            requests.append(ChoiceRequest(arguments[0]["arg_0"], tuple(a["arg_1"] for a in arguments)))
        ours = loglik_choices(model, loaded.tokenizer, requests)
        theirs = [[float(resp[0][0]) for resp in sample["resps"]] for sample in samples]
        for mine, their in zip(ours, theirs, strict=True):
            assert mine == pytest.approx(their, abs=1e-4)
        accuracy = [float(sample["acc"]) for sample in samples]
        golds = [int(sample["target"]) for sample in samples]
        assert accuracy == [float(max(range(len(s)), key=s.__getitem__) == g) for s, g in zip(ours, golds, strict=True)]
