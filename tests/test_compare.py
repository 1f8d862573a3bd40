"""``fedlora compare`` on the tiny model: the report folder, skipping and resuming, identical inputs, bad input."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import fedlora.engine.local as local
from fedlora.cli import app
from fedlora.config import load_config
from fedlora.engine.fingerprint import base_parameter_name
from fedlora.report.compare import CompareError, method_label, parse_methods, parse_thresholds, plan_compare
from test_engine import write_seed_folder

runner = CliRunner(env={"COLUMNS": "400"})  # no line wrapping of messages


def tiny_args(tmp_path: Path, *extra: str) -> list[str]:
    """``tiny`` on a small seed-layout folder: 3 clients, 1 round of 2 steps; runs in about a second per method."""
    data = tmp_path / "data"
    if not data.exists():
        write_seed_folder(data, 3)
    return [
        "tiny",
        f"data.source={data}",
        "data.template=alpaca",
        "data.max_examples_per_category=null",
        "federation.rounds=1",
        "data.cutoff_len=320",  # the tiny model's tokenizer is per character: room for the whole record
        *extra,
    ]


def compare(tmp_path: Path, *args: str, out: str = "cmp"):
    return runner.invoke(app, ["compare", *tiny_args(tmp_path), "--output", str(tmp_path / out), "--quiet", *args])


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_methods_write_report_csv_and_plots(tmp_path: Path) -> None:
    result = compare(tmp_path, "--methods", "fedit,florist", "--thresholds", "0.5,1")
    assert result.exit_code == 0, result.output
    out = tmp_path / "cmp"
    for name in ("report.md", "results.csv", "pareto.png", "loss.png", "ranks-florist-0.5.png", "ranks-florist-1.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for label in ("fedit", "florist-0.5", "florist-1"):
        config = load_config(out / label / "config.yaml")
        assert config.output_dir == str(out / label)
        assert config.method.name == label.split("-")[0]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["label"] for r in rows] == ["fedit", "florist-0.5", "florist-1"]
    # the CSV's totals are the metrics' bytes, summed independently here
    for row in rows:
        lines = metrics(out / row["label"])
        assert int(row["uplink_bytes"]) == sum(m.get("uplink_bytes", 0) for m in lines)
        assert int(row["downlink_bytes"]) == sum(m.get("downlink_bytes", 0) for m in lines)
        assert float(row["wall_seconds"]) > 0
    # tau = 1 keeps every direction of the stack; tau = 0.5 fewer: less downlink
    by_label = {r["label"]: r for r in rows}
    assert int(by_label["florist-0.5"]["downlink_bytes"]) < int(by_label["florist-1"]["downlink_bytes"])
    assert float(by_label["florist-1"]["florist_rank_mean"]) == 3 * 4  # 3 clients of rank 4, nothing cut
    report = (out / "report.md").read_text()
    assert "share the same inputs" in report and "WARNING" not in report
    assert "![accuracy against total bytes](pareto.png)" in report
    assert "same inputs" in result.output


def test_second_invocation_skips_finished_and_resumes_more_rounds(tmp_path: Path, monkeypatch) -> None:
    assert compare(tmp_path, "--methods", "fedit,flora").exit_code == 0
    out = tmp_path / "cmp"
    before = {label: (out / label / "metrics.jsonl").read_text() for label in ("fedit", "flora")}

    def must_not_train(self):
        raise AssertionError(f"{self.run_dir} was trained again")

    monkeypatch.setattr(local.Engine, "run", must_not_train)
    again = compare(tmp_path, "--methods", "fedit,flora")
    assert again.exit_code == 0, again.output
    assert again.output.count("finished") == 2
    assert {label: (out / label / "metrics.jsonl").read_text() for label in before} == before
    monkeypatch.undo()

    # one more round: both runs resume from their checkpoints (round 1 is not retrained)
    more = runner.invoke(
        app,
        ["compare", *tiny_args(tmp_path, "federation.rounds=2"), "--output", str(out), "-q", "-m", "fedit,flora"],
    )
    assert more.exit_code == 0, more.output
    assert more.output.count("resume") >= 2
    for label in before:
        lines = metrics(out / label)
        assert [m["round"] for m in lines] == [0, 1, 2]
        assert lines[1] == json.loads(before[label].splitlines()[1])  # round 1 kept, not retrained


def test_interrupted_runs_are_resumed_or_restarted(tmp_path: Path) -> None:
    """Killed before the export (checkpoint, no adapter): resumed. Killed before round 1's checkpoint: restarted."""
    assert compare(tmp_path, "--methods", "fedit,flora").exit_code == 0
    out = tmp_path / "cmp"
    shutil.rmtree(out / "fedit" / "adapter")
    kept = metrics(out / "fedit")
    shutil.rmtree(out / "flora" / "checkpoint")
    (out / "flora" / "metrics.jsonl").write_text(json.dumps(metrics(out / "flora")[0]) + "\n")
    plan = plan_compare(load_config(out / "fedit" / "config.yaml"), "fedit,flora", output_dir=out)
    assert [(r.label, r.status) for r in plan.runs] == [("fedit", "resume"), ("flora", "restart")]
    result = compare(tmp_path, "--methods", "fedit,flora")
    assert result.exit_code == 0, result.output
    assert (out / "fedit" / "adapter" / "adapter_model.safetensors").is_file()
    assert metrics(out / "fedit") == kept  # nothing retrained
    assert [m["round"] for m in metrics(out / "flora")] == [0, 1]


