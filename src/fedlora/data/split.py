"""Partition records across K clients: IID, the seeds' Dirichlet over categories, McMahan's shards.

Pure functions: records in, :class:`Partition` out; no I/O. Every random draw comes from one numpy ``Generator``
(made from ``seed``, or passed in), so the same seed and input give the same partition. Records are not copied:
clients hold the very dict objects they were given.
"""

from __future__ import annotations

import inspect
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from fedlora.data.errors import DataError

SCHEMES = ("iid", "dirichlet", "shards")

Seed = int | np.random.Generator


class Partition(NamedTuple):
    """``clients[k]`` is client k's records; ``heldout`` the records held out as a global test set (maybe [])."""

    clients: list[list[Any]]
    heldout: list[Any]


def _rng(seed: Seed) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise DataError(f"seed must be an integer or a numpy Generator, got {seed!r}")
    return np.random.default_rng(int(seed))


def _check_clients(num_examples: int, num_clients: int, scheme: str) -> None:
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise DataError(f"{scheme}: the number of clients must be an integer >= 1, got {num_clients!r}")
    if num_examples < num_clients:
        raise DataError(
            f"{scheme}: more clients ({num_clients}) than examples ({num_examples}); every client needs at least one"
        )


def record_categories(records: Sequence[Mapping[str, Any]], field: str = "category", scheme: str = "split") -> list:
    """The category of every record; an error names the field and the records that lack it."""
    cats = [r.get(field) if isinstance(r, Mapping) else None for r in records]
    missing = [i for i, c in enumerate(cats) if c is None]
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
        raise DataError(
            f"{scheme}: needs the category field {field!r} on every record, but {len(missing)} of {len(records)} "
            f"records lack it (0-based indices {shown}); choose another field (--category-field) or use the iid "
            f"scheme"
        )
    return cats


def _sorted_categories(cats: Sequence[Any]) -> list:
    return sorted(set(cats), key=str)


def _holdout(
    cats: Sequence[Any], per_category: int, rng: np.random.Generator, scheme: str, field: str
) -> tuple[np.ndarray, np.ndarray]:
    """(remaining indices in record order, held-out indices grouped by sorted category)."""
    if isinstance(per_category, bool) or not isinstance(per_category, (int, np.integer)) or per_category < 0:
        raise DataError(f"{scheme}: holdout_per_category must be an integer >= 0, got {per_category!r}")
    cats_arr = np.asarray([str(c) for c in cats], dtype=object)
    if per_category == 0:
        return np.arange(len(cats)), np.arange(0)
    held = []
    for cat in _sorted_categories(cats):
        idx = np.flatnonzero(cats_arr == str(cat))
        if len(idx) < per_category:
            raise DataError(
                f"{scheme}: category {cat!r} (field {field!r}) has {len(idx)} examples, fewer than "
                f"holdout_per_category={per_category}; lower --holdout-per-category"
            )
        held.append(rng.choice(idx, size=per_category, replace=False))
    heldout = np.concatenate(held)
    keep = np.ones(len(cats), dtype=bool)
    keep[heldout] = False
    return np.flatnonzero(keep), heldout


def _take(records: Sequence[Any], indices: Sequence[int] | np.ndarray) -> list[Any]:
    return [records[int(i)] for i in indices]


def iid(
    records: Sequence[Any],
    num_clients: int,
    *,
    seed: Seed = 42,
    holdout_per_category: int = 0,
    category_field: str = "category",
) -> Partition:
    """Shuffle and deal into ``num_clients`` near-equal shards (sizes differ by at most one).

    With ``holdout_per_category > 0`` that many records per category are held out first (needs categories).
    """
    rng = _rng(seed)
    remaining, heldout = np.arange(len(records)), np.arange(0)
    if holdout_per_category:
        cats = record_categories(records, category_field, "iid")
        remaining, heldout = _holdout(cats, holdout_per_category, rng, "iid", category_field)
    _check_clients(len(remaining), num_clients, "iid")
    order = rng.permutation(remaining)
    clients = [_take(records, part) for part in np.array_split(order, num_clients)]
    return Partition(clients, _take(records, heldout))


