"""``fedlora report`` and the pure table assembly, on hand-written run folders (no training)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from fedlora.cli import app
from fedlora.engine.fingerprint import (
    base_parameter_name,
    fingerprint_differences,
    first_batch_indices,
    hash_base_weights,
    hash_examples,
)
from fedlora.report import ReportError, load_run, load_runs, write_report
from fedlora.report.table import check_inputs, pareto_front, rank_matrix, rank_summary, results_rows, run_row

runner = CliRunner(env={"COLUMNS": "400"})  # no line wrapping of messages
FINGERPRINT = {
    "version": 1,
    "seed": 7,
    "base_weights": "aa",
    "data_split": "bb",
    "eval_set": "cc",
    "first_batches": "dd",
}
MODULES = ["model.layers.10.self_attn.q_proj", "model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.v_proj"]


def task(correct: int, total: int) -> dict:
    return {"accuracy": correct / total, "num_questions": total, "num_correct": correct}


def write_run(
    folder: Path,
    method: str = "fedit",
    *,
    threshold: float = 0.9,
    rounds: int = 2,
    planned: int | None = None,
    fingerprint: dict | None = FINGERPRINT,
    setup_bytes: tuple[int, int] = (0, 0),
) -> Path:
    """A run folder as the engine writes it: config.yaml and metrics.jsonl with known numbers."""
    folder.mkdir(parents=True)
    config = {
        "model": "tiny-llama",
        "seed": 7,
        "comm_dtype": "fp32",
        "method": {"name": method, "threshold": threshold},
        "lora": {"r": 4, "alpha": 8, "heterogeneous": False, "target_modules": ["q_proj", "v_proj"]},
        "data": {"source": "commonsense", "template": "commonsense", "num_clients": 2, "partition": "iid"},
        "federation": {"rounds": planned or rounds, "client_fraction": 1.0},
        "train": {"max_steps": 2, "batch_size": 4, "learning_rate": 0.001},
        "eval": {"tasks": ["boolq", "piqa"], "limit": 10},
        "output_dir": str(folder),
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    records = [
        {
            "round": 0,
            "inputs": fingerprint,
            "eval": {"eval_loss": 3.0, "tasks": {"boolq": task(5, 10), "piqa": task(4, 10)}, "accuracy": 0.45},
            "uplink_bytes": setup_bytes[0],
            "downlink_bytes": setup_bytes[1],
        }
    ]
    for r in range(1, rounds + 1):
        record = {
            "round": r,
            "method": method,
            "clients": [{"id": 0, "rank": 4}, {"id": 1, "rank": 4}],
            "train_loss": 3.0 - 0.5 * r,
            "uplink_bytes": 1000 * r,
            "downlink_bytes": 3000,
        }
        if method in ("florist", "flexlora"):  # the engine records FlexLoRA's SVD ranks too
            record["global_ranks"] = {MODULES[0]: r, MODULES[1]: 2 * r, MODULES[2]: 3}
            record["energy_kept"] = {m: 0.9 for m in MODULES}
        if r == rounds:
            record["eval"] = {"eval_loss": 2.0, "tasks": {"boolq": task(7, 10), "piqa": task(6, 10)}, "accuracy": 0.65}
        records.append(record)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def test_run_row_numbers_by_hand(tmp_path: Path) -> None:
    run = load_run(write_run(tmp_path / "fedsb", "fedsb", setup_bytes=(500, 200)))
    columns, rows = results_rows([run])
    assert columns.index("acc_boolq") == columns.index("clients") + 1
    row = rows[0]
    assert row["acc_boolq"] == 0.7 and row["acc_piqa"] == 0.6 and row["accuracy"] == 0.65
    assert row["base_accuracy"] == 0.45 and row["eval_loss"] == 2.0 and row["base_eval_loss"] == 3.0
    assert row["uplink_bytes_per_round"] == 1500 and row["downlink_bytes_per_round"] == 3000  # (1000 + 2000) / 2
    assert row["setup_uplink_bytes"] == 500 and row["uplink_bytes"] == 500 + 3000
    assert row["downlink_bytes"] == 200 + 6000 and row["total_bytes"] == 3500 + 6200
    assert row["train_loss"] == 2.0 and row["rounds"] == 2 and row["ranks"] == "4"
    # binomial standard error of the mean of two tasks: sqrt(.7*.3/10 + .6*.4/10) / 2
    assert math.isclose(row["accuracy_stderr"], math.sqrt(0.021 + 0.024) / 2)
    assert row["florist_rank_mean"] is None and row["wall_seconds"] is None


def test_florist_ranks_by_hand(tmp_path: Path) -> None:
    run = load_run(write_run(tmp_path / "f", "florist", threshold=0.8))
    assert run.label == "florist-0.8"
    row = run_row(run)
    assert row["florist_rank_mean"] == pytest.approx((2 + 4 + 3) / 3) and row["florist_rank_sum"] == 9
    assert (row["florist_rank_min"], row["florist_rank_max"], row["stacked_rank"]) == (2, 4, 8)
    modules, rounds, matrix = rank_matrix(run)
    assert modules == [MODULES[1], MODULES[2], MODULES[0]]  # layer 2 before layer 10
    assert rounds == [1, 2] and matrix == [[2, 4], [3, 3], [1, 2]]
    assert [s["rank_sum"] for s in rank_summary(run)] == [6, 9]
    assert rank_matrix(load_run(write_run(tmp_path / "g", "fedit"))) is None
    flex = load_run(write_run(tmp_path / "h", "flexlora"))
    assert rank_matrix(flex) is None and rank_summary(flex) == [] and run_row(flex)["florist_rank_sum"] is None


def test_pareto_front() -> None:
    points = [(10.0, 0.5), (100.0, 0.7), (50.0, 0.4), (5.0, 0.5), (100.0, 0.6), (1000.0, 0.7)]
    assert pareto_front(points) == [3, 1]  # (5, .5) and (100, .7); (10, .5) is dominated by (5, .5)
    assert pareto_front([(1.0, 1.0)]) == [0]


def test_inputs_check(tmp_path: Path) -> None:
    a = load_run(write_run(tmp_path / "a"))
    b = load_run(write_run(tmp_path / "b", "flora"))
    assert check_inputs([a, b]).identical
    c = load_run(write_run(tmp_path / "c", "ffa", fingerprint={**FINGERPRINT, "first_batches": "zz"}))
    d = load_run(write_run(tmp_path / "d", "fedex", fingerprint=None))
    check = check_inputs([a, b, c, d])
    assert not check.identical
    text = "\n".join(check.lines)
    assert "different first batches: ffa vs fedit" in text and "no input fingerprint recorded for fedex" in text
    assert fingerprint_differences({"x": FINGERPRINT, "y": {**FINGERPRINT, "seed": 8}}) == {"seed": ["y"]}


def test_report_cli_writes_tables_and_plots(tmp_path: Path) -> None:
    runs = [
        write_run(tmp_path / "runs" / "fedit"),
        write_run(tmp_path / "runs" / "florist-0.9", "florist"),
        write_run(tmp_path / "runs" / "fedsb", "fedsb", setup_bytes=(10_000, 100)),
    ]
    result = runner.invoke(app, ["report", *map(str, runs)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "runs" / "report"  # the runs' common parent
    for name in ("report.md", "results.csv", "rounds.csv", "pareto.png", "loss.png", "ranks-florist-0.9.png"):
        assert (out / name).is_file(), name
    assert not (out / "ranks-fedit.png").exists()
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["label"] for r in rows] == ["fedit", "florist-0.9", "fedsb"]
    assert rows[2]["setup_uplink_bytes"] == "10000" and rows[1]["florist_rank_sum"] == "9"
    per_round = list(csv.DictReader((out / "rounds.csv").open()))
    assert [(r["label"], r["round"]) for r in per_round[:3]] == [("fedit", "0"), ("fedit", "1"), ("fedit", "2")]
    assert [r["uplink_bytes"] for r in per_round[6:9]] == ["10000", "1000", "2000"]  # fedsb: set-up, rounds 1, 2
    assert per_round[5]["kept_rank_sum"] == "9" and per_round[3]["kept_rank_sum"] == ""
    report = (out / "report.md").read_text()
    assert "| fedit | 4 | 70.0 | 60.0 | 65.0 ± 10.6 |" in report
    assert "## FLoRIST's kept ranks" in report and "share the same inputs" in report
    # a second report over the same folder replaces it
    assert runner.invoke(app, ["report", *map(str, runs[:2])]).exit_code == 0
    assert len(list(csv.DictReader((out / "results.csv").open()))) == 2


def test_report_bad_inputs_name_the_folder(tmp_path: Path) -> None:
    good = write_run(tmp_path / "good")
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["report", str(good), str(empty), "-o", str(tmp_path / "r")])
    assert result.exit_code == 1 and "empty" in result.output and "not a fedlora run folder" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "r").exists()
    missing = runner.invoke(app, ["report", str(tmp_path / "nope")])
    assert missing.exit_code != 0 and "nope" in missing.output
    unfinished = write_run(tmp_path / "half", rounds=1, planned=3)
    result = runner.invoke(app, ["report", str(unfinished), "-o", str(tmp_path / "r")])
    assert result.exit_code == 1 and "unfinished" in result.output and "--partial" in result.output
    assert runner.invoke(app, ["report", str(unfinished), "-o", str(tmp_path / "r"), "--partial"]).exit_code == 0
    broken = write_run(tmp_path / "broken")
    with (broken / "metrics.jsonl").open("a") as f:
        f.write("{not json\n")
    result = runner.invoke(app, ["report", str(broken), "-o", str(tmp_path / "r2")])
    assert result.exit_code == 1 and "metrics.jsonl:4" in result.output
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    result = runner.invoke(app, ["report", str(good), "-o", str(busy)])
    assert result.exit_code == 1 and "notes.txt" in result.output and (busy / "notes.txt").read_text() == "mine"


def test_same_folder_twice_is_an_error(tmp_path: Path) -> None:
    run = write_run(tmp_path / "a")
    with pytest.raises(ReportError, match="twice"):
        load_runs([run, run])


def test_write_report_leaves_nothing_on_failure(tmp_path: Path, monkeypatch) -> None:
    import fedlora.report.plots as plots

    def broken(*args, **kwargs):
        raise ReportError("plot failed")

    monkeypatch.setattr(plots, "loss_plot", broken)
    with pytest.raises(ReportError, match="plot failed"):
        write_report([load_run(write_run(tmp_path / "a"))], tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_base_weights_hash_ignores_adapters() -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(cfg)
    plain = hash_base_weights(model)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert hash_base_weights(peft_model) == plain  # LoRA factors and PEFT's renaming ignored
    with torch.no_grad():
        peft_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight[0, 0] += 1e-3
    assert hash_base_weights(peft_model) != plain
    assert base_parameter_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") == (
        "model.layers.0.self_attn.q_proj.weight"
    )
    assert base_parameter_name("model.layers.0.self_attn.q_proj.lora_A.a0.weight") is None
    assert base_parameter_name("model.layers.0.self_attn.q_proj.R") is None


def test_example_hash_and_first_batch() -> None:
    a = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}]
    assert hash_examples(a) == hash_examples([dict(x) for x in a])
    assert hash_examples(a) != hash_examples(a[::-1])
    assert hash_examples([{"input_ids": [1, 2], "labels": [3]}]) != hash_examples(
        [{"input_ids": [1], "labels": [2, 3]}]
    )
    picked = first_batch_indices(10, 4, seed=5)
    assert len(picked) == 4 and len(set(picked)) == 4 and picked == first_batch_indices(10, 4, seed=5)
