"""From a run config to tokenised client shards and a fixed held-out evaluation set (all checked before training)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from fedlora.config import RunConfig
from fedlora.data import (
    DataError,
    collate,
    load_client_folder,
    load_records_spec,
    split_records,
    tokenize_records,
)


@dataclass
class ClientData:
    clients: list[list[dict[str, Any]]]  # tokenised examples per client
    eval_examples: list[dict[str, Any]]
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]]


def prepare_data(config: RunConfig, tokenizer: Any) -> ClientData:
    d = config.data
    source = Path(d.source)
    if source.is_dir():  # the seeds' pre-split folder: local_training_{k}.json, global_test.json
        clients, test = load_client_folder(source, d.num_clients)
    else:
        records = load_records_spec(
            d.source,
            category_field=d.category_field,
            max_per_category=d.max_examples_per_category,
            seed=config.seed,
        )
        clients, test = split_records(
            records,
            d.num_clients,
            scheme=d.partition,
            alpha=d.dirichlet_alpha,
            category_field=d.category_field,
            min_size=d.min_client_size,
            holdout_per_category=d.holdout_per_category,
            shards_per_client=d.shards_per_client,
            seed=config.seed,
        )
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