def test_inputs_identical_across_methods(tmp_path: Path, monkeypatch) -> None:
    """Every method's clients see the same first batch and start from the same base weights (checked directly)."""
    seen: dict[str, dict] = {}
    real_train = local.train_client

    def spy(model, examples, settings, collate_fn, **kwargs):
        method = kwargs["desc"]  # "client k"
        first: list = []

        def collate(items):
            batch = collate_fn(items)
            if not first:
                first.append(batch["input_ids"].clone())
            return batch

        key = f"{current['method']}/{method}"
        if key not in seen:
            base = {
                base_parameter_name(n): p.detach().clone()
                for n, p in model.named_parameters()
                if base_parameter_name(n) is not None
            }
            seen[key] = {"base": base}
        result = real_train(model, examples, settings, collate, **kwargs)
        seen[key].setdefault("first_batch", first[0])
        return result

    current = {"method": ""}
    real_run = local.Engine.run

    def tagged_run(self):
        current["method"] = self.config.method.name
        return real_run(self)

    monkeypatch.setattr(local, "train_client", spy)
    monkeypatch.setattr(local.Engine, "run", tagged_run)
    result = compare(tmp_path, "--methods", "fedit,flora,ffa")
    assert result.exit_code == 0, result.output
    clients = sorted({k.split("/")[1] for k in seen})
    assert clients == ["client 0", "client 1", "client 2"]
    for client in clients:
        ref = seen[f"fedit/{client}"]
        for method in ("flora", "ffa"):
            other = seen[f"{method}/{client}"]
            assert torch.equal(ref["first_batch"], other["first_batch"]), (method, client)
    # round 1, client 0: nothing merged yet, so every method starts from the same base weights
    ref = seen["fedit/client 0"]["base"]
    for method in ("flora", "ffa"):
        other = seen[f"{method}/client 0"]["base"]
        assert ref.keys() == other.keys() and len(ref) > 0
        assert all(torch.equal(ref[n], other[n]) for n in ref)
    fingerprints = [metrics(tmp_path / "cmp" / m)[0]["inputs"] for m in ("fedit", "flora", "ffa")]
    assert fingerprints[0] == fingerprints[1] == fingerprints[2]


