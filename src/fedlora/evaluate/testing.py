"""Test helpers for evaluation code: a fake causal LM whose answers are known.

``OracleLM`` returns next-token logits that are a chosen function of the text so far (+10 on one character's token,
0 elsewhere), with the byte-level tokenizer of :func:`fedlora.models.byte_level_tokenizer` (one token per byte).
It honours the attention mask and a key/value cache stand-in, so padding or caching mistakes in a scorer show up
as wrong texts, hence wrong answers. Useful to test code that calls :func:`fedlora.evaluate.evaluate` (e.g. an
engine) in milliseconds, without a real model.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch


class _TokenLayer:
    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def batch_select_indices(self, rows: torch.Tensor) -> None:
        self.ids = self.ids[rows]


class TokenCache:
    """Stands in for a key/value cache: it remembers the token ids seen so far (one 'layer')."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.layers = [_TokenLayer(ids)]

    def batch_select_indices(self, rows: torch.Tensor) -> None:
        for layer in self.layers:
            layer.batch_select_indices(rows)


class OracleLM(torch.nn.Module):
    """Next-token logits from ``next_char(text_so_far)``: +10 on that character's token, 0 elsewhere.

    Works with the byte-level tokenizer (one token per character). It honours the attention mask (padding is
    skipped when it rebuilds the text) and the cache, so wrong padding or a wrong cache shows up as a wrong text.
    ``calls`` records (batch, new tokens) of every forward; ``modes`` whether it ran in training mode.
    """

    def __init__(self, tokenizer: Any, next_char: Callable[[str], str | None]) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.next_char = next_char
        self.vocab = len(tokenizer)
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.calls: list[tuple[int, int]] = []
        self.modes: list[bool] = []

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        past_key_values: TokenCache | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **_: Any,
    ) -> SimpleNamespace:
        self.calls.append(tuple(input_ids.shape))
        self.modes.append(self.training)
        past = past_key_values.layers[0].ids if past_key_values is not None else input_ids[:, :0]
        ids = torch.cat([past, input_ids], dim=1)
        new = input_ids.shape[1]
        if isinstance(logits_to_keep, int):
            positions = torch.arange(new - logits_to_keep if logits_to_keep else 0, new).expand(len(ids), -1)
        else:
            positions = logits_to_keep
        logits = torch.zeros((len(ids), positions.shape[1], self.vocab))
        for row in range(len(ids)):
            for k, pos in enumerate(positions[row].tolist()):
                upto = past.shape[1] + pos + 1
                real = ids[row, :upto][attention_mask[row, :upto].bool()]
                char = self.next_char(self.tokenizer.decode(real.tolist()))
                if char is not None:
                    logits[row, k, self.tokenizer.encode(char, add_special_tokens=False)[0]] = 10.0
        return SimpleNamespace(logits=logits, past_key_values=TokenCache(ids))


def answer_oracle(answers: dict[str, str], anchor: str) -> Callable[[str], str | None]:
    """After ``anchor``, spell out the answer of the question (a key of ``answers``) found in the text."""

    def next_char(text: str) -> str | None:
        if anchor not in text:
            return None
        question = next((q for q in answers if q in text), None)
        if question is None:
            return None
        tail = text[text.rindex(anchor) + len(anchor) :]
        target = answers[question]
        return target[len(tail)] if target.startswith(tail) and len(tail) < len(target) else None

    return next_char
