"""Scorers that run a causal LM: log-likelihoods of continuations, and batched generation.

**Log-likelihood** (lm-evaluation-harness semantics): for a context ``c`` and continuations ``k_1 .. k_n`` the score
of ``k_j`` is the sum over its tokens of ``log p(token | c, earlier tokens of k_j)``. Tokenisation follows lm-eval:
trailing whitespace of the context moves to the continuations, the context and each ``context + continuation`` are
tokenised whole, and a continuation's tokens are the tail of the whole beyond the context's tokens.

Where the time goes, and what we do about it:

- a context runs once per question, whatever the number of choices: its last position gives every choice's first
  token; only the tokens after the first (e.g. the ``1`` of ``" answer1"``) take a second, short pass that reads the
  context's key/value cache. MMLU's letters are single tokens, so an MMLU question costs one context pass;
- requests of one ``group`` (an MMLU subject, a commonsense task) share a prompt start (the few-shot examples, the
  instruction template): their longest common *token* prefix runs once, and its cache serves every batch of the
  group (the common prefix is computed on token ids, so it is exact even where a tokenizer merges across the text
  boundary of the shared part);
- batches hold contexts of similar length, padded on the left (default) or the right. Position ids are computed
  from the attention mask, so padding never shifts a token's position: batched scores equal one-at-a-time scores.

**Generation**: greedy, or sampling with temperature / top-k / top-p made reproducible per prompt: every prompt has
its own seeded ``torch.Generator`` and a token is drawn by the Gumbel-max trick (``argmax(logits + Gumbel noise)``
is a sample of ``softmax(logits)``), so a prompt's sample does not depend on the batch it lands in.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation import GenerationConfig, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from fedlora.evaluate.base import EvalError

Advance = Callable[[int], None]  # progress: called with the number of items just finished


@dataclass(frozen=True)
class ChoiceRequest:
    """One question for log-likelihood scoring: a context and the continuations (answers) to compare.

    Requests with the same ``group`` are expected to share a prompt start (e.g. one MMLU subject); it only affects
    speed, never the scores.
    """

    context: str
    continuations: tuple[str, ...]
    group: str = ""


@dataclass
class _Encoded:
    index: int
    group: str
    context: list[int]
    continuations: list[list[int]]


def split_trailing_space(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval's rule: trailing whitespace of the context belongs to the continuation (``"Answer: " + "A"`` is
    scored as ``"Answer:" + " A"``), so that word-initial space tokens are scored as the continuation's."""
    stripped = context.rstrip()
    return stripped, context[len(stripped) :] + continuation


def encode_choice_requests(tokenizer: Any, requests: Sequence[ChoiceRequest]) -> list[_Encoded]:
    """Token ids of every context and continuation (see the module docstring), in request order."""
    contexts: list[str] = []
    wholes: list[str] = []
    for i, request in enumerate(requests):
        if not request.continuations:
            raise EvalError(f"request {i}: no continuations to compare")
        pairs = [split_trailing_space(request.context, c) for c in request.continuations]
        if not pairs[0][0]:
            raise EvalError(f"request {i}: the context is empty or only whitespace")
        contexts.append(pairs[0][0])
        wholes.extend(ctx + cont for ctx, cont in pairs)
    context_ids = tokenizer(contexts)["input_ids"]
    whole_ids = tokenizer(wholes)["input_ids"]
    encoded = []
    position = 0
    for i, (request, ctx) in enumerate(zip(requests, context_ids, strict=True)):
        ctx = list(ctx)
        conts = []
        for continuation in request.continuations:
            tail = list(whole_ids[position][len(ctx) :])
            position += 1
            if not tail:
                raise EvalError(f"request {i}: continuation {continuation!r} adds no token to the context")
            conts.append(tail)
        encoded.append(_Encoded(i, request.group, ctx, conts))
    return encoded


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """The length of the longest common prefix of token id sequences."""
    if not sequences:
        return 0
    first = sequences[0]
    n = min(len(s) for s in sequences)
    for seq in sequences[1:]:
        i = 0
        while i < n and seq[i] == first[i]:
            i += 1
        n = i
    return n


