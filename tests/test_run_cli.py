"""``fedlora run`` through the real CLI on the tiny model: presets, overrides, the seeds' flags, errors."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from fedlora.cli import app
from test_engine import write_seed_folder

runner = CliRunner()


def test_run_cli_with_seed_flags(tmp_path: Path) -> None:
    data = write_seed_folder(tmp_path / "data", 2)
    out = tmp_path / "run"
    args = (
        f"run --global_model tiny-llama --data_path {data} --output_dir {out} --florist True --num_clients 2 "
        "--threshold 0.9 --num_communication_rounds 1 --local_num_epochs 1 --local_batch_size 4 "
        "--local_micro_batch_size 2 --lora_r 4 --lora_alpha 8 --cutoff_len 64"
    ).split()
    result = runner.invoke(app, [*args, "--quiet"])
    assert result.exit_code == 0, result.output
    assert "florist" in result.output and "eval loss" in result.output
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["round"] == 1 and len(lines[-1]["clients"]) == 2
    assert (out / "adapter" / "adapter_config.json").is_file()
    saved = (out / "config.yaml").read_text()
    assert "threshold: 0.9" in saved and "name: florist" in saved


def test_run_cli_preset_and_overrides_dry_run() -> None:
    result = runner.invoke(app, ["run", "tiny", "method.name=flora", "federation.rounds=4", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "name: flora" in result.output and "rounds: 4" in result.output


def test_run_cli_errors_are_clear() -> None:
    typo = runner.invoke(app, ["run", "tiny", "federation.roundz=4", "--dry-run"])
    assert typo.exit_code == 2 and "roundz" in typo.output and "Traceback" not in typo.output
    preset = runner.invoke(app, ["run", "no-such-preset", "--dry-run"])
    assert preset.exit_code == 2 and "default" in preset.output
    bad_value = runner.invoke(app, ["run", "tiny", "method.threshold=1.5", "--dry-run"])
    assert bad_value.exit_code == 2 and "method.threshold" in bad_value.output
