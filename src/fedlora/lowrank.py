"""Shared low-rank math: scaling, client weights, stacking, the factored SVD and the energy threshold.

Pure tensor functions, no I/O. Conventions follow PEFT: a LoRA module of a frozen ``m x n`` weight holds
``A`` (``r x n``) and ``B`` (``m x r``) and adds ``scaling * B @ A``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


class AggregationError(ValueError):
    """Bad input to an aggregation: the message names the module or client and what would be valid."""


def lora_scaling(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """PEFT's scaling: ``alpha / r``, or rsLoRA's ``alpha / sqrt(r)``."""
    if rank <= 0:
        raise AggregationError(f"LoRA rank must be positive, got {rank}")
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


@dataclass(frozen=True)
class ClientFactors:
    """One client's adapter for one module.

    ``B`` (m x r) and ``A`` (r x n) as trained, and the client's own ``scaling``. Fed-SB (LoRA-SB) clients
    also carry the trainable ``R`` (r x r) between the frozen, shared ``B`` and ``A``.
    """

    B: Tensor
    A: Tensor
    scaling: float = 1.0
    R: Tensor | None = None

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def scaled_B(self) -> Tensor:
        """``s * B`` (or ``s * B R``): the scaling folded in, so that server and client cannot disagree."""
        B = self.B if self.R is None else self.B @ self.R
        return B * self.scaling

    def delta(self) -> Tensor:
        """The dense update ``s * B (R) A`` this client applies (tests and small shapes only)."""
        return self.scaled_B() @ self.A


def client_weights(
    num_examples: Sequence[float] | None = None,
    scheme: str = "data",
    num_clients: int | None = None,
) -> Tensor:
    """Normalised aggregation weights ``p_k`` (float64).

    ``scheme="data"`` weighs by ``num_examples`` (example counts or any non-negative numbers, e.g. fractions);
    ``scheme="uniform"`` gives every client ``1 / K``.
    """
    if scheme == "uniform":
        k = num_clients if num_clients is not None else len(num_examples or [])
        if k <= 0:
            raise AggregationError("uniform weights need at least one client")
        return torch.full((k,), 1.0 / k, dtype=torch.float64)
    if scheme != "data":
        raise AggregationError(f"unknown weighting scheme {scheme!r}; valid: 'data', 'uniform'")
    if not num_examples:
        raise AggregationError("data-size weights need the number of examples of every client")
    return normalize_weights(num_examples)


def normalize_weights(weights: Sequence[float] | Tensor) -> Tensor:
    """Check and normalise user weights: finite, non-negative, not all zero."""
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if w.numel() == 0:
        raise AggregationError("no client weights given")
    if not torch.isfinite(w).all():
        raise AggregationError(f"client weights must be finite numbers, got {w.tolist()}")
    if (w < 0).any():
        raise AggregationError(f"client weights must be non-negative, got {w.tolist()}")
    total = w.sum()
    if total <= 0:
        raise AggregationError(f"client weights are all zero ({w.tolist()}); at least one must be positive")
    return w / total


def check_module(name: str, clients: Sequence[ClientFactors], weights: Tensor) -> None:
    """Validate one module's client factors: shapes agree, values finite, one weight per client."""
    if not clients:
        raise AggregationError(f"module {name!r}: no client adapters to aggregate")
    if len(weights) != len(clients):
        raise AggregationError(f"module {name!r}: {len(clients)} client adapters but {len(weights)} weights")
    m, n = clients[0].B.shape[0], clients[0].A.shape[1]
    for k, c in enumerate(clients):
        if c.A.ndim != 2 or c.B.ndim != 2:
            raise AggregationError(f"module {name!r}, client {k}: lora_A and lora_B must be matrices")
        if c.B.shape[1] != c.A.shape[0]:
            raise AggregationError(
                f"module {name!r}, client {k}: lora_B is {tuple(c.B.shape)} but lora_A is {tuple(c.A.shape)}; "
                "lora_B must be (out, r) and lora_A (r, in) with the same r"
            )
        if c.B.shape[0] != m or c.A.shape[1] != n:
            raise AggregationError(
                f"module {name!r}, client {k}: update shape {c.B.shape[0]} x {c.A.shape[1]} differs from "
                f"client 0's {m} x {n}; all clients must adapt the same base weights"
            )
        if c.R is not None and tuple(c.R.shape) != (c.rank, c.rank):
            raise AggregationError(
                f"module {name!r}, client {k}: R is {tuple(c.R.shape)}, expected ({c.rank}, {c.rank})"
            )
        for label, t in (("lora_A", c.A), ("lora_B", c.B), ("R", c.R)):
            if t is not None and not torch.isfinite(t).all():
                raise AggregationError(f"module {name!r}, client {k}: {label} contains NaN or Inf")
        if not math.isfinite(c.scaling):
            raise AggregationError(f"module {name!r}, client {k}: scaling {c.scaling} is not finite")


