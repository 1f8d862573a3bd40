"""Privacy calibration and accounting: pure functions of (noise multiplier, sampling rate, steps, delta).

Record level (DP-SGD in a client): the noise multiplier is calibrated ONCE per client for its whole possible
participation, assuming conservatively that the client takes part in every round:
``total steps = rounds * steps per round``, sampling rate ``q = batch_size / N_k`` (Poisson), target
``(epsilon, delta)``. The epsilon reported after a round is the accountant's value for the steps the client has
actually taken so far (never more than the target). Opacus' accountants do the math (``prv`` by default).

Client level (server-side clipping and noise): the Gaussian mechanism on the average of the clipped client
updates, once per round; sampling rate 1 (no amplification, valid for any client selection) unless asked for.
Accounted with RDP.

Opacus is imported inside the functions: fedlora runs without it when privacy is off.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from fedlora.privacy.settings import ACCOUNTANTS, ClientDPConfig, PrivacyConfig

log = logging.getLogger(__name__)

#: where each guarantee is stated, so that nobody confuses the two units
RECORD_UNIT = "record (one training example of one client)"
CLIENT_UNIT = "client (all the data of one client)"


class PrivacyError(ValueError):
    """A privacy configuration that cannot be met; the message names the client and what would help."""


def require_opacus() -> None:
    try:
        import opacus  # noqa: F401
    except ImportError:
        raise PrivacyError("privacy needs Opacus: pip install 'fedlora[privacy]' (opacus>=1.6)") from None


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise PrivacyError(f"unknown accountant {accountant!r}; valid: {', '.join(ACCOUNTANTS)}")


@functools.lru_cache(maxsize=1024)
def epsilon_spent(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str) -> float:
    """Opacus' epsilon after ``steps`` steps of the Poisson-subsampled Gaussian mechanism (inf without noise)."""
    _check_accountant(accountant)
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    require_opacus()
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    with warnings.catch_warnings():  # RDP's "optimal order is the largest alpha": still a valid upper bound
        warnings.simplefilter("ignore", UserWarning)
        return float(acc.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=256)
def calibrate_noise(
    epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str, max_noise_multiplier: float
) -> float:
    """The smallest noise multiplier (to Opacus' 0.01 tolerance) whose epsilon after ``steps`` is <= ``epsilon``.

    Raises ``PrivacyError`` when even ``max_noise_multiplier`` does not reach the target.
    """
    _check_accountant(accountant)
    if not 0 < sample_rate <= 1:
        raise PrivacyError(f"sampling rate must be in (0, 1], got {sample_rate}")
    if steps < 1:
        raise PrivacyError(f"the number of steps must be >= 1, got {steps}")
    reachable = epsilon_spent(max_noise_multiplier, sample_rate, steps, delta, accountant)
    if reachable > epsilon:
        raise PrivacyError(
            f"epsilon {epsilon} cannot be met with a noise multiplier <= {max_noise_multiplier} "
            f"(sampling rate {sample_rate:.4g}, {steps} steps, delta {delta:.3g}: epsilon would be at least "
            f"{reachable:.3g})"
        )
    require_opacus()
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(
            get_noise_multiplier(
                target_epsilon=epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
                epsilon_tolerance=0.01,
            )
        )


# --------------------------------------------------------------------------------------------- record level


