"""Tokenise rendered records for causal-LM fine-tuning, and pad them into batches.

Follows the seeds (alpaca-lora / FedIT): the text ``prompt + response`` is tokenised with truncation to
``cutoff_len``; EOS is appended when the sequence is shorter than ``cutoff_len`` and does not already end with
it; labels equal the input ids, with the prompt's tokens set to -100 when ``train_on_inputs`` is False.

Which tokens are "the prompt's" needs care, because a tokenizer may merge characters across the prompt/response
boundary. The seeds tokenise the prompt alone and mask that many tokens; that is right when the merge only moves
prompt whitespace into the first response token (SmolLM2 and the ``commonsense`` template: ``"\\n" + 16 spaces``
becomes ``"\\n" + 15 spaces`` and ``" the"``), but it hides a response token when one token straddles the
boundary. With a fast tokenizer we therefore use its character offsets: a token is masked when it ends inside the
prompt, so every token carrying response text stays in the loss. Slow tokenizers fall back to the seeds' rule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fedlora.data.errors import DataError
from fedlora.data.templates import PromptTemplate, get_template, render

if TYPE_CHECKING:
    from torch import Tensor

IGNORE_INDEX = -100
_CHUNK = 1024  # records per tokenizer call: bounds the memory of the tokenizer's intermediate output


def _encode(tokenizer: Any, texts: list[str], cutoff_len: int, offsets: bool = False) -> tuple[list, list]:
    """Token ids (and character offsets when asked) of ``texts``, truncated to ``cutoff_len``."""
    ids: list[list[int]] = []
    spans: list[list[tuple[int, int]]] = []
    for start in range(0, len(texts), _CHUNK):
        batch = tokenizer(
            texts[start : start + _CHUNK],
            truncation=True,
            max_length=cutoff_len,
            return_attention_mask=False,
            return_offsets_mapping=offsets,
        )
        ids.extend(list(x) for x in batch["input_ids"])
        if offsets:
            spans.extend(batch["offset_mapping"])
    return ids, spans


def _tokens_inside(spans: Sequence[tuple[int, int]], prompt_chars: int) -> int:
    """How many leading tokens end within the first ``prompt_chars`` characters (special tokens span (0, 0))."""
    n = 0
    for _, end in spans:
        if end > prompt_chars:
            break
        n += 1
    return n


def tokenize_records(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    template: str | PromptTemplate = "alpaca",
    cutoff_len: int = 512,
    train_on_inputs: bool = True,
    add_eos: bool = True,
) -> list[dict[str, list[int]]]:
    """``[{"input_ids": [...], "labels": [...]}]`` (lists of int, same length) for each record, in order.

    ``tokenizer`` is a Hugging Face tokenizer (called on lists of strings with truncation; its ``eos_token_id``
    is used when ``add_eos``). Labels are the input ids (the model shifts them), with -100 over the prompt when
    ``train_on_inputs`` is False. A prompt longer than ``cutoff_len`` leaves no response token: its labels are all
    -100 when ``train_on_inputs`` is False.
    """
    if isinstance(cutoff_len, bool) or not isinstance(cutoff_len, int) or cutoff_len < 1:
        raise DataError(f"cutoff_len must be an integer >= 1, got {cutoff_len!r}")
    tmpl = get_template(template)
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if add_eos and eos_id is None:
        raise DataError("add_eos=True but the tokenizer has no eos_token_id; set tokenizer.eos_token or add_eos=False")
    if not records:
        return []
    pairs = [render(r, tmpl) for r in records]
    by_offsets = not train_on_inputs and bool(getattr(tokenizer, "is_fast", False))
    full_ids, spans = _encode(tokenizer, [p + r for p, r in pairs], cutoff_len, offsets=by_offsets)
    masked = [0] * len(pairs)
    if by_offsets:
        masked = [_tokens_inside(sp, len(p)) for sp, (p, _) in zip(spans, pairs, strict=True)]
    elif not train_on_inputs:
        masked = [len(ids) for ids in _encode(tokenizer, [p for p, _ in pairs], cutoff_len)[0]]

    examples = []
    for ids, n in zip(full_ids, masked, strict=True):
        if add_eos and len(ids) < cutoff_len and (not ids or ids[-1] != eos_id):
            ids.append(eos_id)
        n = min(n, len(ids))
        labels = [IGNORE_INDEX] * n + ids[n:]
        examples.append({"input_ids": ids, "labels": labels})
    return examples


def collate(
    examples: Sequence[Mapping[str, Sequence[int]]],
    pad_token_id: int,
    padding_side: str = "right",
    pad_to_multiple_of: int | None = None,
) -> dict[str, Tensor]:
    """Pad a list of tokenised examples into ``input_ids``, ``attention_mask`` (1 = token) and ``labels`` tensors.

    Padding positions get ``pad_token_id`` in ``input_ids``, 0 in ``attention_mask`` and -100 in ``labels``, on
    the right (training) or the left (batched generation). An example without ``labels`` is trained on every
    token. All tensors are ``torch.long`` of shape (batch, length), length rounded up to ``pad_to_multiple_of``.
    """
    import torch  # here, so that reading and splitting data does not pay for importing torch

    if not examples:
        raise DataError("collate: no examples")
    if pad_token_id is None:
        raise DataError("collate: pad_token_id is None; set tokenizer.pad_token (e.g. to the EOS token)")
    if padding_side not in ("right", "left"):
        raise DataError(f"collate: padding_side must be 'right' or 'left', got {padding_side!r}")
    if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
        raise DataError(f"collate: pad_to_multiple_of must be a positive integer or None, got {pad_to_multiple_of!r}")
    rows = []
    for i, ex in enumerate(examples):
        ids = list(ex["input_ids"])
        labels = list(ex["labels"]) if "labels" in ex else list(ids)
        if not ids:
            raise DataError(f"collate: example {i} has no tokens")
        if len(labels) != len(ids):
            raise DataError(f"collate: example {i} has {len(ids)} input ids but {len(labels)} labels")
        rows.append((ids, labels))
    length = max(len(ids) for ids, _ in rows)
    if pad_to_multiple_of:
        length = math.ceil(length / pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(rows), length), int(pad_token_id), dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (ids, labs) in enumerate(rows):
        span = slice(0, len(ids)) if padding_side == "right" else slice(length - len(ids), length)
        input_ids[i, span] = torch.tensor(ids, dtype=torch.long)
        labels[i, span] = torch.tensor(labs, dtype=torch.long)
        attention_mask[i, span] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
