"""The ``privacy`` section of a run config (pydantic, no Opacus import): record-level DP-SGD and client-level DP.

Two guarantees, two units:

- **record-level** (``privacy.enabled``): DP-SGD inside every client protects each *training example* of that
  client. ``(epsilon, delta)`` is per client over its whole participation in the run.
- **client-level** (``privacy.client.enabled``): clipping and noising the clients' updates on the server protects
  each *client's whole dataset* (all its examples at once) in the released global model.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ACCOUNTANTS = ("prv", "rdp")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ClientDPConfig(_Strict):
    """Client-level DP on the server (DP-FedAvg style): clip each client's update, noise the average."""

    enabled: bool = False
    clip_norm: float = Field(1.0, gt=0, description="C: bound on the Frobenius norm of one client's whole update")
    noise_multiplier: float | None = Field(
        None, ge=0, description="sigma: noise std = sigma * C / (clients per round); or give epsilon instead"
    )
    epsilon: float | None = Field(None, gt=0, description="target client-level epsilon over all rounds (RDP)")
    delta: float = Field(1e-5, gt=0, lt=1, description="client-level delta (reported with epsilon)")
    amplification: bool = Field(
        False,
        description="account with sampling rate q = clients per round / num_clients, treating the engine's "
        "fixed-size selection as Poisson sampling (an approximation); False: q = 1 (valid for any selection)",
    )

    @model_validator(mode="after")
    def _one_knob(self) -> ClientDPConfig:
        if self.enabled and (self.noise_multiplier is None) == (self.epsilon is None):
            raise ValueError(
                "privacy.client: give exactly one of noise_multiplier (sigma) or epsilon (calibrated over the rounds)"
            )
        return self


class PrivacyConfig(_Strict):
    """Record-level DP-SGD in every client (Opacus), plus the optional client-level section."""

    enabled: bool = Field(False, description="record-level DP-SGD in every client (protects single examples)")
    epsilon: float = Field(3.0, gt=0, description="target epsilon per client over ALL its rounds")
    delta: float | None = Field(None, gt=0, lt=1, description="target delta; None: 1 / N_k for client k")
    clip_norm: float = Field(0.1, gt=0, description="C: per-example gradient norm bound (replaces max_grad_norm)")
    accountant: Literal["prv", "rdp"] = Field("prv", description="Opacus accountant: prv (tighter) or rdp")
    secure_mode: bool = Field(
        False, description="cryptographically secure noise and sampling (needs torchcsprng; not reproducible)"
    )
    max_noise_multiplier: float = Field(
        20.0, gt=0, description="refuse a run whose calibrated noise multiplier would exceed this (useless training)"
    )
    allow_unprotected_init: bool = Field(
        False,
        description="fedsb: allow init_mode federated/pooled, whose gradient-based B and A are computed from the "
        "clients' data WITHOUT privacy (reported as not covered); default: require init_mode=seeded",
    )
    client: ClientDPConfig = Field(default_factory=ClientDPConfig)

    @property
    def any(self) -> bool:
        return self.enabled or self.client.enabled
