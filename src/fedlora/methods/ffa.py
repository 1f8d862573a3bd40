"""FFA-LoRA: A frozen from a seed shared by all clients, only B trains; averaging B is then exact.

``B_g = sum_k p_k s_k B_k`` and ``A_g = A``. Clients whose ``A`` differ break the method's premise and are
rejected (a reference baseline froze B instead of A: a bug we do not repeat).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fedlora.lowrank import AggregationError, ClientFactors
from fedlora.methods.base import Method, ModuleUpdate, aggregate_dtype, weighted_sum


def require_shared(label: str, method: str, module: str, tensors: Sequence[Tensor]) -> None:
    """Every client must hold the same frozen ``label`` (up to float round-off from saving)."""
    ref = tensors[0].to(torch.float64)
    for k, t in enumerate(tensors[1:], start=1):
        if t.shape != ref.shape or not torch.allclose(t.to(torch.float64), ref, rtol=1e-5, atol=1e-7):
            raise AggregationError(
                f"{method} needs the same frozen {label} on every client, but client {k} differs from client 0 "
                f"in module {module!r}"
            )


class FFA(Method):
    name = "ffa"

    def _aggregate(self, clients: list[ClientFactors], p: Tensor, module: str) -> ModuleUpdate:
        dtype = aggregate_dtype(clients)
        require_shared("lora_A", self.name, module, [c.A for c in clients])
        B_g = weighted_sum([c.scaled_B().to(dtype) for c in clients], p)
        return ModuleUpdate(B=B_g, A=clients[0].A.to(dtype))
