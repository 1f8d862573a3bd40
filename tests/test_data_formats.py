"""Record formats (Dolly, Alpaca, WizardLM; JSON and JSONL), their errors, and the seeds' folder layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlora.data import DataError, load_client_folder, load_records, write_client_folder
from fedlora.data import formats as formats_module

DOLLY = [
    {"instruction": "Who wrote Hamlet?", "context": "", "response": "Shakespeare.", "category": "open_qa"},
    {"instruction": "Summarise.", "context": "A long text.", "response": "Short.", "category": "summarization"},
]
ALPACA = [
    {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
    {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
]
WIZARD = [
    {"instruction": "Write a haiku.", "output": "Leaves fall softly."},
    {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Name a colour."},
            {"from": "gpt", "value": "Blue."},
            {"from": "human", "value": "Another?"},
            {"from": "gpt", "value": "Red."},
        ]
    },
]


def _write_json(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("writer,suffix", [(_write_json, ".json"), (_write_jsonl, ".jsonl")])
def test_three_styles_normalise(tmp_path, writer, suffix):
    dolly = load_records(writer(tmp_path / f"dolly{suffix}", DOLLY))
    assert dolly == [
        {"instruction": "Who wrote Hamlet?", "input": "", "output": "Shakespeare.", "category": "open_qa"},
        {"instruction": "Summarise.", "input": "A long text.", "output": "Short.", "category": "summarization"},
    ]
    alpaca = load_records(writer(tmp_path / f"alpaca{suffix}", ALPACA))
    assert alpaca[1] == {"instruction": "Translate to French.", "input": "cat", "output": "chat", "category": None}
    wizard = load_records(writer(tmp_path / f"wizard{suffix}", WIZARD))
    assert wizard == [
        {"instruction": "Write a haiku.", "input": "", "output": "Leaves fall softly.", "category": None},
        # the first human turn and its reply; the system turn and later turns are not part of the record
        {"instruction": "Name a colour.", "input": "", "output": "Blue.", "category": None},
    ]


def test_content_decides_not_the_suffix(tmp_path):
    # Dolly's official file is JSON lines; a .json name must not matter.
    lines = _write_jsonl(tmp_path / "dolly.json", DOLLY)
    assert [r["output"] for r in load_records(lines)] == ["Shakespeare.", "Short."]
    array = _write_json(tmp_path / "alpaca.txt", ALPACA)
    assert len(load_records(array)) == 2


def test_blank_lines_bom_and_other_category_field(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"instruction": "a", "output": "b", "topic": "x"}, {"instruction": "c", "output": "d", "topic": 7}]
    path.write_text("\ufeff" + json.dumps(rows[0]) + "\n\n   \n" + json.dumps(rows[1]) + "\n", encoding="utf-8")
    records = load_records(path, category_field="topic")
    assert [r["category"] for r in records] == ["x", "7"]


def _error(path: Path, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        load_records(path, **kwargs)
    return str(info.value)


def test_missing_response_names_file_record_and_field(tmp_path):
    rows = [ALPACA[0], {"instruction": "No answer here", "input": ""}]
    msg = _error(_write_json(tmp_path / "bad.json", rows))
    assert "bad.json" in msg and "record 1" in msg
    assert "'output'" in msg and "'response'" in msg
    assert "Dolly" in msg and "Alpaca" in msg and "WizardLM" in msg  # lists the accepted formats

    msg = _error(_write_jsonl(tmp_path / "bad.jsonl", rows))
    assert "bad.jsonl" in msg and "line 2" in msg


def test_missing_instruction_and_empty_response(tmp_path):
    msg = _error(_write_jsonl(tmp_path / "a.jsonl", [{"prompt": "x", "output": "y"}]))
    assert "line 1" in msg and "'instruction'" in msg
    msg = _error(_write_jsonl(tmp_path / "b.jsonl", [DOLLY[0], {"instruction": "q", "response": "  "}]))
    assert "line 2" in msg and "'response'" in msg and "empty" in msg
    msg = _error(_write_json(tmp_path / "c.json", [{"instruction": "", "output": "y"}]))
    assert "'instruction'" in msg and "empty" in msg


def test_wrong_types_and_non_objects(tmp_path):
    msg = _error(_write_json(tmp_path / "a.json", [ALPACA[0], ["not", "an", "object"]]))
    assert "record 1" in msg and "expected a JSON object" in msg and "list" in msg
    msg = _error(_write_jsonl(tmp_path / "b.jsonl", [{"instruction": "q", "output": 5}]))
    assert "'output'" in msg and "must be a string" in msg
    msg = _error(_write_jsonl(tmp_path / "c.jsonl", [{"instruction": "q", "output": "a", "category": [1]}]))
    assert "category" in msg


def test_bad_conversations(tmp_path):
    msg = _error(_write_jsonl(tmp_path / "a.jsonl", [{"conversations": [{"from": "gpt", "value": "hi"}]}]))
    assert "human" in msg and "line 1" in msg
    msg = _error(_write_jsonl(tmp_path / "b.jsonl", [{"conversations": [{"from": "human", "value": "hi"}]}]))
    assert "no reply" in msg
    msg = _error(_write_jsonl(tmp_path / "c.jsonl", [{"conversations": "hello"}]))
    assert "conversations" in msg


def test_malformed_json(tmp_path):
    array = tmp_path / "broken.json"
    array.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]\n')
    msg = _error(array)
    assert "broken.json" in msg and "malformed JSON" in msg and "line 3" in msg

    lines = tmp_path / "broken.jsonl"
    lines.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    msg = _error(lines)
    assert "broken.jsonl" in msg and "line 2" in msg

    pretty = tmp_path / "object.json"
    pretty.write_text(json.dumps({"instruction": "a", "output": "b"}, indent=2))
    assert "single pretty-printed JSON object" in _error(pretty)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n \n")
    assert "empty" in _error(tmp_path / "empty.jsonl")
    (tmp_path / "empty.json").write_text("[]")
    assert "empty" in _error(tmp_path / "empty.json")
    assert "no such file" in _error(tmp_path / "nope.json")
    assert "is a folder" in _error(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# The seeds' folder layout


def _records(n: int, prefix: str, category: str | None = "c") -> list[dict]:
    return [{"instruction": f"{prefix} {i}", "input": "", "output": f"out {i}", "category": category} for i in range(n)]


def test_folder_round_trip(tmp_path):
    clients = [_records(3, "a"), _records(1, "b", None), _records(2, "c", "other")]
    test = _records(2, "t")
    folder = write_client_folder(tmp_path / "split", clients, test)
    assert sorted(p.name for p in folder.iterdir()) == [
        "global_test.json",
        "local_training_0.json",
        "local_training_1.json",
        "local_training_2.json",
    ]
    loaded_clients, loaded_test = load_client_folder(folder)
    assert loaded_clients == clients and loaded_test == test
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    # the files are plain JSON arrays the seeds' code can read
    assert json.loads((folder / "local_training_0.json").read_text())[0]["instruction"] == "a 0"

    two, _ = load_client_folder(folder, num_clients=2)
    assert two == clients[:2]


def test_folder_dolly_style_and_no_test(tmp_path):
    folder = write_client_folder(tmp_path / "dolly", [_records(2, "a")], None, style="dolly")
    raw = json.loads((folder / "local_training_0.json").read_text())
    assert set(raw[0]) == {"instruction", "context", "response", "category"}
    clients, test = load_client_folder(folder)
    assert clients == [_records(2, "a")] and test is None


def test_folder_errors(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    with pytest.raises(DataError, match="no client files"):
        load_client_folder(folder)
    _write_json(folder / "local_training_0.json", ALPACA)
    _write_json(folder / "local_training_2.json", ALPACA)
    with pytest.raises(DataError, match=r"missing local_training_1\.json"):
        load_client_folder(folder)
    with pytest.raises(DataError, match=r"missing local_training_1\.json"):
        load_client_folder(folder, num_clients=3)
    (folder / "local_training_1.json").write_text("[]")
    with pytest.raises(DataError, match=r"local_training_1\.json: the JSON array is empty"):
        load_client_folder(folder)
    with pytest.raises(DataError, match="no such folder"):
        load_client_folder(tmp_path / "absent")


def test_write_refuses_existing_and_replaces_with_overwrite(tmp_path):
    folder = write_client_folder(tmp_path / "out", [_records(2, "old")])
    with pytest.raises(DataError, match="overwrite"):
        write_client_folder(folder, [_records(1, "new")])
    assert load_client_folder(folder)[0] == [_records(2, "old")]
    write_client_folder(folder, [_records(1, "new"), _records(1, "new2")], overwrite=True)
    assert load_client_folder(folder)[0] == [_records(1, "new"), _records(1, "new2")]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_write_validates_before_touching_disk(tmp_path):
    with pytest.raises(DataError, match="client 1 has no examples"):
        write_client_folder(tmp_path / "out", [_records(1, "a"), []])
    with pytest.raises(DataError, match="client 0: record 1"):
        write_client_folder(tmp_path / "out", [[_records(1, "a")[0], {"instruction": "x"}]])
    assert list(tmp_path.iterdir()) == []


def test_write_failure_midway_leaves_previous_folder_intact(tmp_path, monkeypatch):
    folder = write_client_folder(tmp_path / "out", [_records(2, "old")])
    calls = {"n": 0}
    real_dump = formats_module.dump_records

    def failing_dump(records):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real_dump(records)

    monkeypatch.setattr(formats_module, "dump_records", failing_dump)
    with pytest.raises(OSError, match="disk full"):
        write_client_folder(folder, [_records(1, "new"), _records(1, "new")], overwrite=True)
    assert load_client_folder(folder)[0] == [_records(2, "old")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
