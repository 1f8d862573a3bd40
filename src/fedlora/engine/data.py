"""From a run config to tokenised client shards and a fixed held-out evaluation set (all checked before training)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from fedlora.config import RunConfig
from fedlora.data import DataError, collate, load_records_spec, tokenize_records
from fedlora.data.split import partition


@dataclass
class ClientData:
    clients: list[list[dict[str, Any]]]  # tokenised examples per client
    eval_examples: list[dict[str, Any]]
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]]


def prepare_data(config: RunConfig, tokenizer: Any) -> ClientData:
    d = config.data
    loaded = load_records_spec(
        d.source,
        category_field=d.category_field,
        tasks=d.tasks,
        max_per_task=d.max_examples_per_category,
        seed=config.seed,
        num_clients=d.num_clients if Path(d.source).is_dir() else None,
    )
    if loaded.kind == "folder":  # the seeds' pre-split folder keeps its own partition
        clients, test = loaded.clients, loaded.test
        if len(clients) != d.num_clients:
            raise DataError(f"{d.source} holds {len(clients)} client files but data.num_clients is {d.num_clients}")
    else:
        options: dict[str, object] = {"seed": config.seed, "holdout_per_category": d.holdout_per_category}
        if d.partition == "dirichlet":
            options.update(alpha=d.dirichlet_alpha, min_size=d.min_client_size)
        elif d.partition == "shards":
            options.update(shards_per_client=d.shards_per_client)
        # records are normalised: their category (from data.category_field) is under "category"
        clients, test = partition(loaded.records, d.partition, d.num_clients, **options)
    if d.max_examples_per_client is not None:
        clients = [c[: d.max_examples_per_client] for c in clients]
    for k, shard in enumerate(clients):
        if not shard:
            raise DataError(f"client {k} has no training examples; lower data.num_clients or change the split")

    tokenize = partial(
        tokenize_records,
        tokenizer=tokenizer,
        template=d.template,
        cutoff_len=d.cutoff_len,
        train_on_inputs=d.train_on_inputs,
        add_eos=d.add_eos,
    )
    eval_records = list(test or [])
    random.Random(config.seed).shuffle(eval_records)  # a fixed sample, the same for every method
    return ClientData(
        clients=[tokenize(shard) for shard in clients],
        eval_examples=tokenize(eval_records[: d.eval_examples]) if d.eval_examples else [],
        collate=partial(collate, pad_token_id=tokenizer.pad_token_id),
    )