@dataclass(frozen=True)
class RecordPlan:
    """Client ``client``'s DP-SGD parameters, fixed before training for the whole run."""

    client: int
    num_examples: int
    sample_rate: float  # q = expected_batch_size / num_examples (Poisson sampling)
    expected_batch_size: int
    steps_per_round: int
    max_rounds: int  # conservatively: the client may take part in every round
    noise_multiplier: float
    clip_norm: float
    epsilon_target: float
    delta: float
    accountant: str

    @property
    def total_steps(self) -> int:
        return self.steps_per_round * self.max_rounds

    def epsilon_after(self, participations: int) -> float:
        """Epsilon spent after taking part in ``participations`` rounds (cumulative, by the accountant)."""
        return epsilon_spent(
            self.noise_multiplier, self.sample_rate, self.steps_per_round * participations, self.delta, self.accountant
        )

    def record(self, participations: int) -> dict[str, Any]:
        """This round's privacy entry of the client in ``metrics.jsonl``."""
        return {
            "unit": "record",
            "epsilon": self.epsilon_after(participations),
            "epsilon_round": self.epsilon_after(1),
            "delta": self.delta,
            "epsilon_target": self.epsilon_target,
            "participations": participations,
            "steps_total": self.steps_per_round * participations,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "clip_norm": self.clip_norm,
            "accountant": self.accountant,
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_record_level(
    privacy: PrivacyConfig,
    client_sizes: Sequence[int],
    batch_size: int,
    steps_per_round: Sequence[int],
    rounds: int,
) -> list[RecordPlan]:
    """One ``RecordPlan`` per client, or a ``PrivacyError`` naming the first client whose target cannot be met.

    ``steps_per_round[k]``: optimizer steps client k takes whenever it is selected (``TrainSettings.total_steps``).
    """
    plans = []
    for k, (n, steps) in enumerate(zip(client_sizes, steps_per_round, strict=True)):
        where = f"client {k} ({n} examples)"
        if n < 2:
            raise PrivacyError(f"{where}: DP-SGD needs at least 2 examples per client")
        if batch_size > n:
            raise PrivacyError(
                f"{where}: train.batch_size {batch_size} exceeds the client's data, so the Poisson sampling rate "
                f"{batch_size}/{n} would be > 1; lower train.batch_size to <= {n} or give clients more data"
            )
        delta = privacy.delta if privacy.delta is not None else 1.0 / n
        if delta > 1.0 / n:
            log.warning("%s: delta %.3g is larger than 1/N = %.3g; the guarantee is weak", where, delta, 1.0 / n)
        q = batch_size / n
        total = steps * rounds
        try:
            sigma = calibrate_noise(privacy.epsilon, delta, q, total, privacy.accountant, privacy.max_noise_multiplier)
        except PrivacyError as err:
            raise PrivacyError(
                f"{where}: {err}. Allow a larger privacy.epsilon, fewer steps (train.max_steps / train.epochs, "
                f"federation.rounds), a smaller train.batch_size, more data per client, or raise "
                f"privacy.max_noise_multiplier (currently {privacy.max_noise_multiplier})"
            ) from None
        plans.append(
            RecordPlan(
                client=k,
                num_examples=n,
                sample_rate=q,
                expected_batch_size=batch_size,
                steps_per_round=steps,
                max_rounds=rounds,
                noise_multiplier=sigma,
                clip_norm=privacy.clip_norm,
                epsilon_target=privacy.epsilon,
                delta=delta,
                accountant=privacy.accountant,
            )
        )
    return plans


# --------------------------------------------------------------------------------------------- client level


@dataclass(frozen=True)
class ClientLevelPlan:
    """Server-side client-level DP: clip bound, noise multiplier, and how rounds are accounted (RDP)."""

    clip_norm: float
    noise_multiplier: float
    clients_per_round: int
    sample_rate: float  # 1 without amplification
    rounds: int
    delta: float
    epsilon_target: float | None

    @property
    def noise_std(self) -> float:
        """Std of the Gaussian noise added to the average of the clipped updates (per coordinate)."""
        return self.noise_multiplier * self.clip_norm / self.clients_per_round

    def epsilon_after(self, rounds_done: int) -> float:
        return epsilon_spent(self.noise_multiplier, self.sample_rate, rounds_done, self.delta, "rdp")

    def record(self, rounds_done: int) -> dict[str, Any]:
        eps = self.epsilon_after(rounds_done)
        return {
            "unit": "client",
            "epsilon": eps if math.isfinite(eps) else None,  # None: no noise, no guarantee
            "delta": self.delta,
            "rounds": rounds_done,
            "noise_multiplier": self.noise_multiplier,
            "noise_std": self.noise_std,
            "clip_norm": self.clip_norm,
            "sample_rate": self.sample_rate,
            "accountant": "rdp",
        }


def plan_client_level(cfg: ClientDPConfig, num_clients: int, clients_per_round: int, rounds: int) -> ClientLevelPlan:
    """Fix the client-level noise multiplier (given, or calibrated to ``cfg.epsilon`` over all rounds with RDP)."""
    q = clients_per_round / num_clients if cfg.amplification else 1.0
    sigma = cfg.noise_multiplier
    if sigma is None:
        try:
            sigma = calibrate_noise(cfg.epsilon, cfg.delta, q, rounds, "rdp", 1e4)
        except PrivacyError as err:
            raise PrivacyError(f"privacy.client: {err}") from None
    return ClientLevelPlan(
        clip_norm=cfg.clip_norm,
        noise_multiplier=float(sigma),
        clients_per_round=clients_per_round,
        sample_rate=q,
        rounds=rounds,
        delta=cfg.delta,
        epsilon_target=cfg.epsilon,
    )


# ------------------------------------------------------------------------------------------------- summary


def privacy_summary(metrics: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The run's final privacy statement from its ``metrics.jsonl`` records (None when privacy was off).

    ``record``: per client the cumulative epsilon of its last participation, and the worst (largest) one;
    ``client``: the client-level epsilon after the last round.
    """
    per_client: dict[int, dict[str, Any]] = {}
    client_level = None
    init_covered = True
    for m in metrics:
        for rec in m.get("clients", []):
            if rec.get("privacy"):
                per_client[rec["id"]] = rec["privacy"]
        if m.get("client_privacy"):
            client_level = m["client_privacy"]
        if m.get("privacy_init_covered") is False:
            init_covered = False
    if not per_client and client_level is None:
        return None
    out: dict[str, Any] = {}
    if per_client:
        worst = max(per_client.values(), key=lambda p: p["epsilon"])
        out["record"] = {
            "unit": RECORD_UNIT,
            "epsilon": worst["epsilon"],
            "delta": max(p["delta"] for p in per_client.values()),
            "accountant": worst["accountant"],
            "per_client": {k: {"epsilon": p["epsilon"], "delta": p["delta"]} for k, p in sorted(per_client.items())},
        }
    if client_level is not None:
        out["client"] = {"unit": CLIENT_UNIT, **client_level}
    out["init_covered"] = init_covered
    return out


def describe(summary: dict[str, Any] | None) -> str:
    """One human line per guarantee, naming its unit (for the CLI)."""
    if not summary:
        return "privacy: off (no differential privacy guarantee)"
    lines = []
    if "record" in summary:
        r = summary["record"]
        lines.append(
            f"record-level DP: epsilon <= {r['epsilon']:.3f}, delta = {r['delta']:.3g} per client "
            f"({r['accountant']} accountant); protects one {r['unit']}"
        )
    if "client" in summary:
        c = summary["client"]
        eps = "inf (no noise)" if c["epsilon"] is None else f"{c['epsilon']:.3f}"
        lines.append(f"client-level DP: epsilon = {eps}, delta = {c['delta']:.3g} (rdp); protects one {c['unit']}")
    if not summary.get("init_covered", True):
        lines.append("WARNING: Fed-SB's B and A were computed from client data without privacy (not covered)")
    return "\n".join(lines)


def plan_run(config: Any, client_sizes: Sequence[int]) -> list[RecordPlan]:
    """Record-level plans of a ``RunConfig`` for clients of the given sizes (all rounds, every client)."""
    train = config.train
    return plan_record_level(
        config.privacy,
        client_sizes,
        train.batch_size,
        [train.total_steps(n) for n in client_sizes],
        config.federation.rounds,
    )


def client_level_plan(config: Any) -> ClientLevelPlan:
    """The client-level plan of a ``RunConfig`` (its ``privacy.client`` section must be enabled)."""
    fed, k = config.federation, config.data.num_clients
    per_round = min(k, max(1, round(fed.client_fraction * k)))  # the engine's select_clients count
    return plan_client_level(config.privacy.client, k, per_round, fed.rounds)