def loglik_choices(
    model: Any,
    tokenizer: Any,
    requests: Sequence[ChoiceRequest],
    *,
    batch_size: int = 8,
    padding_side: str = "left",
    share_prefix: bool = True,
    progress: Advance | None = None,
) -> list[tuple[float, ...]]:
    """For every request, the summed log-probability of each continuation given the context (same order).

    The model is used as is (call under ``model.eval()``); ``padding_side`` and ``share_prefix`` change speed only.
    """
    if padding_side not in ("left", "right"):
        raise EvalError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    encoded = encode_choice_requests(tokenizer, requests)
    pad_id = pad_token_id(tokenizer)
    device = model_device(model)
    groups: dict[str, list[_Encoded]] = {}
    for item in encoded:
        groups.setdefault(item.group, []).append(item)

    results: list[tuple[float, ...]] = [()] * len(encoded)
    with torch.inference_mode():
        for items in groups.values():
            prefix_len = 0
            if share_prefix and len(items) > 1:
                # Keep at least one context token out of the prefix: its logits give the first answer token.
                prefix_len = min(common_prefix_length([e.context for e in items]), *(len(e.context) - 1 for e in items))
            prefix_cache = _run_prefix(model, items[0].context[:prefix_len], device) if prefix_len > 0 else None
            ordered = sorted(items, key=lambda e: len(e.context), reverse=True)
            for start in range(0, len(ordered), batch_size):
                batch = ordered[start : start + batch_size]
                scores = _score_batch(model, batch, prefix_len, prefix_cache, pad_id, padding_side, device, batch_size)
                for item, score in zip(batch, scores, strict=True):
                    results[item.index] = score
                if progress is not None:
                    progress(len(batch))
    return results


def _run_prefix(model: Any, prefix: list[int], device: torch.device) -> Any:
    ids = torch.tensor([prefix], dtype=torch.long, device=device)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
    return out.past_key_values


def _select_rows(cache: Any, rows: torch.Tensor) -> Any:
    """A cache holding rows ``rows`` of ``cache`` (repeats allowed), leaving ``cache`` itself untouched.

    The layers' ``batch_select_indices`` replaces their tensors (it does not write into them), so shallow copies of
    the layers suffice.
    """
    picked = copy.copy(cache)
    picked.layers = [copy.copy(layer) for layer in cache.layers]
    picked.batch_select_indices(rows)
    return picked


def _pad(rows: Sequence[Sequence[int]], pad_id: int, side: str, device: torch.device) -> tuple[torch.Tensor, ...]:
    """``(ids, mask)`` of shape (len(rows), longest), padded on ``side``."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(0, len(row)) if side == "right" else slice(length - len(row), length)
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids.to(device), mask.to(device)


def _positions(full_mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Position ids of the last ``new_tokens`` columns: the number of real tokens before each one."""
    return (full_mask.cumsum(-1) - 1).clamp(min=0)[:, -new_tokens:]


def _score_batch(
    model: Any,
    batch: list[_Encoded],
    prefix_len: int,
    prefix_cache: Any,
    pad_id: int,
    side: str,
    device: torch.device,
    chunk: int,
) -> list[tuple[float, ...]]:
    """Scores of the continuations of one batch of questions (their contexts minus the shared prefix)."""
    ids, mask = _pad([e.context[prefix_len:] for e in batch], pad_id, side, device)
    full_mask = torch.cat([torch.ones((len(batch), prefix_len), dtype=torch.long, device=device), mask], dim=1)
    last = mask.shape[1] - 1 if side == "left" else mask.sum(-1) - 1
    keep = torch.full((len(batch), 1), last, device=device) if side == "left" else last.unsqueeze(1)
    multi_token = [(i, j) for i, e in enumerate(batch) for j, cont in enumerate(e.continuations) if len(cont) > 1]
    past = None
    if prefix_cache is not None:
        past = _select_rows(prefix_cache, torch.zeros(len(batch), dtype=torch.long, device=device))
    out = model(
        input_ids=ids,
        attention_mask=full_mask,
        position_ids=_positions(full_mask, ids.shape[1]),
        past_key_values=past,
        use_cache=past is not None or bool(multi_token),
        logits_to_keep=keep,
    )
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (batch, vocab): next token after each context
    scores = [[first[i, cont[0]].item() for cont in e.continuations] for i, e in enumerate(batch)]

    # Tokens after the first: feed each continuation (but its last token) on top of its question's cache.
    for start in range(0, len(multi_token), chunk):
        pairs = multi_token[start : start + chunk]
        rows = torch.tensor([i for i, _ in pairs], dtype=torch.long, device=device)
        conts = [batch[i].continuations[j] for i, j in pairs]
        cont_ids, cont_mask = _pad([c[:-1] for c in conts], pad_id, "right", device)
        pair_mask = torch.cat([full_mask[rows], cont_mask], dim=1)
        logits = model(
            input_ids=cont_ids,
            attention_mask=pair_mask,
            position_ids=_positions(pair_mask, cont_ids.shape[1]),
            past_key_values=_select_rows(out.past_key_values, rows),
            use_cache=True,
        ).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        for k, ((i, j), cont) in enumerate(zip(pairs, conts, strict=True)):
            targets = torch.tensor(cont[1:], dtype=torch.long, device=device)
            scores[i][j] += logprobs[k, : len(targets)].gather(-1, targets.unsqueeze(-1)).sum().item()
    return [tuple(s) for s in scores]


