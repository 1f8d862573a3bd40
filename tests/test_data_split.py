"""Partitioners: determinism by seed, sizes, min_size, hold-out per category, nothing lost or duplicated."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from fedlora.data import DataError, dirichlet, iid, partition, shards


def _records(per_category: dict[str, int]) -> list[dict]:
    records = []
    for cat, n in per_category.items():
        records += [{"id": len(records) + i, "category": cat, "instruction": "q", "output": "a"} for i in range(n)]
    return records


DOLLY_LIKE = _records({f"cat{c}": 150 + 40 * c for c in range(8)})  # 8 categories, unequal sizes


def _ids(part) -> list[int]:
    return [r["id"] for shard in part.clients for r in shard] + [r["id"] for r in part.heldout]


def _assert_exact_cover(part, records) -> None:
    ids = _ids(part)
    assert len(ids) == len(set(ids)), "an example was duplicated"
    assert sorted(ids) == sorted(r["id"] for r in records), "an example was lost"
    # clients hold the caller's dicts, not copies
    assert all(any(r is s for s in records) for r in part.clients[0][:3])


def _signature(part) -> list[list[int]]:
    return [[r["id"] for r in shard] for shard in part.clients] + [[r["id"] for r in part.heldout]]


# ----------------------------------------------------------------------------------------------------------------
# iid


def test_iid_sizes_cover_and_determinism():
    records = _records({"a": 101})
    part = iid(records, 4, seed=3)
    assert sorted(len(s) for s in part.clients) == [25, 25, 25, 26]
    assert part.heldout == []
    _assert_exact_cover(part, records)
    assert _signature(iid(records, 4, seed=3)) == _signature(part)
    assert _signature(iid(records, 4, seed=4)) != _signature(part)
    # a generator is accepted and continues
    rng = np.random.default_rng(3)
    assert _signature(iid(records, 4, seed=rng)) == _signature(part)


def test_iid_is_shuffled_not_contiguous():
    part = iid(_records({"a": 100}), 2, seed=0)
    first = [r["id"] for r in part.clients[0]]
    assert first != sorted(first)


def test_iid_needs_no_category_unless_holding_out():
    records = [{"id": i, "instruction": "q", "output": "a"} for i in range(10)]
    assert sum(len(s) for s in iid(records, 3).clients) == 10
    with pytest.raises(DataError, match="'category'"):
        iid(records, 3, holdout_per_category=1)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_client_count_errors(scheme):
    records = _records({"a": 5})
    options = {"min_size": 0, "holdout_per_category": 0} if scheme == "dirichlet" else {}
    with pytest.raises(DataError, match=">= 1"):
        partition(records, scheme, 0, **options)
    with pytest.raises(DataError, match=r"more clients \(6\) than examples \(5\)"):
        partition(records, scheme, 6, **options)


# ----------------------------------------------------------------------------------------------------------------
# dirichlet (the seeds' allocation)


def test_dirichlet_holdout_min_size_and_cover():
    part = dirichlet(DOLLY_LIKE, 8, alpha=0.5, seed=42, min_size=40, holdout_per_category=10)
    assert Counter(r["category"] for r in part.heldout) == {f"cat{c}": 10 for c in range(8)}
    # held-out records come grouped by category in sorted order, as the seeds' groupby does
    assert [r["category"] for r in part.heldout] == sorted(r["category"] for r in part.heldout)
    assert len(part.clients) == 8
    assert min(len(s) for s in part.clients) >= 40
    _assert_exact_cover(part, DOLLY_LIKE)


def test_dirichlet_is_deterministic_by_seed():
    a = dirichlet(DOLLY_LIKE, 8, seed=42)
    assert _signature(dirichlet(DOLLY_LIKE, 8, seed=42)) == _signature(a)
    assert _signature(dirichlet(DOLLY_LIKE, 8, seed=43)) != _signature(a)
    # the input order is part of the input; the records are not reordered in place
    assert [r["id"] for r in DOLLY_LIKE] == list(range(len(DOLLY_LIKE)))


def _mean_top_category_share(part) -> float:
    shares = []
    for shard in part.clients:
        counts = Counter(r["category"] for r in shard)
        shares.append(max(counts.values()) / len(shard))
    return float(np.mean(shares))


def test_dirichlet_alpha_controls_heterogeneity():
    records = _records({f"c{i}": 200 for i in range(8)})
    skewed = dirichlet(records, 8, alpha=0.1, seed=0, min_size=10)
    even = dirichlet(records, 8, alpha=1000.0, seed=0, min_size=10)
    # with a huge alpha every client gets about 1/8 of every category; with a small one a few categories dominate
    assert _mean_top_category_share(even) < 0.2
    assert _mean_top_category_share(skewed) > 0.4
    for shard in even.clients:
        assert set(Counter(r["category"] for r in shard)) == {f"c{i}" for i in range(8)}


def test_dirichlet_redraws_until_min_size():
    records = _records({f"c{i}": 60 for i in range(4)})
    # alpha small: single draws are very uneven, so reaching min_size needs redraws; it must still hold
    with pytest.raises(DataError, match="after 1 draws"):
        dirichlet(records, 4, alpha=0.3, seed=1, min_size=30, holdout_per_category=0, max_tries=1)
    part = dirichlet(records, 4, alpha=0.3, seed=1, min_size=30, holdout_per_category=0)
    assert min(len(s) for s in part.clients) >= 30
    _assert_exact_cover(part, records)


def test_dirichlet_errors():
    with pytest.raises(DataError, match="alpha must be a finite number > 0"):
        dirichlet(DOLLY_LIKE, 4, alpha=0)
    with pytest.raises(DataError, match="alpha"):
        dirichlet(DOLLY_LIKE, 4, alpha=float("nan"))
    # impossible on its face: 8 clients x 1000 > examples
    with pytest.raises(DataError, match="min_size=1000 is impossible"):
        dirichlet(DOLLY_LIKE, 8, min_size=1000)
    # possible in theory (exactly N/K each) but not reached by the draws: gives up with a clear error
    records = _records({f"c{i}": 50 for i in range(4)})
    with pytest.raises(DataError, match=r"after 5 draws .* min_size=50"):
        dirichlet(records, 4, alpha=0.05, min_size=50, holdout_per_category=0, max_tries=5)
    # a category too small for the hold-out
    with pytest.raises(DataError, match=r"category 'tiny'.*3 examples"):
        dirichlet(_records({"big": 500, "tiny": 3}), 2, min_size=1)


def test_missing_category_names_field_and_records():
    records = _records({"a": 20})
    records[3] = {"id": 3, "instruction": "q", "output": "a", "category": None}
    del records[7]["category"]
    with pytest.raises(DataError, match=r"'category'.*2 of 20 records.*3, 7"):
        dirichlet(records, 2, min_size=1, holdout_per_category=0)
    with pytest.raises(DataError, match=r"'category'.*3, 7"):
        shards(records, 2)


def test_other_category_field():
    records = [{"id": i, "topic": "ab"[i % 2], "instruction": "q", "output": "a"} for i in range(40)]
    part = dirichlet(records, 2, min_size=1, holdout_per_category=2, category_field="topic")
    assert Counter(r["topic"] for r in part.heldout) == {"a": 2, "b": 2}
    _assert_exact_cover(part, records)


# ----------------------------------------------------------------------------------------------------------------
# shards (McMahan)


def test_shards_pathological_split():
    # 10 categories x 100 records, 5 clients x 2 shards: every shard is exactly one category
    records = _records({f"c{i}": 100 for i in range(10)})
    part = shards(records, 5, shards_per_client=2, seed=0)
    _assert_exact_cover(part, records)
    assert [len(s) for s in part.clients] == [200] * 5
    seen = set()
    for shard in part.clients:
        counts = Counter(r["category"] for r in shard)
        assert sorted(counts.values()) == [100, 100]
        seen |= set(counts)
    assert seen == {f"c{i}" for i in range(10)}
    assert _signature(shards(records, 5, seed=0)) == _signature(part)
    assert _signature(shards(records, 5, seed=1)) != _signature(part)


def test_shards_contiguous_pieces_of_sorted_order():
    # shards of unequal categories: each client's records are 2 contiguous runs of the category-sorted order
    records = _records({"b": 7, "a": 5, "c": 9})
    order = sorted(range(len(records)), key=lambda i: records[i]["category"])
    position = {records[i]["id"]: p for p, i in enumerate(order)}
    part = shards(records, 3, shards_per_client=2, seed=5)
    _assert_exact_cover(part, records)
    for shard in part.clients:
        pos = [position[r["id"]] for r in shard]
        runs = 1 + sum(1 for x, y in itertools.pairwise(pos) if y != x + 1)
        assert runs <= 2
    # 21 records in 6 shards of 4, 4, 4, 3, 3, 3: two shards per client
    assert all(len(s) in (6, 7, 8) for s in part.clients)


def test_shards_errors():
    with pytest.raises(DataError, match="cannot cut 5 examples into 6 shards"):
        shards(_records({"a": 5}), 3, shards_per_client=2)
    with pytest.raises(DataError, match="shards_per_client"):
        shards(_records({"a": 5}), 1, shards_per_client=0)


def test_partition_dispatch_and_errors():
    records = _records({"a": 30, "b": 30})
    assert _signature(partition(records, "iid", 3, seed=1)) == _signature(iid(records, 3, seed=1))
    with pytest.raises(DataError, match="unknown partition scheme 'label'; valid: iid, dirichlet, shards"):
        partition(records, "label", 3)
    with pytest.raises(DataError, match=r"iid: unknown option.*alpha"):
        partition(records, "iid", 3, alpha=0.5)
    with pytest.raises(DataError, match="seed"):
        iid(records, 3, seed="42")
