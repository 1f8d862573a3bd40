"""The in-process engine: one base model in memory, clients trained one after another, rounds checkpointed.

Reads top to bottom as ALGORITHMS.md describes a round:

    for each round:
        select clients (fraction, seeded by round)
        for each selected client (sequentially, on the ONE base model):
            install its LoRA: fresh (FLoRA, FLoRIST) or from the global adapter (FedIT, FlexLoRA, FFA, FedEx)
            train locally; read its factors (the uplink)
        aggregate per module with the method (pure math)
        apply: merge into the base (FLoRA, FLoRIST; FedEx's residual) or keep the global adapter
        evaluate; write metrics; checkpoint atomically
    export a standard PEFT adapter that reproduces the global model on the ORIGINAL base

Every random choice is seeded from (seed, round, client), so an interrupted run resumed from its checkpoint
ends with exactly the weights of an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor

from fedlora.adapter_io import write_adapter
from fedlora.adapters import LoraHost, check_targets
from fedlora.comm import DTYPE_BYTES
from fedlora.config import RunConfig
from fedlora.engine.data import ClientData, prepare_data
from fedlora.engine.fingerprint import input_fingerprint
from fedlora.engine.seeding import mix_seed
from fedlora.engine.state import Factors, ServerState, load_state, save_state
from fedlora.evaluate import evaluate, resolve_tasks
from fedlora.lora_sb import LoraSBHost, SBInit, init_from_gradient
from fedlora.lowrank import ClientFactors
from fedlora.methods import Method, ModuleUpdate, get_method
from fedlora.models import load_model
from fedlora.privacy import client_level_plan, plan_run, privacy_summary
from fedlora.privacy.client_level import ClientLevelDP, record_of
from fedlora.privacy.dp_sgd import train_client_private
from fedlora.train import evaluate_loss, select_device, train_client

log = logging.getLogger("fedlora")
RUN_FILES = ("metrics.jsonl", "checkpoint", ".checkpoint-old", "adapter", "config.yaml")


class RunError(ValueError):
    """A run that cannot start or continue; the message says why and what to do."""


@dataclass
class RunSummary:
    run_dir: Path
    method: str
    rounds: int
    eval_before: float | None
    eval_after: float | None
    uplink_bytes: int
    downlink_bytes: int
    seconds: float
    global_ranks: dict[str, int] = field(default_factory=dict)
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    privacy: dict[str, Any] | None = None  # privacy_summary: epsilon per unit (record, client)


def select_clients(num_clients: int, fraction: float, seed: int, round_: int) -> list[int]:
    """The seeds' client sampling: ``max(1, round(fraction * K))`` clients without replacement, per round."""
    count = max(1, round(fraction * num_clients))
    if count >= num_clients:
        return list(range(num_clients))
    gen = torch.Generator().manual_seed(mix_seed(seed, "select", round_))
    return sorted(torch.randperm(num_clients, generator=gen)[:count].tolist())


def truncate(factors: tuple[Tensor, Tensor], rank: int) -> tuple[Tensor, Tensor]:
    """The first ``rank`` directions of a global adapter, zero-padded when it has fewer (FedIT, FlexLoRA)."""
    B, A = factors
    if A.shape[0] >= rank:
        return B[:, :rank], A[:rank]
    extra = rank - A.shape[0]
    return torch.cat([B, B.new_zeros(B.shape[0], extra)], 1), torch.cat([A, A.new_zeros(extra, A.shape[1])], 0)


def payload_params(method: Method, factors: ClientFactors) -> int:
    """Parameters a client sends up for one module: only B for FFA-LoRA, only R for Fed-SB."""
    if method.name == "ffa":
        return factors.B.numel()
    if factors.R is not None:  # Fed-SB: only R travels
        return factors.R.numel()
    return factors.B.numel() + factors.A.numel()


