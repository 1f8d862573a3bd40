"""load_records_spec: built-in names, files, seeds' folders and Hugging Face ids (offline here)."""

from __future__ import annotations

import json
import sys
import types

import pytest

from fedlora.data import DataError, load_builtin, load_records_spec, write_client_folder
from fedlora.data import sources as sources_module

ROWS = [
    {"instruction": "q1", "context": "", "response": "a1", "category": "open_qa"},
    {"instruction": "q2", "context": "c", "response": "a2", "category": "closed_qa"},
]


def test_file_spec(tmp_path):
    path = tmp_path / "dolly.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    loaded = load_records_spec(str(path))
    assert loaded.kind == "file" and loaded.clients is None and loaded.test is None
    assert [r["output"] for r in loaded.records] == ["a1", "a2"]
    assert loaded.seconds >= 0


def test_folder_spec_keeps_the_partition(tmp_path):
    clients = [[{"instruction": f"q{k}{i}", "output": "a"} for i in range(k + 1)] for k in range(3)]
    folder = write_client_folder(tmp_path / "seed", clients, [{"instruction": "t", "output": "a"}])
    loaded = load_records_spec(folder)
    assert loaded.kind == "folder"
    assert [len(c) for c in loaded.clients] == [1, 2, 3]
    assert len(loaded.records) == 6 and loaded.test[0]["instruction"] == "t"
    assert len(load_records_spec(folder, num_clients=2).clients) == 2


def test_missing_paths_are_not_sent_to_the_hub(tmp_path):
    for spec in (str(tmp_path / "nope.json"), "data.jsonl", "./data", "data/dolly/train"):
        with pytest.raises(DataError, match="no such file or folder"):
            load_records_spec(spec)


def test_hub_offline_error_says_what_to_use():
    # tests run with HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1 (conftest): nothing is fetched
    with pytest.raises(DataError) as info:
        load_records_spec("someone/not-a-cached-dataset")
    message = str(info.value)
    assert "offline" in message and "JSON/JSONL file" in message and "'commonsense'" in message


def _fake_datasets(monkeypatch, load_dataset) -> None:
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))


def test_hub_rows_are_normalised(monkeypatch):
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return ROWS

    _fake_datasets(monkeypatch, load_dataset)
    loaded = load_records_spec("databricks/databricks-dolly-15k", hf_split="train[:2]")
    assert loaded.kind == "hub" and calls == [("databricks/databricks-dolly-15k", None, "train[:2]")]
    assert loaded.records[1] == {"instruction": "q2", "input": "c", "output": "a2", "category": "closed_qa"}


def test_hub_errors(monkeypatch):
    def broken(name, config, split):
        raise ConnectionError("unreachable")

    _fake_datasets(monkeypatch, broken)
    for var in sources_module._OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(DataError, match=r"could not load 'org/data'.*ConnectionError: unreachable"):
        load_records_spec("org/data")

    _fake_datasets(monkeypatch, lambda name, config, split: [{"instruction": "x"}])
    with pytest.raises(DataError, match=r"org/data \(Hugging Face, split train\): row 0: missing the response"):
        load_records_spec("org/data")


def test_builtin_options_are_checked(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps(ROWS))
    with pytest.raises(DataError, match="max_per_task apply only to built-in datasets"):
        load_records_spec(path, max_per_task=3)
    with pytest.raises(DataError, match="own category"):
        load_records_spec("commonsense", category_field="topic")
    with pytest.raises(DataError, match="unknown built-in dataset 'dolly'; valid: commonsense"):
        load_builtin("dolly")


@pytest.mark.integration
def test_builtin_commonsense_spec():
    loaded = load_records_spec("commonsense", tasks="boolq,obqa", max_per_task=5, seed=0)
    assert loaded.kind == "builtin"
    assert [r["category"] for r in loaded.records] == ["boolq"] * 5 + ["obqa"] * 5
