"""A fingerprint of a run's inputs, recorded at round 0 so that runs compared side by side provably share them.

Two runs of different methods are comparable only when they train on the same client shards, see the same data
in the same order and start from the same base weights with the same seed. ``input_fingerprint`` hashes each of
those inputs separately (so that a mismatch names the input that differs); ``fedlora compare`` and
``fedlora report`` check that every compared run recorded the same fingerprint.

Nothing here depends on the method: adapters (whose initialisation legitimately differs between methods) are
excluded from the weights' hash.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fedlora.engine.seeding import mix_seed

FINGERPRINT_VERSION = 1
#: the components of a fingerprint that must agree between comparable runs, in the order reports list them
COMPONENTS = ("seed", "base_weights", "data_split", "eval_set", "first_batches")
_DIGEST_CHARS = 16  # 64 bits: collisions are not a concern for telling runs apart


def hash_examples(examples: Iterable[Mapping[str, Sequence[int]]]) -> str:
    """Hash of tokenised examples in order: their ``input_ids`` and ``labels`` (lengths included)."""
    h = hashlib.sha256()
    for example in examples:
        for key in ("input_ids", "labels"):
            values = example.get(key)
            if values is None:
                h.update(b"-")
                continue
            h.update(len(values).to_bytes(4, "little"))
            h.update(torch.as_tensor(list(values), dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()[:_DIGEST_CHARS]


def _combine(parts: Iterable[str]) -> str:
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:_DIGEST_CHARS]


def base_parameter_name(name: str) -> str | None:
    """The base model's name of a parameter, or None for adapter parameters (PEFT LoRA, LoRA-SB's B, A, R).

    PEFT wraps a target linear as ``<name>.base_layer``; LoRA-SB registers ``B``, ``A`` and ``R`` beside it. Base
    weights are the parameters named ``weight`` or ``bias``, outside any ``lora_*`` container.
    """
    parts = name.split(".")
    if parts[-1] not in ("weight", "bias") or any(p.startswith("lora_") for p in parts):
        return None
    if parts[:2] == ["base_model", "model"]:  # a PeftModel's prefix
        parts = parts[2:]
    return ".".join(p for p in parts if p != "base_layer")


def hash_base_weights(model: nn.Module) -> str:
    """Hash of the base model's weights (names, dtypes, shapes, bytes), adapters excluded, in sorted name order."""
    params = {}
    for name, param in model.named_parameters():
        base = base_parameter_name(name)
        if base is not None:
            params[base] = param
    h = hashlib.sha256()
    for name in sorted(params):
        tensor = params[name].detach().cpu().contiguous()
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        h.update(tensor.view(torch.uint8).numpy())  # raw bytes of any dtype, no copy
    return h.hexdigest()[:_DIGEST_CHARS]


def first_batch_indices(num_examples: int, batch_size: int, seed: int) -> list[int]:
    """Indices of the first effective batch the local trainer draws with ``seed`` (epoch 0 of its order)."""
    from fedlora.train import epoch_order

    return epoch_order(num_examples, seed, 0)[:batch_size]


def input_fingerprint(config: Any, data: Any, model: nn.Module) -> dict[str, Any]:
    """The fingerprint of a run's inputs, before any training (``record["inputs"]`` of ``metrics.jsonl``).

    ``config`` is the ``RunConfig``, ``data`` the engine's ``ClientData`` (tokenised client shards and evaluation
    set), ``model`` the base model (adapters may be installed; they are ignored). The first batches are the ones
    each client trains on in round 1, drawn exactly as the engine seeds them.
    """

    first_batches = []
    for k, shard in enumerate(data.clients):
        seed = mix_seed(config.seed, "train", 1, k)
        picked = first_batch_indices(len(shard), config.train.batch_size, seed)
        first_batches.append(hash_examples(shard[i] for i in picked))
    return {
        "version": FINGERPRINT_VERSION,
        "seed": config.seed,
        "base_weights": hash_base_weights(model),
        "data_split": _combine(hash_examples(shard) for shard in data.clients),
        "eval_set": hash_examples(data.eval_examples),
        "first_batches": _combine(first_batches),
        "client_sizes": [len(shard) for shard in data.clients],
        "first_batch_per_client": first_batches,
    }


def fingerprint_differences(fingerprints: Mapping[str, Mapping[str, Any] | None]) -> dict[str, list[str]]:
    """Which components differ between runs: ``{component: [run labels that disagree with the first run]}``.

    Runs without a fingerprint are reported under the component ``"missing"``. An empty result means that every
    run recorded the same seed, base weights, data split, evaluation set and first batches.
    """
    out: dict[str, list[str]] = {}
    recorded = {label: fp for label, fp in fingerprints.items() if fp}
    missing = [label for label, fp in fingerprints.items() if not fp]
    if missing:
        out["missing"] = missing
    if not recorded:
        return out
    reference = next(iter(recorded.values()))
    for component in COMPONENTS:
        differing = [label for label, fp in recorded.items() if fp.get(component) != reference.get(component)]
        if differing:
            out[component] = differing
    return out
