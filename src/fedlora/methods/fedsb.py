"""Fed-SB: LoRA-SB clients share frozen B and A and train only R (r x r); the server averages R exactly.

``B (sum_k p_k s_k R_k) A = sum_k p_k s_k B R_k A``: communication is ``r^2`` per module and direction,
independent of the number of clients. Clients given without ``R`` are standard LoRA adapters exported from
LoRA-SB (``B' = B R_k``, shared ``A``): averaging ``B'`` is then the same exact average.
"""

from __future__ import annotations

from torch import Tensor

from fedlora.lowrank import AggregationError, ClientFactors
from fedlora.methods.base import Method, ModuleUpdate, aggregate_dtype, weighted_sum
from fedlora.methods.ffa import require_shared


class FedSB(Method):
    name = "fedsb"

    def _aggregate(self, clients: list[ClientFactors], p: Tensor, module: str) -> ModuleUpdate:
        dtype = aggregate_dtype(clients)
        with_r = [c.R is not None for c in clients]
        if any(with_r) and not all(with_r):
            raise AggregationError(f"fedsb: module {module!r} mixes LoRA-SB clients (with R) and plain LoRA ones")
        require_shared("lora_A", self.name, module, [c.A for c in clients])
        A = clients[0].A.to(dtype)
        if not all(with_r):
            B_g = weighted_sum([c.scaled_B().to(dtype) for c in clients], p)
            return ModuleUpdate(B=B_g, A=A)
        require_shared("lora_B", self.name, module, [c.B for c in clients])
        R_g = weighted_sum([c.R.to(dtype) * c.scaling for c in clients], p)
        return ModuleUpdate(B=clients[0].B.to(dtype) @ R_g, A=A, R=R_g)
