"""The method interface: every federated LoRA method aggregates one module at a time, as pure tensor math.

A method receives, for one adapted module, the clients' factors (``ClientFactors``: ``B``, ``A``, their own
scaling, and ``R`` for LoRA-SB) and their weights, and returns a ``ModuleUpdate`` that says what the server
sends back and how the global model changes. Engines (in-process, Flower) and the ``aggregate`` command only
call ``aggregate``; nothing here knows about files, models or networks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from fedlora.lowrank import ClientFactors, check_module, normalize_weights, require_same_rank


@dataclass
class ModuleUpdate:
    """The server's result for one module. All factors have the scaling folded in (effective scaling 1).

    - ``B`` (m x r_g), ``A`` (r_g x n): the global adapter; ``B @ A`` is the method's global update
      (``r_g`` may be 0 when the update is zero).
    - ``merge``: True when the global adapter is merged into the frozen base weights and every client starts a
      fresh LoRA next round (FLoRA, FLoRIST). False when clients continue from an adapter.
    - ``client_starts``: per client, the ``(B, A)`` it starts the next round from, when that differs from the
      global adapter (FedIT's truncation to each client's rank, FlexLoRA's per-client SVD truncation).
    - ``residual``: FedEx-LoRA's correction ``(B_E, A_E)``, merged into the base weights.
    - ``R``: Fed-SB's averaged ``R`` (the shared ``B`` and ``A`` stay as they are).
    - ``singular_values``: of the aggregate, when the method computed them; ``energy_kept`` their kept share.
    """

    B: Tensor
    A: Tensor
    merge: bool = False
    client_starts: list[tuple[Tensor, Tensor]] | None = None
    residual: tuple[Tensor, Tensor] | None = None
    R: Tensor | None = None
    singular_values: Tensor | None = None
    energy_kept: float = 1.0

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> Tensor:
        """The dense update this result adds to the global model (tests and small shapes only)."""
        out = self.B @ self.A
        if self.residual is not None:
            out = out + self.residual[0] @ self.residual[1]
        return out

    def client_start(self, k: int) -> tuple[Tensor, Tensor]:
        """The ``(B, A)`` client ``k`` starts from next round (scaling folded; divide ``B`` by its own)."""
        return self.client_starts[k] if self.client_starts is not None else (self.B, self.A)


class Method(ABC):
    """Base class: subclasses set the class flags and implement ``_aggregate``."""

    name: ClassVar[str]
    #: accepts clients of different LoRA ranks
    heterogeneous: ClassVar[bool] = False
    #: merges the global adapter into the base and restarts clients from a fresh LoRA every round
    merges_into_base: ClassVar[bool] = False
    #: the global update equals ``sum_k p_k s_k B_k A_k`` (up to the method's documented truncation)
    exact: ClassVar[bool] = True

    def aggregate(
        self, clients: Sequence[ClientFactors], weights: Sequence[float] | Tensor, module: str = "module"
    ) -> ModuleUpdate:
        """Aggregate one module. ``weights`` are normalised here (any non-negative numbers, not all zero)."""
        p = normalize_weights(weights)
        check_module(module, clients, p)
        if not self.heterogeneous:
            require_same_rank(self.name, module, clients)
        return self._aggregate(list(clients), p, module)

    @abstractmethod
    def _aggregate(self, clients: list[ClientFactors], p: Tensor, module: str) -> ModuleUpdate: ...

    def options(self) -> dict[str, object]:
        """The method's options as given (recorded with results)."""
        return {}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


def weighted_sum(tensors: Sequence[Tensor], p: Tensor) -> Tensor:
    """``sum_k p_k T_k`` in the tensors' dtype."""
    out = torch.zeros_like(tensors[0])
    for t, w in zip(tensors, p, strict=True):
        out = out + t * float(w)
    return out


def aggregate_dtype(clients: Sequence[ClientFactors]) -> torch.dtype:
    """Widest floating dtype among the clients, at least float32."""
    dtype = torch.float32
    for c in clients:
        for t in (c.A, c.B, c.R):
            if t is not None:
                dtype = torch.promote_types(dtype, t.dtype)
    return dtype
