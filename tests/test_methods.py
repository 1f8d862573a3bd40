"""Exactness of every aggregation method against the dense computation it claims to equal.

One table of cases (shapes with m != n, K = 1..8, heterogeneous ranks, rank-deficient clients, a zero-weight
client, float32 and float64) drives every test, PEFT-style.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import pytest
import torch

from fedlora.lowrank import (
    AggregationError,
    ClientFactors,
    energy_rank,
    factored_svd,
    lora_scaling,
    normalize_weights,
)
from fedlora.methods import METHODS, get_method


@dataclass(frozen=True)
class Case:
    id: str
    m: int
    n: int
    ranks: tuple[int, ...]
    weights: tuple[float, ...] | None = None  # None: data-size-like random counts
    dtype: torch.dtype = torch.float64
    deficient: tuple[int, ...] = ()  # clients whose B A has rank 1 (rank-deficient)
    rslora: bool = False


CASES = [
    Case("k1", 24, 17, (4,)),
    Case("k2-tall", 40, 12, (3, 3)),
    Case("k3-wide", 9, 33, (2, 2, 2), weights=(1, 1, 1)),
    Case("k4-f32", 48, 32, (8, 8, 8, 8), dtype=torch.float32),
    Case("k5-deficient", 30, 21, (4, 4, 4, 4, 4), deficient=(1, 3)),
    Case("k6-zero-weight", 26, 19, (3,) * 6, weights=(5, 0, 2, 1, 3, 2)),
    Case("k7-rslora", 35, 20, (5,) * 7, rslora=True),
    Case("k8-het", 64, 48, (8, 8, 4, 4, 2, 2, 1, 1)),
    Case("k8-het-f32", 64, 40, (16, 8, 8, 4, 4, 2, 2, 1), dtype=torch.float32),
    Case("k3-het-zero-weight", 20, 28, (6, 2, 4), weights=(0, 3, 1), deficient=(2,)),
    Case("k4-rank-exceeds-dim", 6, 5, (4, 4, 4, 4)),  # stacked rank 16 > min(m, n)
]
HOMOGENEOUS = [c for c in CASES if len(set(c.ranks)) == 1]
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def make_clients(
    case: Case, shared_A: bool = False, shared_B: bool = False
) -> tuple[list[ClientFactors], torch.Tensor]:
    gen = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    A0, B0 = rand(case.ranks[0], case.n), rand(case.m, case.ranks[0])
    clients = []
    for k, r in enumerate(case.ranks):
        A = A0.clone() if shared_A else rand(r, case.n)
        B = B0.clone() if shared_B else rand(case.m, r)
        if k in case.deficient and not shared_B:  # every column of B parallel: B A has rank 1
            B = rand(case.m, 1) @ rand(1, r)
        alpha = 2.0 * r + k  # a different alpha per client: scaling must be folded per client
        clients.append(
            ClientFactors(B=B.to(case.dtype), A=A.to(case.dtype), scaling=lora_scaling(alpha, r, case.rslora))
        )
    raw = case.weights or tuple(float(x) for x in torch.randint(10, 500, (len(case.ranks),), generator=gen))
    return clients, torch.tensor(raw, dtype=torch.float64)


def dense_sum(clients: list[ClientFactors], weights: torch.Tensor) -> torch.Tensor:
    """The ideal update ``sum_k p_k s_k B_k A_k``, formed densely in float64."""
    p = weights / weights.sum()
    return sum(float(pk) * c.scaling * c.B.double() @ c.A.double() for pk, c in zip(p, clients, strict=True))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    scale = max(1.0, float(expected.abs().max()))
    err = float((actual.double() - expected).abs().max()) / scale
    assert err <= TOL[dtype], f"relative error {err:.2e} > {TOL[dtype]:.0e}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("method", ["flora", "florist"])
def test_stacking_methods_equal_dense_sum(case: Case, method: str) -> None:
    clients, w = make_clients(case)
    update = get_method(method, **({"threshold": 1.0} if method == "florist" else {})).aggregate(clients, w)
    assert update.merge
    assert_close(update.delta(), dense_sum(clients, w), case.dtype)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_flora_stack_layout(case: Case) -> None:
    """FLoRA's stack keeps every non-zero-weight client's rank: R = sum of their r_k."""
    clients, w = make_clients(case)
    update = get_method("flora").aggregate(clients, w)
    assert update.rank == sum(c.rank for c, wk in zip(clients, w, strict=True) if wk > 0)


@pytest.mark.parametrize("case", HOMOGENEOUS, ids=lambda c: c.id)
def test_fedex_global_plus_residual_equals_dense_sum(case: Case) -> None:
    clients, w = make_clients(case)
    update = get_method("fedex").aggregate(clients, w)
    p = w / w.sum()
    # clients continue from the plain weighted averages (scaling folded into B)
    assert_close(
        update.B, sum(float(pk) * c.scaling * c.B.double() for pk, c in zip(p, clients, strict=True)), case.dtype
    )
    assert_close(update.A, sum(float(pk) * c.A.double() for pk, c in zip(p, clients, strict=True)), case.dtype)
    assert update.residual is not None
    assert update.residual[0].shape[1] <= (len(clients) + 1) * case.ranks[0]
    assert_close(update.delta(), dense_sum(clients, w), case.dtype)


@pytest.mark.parametrize("case", HOMOGENEOUS, ids=lambda c: c.id)
def test_ffa_with_shared_A_equals_dense_sum(case: Case) -> None:
    clients, w = make_clients(case, shared_A=True)
    update = get_method("ffa").aggregate(clients, w)
    assert_close(update.delta(), dense_sum(clients, w), case.dtype)
    assert torch.equal(update.A, clients[0].A.to(update.A.dtype))


@pytest.mark.parametrize("case", HOMOGENEOUS, ids=lambda c: c.id)
def test_fedsb_averaging_R_equals_dense_sum(case: Case) -> None:
    base, w = make_clients(case, shared_A=True, shared_B=True)
    gen = torch.Generator().manual_seed(7)
    r = case.ranks[0]
    clients = [
        ClientFactors(
            B=c.B, A=c.A, scaling=c.scaling, R=torch.randn(r, r, generator=gen, dtype=torch.float64).to(case.dtype)
        )
        for c in base
    ]
    update = get_method("fedsb").aggregate(clients, w)
    assert update.R is not None and update.R.shape == (r, r)
    expected = sum(
        float(pk) * c.scaling * c.B.double() @ c.R.double() @ c.A.double()
        for pk, c in zip(w / w.sum(), clients, strict=True)
    )
    assert_close(update.delta(), expected, case.dtype)
    # the same average from exported standard adapters (B' = B R_k, shared A)
    exported = [ClientFactors(B=c.B @ c.R, A=c.A, scaling=c.scaling) for c in clients]
    assert_close(get_method("fedsb").aggregate(exported, w).delta(), expected, case.dtype)


def best_rank_k(dense: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
    return U[:, :k] * S[:k] @ Vh[:k]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("tau", [0.5, 0.8, 0.9, 0.99])
def test_florist_threshold_is_best_rank_k_star(case: Case, tau: float) -> None:
    clients, w = make_clients(case)
    dense = dense_sum(clients, w)
    S_dense = torch.linalg.svdvals(dense)
    k_star = energy_rank(S_dense, tau)
    update = get_method("florist", threshold=tau).aggregate(clients, w)
    assert update.rank == k_star
    assert_close(update.delta(), best_rank_k(dense, k_star), case.dtype)
    kept = float(S_dense[:k_star].square().sum() / S_dense.square().sum())
    assert update.energy_kept == pytest.approx(kept, rel=1e-4)
    assert kept >= tau
    if k_star > 1:  # k* is the smallest such rank
        assert float(S_dense[: k_star - 1].square().sum() / S_dense.square().sum()) < tau


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_florist_rank_cap(case: Case) -> None:
    clients, w = make_clients(case)
    update = get_method("florist", threshold=1.0, max_rank=2).aggregate(clients, w)
    assert update.rank <= 2
    assert_close(update.delta(), best_rank_k(dense_sum(clients, w), update.rank), case.dtype)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_flexlora_gives_each_client_its_own_truncation(case: Case) -> None:
    clients, w = make_clients(case)
    dense = dense_sum(clients, w)
    update = get_method("flexlora").aggregate(clients, w)
    assert_close(update.delta(), dense, case.dtype)  # the global aggregate itself is exact
    for k, c in enumerate(clients):
        B_k, A_k = update.client_start(k)
        assert B_k.shape == (case.m, c.rank) and A_k.shape == (c.rank, case.n)
        assert_close(B_k @ A_k, best_rank_k(dense, c.rank), case.dtype)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_fedit_equals_its_definition(case: Case) -> None:
    clients, w = make_clients(case)
    p = w / w.sum()
    r_max = max(case.ranks)
    B_def = torch.zeros(case.m, r_max, dtype=torch.float64)
    A_def = torch.zeros(r_max, case.n, dtype=torch.float64)
    for pk, c in zip(p, clients, strict=True):  # zero-padding: pad columns of B / rows of A
        B_def[:, : c.rank] += float(pk) * c.scaling * c.B.double()
        A_def[: c.rank] += float(pk) * c.A.double()
    update = get_method("fedit").aggregate(clients, w)
    assert_close(update.B, B_def, case.dtype)
    assert_close(update.A, A_def, case.dtype)
    for k, c in enumerate(clients):  # truncation back to each client's rank
        B_k, A_k = update.client_start(k)
        assert_close(B_k, B_def[:, : c.rank], case.dtype)
        assert_close(A_k, A_def[: c.rank], case.dtype)


@pytest.mark.parametrize("case", [c for c in CASES if len(c.ranks) > 1], ids=lambda c: c.id)
def test_fedit_cross_term_error(case: Case) -> None:
    """FedIT's product of averages misses the cross terms: its error against the exact sum is large."""
    clients, w = make_clients(case)
    exact = dense_sum(clients, w)
    fedit = get_method("fedit").aggregate(clients, w).delta()
    flora = get_method("flora").aggregate(clients, w).delta()
    rel = lambda x: float(torch.linalg.norm(x.double() - exact) / torch.linalg.norm(exact))  # noqa: E731
    assert rel(fedit) > 0.1
    assert rel(flora) < 1e-4


