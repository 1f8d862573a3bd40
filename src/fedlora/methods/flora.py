"""FLoRA: stack the clients' factors (exact), merge the stack into the base, restart clients fresh.

``B_s = [s_1 B_1, ..., s_K B_K]``, ``A_s = [p_1 A_1; ...; p_K A_K]``; ``B_s A_s = sum_k p_k s_k B_k A_k``.
Any mix of ranks stacks natively. The whole stack (rank ``sum_k r_k``) goes down to every client.
"""

from __future__ import annotations

from torch import Tensor

from fedlora.lowrank import ClientFactors, stack_factors
from fedlora.methods.base import Method, ModuleUpdate


class FLoRA(Method):
    name = "flora"
    heterogeneous = True
    merges_into_base = True

    def _aggregate(self, clients: list[ClientFactors], p: Tensor, module: str) -> ModuleUpdate:
        B_s, A_s = stack_factors(clients, p)
        return ModuleUpdate(B=B_s, A=A_s, merge=True)
