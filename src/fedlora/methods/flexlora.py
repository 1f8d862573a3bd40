"""FlexLoRA: SVD of the exact aggregate; each client restarts from its own rank-``r_k`` truncation.

The SVD is computed from the stacked factors (as FLoRIST) instead of the dense ``m x n`` matrix; the result is
the same. The global adapter is the whole aggregate at its numerical rank (optionally capped by ``max_rank``);
client ``k`` receives ``B = U_{:r_k} S_{:r_k}``, ``A = V_{:r_k}^T`` at its own rank (the reference code sent
every client the rank of the last-processed client, a bug).
"""

from __future__ import annotations

from torch import Tensor

from fedlora.lowrank import (
    AggregationError,
    ClientFactors,
    energy_fraction,
    factored_svd,
    numerical_rank,
    stack_factors,
)
from fedlora.methods.base import Method, ModuleUpdate


class FlexLoRA(Method):
    name = "flexlora"
    heterogeneous = True
    exact = False  # clients receive truncations; the global aggregate itself is exact

    def __init__(self, max_rank: int | None = None) -> None:
        if max_rank is not None and (not isinstance(max_rank, int) or max_rank < 1):
            raise AggregationError(f"flexlora max_rank must be a positive integer, got {max_rank!r}")
        self.max_rank = max_rank

    def options(self) -> dict[str, object]:
        return {"max_rank": self.max_rank}

    def _aggregate(self, clients: list[ClientFactors], p: Tensor, module: str) -> ModuleUpdate:
        B_s, A_s = stack_factors(clients, p)
        U, S, Vh = factored_svd(B_s, A_s)
        q = numerical_rank(S, (B_s.shape[0], A_s.shape[1]))
        k = q if self.max_rank is None else min(q, self.max_rank)
        # Each client gets exactly r_k directions (zero ones if the aggregate has fewer), so its LoRA keeps
        # its rank.
        starts = [(U[:, : c.rank] * S[: c.rank], Vh[: c.rank]) for c in clients]
        return ModuleUpdate(
            B=U[:, :k] * S[:k],
            A=Vh[:k],
            client_starts=starts,
            singular_values=S[:q],
            energy_kept=energy_fraction(S, k),
        )
