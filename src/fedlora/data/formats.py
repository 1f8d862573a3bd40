"""Instruction records on disk: JSON / JSONL files and the seeds' client-folder layout.

Every loader returns *normalised* records: dicts with exactly the keys ``instruction``, ``input``, ``output`` and
``category`` (``None`` when the source has none). Accepted input styles, recognised per record:

- Dolly:    ``{"instruction", "context", "response", "category"}``
- Alpaca:   ``{"instruction", "input", "output"}`` (``input`` may be absent or empty)
- WizardLM: ``{"instruction", "output"}`` or ``{"conversations": [{"from": "human", "value"}, {"from": "gpt",
  "value"}, ...]}`` (the first human turn and the reply to it; later turns are ignored)

The seeds' folder holds ``local_training_{k}.json`` for k = 0..K-1 and, optionally, ``global_test.json``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from fedlora.data.errors import DataError

Record = dict[str, Any]

ACCEPTED_FORMATS = (
    "accepted formats: a JSON array or JSON lines of objects in Dolly style {instruction, context, response, "
    "category}, Alpaca style {instruction, input, output} or WizardLM style {instruction, output} / "
    "{conversations: [{from: human, value}, {from: gpt, value}]}"
)

TRAIN_FILE = "local_training_{k}.json"
TEST_FILE = "global_test.json"
_TRAIN_FILE_RE = re.compile(r"local_training_(\d+)\.json")

_HUMAN_ROLES = ("human", "user")
_ASSISTANT_ROLES = ("gpt", "assistant", "chatgpt")
_SYSTEM_ROLES = ("system",)


# ----------------------------------------------------------------------------------------------------------------
# One record


def _text_field(raw: Mapping[str, Any], key: str, where: str, *, required: bool) -> str:
    """A string field: ``None`` / absent is ``""`` unless required; an empty required field is an error."""
    value = raw.get(key)
    if value is None:
        if required:
            raise DataError(f"{where}: missing field {key!r}; {ACCEPTED_FORMATS}")
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}; {ACCEPTED_FORMATS}")
    if required and not value.strip():
        raise DataError(f"{where}: field {key!r} is empty; {ACCEPTED_FORMATS}")
    return value


def _from_conversations(turns: Any, where: str) -> tuple[str, str]:
    """(instruction, output) from a WizardLM / ShareGPT ``conversations`` list: first human turn and its reply."""
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field 'conversations' must be a non-empty list of turns; {ACCEPTED_FORMATS}")
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(
                f"{where}: conversations[{j}] must be an object with fields 'from' and 'value'; {ACCEPTED_FORMATS}"
            )
    roles = [str(turn["from"]).lower() for turn in turns]
    start = 0
    while start < len(roles) and roles[start] in _SYSTEM_ROLES:
        start += 1
    if start >= len(roles) or roles[start] not in _HUMAN_ROLES:
        raise DataError(f"{where}: conversations must start with a turn from 'human'; got roles {roles}")
    if start + 1 >= len(roles) or roles[start + 1] not in _ASSISTANT_ROLES:
        raise DataError(f"{where}: the first 'human' turn has no reply from 'gpt' after it; got roles {roles}")
    human, reply = turns[start], turns[start + 1]
    instruction = _text_field(human, "value", f"{where} conversations[{start}]", required=True)
    output = _text_field(reply, "value", f"{where} conversations[{start + 1}]", required=True)
    return instruction, output


def normalize_record(raw: Any, where: str = "record", category_field: str = "category") -> Record:
    """One raw record (Dolly, Alpaca or WizardLM style) as ``{instruction, input, output, category}``.

    ``where`` names the record in error messages (file and record index or line). ``category_field`` is the raw
    field copied into ``category``.
    """
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}; {ACCEPTED_FORMATS}")
    if "instruction" not in raw and "conversations" in raw:
        instruction, output = _from_conversations(raw["conversations"], where)
        context = ""
    else:
        if "instruction" not in raw:
            raise DataError(f"{where}: missing field 'instruction' (keys: {sorted(raw)}); {ACCEPTED_FORMATS}")
        instruction = _text_field(raw, "instruction", where, required=True)
        # Alpaca's "input" and Dolly's "context" are the same thing; "input" wins if both are present.
        context = _text_field(raw, "input" if raw.get("input") is not None else "context", where, required=False)
        if "output" in raw:
            output = _text_field(raw, "output", where, required=True)
        elif "response" in raw:
            output = _text_field(raw, "response", where, required=True)
        else:
            raise DataError(
                f"{where}: missing the response: field 'output' (Alpaca, WizardLM) or 'response' (Dolly) "
                f"(keys: {sorted(raw)}); {ACCEPTED_FORMATS}"
            )
    return {
        "instruction": instruction,
        "input": context,
        "output": output,
        "category": _category(raw, where, category_field),
    }


def _category(raw: Mapping[str, Any], where: str, field: str) -> str | None:
    value = raw.get(field)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise DataError(f"{where}: category field {field!r} must be a string or an integer, got {type(value).__name__}")


def normalize_records(rows: Iterable[Any], source: str, category_field: str = "category") -> list[Record]:
    """Normalise rows of an in-memory source (e.g. a Hugging Face dataset); errors name ``source`` and the row."""
    records = [normalize_record(row, f"{source}: row {i}", category_field) for i, row in enumerate(rows)]
    if not records:
        raise DataError(f"{source}: no records")
    return records


# ----------------------------------------------------------------------------------------------------------------
# Files


def load_records(path: str | os.PathLike[str], category_field: str = "category") -> list[Record]:
    """Normalised records of a JSON (array of objects) or JSON-lines file, whatever its extension.

    Errors (:class:`DataError`) name the file, the record (0-based index in an array, 1-based line in JSON lines)
    and the missing or bad field. An empty file or array is an error.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a folder; pass a JSON/JSONL file, or read a seeds' folder with load_client_folder")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read as UTF-8 text: {err}") from None
    body = text.lstrip("\ufeff \t\r\n")
    if not body:
        raise DataError(f"{path}: the file is empty; {ACCEPTED_FORMATS}")
    if body[0] == "[":
        return _load_json_array(path, text, category_field)
    return _load_json_lines(path, text, category_field)


