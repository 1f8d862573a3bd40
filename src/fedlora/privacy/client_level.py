"""Client-level differential privacy on the server: a wrapper around a federated method (DP-FedAvg style).

Each round, every selected client's whole update (all modules together) is clipped to Frobenius norm ``C``,
the method aggregates the clipped updates with uniform weights ``1/m`` (m = clients per round, a public
constant), and Gaussian noise of std ``sigma * C / m`` per coordinate is added to the aggregate. One client's
data (all of it) then changes the aggregate by at most ``C / m`` before noise: the guarantee protects a
**client** (unit: a client's whole dataset), accounted with RDP over the rounds (``accounting.plan_client_level``).

Where the update lives depends on what the method releases:

- **parameter space** (``fedit``, ``ffa``, ``fedsb``): the global adapter is a weighted mean of the uploaded
  tensors, so the update of client k is its upload minus the start it received: ``(s B_k - B_0, A_k - A_0)``
  for FedIT, ``s B_k - B_0`` for FFA-LoRA (A is frozen), ``s R_k - R_0`` for Fed-SB (equal to the norm of
  ``B (s R_k - R_0) A`` because Fed-SB's B and A are orthonormal). Noise goes on the averaged tensors.
- **weight space** (``flora``, ``florist``): clients start from a fresh LoRA (B = 0), so the update is
  ``dW_k = s B_k A_k`` (its norm from the r x r Gram matrices) and clipping scales ``B_k``. The exact average
  ``sum_k dW_k / m`` gets dense m x n noise, and the method then runs on that noisy matrix (FLoRIST thresholds its
  SVD): the merged update has full rank, as any Gaussian mechanism on dW must.

``flexlora`` and ``fedex`` are refused (their outputs depend on each client's own product ``B_k A_k`` with
non-zero starts, which clipping the uploads does not bound). With ``sigma = 0`` and no client above ``C`` the
wrapper returns exactly the unwrapped method's result (unclipped uploads are passed through untouched).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fedlora.lowrank import AggregationError, ClientFactors, normalize_weights, stack_factors
from fedlora.methods.base import Method, ModuleUpdate
from fedlora.privacy.accounting import ClientLevelPlan

PARAMETER_SPACE = ("fedit", "ffa", "fedsb")
WEIGHT_SPACE = ("flora", "florist")
CLIENT_DP_METHODS = PARAMETER_SPACE + WEIGHT_SPACE


def _sq(t: Tensor) -> float:
    return float(t.double().pow(2).sum())


def product_norm_sq(B: Tensor, A: Tensor) -> float:
    """``||B A||_F^2`` from the r x r Gram matrices (never forms the m x n product)."""
    B, A = B.double(), A.double()
    return float(torch.trace((B.T @ B) @ (A @ A.T)))


class ClientLevelDP(Method):
    """Wraps ``inner``; call ``set_start`` per client before it trains and ``begin_round`` before aggregating."""

    def __init__(self, inner: Method, plan: ClientLevelPlan, seed: int = 0) -> None:
        if inner.name not in CLIENT_DP_METHODS:
            raise AggregationError(
                f"client-level DP does not support method {inner.name!r}; valid: {', '.join(CLIENT_DP_METHODS)}"
            )
        self.inner = inner
        self.plan = plan
        self.seed = seed
        # the wrapper behaves as the method it wraps for the engine
        self.name = inner.name
        self.heterogeneous = inner.heterogeneous
        self.merges_into_base = inner.merges_into_base
        self.exact = False
        self._starts: dict[int, dict[str, ClientFactors]] = {}
        self._clip: list[float] = []
        self._round = 0

    def options(self) -> dict[str, object]:
        return {**self.inner.options(), "client_dp": self.plan}

    # ------------------------------------------------------------------------------------------------ round

    def set_start(self, client: int, start: Mapping[str, ClientFactors]) -> None:
        """The adapter client ``client`` starts this round from (read before it trains)."""
        self._starts[client] = dict(start)

    def update_norm(self, client: int, upload: Mapping[str, ClientFactors]) -> float:
        """Frobenius norm of the client's whole update (all modules) in this method's space."""
        total = 0.0
        for module, f in upload.items():
            total += self._module_norm_sq(f, self._start(client, module))
        return math.sqrt(total)

    def begin_round(self, round_: int, clients: Sequence[int], uploads: Sequence[Mapping[str, ClientFactors]]) -> dict:
        """Fix this round's per-client clip factors; returns the round's diagnostics (norms are NOT private)."""
        if len(clients) != self.plan.clients_per_round:
            raise AggregationError(
                f"client-level DP was planned for {self.plan.clients_per_round} clients per round, got {len(clients)}"
            )
        self._round = round_
        self._order = list(clients)
        norms = [self.update_norm(k, u) for k, u in zip(clients, uploads, strict=True)]
        C = self.plan.clip_norm
        self._clip = [1.0 if n <= C else C / n for n in norms]
        return {"clipped": sum(c < 1.0 for c in self._clip), "clip_norm": C}

    def _start(self, client: int, module: str) -> ClientFactors | None:
        if self.name in WEIGHT_SPACE:
            return None
        try:
            return self._starts[client][module]
        except KeyError:
            raise AggregationError(
                f"client-level DP: no start adapter recorded for client {client}, module {module!r}; the engine "
                "must call set_start before the client trains"
            ) from None

    def _module_norm_sq(self, f: ClientFactors, start: ClientFactors | None) -> float:
        if self.name in WEIGHT_SPACE:
            return product_norm_sq(f.B, f.A) * f.scaling**2
        if self.name == "fedsb":
            return _sq(f.R * f.scaling - start.R * start.scaling)
        total = _sq(f.scaled_B() - start.scaled_B())
        if self.name == "fedit":
            total += _sq(f.A - start.A)
        return total

    def _clipped(self, f: ClientFactors, start: ClientFactors | None, c: float) -> ClientFactors:
        if c >= 1.0:
            return f  # untouched: exact when nothing is clipped
        if self.name in WEIGHT_SPACE:
            return ClientFactors(B=f.B * c, A=f.A, scaling=f.scaling)
        if self.name == "fedsb":
            R0 = start.R * start.scaling
            return ClientFactors(B=f.B, A=f.A, scaling=1.0, R=R0 + c * (f.R * f.scaling - R0))
        B0 = start.scaled_B()
        B = B0 + c * (f.scaled_B() - B0)
        A = start.A + c * (f.A - start.A) if self.name == "fedit" else f.A
        return ClientFactors(B=B, A=A, scaling=1.0)

    # ------------------------------------------------------------------------------------------- aggregate

    def _noise(self, module: str, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> Tensor:
        gen = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}/client-dp/{self._round}/{module}".encode()))
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) * self.plan.noise_std

    def aggregate(
        self, clients: Sequence[ClientFactors], weights: Sequence[float] | Tensor, module: str = "module"
    ) -> ModuleUpdate:
        p = normalize_weights(weights)
        if len(clients) != len(self._clip):
            raise AggregationError(f"module {module!r}: begin_round saw {len(self._clip)} clients, got {len(clients)}")
        if not torch.allclose(p, torch.full_like(p, 1.0 / len(p))):
            raise AggregationError("client-level DP needs uniform client weights (federation.weighting=uniform)")
        clipped = [
            self._clipped(f, self._start(k, module), c)
            for k, f, c in zip(self._order, clients, self._clip, strict=True)
        ]
        if self.plan.noise_multiplier == 0:
            return self.inner.aggregate(clipped, weights, module)
        if self.name in WEIGHT_SPACE:
            B_s, A_s = stack_factors(clipped, p)
            dense = B_s @ A_s
            dense = dense + self._noise(module, dense.shape, dense.dtype)
            U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
            return self.inner.aggregate([ClientFactors(B=U * S, A=Vh)], [1.0], module)
        update = self.inner.aggregate(clipped, weights, module)
        if self.name == "fedsb":
            R = update.R + self._noise(module, update.R.shape, update.R.dtype)
            return ModuleUpdate(B=clients[0].B.to(R.dtype) @ R, A=update.A, R=R)
        B = update.B + self._noise(module + ".B", update.B.shape, update.B.dtype)
        if self.name == "ffa":
            return ModuleUpdate(B=B, A=update.A)
        A = update.A + self._noise(module + ".A", update.A.shape, update.A.dtype)
        return ModuleUpdate(B=B, A=A, client_starts=[(B[:, : c.rank], A[: c.rank]) for c in clients])

    def _aggregate(self, clients: list[ClientFactors], p: Tensor, module: str) -> ModuleUpdate:  # pragma: no cover
        raise NotImplementedError  # aggregate is overridden


def record_of(plan: ClientLevelPlan, rounds_done: int, diagnostics: dict[str, Any]) -> dict[str, Any]:
    """The round's ``client_privacy`` entry in ``metrics.jsonl``."""
    return {**plan.record(rounds_done), **diagnostics}