def loglik_reference(model: Any, tokenizer: Any, context: str, continuation: str) -> float:
    """One continuation's log-likelihood by one plain forward pass over ``context + continuation`` (no batching, no
    cache): the independent baseline for tests and benchmarks."""
    (encoded,) = encode_choice_requests(tokenizer, [ChoiceRequest(context, (continuation,))])
    tokens = encoded.context + encoded.continuations[0]
    with torch.inference_mode():
        ids = torch.tensor([tokens], dtype=torch.long, device=model_device(model))
        logits = model(input_ids=ids).logits[0].float()
    logprobs = torch.log_softmax(logits[len(encoded.context) - 1 : -1], dim=-1)
    targets = torch.tensor(encoded.continuations[0], dtype=torch.long, device=logprobs.device)
    return logprobs.gather(-1, targets.unsqueeze(-1)).sum().item()


# ----------------------------------------------------------------------------------------------------------------
# Generation


@dataclass(frozen=True)
class Sampling:
    """Sampling settings; the FLoRA / FLoRIST MMLU protocol is ``Sampling(0.2, 0.6, 30)``."""

    temperature: float
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise EvalError(f"sampling temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise EvalError(f"sampling top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise EvalError(f"sampling top_k must be >= 0 (0: off), got {self.top_k}")


class GumbelSampler(LogitsProcessor):
    """Turns greedy decoding into sampling: adds Gumbel noise drawn from one seeded generator per batch row.

    ``argmax(scores + G)`` with ``G`` i.i.d. standard Gumbel is a draw from ``softmax(scores)``; tokens filtered to
    ``-inf`` by top-k / top-p stay impossible.
    """

    def __init__(self, seeds: Sequence[int]) -> None:
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        vocab = scores.shape[-1]
        uniform = torch.stack([torch.rand(vocab, generator=g, dtype=torch.float64) for g in self.generators])
        tiny = torch.finfo(torch.float64).tiny
        gumbel = -torch.log(-torch.log(uniform.clamp(min=tiny, max=1 - 1e-16)))
        return scores + gumbel.to(device=scores.device, dtype=scores.dtype)


def generate_texts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    sampling: Sampling | None = None,
    progress: Advance | None = None,
) -> list[str]:
    """The continuation generated for each prompt (special tokens and everything after the first EOS dropped).

    Greedy when ``sampling`` is None; otherwise prompt ``i`` samples with its own generator seeded by
    ``(sampling.seed, i)``, so results do not depend on ``batch_size``. Batches are left-padded.
    """
    if not prompts:
        return []
    device = model_device(model)
    pad_id = pad_token_id(tokenizer)
    eos_ids = _eos_ids(model, tokenizer)
    token_ids = tokenizer(list(prompts))["input_ids"]
    order = sorted(range(len(prompts)), key=lambda i: len(token_ids[i]), reverse=True)
    config = GenerationConfig(
        do_sample=False,  # sampling, when asked, is done by GumbelSampler on top of greedy search
        num_beams=1,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=eos_ids or None,
    )
    texts = [""] * len(prompts)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            ids, mask = _pad([token_ids[i] for i in rows], pad_id, "left", device)
            processors = LogitsProcessorList()
            if sampling is not None:
                processors.extend(_sampling_processors(sampling, [_prompt_seed(sampling.seed, i) for i in rows]))
            out = model.generate(
                input_ids=ids, attention_mask=mask, generation_config=config, logits_processor=processors
            )
            for row, tokens in zip(rows, out[:, ids.shape[1] :].tolist(), strict=True):
                texts[row] = tokenizer.decode(_until_eos(tokens, eos_ids), skip_special_tokens=True)
            if progress is not None:
                progress(len(rows))
    return texts


def _sampling_processors(sampling: Sampling, seeds: list[int]) -> list[LogitsProcessor]:
    """Temperature, top-k, top-p (transformers' sampling order), then the seeded Gumbel draw."""
    processors: list[LogitsProcessor] = [TemperatureLogitsWarper(sampling.temperature)]
    if sampling.top_k > 0:
        processors.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p < 1:
        processors.append(TopPLogitsWarper(sampling.top_p))
    processors.append(GumbelSampler(seeds))
    return processors


def _prompt_seed(seed: int, index: int) -> int:
    # Distinct, reproducible streams per (seed, prompt): a fixed odd multiplier spreads consecutive indices.
    return (seed * 1_000_003 + index * 2_654_435_761) % (2**63 - 1)


def _until_eos(tokens: list[int], eos_ids: list[int]) -> list[int]:
    for k, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[:k]
    return tokens


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    config = getattr(model, "generation_config", None)
    configured = getattr(config, "eos_token_id", None)
    for value in ([configured] if isinstance(configured, int) else list(configured or [])) + [tokenizer.eos_token_id]:
        if value is not None and value not in ids:
            ids.append(int(value))
    return ids


# ----------------------------------------------------------------------------------------------------------------
# Helpers


def model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # a parameter-free fake model
        return torch.device("cpu")


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its eos id (padding never reaches a scored position)."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    raise EvalError("the tokenizer has neither a pad token nor an eos token; set tokenizer.pad_token")
