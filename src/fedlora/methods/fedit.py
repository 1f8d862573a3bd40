"""FedIT: naive averaging of A and B separately (inexact: ``B_g A_g != sum_k p_k B_k A_k``).

Heterogeneous ranks use zero-padding (HetLoRA-style): each client's factors are padded with zero rows of A and
zero columns of B up to the largest rank, averaged, and every client starts the next round from the first
``r_k`` rows/columns of the average. Scaling is folded into B before padding so mixed alphas stay consistent.
"""

from __future__ import annotations

from torch import Tensor

from fedlora.lowrank import ClientFactors, pad_rank
from fedlora.methods.base import Method, ModuleUpdate, aggregate_dtype, weighted_sum


class FedIT(Method):
    name = "fedit"
    heterogeneous = True
    exact = False

    def _aggregate(self, clients: list[ClientFactors], p: Tensor, module: str) -> ModuleUpdate:
        dtype = aggregate_dtype(clients)
        r_max = max(c.rank for c in clients)
        padded = [pad_rank(c.scaled_B().to(dtype), c.A.to(dtype), r_max) for c in clients]
        B_g = weighted_sum([B for B, _ in padded], p)
        A_g = weighted_sum([A for _, A in padded], p)
        starts = [(B_g[:, : c.rank], A_g[: c.rank]) for c in clients]
        return ModuleUpdate(B=B_g, A=A_g, client_starts=starts)