def test_fedit_equal_clients_is_exact() -> None:
    """With identical clients there are no cross terms: FedIT is exact (a sanity check of the error test)."""
    gen = torch.Generator().manual_seed(1)
    B, A = torch.randn(10, 3, generator=gen, dtype=torch.float64), torch.randn(3, 8, generator=gen, dtype=torch.float64)
    clients = [ClientFactors(B, A, 2.0)] * 3
    assert torch.allclose(get_method("fedit").aggregate(clients, [1, 2, 3]).delta(), 2.0 * B @ A)


def test_factored_svd_matches_dense_svd() -> None:
    gen = torch.Generator().manual_seed(3)
    B, A = (
        torch.randn(50, 12, generator=gen, dtype=torch.float64),
        torch.randn(12, 30, generator=gen, dtype=torch.float64),
    )
    U, S, Vh = factored_svd(B, A)
    assert torch.allclose(S, torch.linalg.svdvals(B @ A)[:12])
    assert torch.allclose(U.T @ U, torch.eye(12, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(Vh @ Vh.T, torch.eye(12, dtype=torch.float64), atol=1e-12)
    assert torch.allclose((U * S) @ Vh, B @ A)


def test_energy_rank_edges() -> None:
    S = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14
    assert energy_rank(S, 9 / 14) == 1
    assert energy_rank(S, 9 / 14 + 1e-9) == 2
    assert energy_rank(S, 1.0) == 3
    assert energy_rank(torch.zeros(3), 0.9) == 0
    for bad in (0.0, -0.1, 1.01, float("nan")):
        with pytest.raises(AggregationError, match="tau"):
            energy_rank(S, bad)


def test_zero_update_gives_rank_zero() -> None:
    clients = [ClientFactors(torch.zeros(6, 2), torch.randn(2, 5), 1.0) for _ in range(3)]
    assert get_method("florist", threshold=0.9).aggregate(clients, [1, 1, 1]).rank == 0


def test_weights_are_scale_free() -> None:
    clients, _ = make_clients(CASES[4])
    a = get_method("flora").aggregate(clients, [100, 300, 50, 50, 500]).delta()
    b = get_method("flora").aggregate(clients, [0.1, 0.3, 0.05, 0.05, 0.5]).delta()
    assert torch.allclose(a, b)


@pytest.mark.parametrize(
    ("weights", "match"),
    [([1, -1, 1], "non-negative"), ([0, 0, 0], "all zero"), ([1, float("nan"), 1], "finite"), ([1, 1], "weights")],
)
def test_bad_weights(weights: list[float], match: str) -> None:
    clients, _ = make_clients(CASES[2])
    with pytest.raises(AggregationError, match=match):
        get_method("flora").aggregate(clients, weights)


@pytest.mark.parametrize("method", ["ffa", "fedex", "fedsb"])
def test_methods_without_heterogeneous_ranks_reject_them(method: str) -> None:
    clients, w = make_clients(CASES[7])
    with pytest.raises(AggregationError, match=r"same LoRA rank.*ranks \[1, 2, 4, 8\]"):
        get_method(method).aggregate(clients, w, module="layers.0.q_proj")


@pytest.mark.parametrize("method", list(METHODS))
def test_bad_tensors_name_the_module_and_client(method: str) -> None:
    clients, w = make_clients(CASES[2], shared_A=True, shared_B=True)
    bad = list(clients)
    A = bad[1].A.clone()
    A[0, 0] = float("nan")
    bad[1] = ClientFactors(bad[1].B, A, bad[1].scaling)
    with pytest.raises(AggregationError, match=r"'mod\.q', client 1: lora_A contains NaN"):
        get_method(method).aggregate(bad, w, module="mod.q")
    wrong = list(clients)
    wrong[2] = ClientFactors(torch.randn(case_m := CASES[2].m + 1, 2, dtype=torch.float64), clients[2].A, 1.0)
    with pytest.raises(AggregationError, match=rf"client 2: update shape {case_m} x"):
        get_method(method).aggregate(wrong, w, module="mod.q")


def test_ffa_rejects_different_A() -> None:
    clients, w = make_clients(CASES[2])
    with pytest.raises(AggregationError, match="same frozen lora_A"):
        get_method("ffa").aggregate(clients, w)


def test_unknown_method_and_option() -> None:
    with pytest.raises(AggregationError, match=r"unknown method 'fedavg'; valid: fedit, flora, florist"):
        get_method("fedavg")
    with pytest.raises(AggregationError, match="does not take"):
        get_method("flora", threshold=0.9)
    with pytest.raises(AggregationError, match="tau"):
        get_method("florist", threshold=1.5)


def test_registry_flags_match_algorithms() -> None:
    assert {n for n, m in METHODS.items() if m.heterogeneous} == {"fedit", "flora", "florist", "flexlora"}
    assert {n for n, m in METHODS.items() if m.merges_into_base} == {"flora", "florist"}


def test_normalize_weights_returns_fractions() -> None:
    assert normalize_weights([1, 3]).tolist() == [0.25, 0.75]