class Engine:
    """One federated run. ``Engine(config).run()``; ``resume=True`` continues from the run folder's checkpoint."""

    def __init__(
        self, config: RunConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True
    ) -> None:
        if resume and overwrite:
            raise RunError("--resume continues a run and --overwrite replaces it: choose one")
        self.config = config
        self.resume = resume
        self.overwrite = overwrite
        self.show_progress = progress
        self.run_dir = Path(config.output_dir)
        self.method = get_method(config.method.name, **config.method.options())
        self.client_dp: ClientLevelDP | None = None
        if config.privacy.client.enabled:  # clip and noise the clients' updates around the method
            self.client_dp = ClientLevelDP(self.method, client_level_plan(config), seed=mix_seed(config.seed, "cdp"))
            self.method = self.client_dp
        self.record_plans = None  # record-level DP-SGD plans per client, fixed in prepare()
        self.is_sb = self.method.name == "fedsb"  # LoRA-SB adapters: only R trains and travels
        self.bytes_per_value = DTYPE_BYTES[config.comm_dtype]
        self.sb_init: SBInit | None = None

    # ---------------------------------------------------------------------------------------------- set-up

    def prepare(self) -> None:
        """Everything that can fail on bad input, before any training: folder, model, data, targets, ranks."""
        cfg = self.config
        self._clock = time.perf_counter()
        self._prepare_run_dir()
        self.load()
        if cfg.privacy.enabled:  # an unreachable privacy target fails here, before anything trains
            self.record_plans = plan_run(cfg, [len(c) for c in self.data.clients])
        # Only now, with every input checked, touch the run folder.
        if self.overwrite:
            for name in RUN_FILES:
                path = self.run_dir / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(cfg.to_yaml())

    def load(self, *, data: bool = True) -> None:
        """Model, data (unless ``data=False``), targets and the adapter host; no run folder (Flower clients use it)."""
        cfg = self.config
        self.device = select_device(cfg.device)
        loaded = load_model(cfg.model, seed=cfg.seed, device=self.device)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.model_path = loaded.path or cfg.model
        for p in self.model.parameters():
            p.requires_grad_(False)
        if data:
            self.data: ClientData = prepare_data(cfg, self.tokenizer)
        if cfg.eval.tasks:
            resolve_tasks(cfg.eval.tasks)  # unknown task names fail now, not after training
        ranks = [cfg.lora.rank_of(k) for k in range(cfg.data.num_clients)]
        self.shapes = check_targets(self.model, cfg.lora.target_modules, max(ranks))
        self.host = (
            LoraSBHost(self.model, cfg.lora.target_modules, cfg.lora.dropout)
            if self.is_sb
            else LoraHost(self.model, cfg.lora.target_modules, cfg.lora.dropout)
        )

    def _prepare_run_dir(self) -> None:
        has_run = (self.run_dir / "metrics.jsonl").exists() or (self.run_dir / "checkpoint").exists()
        if has_run and not (self.resume or self.overwrite):
            raise RunError(
                f"run folder {self.run_dir} already holds a run; pass --resume to continue it, --overwrite to replace "
                "it, or choose another output_dir"
            )
        if self.resume and not has_run:
            raise RunError(f"nothing to resume in {self.run_dir}: no checkpoint found")
        if self.resume:
            self._check_same_config()

    def _check_same_config(self) -> None:
        """A resumed run must be the same run: only the number of rounds may grow."""
        saved_path = self.run_dir / "config.yaml"
        if not saved_path.is_file():
            return
        saved = yaml.safe_load(saved_path.read_text())
        current = self.config.model_dump(mode="json")
        private = self.config.privacy.any
        if private and saved["federation"].get("rounds") != current["federation"]["rounds"]:
            raise RunError(
                f"cannot resume {self.run_dir} with federation.rounds changed: the privacy noise was calibrated "
                "for the saved number of rounds; start a new run instead"
            )
        for cfg in (saved, current):
            cfg["federation"].pop("rounds", None)
        changed = sorted(k for k in {*saved, *current} if saved.get(k) != current.get(k))
        if changed:
            raise RunError(
                f"cannot resume {self.run_dir}: the config differs from the saved one in {changed}; "
                "only federation.rounds may change when resuming"
            )

    # ------------------------------------------------------------------------------------------------ run

    def run(self) -> RunSummary:
        start = time.perf_counter()
        self.prepare()
        cfg = self.config
        state = self._initial_state()
        metrics = self._metrics_so_far(state.round)
        if state.round == 0 and not any(m["round"] == 0 for m in metrics):
            metrics.append(self._write_metrics(self.round0_record(state)))

        with self._progress() as progress:
            rounds_bar = progress.add_task("rounds", total=cfg.federation.rounds, completed=state.round)
            for round_ in range(state.round + 1, cfg.federation.rounds + 1):
                record = self._run_round(round_, state, progress)
                state.round = round_
                if self._evaluate_now(round_):
                    record["eval"] = self._evaluate(state)
                save_state(self.run_dir, state)
                metrics.append(self._write_metrics(record))
                progress.advance(rounds_bar)

        self._export(state)
        return self._summary(metrics, time.perf_counter() - start)

    def round0_record(self, state: ServerState) -> dict[str, Any]:
        """The ``round: 0`` line of metrics.jsonl: inputs, the base model's evaluation, Fed-SB's one-time init."""
        cfg = self.config
        record: dict[str, Any] = {"round": 0}
        record["inputs"] = input_fingerprint(cfg, self.data, self.model)  # same inputs across methods
        if cfg.eval.base:
            record["eval"] = self._evaluate(state)
        if self.sb_init is not None and cfg.privacy.any:  # data-dependent B and A are not covered by DP
            record["privacy_init_covered"] = cfg.method.init_mode == "seeded"
        if self.sb_init is not None:  # Fed-SB's one-time agreement on B and A
            record["fedsb_init"] = self.sb_init.record()
            K = cfg.data.num_clients
            record["uplink_bytes"] = self.sb_init.uplink_params_per_client * K * self.bytes_per_value
            record["downlink_bytes"] = self.sb_init.downlink_params_per_client * K * self.bytes_per_value
        return record

    def _run_round(self, round_: int, state: ServerState, progress: Progress) -> dict[str, Any]:
        cfg = self.config
        selected = select_clients(cfg.data.num_clients, cfg.federation.client_fraction, cfg.seed, round_)
        clients_bar = progress.add_task(f"round {round_}: clients", total=len(selected))
        uploads: list[dict[str, ClientFactors]] = []
        client_records = []
        for k in selected:
            factors, client_record = self.client_update(k, round_, state, progress)
            uploads.append(factors)
            client_records.append(client_record)
            progress.advance(clients_bar)
        progress.remove_task(clients_bar)
        return self.server_update(round_, state, client_records, uploads)

    def client_update(
        self, k: int, round_: int, state: ServerState, progress: Progress | None = None
    ) -> tuple[dict[str, ClientFactors], dict[str, Any]]:
        """Client ``k``'s part of a round: start from the global state, train locally, return its upload.

        The upload is the client's factors per module; the record is its line in ``metrics.jsonl``.
        """
        cfg, data = self.config, self.data
        self._install_client(k, round_, state)
        if self.client_dp is not None:  # client-level DP clips the update relative to this start
            self.client_dp.set_start(k, self.host.factors())
        settings = cfg.train.model_copy(update={"seed": mix_seed(cfg.seed, "train", round_, k)})
        train_kwargs: dict[str, Any] = dict(device=self.device, progress=progress if self.show_progress else None)
        if cfg.privacy.enabled:
            if self.record_plans is None:  # a Flower client: plan from the same data as the server would
                self.record_plans = plan_run(cfg, [len(c) for c in data.clients])
            plan = self.record_plans[k]
            result = train_client_private(
                self.host.model,
                data.clients[k],
                settings,
                plan,
                data.collate,
                **train_kwargs,
                desc=f"client {k}",
                secure_mode=cfg.privacy.secure_mode,
            )
        else:
            result = train_client(
                self.host.model, data.clients[k], settings, data.collate, **train_kwargs, desc=f"client {k}"
            )
        factors = self.host.factors()
        up = sum(payload_params(self.method, f) for f in factors.values())
        record = {
            "id": k,
            "num_examples": len(data.clients[k]),
            "rank": cfg.lora.rank_of(k),
            "train_loss": result.loss,
            "steps": result.steps,
            "tokens_per_second": result.tokens_per_second,
            "uplink_params": up,
            "uplink_bytes": up * self.bytes_per_value,
        }
        if cfg.privacy.enabled:  # cumulative epsilon over the rounds this client took part in (unit: a record)
            fed = cfg.federation
            times = sum(
                k in select_clients(cfg.data.num_clients, fed.client_fraction, cfg.seed, t)
                for t in range(1, round_ + 1)
            )
            record["privacy"] = plan.record(times)
        return factors, record

    def server_update(
        self,
        round_: int,
        state: ServerState,
        client_records: list[dict[str, Any]],
        uploads: list[dict[str, ClientFactors]],
    ) -> dict[str, Any]:
        """The server's part of a round: aggregate the uploads per module, apply, count the downlink.

        ``client_records`` (one per upload, with the client's ``id``) gain the downlink; returns the round's record.
        """
        selected = [rec["id"] for rec in client_records]
        weights = self.record_weights(client_records)
        if self.client_dp is not None:
            dp_round = self.client_dp.begin_round(round_, selected, uploads)
        updates = {name: self.method.aggregate([u[name] for u in uploads], weights, module=name) for name in uploads[0]}
        self._apply(updates, state)
        down = self._downlink_params(updates, state)
        for rec in client_records:
            rec["downlink_params"] = down[rec["id"]]
            rec["downlink_bytes"] = down[rec["id"]] * self.bytes_per_value
        record: dict[str, Any] = {
            "round": round_,
            "method": self.method.name,
            "selected": selected,
            "clients": client_records,
            "train_loss": sum(r["train_loss"] * w for r, w in zip(client_records, weights, strict=True)) / sum(weights),
            "uplink_bytes": sum(r["uplink_bytes"] for r in client_records),
            "downlink_bytes": sum(down.values()) * self.bytes_per_value,
        }
        if self.client_dp is not None:  # unit: a client's whole data
            record["client_privacy"] = record_of(self.client_dp.plan, round_, dp_round)
        if any(u.singular_values is not None for u in updates.values()):
            record["global_ranks"] = {name: u.rank for name, u in updates.items()}
            record["energy_kept"] = {name: round(u.energy_kept, 6) for name, u in updates.items()}
        return record

    # ------------------------------------------------------------------------------- method semantics

    def _initial_state(self) -> ServerState:
        """Round 0: the global adapter every client starts from (non-merging methods), seeded once."""
        if self.resume:
            state = load_state(self.run_dir)
            if state is None:
                raise RunError(f"nothing to resume in {self.run_dir}: no complete checkpoint")
            for step in state.history:  # replay the merges in order: bit-identical base weights
                self.host.merge_into_base(step)
            if self.is_sb:
                self.host.install(
                    {n: ClientFactors(B, A, 1.0, state.global_R[n]) for n, (B, A) in state.frozen.items()}
                )
            log.info("resuming %s after round %d", self.run_dir, state.round)
            return state
        state = ServerState()
        if self.is_sb:
            return self._initial_sb_state(state)
        if not self.method.merges_into_base:
            # All clients start round 1 from the same PEFT-initialised adapter (the seeds' global model).
            r_max = max(self.config.lora.rank_of(k) for k in range(self.config.data.num_clients))
            self.host.install(r_max, r_max, seed=mix_seed(self.config.seed, "init"))
            state.global_adapter = {n: (f.scaled_B(), f.A) for n, f in self.host.factors().items()}
        return state

    def _initial_sb_state(self, state: ServerState) -> ServerState:
        """Fed-SB: B, A and R from a gradient estimate (or a seed), shared by every client for the whole run."""
        cfg = self.config
        mode = cfg.method.init_mode
        if mode == "pooled":
            log.warning("fedsb init_mode=pooled computes B and A on the pooled data of all clients: NOT federated")
        self.sb_init = self.compute_sb_init(mode, self.data.clients, self._weights(range(cfg.data.num_clients)))
        return self.install_sb_init(state)

    def compute_sb_init(
        self, mode: str, examples_by_client: list[list[Any]], weights: list[float] | None = None
    ) -> SBInit:
        """LoRA-SB's B, A and R with this run's rank, targets, learning rate and seed (Flower's clients use it too)."""
        cfg = self.config
        return init_from_gradient(
            self.model,
            examples_by_client,
            self.data.collate if hasattr(self, "data") else None,
            cfg.lora.target_modules,
            cfg.lora.r,
            learning_rate=cfg.train.learning_rate,
            mode=mode,
            num_samples=cfg.method.init_samples,
            seed=mix_seed(cfg.seed, "fedsb-init"),
            weights=weights,
            micro_batch_size=cfg.train.micro_batch_size,
        )

    def install_sb_init(self, state: ServerState) -> ServerState:
        """Install ``self.sb_init`` (Fed-SB's shared B, A and starting R) on the host and in the server state."""
        self.host.install(self.sb_init)
        state.frozen = {n: (f.B, f.A) for n, f in self.sb_init.factors.items()}
        state.global_R = {n: f.R * f.scaling for n, f in self.sb_init.factors.items()}
        state.global_adapter = self.host.export_factors()
        return state

    def record_weights(self, client_records: list[dict[str, Any]]) -> list[float]:
        """Aggregation weights from the clients' own reports (their example counts), as a remote server sees them."""
        if self.config.federation.weighting == "uniform":
            return [1.0 for _ in client_records]
        return [float(rec["num_examples"]) for rec in client_records]

    def _weights(self, clients) -> list[float]:
        if self.config.federation.weighting == "uniform":
            return [1.0 for _ in clients]
        return [float(len(self.data.clients[k])) for k in clients]

    def _install_client(self, k: int, round_: int, state: ServerState) -> None:
        if self.is_sb:  # every client starts from the shared B, A and the global R
            self.host.install(start=state.global_R)
            return
        lora = self.config.lora
        rank, alpha = lora.rank_of(k), lora.alpha_of(k)
        start = None
        if state.global_adapter is not None:
            start = {name: truncate(f, rank) for name, f in state.global_adapter.items()}
        self.host.install(
            rank,
            alpha,
            use_rslora=lora.use_rslora,
            start=start,
            seed=mix_seed(self.config.seed, "lora", round_, k),
            train_A=self.method.name != "ffa",
        )

    def _apply(self, updates: dict[str, ModuleUpdate], state: ServerState) -> None:
        if self.method.merges_into_base:  # FLoRA, FLoRIST: W0 += B_g A_g; clients restart fresh
            step = {name: (u.B, u.A) for name, u in updates.items()}
            self.host.merge_into_base(step)
            state.history.append(step)
            return
        if self.is_sb:  # only this round's clients' R are averaged (the reference's stale-list bug avoided)
            state.global_R = {name: u.R for name, u in updates.items()}
        residual = {name: u.residual for name, u in updates.items() if u.residual is not None}
        if residual:  # FedEx-LoRA: the exactness correction goes into the frozen weights
            self.host.merge_into_base(residual)
            state.history.append(residual)
        state.global_adapter = {name: (u.B, u.A) for name, u in updates.items()}

    def _downlink_params(self, updates: dict[str, ModuleUpdate], state: ServerState) -> dict[int, int]:
        """Parameters each of the K clients receives after this round (all of them: bases must stay equal)."""
        per_client = {}
        for k in range(self.config.data.num_clients):
            rank = self.config.lora.rank_of(k)
            total = 0
            for u in updates.values():
                m, n = u.B.shape[0], u.A.shape[1]
                if self.is_sb:
                    total += u.R.numel()
                elif self.method.merges_into_base:
                    total += u.rank * (m + n)
                elif self.method.name == "ffa":
                    total += u.B.numel()
                else:
                    total += rank * (m + n)  # FedIT / FlexLoRA truncation to the client's rank; FedEx adapter
                if u.residual is not None:
                    total += u.residual[0].numel() + u.residual[1].numel()
            per_client[k] = total
        return per_client

    # ------------------------------------------------------------------------------------- evaluation

    def _evaluate_now(self, round_: int) -> bool:
        every = self.config.eval.every
        return round_ == self.config.federation.rounds or (every > 0 and round_ % every == 0)

    def _evaluate(self, state: ServerState) -> dict[str, Any]:
        """Held-out loss and task accuracy of the current global model (base + merges + global adapter)."""
        cfg = self.config.eval
        out: dict[str, Any] = {}
        if not self.data.eval_examples and not cfg.tasks:
            return out
        with self._global_model(state) as model:
            if self.data.eval_examples:
                out["eval_loss"] = evaluate_loss(model, self.data.eval_examples, self.data.collate, cfg.batch_size)
            if cfg.tasks:
                results = evaluate(
                    model,
                    self.tokenizer,
                    cfg.tasks,
                    limit=cfg.limit,
                    scorer=cfg.scorer,
                    batch_size=cfg.batch_size,
                    template=self.config.data.template,
                    seed=self.config.seed,
                )
                out["tasks"] = {name: r.to_dict() for name, r in results.items()}
                out["accuracy"] = sum(r.accuracy for r in results.values()) / len(results)
        return out

    @contextmanager
    def _global_model(self, state: ServerState) -> Iterator[torch.nn.Module]:
        """The global model: before round 1 the base model; then base (with merges) plus the global adapter."""
        host = self.host
        if state.round == 0 or (state.global_adapter is None and not self.is_sb):  # base, or merged FLoRA(IST)
            with host.disable_adapter() as model:
                yield model
        elif self.is_sb:
            host.install(start=state.global_R, dropout=0.0)
            yield host.model
        elif state.global_adapter is not None:
            ranks = {n: max(1, A.shape[0]) for n, (_, A) in state.global_adapter.items()}
            host.install(ranks, start={n: truncate(f, ranks[n]) for n, f in state.global_adapter.items()}, dropout=0.0)
            yield host.model

    # ------------------------------------------------------------------------------ metrics, export

    def _metrics_so_far(self, completed: int) -> list[dict[str, Any]]:
        """On resume keep the metrics of checkpointed rounds only (a crash may have left a later line)."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return []
        kept = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        kept = [m for m in kept if m["round"] <= completed]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(m) + "\n" for m in kept))
        os.replace(tmp, path)
        return kept

    def _write_metrics(self, record: dict[str, Any]) -> dict[str, Any]:
        # Wall time since the previous line (round 0: since set-up began); their sum is the run's wall time.
        now = time.perf_counter()
        record["seconds"] = round(now - self._clock, 3)
        self._clock = now
        with (self.run_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        return record

    def global_factors(self, state: ServerState) -> Factors:
        """One adapter equal to the global update on the ORIGINAL base: merged rounds + global adapter."""
        out = state.merged_factors()
        for name, (B, A) in (state.global_adapter or {}).items():
            if name in out:
                out[name] = (torch.cat([out[name][0], B], 1), torch.cat([out[name][1], A], 0))
            else:
                out[name] = (B, A)
        return out

    def _export(self, state: ServerState) -> None:
        template = {
            "base_model_name_or_path": str(self.model_path),
            "task_type": "CAUSAL_LM",
            "target_modules": list(self.config.lora.target_modules),
        }
        write_adapter(self.run_dir / "adapter", self.global_factors(state), template, overwrite=True)

    def _summary(self, metrics: list[dict[str, Any]], seconds: float) -> RunSummary:
        rounds = [m for m in metrics if m["round"] > 0]
        evals = [m for m in metrics if m.get("eval")]
        first = next((m["eval"] for m in metrics if m["round"] == 0 and m.get("eval")), {})
        last = evals[-1]["eval"] if evals and evals[-1]["round"] > 0 else {}
        return RunSummary(
            run_dir=self.run_dir,
            method=self.method.name,
            rounds=len(rounds),
            eval_before=first.get("eval_loss"),
            eval_after=last.get("eval_loss"),
            accuracy_before=first.get("accuracy"),
            accuracy_after=last.get("accuracy"),
            uplink_bytes=sum(m.get("uplink_bytes", 0) for m in metrics),
            downlink_bytes=sum(m.get("downlink_bytes", 0) for m in metrics),
            seconds=seconds,
            global_ranks=rounds[-1].get("global_ranks", {}) if rounds else {},
            privacy=privacy_summary(metrics),
        )

    def _progress(self) -> Progress:
        return Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            disable=not self.show_progress,
            transient=False,
        )


def run(config: RunConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True) -> RunSummary:
    return Engine(config, resume=resume, overwrite=overwrite, progress=progress).run()