def require_same_rank(method: str, name: str, clients: Sequence[ClientFactors]) -> int:
    """Methods that need one rank for all clients call this; returns that rank."""
    ranks = sorted({c.rank for c in clients})
    if len(ranks) > 1:
        raise AggregationError(
            f"{method} needs the same LoRA rank on every client, but module {name!r} has ranks {ranks}; "
            "use fedit (zero-padding), flora, florist or flexlora for heterogeneous ranks"
        )
    return ranks[0]


def stack_factors(clients: Sequence[ClientFactors], weights: Tensor) -> tuple[Tensor, Tensor]:
    """FLoRA's stack: ``B_s = [s_1 B_1, ..., s_K B_K]`` (m x R), ``A_s = [p_1 A_1; ...; p_K A_K]`` (R x n).

    ``B_s @ A_s == sum_k p_k s_k B_k A_k`` exactly. Zero-weight clients are left out (they add nothing).
    """
    dtype = _common_dtype(clients)
    keep = [(c, float(w)) for c, w in zip(clients, weights, strict=True) if float(w) != 0.0]
    B_s = torch.cat([c.scaled_B().to(dtype) for c, _ in keep], dim=1)
    A_s = torch.cat([c.A.to(dtype) * w for c, w in keep], dim=0)
    return B_s, A_s


def factored_svd(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of ``B @ A`` from the factors only, never forming the ``m x n`` product.

    ``B = Q_B R_B`` and ``A^T = Q_A R_A`` (thin QR), then the small core ``R_B R_A^T = U' S V'^T``; so
    ``B A = (Q_B U') S (Q_A V')^T``. Cost ``O((m + n) R^2 + R^3)`` instead of ``O(m n min(m, n))``.
    Returns ``U`` (m x q), ``S`` (q, descending), ``Vh`` (q x n) with ``q = min(m, n, R)``.
    """
    Q_B, R_B = torch.linalg.qr(B, mode="reduced")
    Q_A, R_A = torch.linalg.qr(A.transpose(0, 1), mode="reduced")
    U_core, S, Vh_core = torch.linalg.svd(R_B @ R_A.transpose(0, 1), full_matrices=False)
    return Q_B @ U_core, S, Vh_core @ Q_A.transpose(0, 1)


def numerical_rank(S: Tensor, shape: tuple[int, int]) -> int:
    """Number of singular values above round-off (LAPACK's usual tolerance ``max(m, n) * eps * s_1``)."""
    if S.numel() == 0 or float(S[0]) == 0.0:
        return 0
    tol = max(shape) * torch.finfo(S.dtype).eps * float(S[0])
    return int((S > tol).sum())


def energy_rank(S: Tensor, tau: float) -> int:
    """Smallest ``k`` with ``sum_{i<=k} s_i^2 / sum_i s_i^2 >= tau``; all of ``S`` if round-off prevents it."""
    check_threshold(tau)
    if S.numel() == 0:
        return 0
    energy = S.to(torch.float64).square()
    total = float(energy.sum())
    if total == 0.0:
        return 0
    reached = torch.nonzero(torch.cumsum(energy, 0) / total >= tau)
    return int(reached[0]) + 1 if len(reached) else S.numel()


def energy_fraction(S: Tensor, k: int) -> float:
    """Fraction of the squared singular values (Frobenius energy) held by the first ``k``."""
    energy = S.to(torch.float64).square()
    total = float(energy.sum())
    return 1.0 if total == 0.0 else float(energy[:k].sum()) / total


def check_threshold(tau: float) -> None:
    if not (isinstance(tau, int | float) and 0.0 < tau <= 1.0):
        raise AggregationError(f"energy threshold tau must be in (0, 1], got {tau!r}")


def pad_rank(B: Tensor, A: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Zero-pad ``B`` with columns and ``A`` with rows up to ``rank`` (HetLoRA-style)."""
    extra = rank - A.shape[0]
    if extra < 0:
        raise AggregationError(f"cannot pad rank {A.shape[0]} down to {rank}")
    return (
        torch.cat([B, B.new_zeros(B.shape[0], extra)], dim=1),
        torch.cat([A, A.new_zeros(extra, A.shape[1])], dim=0),
    )


def _common_dtype(clients: Sequence[ClientFactors]) -> torch.dtype:
    """Aggregate in the widest floating dtype present, at least float32 (bf16 factors lose too much)."""
    dtype = torch.float32
    for c in clients:
        dtype = torch.promote_types(dtype, c.A.dtype)
        dtype = torch.promote_types(dtype, c.B.dtype)
    return dtype
