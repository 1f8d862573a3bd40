"""FedEx-LoRA: FedIT's averages plus the exact residual, added into the frozen base weights.

``A_g = sum p_k A_k``, ``B_g = sum p_k s_k B_k`` (clients continue from them), and the residual
``E = sum_k p_k s_k B_k A_k - B_g A_g`` goes into the base. E is kept factored: it equals
``[s_1 B_1, ..., s_K B_K, -B_g] [p_1 A_1; ...; p_K A_K; A_g]`` (rank <= (K + 1) r), compressed by the factored
SVD to its numerical rank, so no ``m x n`` matrix is formed here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedlora.lowrank import ClientFactors, factored_svd, numerical_rank, stack_factors
from fedlora.methods.base import Method, ModuleUpdate, aggregate_dtype, weighted_sum


class FedEx(Method):
    name = "fedex"

    def _aggregate(self, clients: list[ClientFactors], p: Tensor, module: str) -> ModuleUpdate:
        dtype = aggregate_dtype(clients)
        B_g = weighted_sum([c.scaled_B().to(dtype) for c in clients], p)
        A_g = weighted_sum([c.A.to(dtype) for c in clients], p)
        B_s, A_s = stack_factors(clients, p)
        U, S, Vh = factored_svd(torch.cat([B_s, -B_g], dim=1), torch.cat([A_s, A_g], dim=0))
        q = numerical_rank(S, (B_g.shape[0], A_g.shape[1]))
        return ModuleUpdate(B=B_g, A=A_g, residual=(U[:, :q] * S[:q], Vh[:q]))
