"""FLoRIST: SVD of FLoRA's stacked product computed from the factors, then singular value thresholding.

The SVD of ``B_s A_s`` comes from thin QRs of the stacks and an ``R x R`` core (``lowrank.factored_svd``); the
``m x n`` product is never formed. Keep the smallest rank ``k*`` whose singular values hold a fraction ``tau``
of the energy (optionally capped by ``max_rank``), send ``B_g = U S``, ``A_g = V^T``, merge into the base, and
restart clients fresh (as FLoRA). Singular values at round-off level are dropped first, so ``tau = 1`` gives
the exact sum at its numerical rank.
"""

from __future__ import annotations

from torch import Tensor

from fedlora.lowrank import (
    AggregationError,
    ClientFactors,
    check_threshold,
    energy_fraction,
    energy_rank,
    factored_svd,
    numerical_rank,
    stack_factors,
)
from fedlora.methods.base import Method, ModuleUpdate


class FLoRIST(Method):
    name = "florist"
    heterogeneous = True
    merges_into_base = True

    def __init__(self, threshold: float = 0.9, max_rank: int | None = None) -> None:
        check_threshold(threshold)
        if max_rank is not None and (not isinstance(max_rank, int) or max_rank < 1):
            raise AggregationError(f"florist max_rank must be a positive integer, got {max_rank!r}")
        self.threshold = float(threshold)
        self.max_rank = max_rank

    def options(self) -> dict[str, object]:
        return {"threshold": self.threshold, "max_rank": self.max_rank}

    def _aggregate(self, clients: list[ClientFactors], p: Tensor, module: str) -> ModuleUpdate:
        B_s, A_s = stack_factors(clients, p)
        U, S, Vh = factored_svd(B_s, A_s)
        q = numerical_rank(S, (B_s.shape[0], A_s.shape[1]))
        k = energy_rank(S[:q], self.threshold)
        if self.max_rank is not None:
            k = min(k, self.max_rank)
        return ModuleUpdate(
            B=U[:, :k] * S[:k],
            A=Vh[:k],
            merge=True,
            singular_values=S[:q],
            energy_kept=energy_fraction(S, k),
        )