def _load_json_array(path: Path, text: str, category_field: str) -> list[Record]:
    try:
        rows = json.loads(text.lstrip("\ufeff"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    if not isinstance(rows, list):  # pragma: no cover - the text starts with "[" so it parses to a list
        raise DataError(f"{path}: expected a JSON array of records; {ACCEPTED_FORMATS}")
    if not rows:
        raise DataError(f"{path}: the JSON array is empty (no records)")
    return [normalize_record(row, f"{path}: record {i} (0-based)", category_field) for i, row in enumerate(rows)]


def _load_json_lines(path: Path, text: str, category_field: str) -> list[Record]:
    records = []
    for lineno, line in enumerate(text.lstrip("\ufeff").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            hint = ""
            if lineno == 1 and line.strip() == "{":
                hint = " (a single pretty-printed JSON object is not a list of records)"
            raise DataError(
                f"{path}: malformed JSON on line {lineno}, column {err.colno}: {err.msg}{hint}; expected a JSON "
                f"array or one JSON object per line"
            ) from None
        records.append(normalize_record(row, f"{path}: line {lineno}", category_field))
    if not records:  # pragma: no cover - a non-blank file has at least one non-blank line
        raise DataError(f"{path}: no records")
    return records


def dump_records(records: Sequence[Record]) -> str:
    """A JSON array with one record per line: valid JSON, compact, and readable in a diff."""
    return "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n"


# ----------------------------------------------------------------------------------------------------------------
# The seeds' folder layout


def _train_files(folder: Path) -> dict[int, Path]:
    files = {}
    for path in folder.iterdir():
        match = _TRAIN_FILE_RE.fullmatch(path.name)
        if match and path.is_file():
            files[int(match.group(1))] = path
    return files


def load_client_folder(
    folder: str | os.PathLike[str], num_clients: int | None = None, category_field: str = "category"
) -> tuple[list[list[Record]], list[Record] | None]:
    """Clients' shards (``local_training_{k}.json``, k = 0..K-1) and the test set (``global_test.json``, or None).

    Without ``num_clients`` every ``local_training_*.json`` is read and the indices must run 0..K-1 without gaps;
    with it, files 0..num_clients-1 must exist (further files are ignored). An empty shard is an error.
    """
    folder = Path(folder)
    layout = f"expected {TRAIN_FILE.format(k='{k}')} for k = 0..K-1 and optionally {TEST_FILE}"
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder; {layout}")
    files = _train_files(folder)
    if not files:
        raise DataError(f"{folder}: no client files; {layout}")
    if num_clients is not None:
        if num_clients < 1:
            raise DataError(f"num_clients must be at least 1, got {num_clients}")
        wanted = range(num_clients)
    else:
        wanted = range(max(files) + 1)
    missing = [TRAIN_FILE.format(k=k) for k in wanted if k not in files]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        found = ", ".join(p.name for _, p in sorted(files.items())[:5])
        raise DataError(f"{folder}: missing {shown} (found {found}); {layout}")
    clients = [load_records(files[k], category_field) for k in wanted]
    test_path = folder / TEST_FILE
    test = load_records(test_path, category_field) if test_path.exists() else None
    return clients, test


def _styled(record: Record, style: str) -> Record:
    if style == "dolly":
        return {
            "instruction": record["instruction"],
            "context": record["input"],
            "response": record["output"],
            "category": record["category"],
        }
    return dict(record)


def write_client_folder(
    folder: str | os.PathLike[str],
    clients: Sequence[Sequence[Mapping[str, Any]]],
    test: Sequence[Mapping[str, Any]] | None = None,
    *,
    overwrite: bool = False,
    style: Literal["alpaca", "dolly"] = "alpaca",
) -> Path:
    """Write the seeds' layout atomically: a temporary folder beside ``folder``, renamed into place when complete.

    Records are validated (any accepted input style) and written normalised, with Alpaca field names
    (``instruction, input, output, category``) or, with ``style="dolly"``, the seeds' Dolly names
    (``instruction, context, response, category``). An existing non-empty ``folder`` is replaced only with
    ``overwrite=True``; on any error nothing is left behind.
    """
    if style not in ("alpaca", "dolly"):
        raise DataError(f"unknown record style {style!r}; valid: 'alpaca', 'dolly'")
    folder = Path(folder)
    if not clients:
        raise DataError("no clients to write")
    shards = []
    for k, shard in enumerate(clients):
        if not shard:
            raise DataError(f"client {k} has no examples; every {TRAIN_FILE.format(k='{k}')} must hold records")
        shards.append([_styled(normalize_record(r, f"client {k}: record {i}"), style) for i, r in enumerate(shard)])
    test_records = None
    if test:
        test_records = [_styled(normalize_record(r, f"test: record {i}"), style) for i, r in enumerate(test)]
    if folder.exists() and not folder.is_dir():
        raise DataError(f"{folder}: exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise DataError(f"{folder}: already exists and is not empty; pass overwrite=True (--overwrite) to replace it")

    folder.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = folder.parent / f".{folder.name}.tmp-{tag}"
    old = folder.parent / f".{folder.name}.old-{tag}"
    try:
        tmp.mkdir()
        for k, shard in enumerate(shards):
            (tmp / TRAIN_FILE.format(k=k)).write_text(dump_records(shard), encoding="utf-8")
        if test_records:
            (tmp / TEST_FILE).write_text(dump_records(test_records), encoding="utf-8")
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
    except BaseException:
        if old.exists() and not folder.exists():
            old.rename(folder)  # put the previous folder back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return folder