def test_mismatched_inputs_warn_loudly(tmp_path: Path) -> None:
    """Runs of different seeds put side by side by report: the inputs check fails and says which input differs."""
    assert compare(tmp_path, "--methods", "fedit", out="a").exit_code == 0
    assert compare(tmp_path, "--methods", "flora", "seed=1", out="b").exit_code == 0
    result = runner.invoke(
        app, ["report", str(tmp_path / "a" / "fedit"), str(tmp_path / "b" / "flora"), "-o", str(tmp_path / "r")]
    )
    assert result.exit_code == 0, result.output
    report = (tmp_path / "r" / "report.md").read_text()
    # the seed-layout folder fixes the split, the seed changes the weights and the data order
    assert "WARNING: different seed: flora vs fedit" in report
    assert "different base weights" in report and "different first batches" in report
    assert "different data split" not in report
    assert "WARNING" in result.output
    assert "seed" in report  # the config difference is named too


def test_unknown_or_incompatible_methods_fail_before_training(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(local.Engine, "run", lambda self: pytest.fail("trained despite bad input"))
    unknown = compare(tmp_path, "--methods", "fedit,fedavg")
    assert unknown.exit_code == 2 and "fedavg" in unknown.output and "florist" in unknown.output
    assert "Traceback" not in unknown.output
    hetero = compare(tmp_path, "--methods", "fedit,ffa", "lora.heterogeneous=true", "lora.local_ranks=[4,2,1]")
    assert hetero.exit_code == 2, hetero.output
    assert "ffa" in hetero.output and "flexlora" in hetero.output  # names the methods that accept the config
    thresholds = compare(tmp_path, "--methods", "fedit", "--thresholds", "0.9")
    assert thresholds.exit_code == 2 and "florist" in thresholds.output
    bad_tau = compare(tmp_path, "--methods", "florist", "--thresholds", "0.9,1.5")
    assert bad_tau.exit_code == 2 and "1.5" in bad_tau.output
    typo = compare(tmp_path, "--methods", "fedit", "federation.roundz=2")
    assert typo.exit_code == 2 and "roundz" in typo.output
    option = compare(tmp_path, "--metods", "fedit")
    assert option.exit_code == 2 and "--metods" in option.output
    assert not (tmp_path / "cmp").exists()


def test_all_skips_methods_the_config_rejects(tmp_path: Path) -> None:
    result = compare(tmp_path, "--dry-run", "lora.heterogeneous=true", "lora.local_ranks=[4,2,1]")
    assert result.exit_code == 0, result.output
    for name in ("fedit", "flora", "florist-0.9", "flexlora"):
        assert name in result.output
    assert "skipped ffa" in result.output and "skipped fedsb" in result.output
    assert not (tmp_path / "cmp").exists()


def test_folder_of_another_experiment_is_refused(tmp_path: Path) -> None:
    assert compare(tmp_path, "--methods", "fedit").exit_code == 0
    other = compare(tmp_path, "--methods", "fedit", "lora.r=2", "lora.alpha=4")
    assert other.exit_code == 2 and "lora.r" in other.output and "--overwrite" in other.output
    replaced = compare(tmp_path, "--methods", "fedit", "lora.r=2", "lora.alpha=4", "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert load_config(tmp_path / "cmp" / "fedit" / "config.yaml").lora.r == 2


def test_parsing_helpers() -> None:
    assert parse_methods("FedIT, florist,fedit") == (["fedit", "florist"], False)
    assert parse_methods("all")[1] is True
    assert parse_thresholds("0.8,0.9,0.8") == [0.8, 0.9]
    assert method_label("florist", 0.9) == "florist-0.9" and method_label("flora") == "flora"
    with pytest.raises(CompareError, match="valid"):
        parse_methods("")
    with pytest.raises(CompareError, match="abc"):
        parse_thresholds("0.9,abc")


def test_compare_presets_load() -> None:
    homog = load_config("compare-default")
    heter = load_config("compare-default-heter")
    assert homog.data.num_clients == heter.data.num_clients == 8 and homog.data.partition == "dirichlet"
    assert heter.lora.heterogeneous and len(heter.lora.local_ranks) == 8
    plan = plan_compare(heter, "all", output_dir="/nonexistent/compare")
    assert [r.label for r in plan.runs] == ["fedit", "flora", "florist-0.9", "flexlora"]
    assert set(plan.skipped) == {"ffa", "fedex", "fedsb"}
