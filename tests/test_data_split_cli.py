"""``fedlora split``: writes the seeds' layout, prints sizes; errors are red, exit 1/2, no traceback, no folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedlora.cli import app
from fedlora.data import load_client_folder

runner = CliRunner()


def _dolly(path: Path, per_category: int = 30, categories: int = 4) -> Path:
    rows = [
        {"instruction": f"q{c}-{i}", "context": "", "response": f"a{i}", "category": f"cat{c}"}
        for c in range(categories)
        for i in range(per_category)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(*args: str):
    return runner.invoke(app, ["split", *args])


def test_dirichlet_split_writes_folder_and_table(tmp_path):
    data = _dolly(tmp_path / "dolly.jsonl")
    out = tmp_path / "clients"
    result = _run(str(data), "--clients", "3", "--scheme", "dirichlet", "--min-size", "5", "--output", str(out))
    assert result.exit_code == 0, result.output
    assert "Loaded 120 records" in result.output
    lines = result.output.splitlines()
    header = next(line for line in lines if "total" in line).split()
    assert header == ["client", "cat0", "cat1", "cat2", "cat3", "total"]
    test_row = next(line for line in lines if line.split()[:1] == ["test"]).split()
    assert test_row == ["test", "10", "10", "10", "10", "40"]  # the held-out set: 10 per category
    clients, test = load_client_folder(out)
    assert len(clients) == 3 and min(len(c) for c in clients) >= 5
    assert len(test) == 40  # 10 per category, the seeds' default
    assert sum(len(c) for c in clients) + len(test) == 120
    # deterministic: the same command gives the same files
    again = tmp_path / "again"
    _run(str(data), "-k", "3", "--scheme", "dirichlet", "--min-size", "5", "-o", str(again))
    for name in ("local_training_0.json", "global_test.json"):
        assert (out / name).read_text() == (again / name).read_text()


def test_iid_and_shards(tmp_path):
    data = _dolly(tmp_path / "d.jsonl")
    result = _run(str(data), "-k", "4", "--scheme", "iid", "-o", str(tmp_path / "iid"))
    assert result.exit_code == 0, result.output
    clients, test = load_client_folder(tmp_path / "iid")
    assert [len(c) for c in clients] == [30, 30, 30, 30] and test is None

    result = _run(str(data), "-k", "2", "--scheme", "shards", "--shards-per-client", "2", "-o", str(tmp_path / "sh"))
    assert result.exit_code == 0, result.output
    clients, _ = load_client_folder(tmp_path / "sh")
    assert [len({r["category"] for r in c}) for c in clients] == [2, 2]  # 4 shards = 4 categories, 2 each


def test_existing_output_needs_overwrite(tmp_path):
    data = _dolly(tmp_path / "d.jsonl")
    out = tmp_path / "out"
    assert _run(str(data), "-k", "2", "--scheme", "iid", "-o", str(out)).exit_code == 0
    before = (out / "local_training_0.json").read_text()
    result = _run(str(data), "-k", "3", "--scheme", "iid", "-o", str(out))
    assert result.exit_code == 1 and "--overwrite" in result.output
    assert (out / "local_training_0.json").read_text() == before
    result = _run(str(data), "-k", "3", "--scheme", "iid", "-o", str(out), "--overwrite", "--seed", "7")
    assert result.exit_code == 0, result.output
    assert len(load_client_folder(out)[0]) == 3


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"instruction": "q", "response": ""}\n', "'response' is empty"),
        ('{"instruction": "q", "output": "a"\n', "malformed JSON on line 1"),
        ("", "empty"),
    ],
)
def test_bad_input_is_a_red_message_and_no_folder(tmp_path, content, expected):
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    out = tmp_path / "out"
    result = _run(str(data), "-k", "2", "--scheme", "iid", "-o", str(out))
    assert result.exit_code == 1
    assert expected in result.output and "error" in result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_partition_errors_exit_1_without_folder(tmp_path):
    data = _dolly(tmp_path / "d.jsonl")
    out = tmp_path / "out"
    result = _run(str(data), "-k", "4", "--scheme", "dirichlet", "--min-size", "100", "-o", str(out))
    assert result.exit_code == 1 and "min_size=100 is impossible" in result.output
    assert not out.exists()
    result = _run(str(data), "-k", "2", "--scheme", "dirichlet", "--category-field", "topic", "-o", str(out))
    assert result.exit_code == 1 and "'category'" in result.output and "lack it" in result.output
    result = _run(str(tmp_path / "missing.jsonl"), "-k", "2", "--scheme", "iid", "-o", str(out))
    assert result.exit_code == 1 and "no such file" in result.output
    assert not out.exists()


def test_usage_errors_exit_2(tmp_path):
    data = _dolly(tmp_path / "d.jsonl")
    out = str(tmp_path / "out")
    result = _run(str(data), "-k", "2", "--scheme", "iid", "--alpha", "0.3", "-o", out)
    assert result.exit_code == 2 and "--alpha" in result.output and "does not apply" in result.output
    assert _run(str(data), "-k", "0", "--scheme", "iid", "-o", out).exit_code == 2
    assert _run(str(data), "-k", "2", "--scheme", "label", "-o", out).exit_code == 2
    assert _run(str(data), "-k", "2", "--scheme", "dirichlet", "--alpha", "0", "-o", out).exit_code == 2
    assert not Path(out).exists()


def test_hub_id_offline(tmp_path):
    result = _run("someone/dataset", "-k", "2", "--scheme", "iid", "-o", str(tmp_path / "out"))
    assert result.exit_code == 1 and "offline" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
def test_commonsense_split(tmp_path):
    out = tmp_path / "cs"
    result = _run(
        "commonsense", "-k", "4", "--scheme", "dirichlet", "--max-per-task", "30", "--min-size", "10",
        "--holdout-per-category", "5", "-o", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    clients, test = load_client_folder(out)
    assert len(test) == 8 * 5 and sum(len(c) for c in clients) == 8 * 25
    assert {r["category"] for r in test} == {
        "boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "obqa",
    }  # fmt: skip
