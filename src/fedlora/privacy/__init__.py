"""Differential privacy for federated LoRA: record-level DP-SGD in clients, client-level DP on the server.

- :mod:`fedlora.privacy.settings`: the ``privacy`` config section (no Opacus needed to import it).
- :mod:`fedlora.privacy.accounting`: calibration of the noise and the epsilon spent (Opacus' PRV / RDP).
- :mod:`fedlora.privacy.dp_sgd`: ``train_client_private``, the DP-SGD twin of ``fedlora.train.train_client``.
- :mod:`fedlora.privacy.client_level`: ``ClientLevelDP``, clipping and noise around any supported method.
"""

from fedlora.privacy.accounting import (
    CLIENT_UNIT,
    RECORD_UNIT,
    ClientLevelPlan,
    PrivacyError,
    RecordPlan,
    calibrate_noise,
    client_level_plan,
    describe,
    epsilon_spent,
    plan_client_level,
    plan_record_level,
    plan_run,
    privacy_summary,
)
from fedlora.privacy.settings import ClientDPConfig, PrivacyConfig

__all__ = [
    "CLIENT_UNIT",
    "RECORD_UNIT",
    "ClientDPConfig",
    "ClientLevelPlan",
    "PrivacyConfig",
    "PrivacyError",
    "RecordPlan",
    "calibrate_noise",
    "client_level_plan",
    "describe",
    "epsilon_spent",
    "plan_client_level",
    "plan_record_level",
    "plan_run",
    "privacy_summary",
]