def dirichlet(
    records: Sequence[Any],
    num_clients: int,
    *,
    alpha: float = 0.5,
    seed: Seed = 42,
    min_size: int = 40,
    holdout_per_category: int = 10,
    category_field: str = "category",
    max_tries: int = 1000,
) -> Partition:
    """The seeds' non-IID allocation (FedIT / FLoRA / FLoRIST on Dolly-15k).

    1. Hold out ``holdout_per_category`` records of every category (sorted by name) as the global test set.
    2. For each category in turn: shuffle its remaining records, draw client proportions ``p ~ Dir(alpha)``, zero
       the share of clients that already hold at least ``N / K`` records (N = records after the hold-out), and cut
       the shuffled records at the cumulative proportions.
    3. Redraw all categories (the generator continues) until every client has at least ``min_size`` records;
       after ``max_tries`` draws, fail with an error.
    Each client's records are finally shuffled.
    """
    scheme = "dirichlet"
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise DataError(f"{scheme}: alpha must be a finite number > 0, got {alpha!r}")
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 0:
        raise DataError(f"{scheme}: min_size must be an integer >= 0, got {min_size!r}")
    if max_tries < 1:
        raise DataError(f"{scheme}: max_tries must be >= 1, got {max_tries}")
    cats = record_categories(records, category_field, scheme)
    rng = _rng(seed)
    remaining, heldout = _holdout(cats, holdout_per_category, rng, scheme, category_field)
    n = len(remaining)
    _check_clients(n, num_clients, scheme)
    if min_size * num_clients > n:
        raise DataError(
            f"{scheme}: min_size={min_size} is impossible: {n} examples (after holding out {len(heldout)}) cannot "
            f"give each of {num_clients} clients {min_size}; at most {n // num_clients} per client; lower --min-size "
            f"or use fewer clients"
        )
    cats_arr = np.asarray([str(c) for c in cats], dtype=object)[remaining]
    by_category = [remaining[cats_arr == str(cat)] for cat in _sorted_categories([cats[i] for i in remaining])]
    cap = n / num_clients
    smallest = 0
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for indices in by_category:
            shuffled = rng.permutation(indices)
            p = rng.dirichlet(np.full(num_clients, float(alpha)))
            p = p * np.array([len(part) < cap for part in parts])
            total = p.sum()
            # Not reachable in exact arithmetic (some client is below N/K while records remain); guard anyway.
            p = p / total if total > 0 and np.isfinite(total) else np.full(num_clients, 1.0 / num_clients)
            cuts = (np.cumsum(p) * len(shuffled)).astype(int)[:-1]
            for part, chunk in zip(parts, np.split(shuffled, cuts), strict=True):
                part.extend(chunk.tolist())
        smallest = min(len(part) for part in parts)
        if smallest >= min_size:
            break
    else:
        raise DataError(
            f"{scheme}: after {max_tries} draws no allocation gave every client at least min_size={min_size} "
            f"examples (alpha={alpha}, {num_clients} clients, {n} examples; the last draw's smallest client had "
            f"{smallest}); min_size={min_size} is not reachable in practice: lower --min-size, raise --alpha or "
            f"use fewer clients"
        )
    clients = [_take(records, rng.permutation(np.asarray(part, dtype=np.int64))) for part in parts]
    return Partition(clients, _take(records, heldout))


def shards(
    records: Sequence[Any],
    num_clients: int,
    *,
    shards_per_client: int = 2,
    seed: Seed = 42,
    holdout_per_category: int = 0,
    category_field: str = "category",
) -> Partition:
    """McMahan et al.'s pathological non-IID split.

    Sort by category (stable: ties keep record order), cut into ``shards_per_client * num_clients`` contiguous
    near-equal shards, and give each client ``shards_per_client`` shards drawn at random without replacement.
    """
    scheme = "shards"
    if isinstance(shards_per_client, bool) or not isinstance(shards_per_client, (int, np.integer)):
        raise DataError(f"{scheme}: shards_per_client must be an integer >= 1, got {shards_per_client!r}")
    if shards_per_client < 1:
        raise DataError(f"{scheme}: shards_per_client must be an integer >= 1, got {shards_per_client!r}")
    cats = record_categories(records, category_field, scheme)
    rng = _rng(seed)
    remaining, heldout = _holdout(cats, holdout_per_category, rng, scheme, category_field)
    _check_clients(len(remaining), num_clients, scheme)
    num_shards = shards_per_client * num_clients
    if num_shards > len(remaining):
        raise DataError(
            f"{scheme}: cannot cut {len(remaining)} examples into {num_shards} shards ({shards_per_client} per "
            f"client x {num_clients} clients); lower --shards-per-client or use fewer clients"
        )
    order = sorted(remaining.tolist(), key=lambda i: str(cats[i]))
    pieces = np.array_split(np.asarray(order, dtype=np.int64), num_shards)
    owner = rng.permutation(num_shards)
    clients = []
    for k in range(num_clients):
        mine = owner[k * shards_per_client : (k + 1) * shards_per_client]
        clients.append(_take(records, np.concatenate([pieces[s] for s in mine])))
    return Partition(clients, _take(records, heldout))


_PARTITIONERS = {"iid": iid, "dirichlet": dirichlet, "shards": shards}


def partition(records: Sequence[Any], scheme: str, num_clients: int, **options: Any) -> Partition:
    """Dispatch to :func:`iid`, :func:`dirichlet` or :func:`shards` by name; options are checked against it."""
    if scheme not in _PARTITIONERS:
        raise DataError(f"unknown partition scheme {scheme!r}; valid: {', '.join(SCHEMES)}")
    func = _PARTITIONERS[scheme]
    valid = [p for p in inspect.signature(func).parameters if p not in ("records", "num_clients")]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise DataError(f"{scheme}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    return func(records, num_clients, **options)


def category_counts(records: Sequence[Mapping[str, Any]], field: str = "category") -> Counter:
    """How many records per category (``None`` for records without one)."""
    return Counter(r.get(field) for r in records)
