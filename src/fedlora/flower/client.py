"""The fedlora client inside a Flower ClientApp: the engine's own client step on this node's partition.

A ``ClientRuntime`` holds what is expensive to build (model, tokenizer, tokenised data) once per process, keyed
by the run config. Every message starts from the pristine base weights and replays the merged steps kept in
``Context.state`` (bit-identical to the server's base, as a resumed in-process run does), installs the client's
adapter exactly as ``Engine._install_client`` does, and trains with ``Engine.client_update``: the same code as
``fedlora run``, so the same numbers.
"""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from torch import Tensor

from fedlora.config import ConfigError, RunConfig
from fedlora.engine.data import ClientData, prepare_data
from fedlora.engine.local import Engine, truncate
from fedlora.engine.state import ServerState
from fedlora.flower import protocol as P
from fedlora.flower.messages import decode, encode, pack_factors, unpack_factors, unpack_part
from fedlora.flower.options import DATA_PATH, NUM_PARTITIONS, PARTITION_ID, FlowerOptions
from fedlora.lora_sb import _accumulate_gradients, linear_targets
from fedlora.lowrank import ClientFactors

log = logging.getLogger("fedlora.flower")


def node_partition(context: Context, config: RunConfig) -> tuple[int, str | None]:
    """This node's client index (``partition-id``) and optional own data file (``data-path``), checked."""
    node = context.node_config
    if PARTITION_ID not in node:
        raise ConfigError(
            f"node config has no {PARTITION_ID!r}; start the SuperNode with --node-config "
            f"'{PARTITION_ID}=<0..{config.data.num_clients - 1}> {NUM_PARTITIONS}={config.data.num_clients}'"
        )
    k = int(node[PARTITION_ID])
    total = int(node.get(NUM_PARTITIONS, config.data.num_clients))
    if total != config.data.num_clients or not 0 <= k < total:
        raise ConfigError(
            f"node config {PARTITION_ID}={k} {NUM_PARTITIONS}={total} does not fit data.num_clients="
            f"{config.data.num_clients}; partitions are 0..{config.data.num_clients - 1}"
        )
    path = node.get(DATA_PATH)
    return k, (str(path) if path else None)


class ClientRuntime:
    """Model, data and the engine's client step for one run config on this process."""

    def __init__(self, config: RunConfig, data_path: str | None = None) -> None:
        if config.method.name == "fedsb" and config.method.init_mode == "pooled":
            raise ConfigError(
                "method.init_mode=pooled computes Fed-SB's B and A on the pooled data of all clients, which a "
                "federation does not have; use method.init_mode=federated or seeded on Flower"
            )
        self.config = config
        self.data_path = data_path
        self.engine = Engine(config, progress=False)
        self.engine.load(data=data_path is None)
        if data_path is not None:
            self.own_data = self._load_own(data_path)
        self.pristine = {n: self.engine.host.base_linear(n).weight.detach().clone() for n in self.engine.shapes}
        self.init_state: ServerState | None = None
        self.seeded_sb: dict[str, ClientFactors] | None = None
        method = self.engine.method
        if not self.engine.is_sb and not method.merges_into_base:
            self.init_state = self.engine._initial_state()  # the seeded round-1 adapter: derived, never sent
        if self.engine.is_sb and config.method.init_mode == "seeded":
            self.seeded_sb = self.engine.compute_sb_init("seeded", [[] for _ in range(config.data.num_clients)]).factors

    def _load_own(self, path: str) -> ClientData:
        """This client's own file (JSON/JSONL records) tokenised as the engine tokenises a shard."""
        own = self.config.model_copy(deep=True)
        own.data.source = path
        own.data.num_clients = 1
        own.data.partition = "iid"
        own.data.holdout_per_category = 0
        own.data.eval_examples = 0
        own.data.max_examples_per_category = None
        return prepare_data(own, self.engine.tokenizer)

    def use_partition(self, k: int) -> None:
        """Make ``engine.data.clients[k]`` this node's examples (its own file when it has one)."""
        if self.data_path is not None:
            shard = self.own_data.clients[0]
            self.engine.data = ClientData(
                clients=[shard if i == k else [] for i in range(self.config.data.num_clients)],
                eval_examples=[],
                collate=self.own_data.collate,
            )

    def num_examples(self, k: int) -> int:
        self.use_partition(k)
        return len(self.engine.data.clients[k])

    # ------------------------------------------------------------------------------------------ state

    def base_state(self, store: RecordDict, k: int) -> ServerState:
        """Restore the pristine base, replay the stored merges, and return what ``client_update`` starts from."""
        engine = self.engine
        with torch.no_grad():
            for name, weight in self.pristine.items():
                engine.host.base_linear(name).weight.copy_(weight)
        meta = store.get(P.STATE_META)
        steps = int(meta["steps"]) if meta is not None else 0
        for i in range(steps):
            engine.host.merge_into_base(unpack_factors(decode(store[f"{P.STATE_STEP}{i}"])))
        state = ServerState(round=int(meta["synced"]) if meta is not None else 0)
        if engine.is_sb:
            frozen, R = self._sb_factors(store)
            engine.host.install({n: ClientFactors(B, A, 1.0, R[n]) for n, (B, A) in frozen.items()})
            state.frozen, state.global_R = frozen, R
        elif not engine.method.merges_into_base:
            state.global_adapter = self.current_start(store, k)
        return state

    def current_start(self, store: RecordDict, k: int) -> dict[str, tuple[Tensor, Tensor]]:
        """The adapter this client starts from: the last one the server sent, else the seeded round-1 adapter."""
        if P.STATE_START in store:
            return unpack_factors(decode(store[P.STATE_START]))
        rank = self.config.lora.rank_of(k)
        return {n: truncate(f, rank) for n, f in self.init_state.global_adapter.items()}

    def _sb_factors(self, store: RecordDict) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, Tensor]]:
        if P.STATE_FROZEN in store:
            tensors = decode(store[P.STATE_FROZEN])
            frozen = unpack_factors({k: v for k, v in tensors.items() if not k.endswith(".R")})
            start_R = unpack_part(tensors, "R")
        elif self.seeded_sb is not None:
            frozen = {n: (f.B, f.A) for n, f in self.seeded_sb.items()}
            start_R = {n: f.R * f.scaling for n, f in self.seeded_sb.items()}
        else:
            raise ConfigError("Fed-SB client has no shared B and A yet: the server must send them (query.sync)")
        R = unpack_part(decode(store[P.STATE_R]), "R") if P.STATE_R in store else start_R
        return frozen, R

    def store_update(self, content: RecordDict, store: RecordDict, k: int) -> None:
        """Keep what the server sent (a sync, or a stale client's catch-up) in ``Context.state``."""
        meta = store.get(P.STATE_META) or ConfigRecord({"synced": 0, "steps": 0})
        cfg = content[P.CONFIG]
        steps = int(meta["steps"])
        if "keep_steps" in cfg:  # the server resumed from an older checkpoint: drop the steps it no longer has
            for i in range(int(cfg["keep_steps"]), steps):
                del store[f"{P.STATE_STEP}{i}"]
            steps = min(steps, int(cfg["keep_steps"]))
        first = int(cfg.get("first_step", steps))
        for key in sorted((s for s in content.array_records if s.startswith(P.STEP)), key=lambda s: int(s[5:])):
            i = int(key[len(P.STEP) :])
            if i < steps:
                continue  # already have it (a resent catch-up)
            if i != steps:
                raise ConfigError(f"merge step {i} arrived but this client holds only {steps} steps (first {first})")
            store[f"{P.STATE_STEP}{i}"] = content[key]
            steps += 1
        if P.START in content.array_records:
            start = decode(content[P.START])
            if self.engine.method.name == "ffa":  # only B travels; A is the shared frozen A the client holds
                current = self.current_start(store, k)
                start = pack_factors({n: (B, current[n][1]) for n, B in unpack_part(start, "B").items()})
            store[P.STATE_START] = encode(start)
        if P.R in content.array_records:
            store[P.STATE_R] = content[P.R]
        if P.FROZEN in content.array_records:
            store[P.STATE_FROZEN] = content[P.FROZEN]
        meta["steps"] = steps
        if "synced" in cfg:  # the round whose global state this message completes
            meta["synced"] = int(cfg["synced"])
        store[P.STATE_META] = meta

    # --------------------------------------------------------------------------------------- handlers

    def hello(self, msg: Message, context: Context) -> Message:
        k, _ = node_partition(context, self.config)
        meta = context.state.get(P.STATE_META)
        report = {
            "id": k,
            "num_examples": self.num_examples(k),
            "rank": self.config.lora.rank_of(k),
            "synced": int(meta["synced"]) if meta is not None else 0,
            "steps": int(meta["steps"]) if meta is not None else 0,
            "has_frozen": P.STATE_FROZEN in context.state,
        }
        return Message(RecordDict({P.REPORT: ConfigRecord({"json": json.dumps(report)})}), reply_to=msg)

    def sync(self, msg: Message, context: Context) -> Message:
        k, _ = node_partition(context, self.config)
        self.store_update(msg.content, context.state, k)
        meta = context.state[P.STATE_META]
        report = {"id": k, "synced": int(meta["synced"]), "steps": int(meta["steps"])}
        return Message(RecordDict({P.REPORT: ConfigRecord({"json": json.dumps(report)})}), reply_to=msg)

    def train(self, msg: Message, context: Context) -> Message:
        k, _ = node_partition(context, self.config)
        cfg = msg.content[P.CONFIG]
        if int(cfg["client"]) != k:
            raise ConfigError(f"the server addressed client {cfg['client']} but this node is partition {k}")
        self.store_update(msg.content, context.state, k)  # a stale client's catch-up, if any
        round_ = int(cfg["round"])
        self.use_partition(k)
        state = self.base_state(context.state, k)
        factors, record = self.engine.client_update(k, round_, state)
        record["scaling"] = next(iter(factors.values())).scaling
        upload = self.upload(factors)
        metrics = MetricRecord({key: float(v) for key, v in record.items() if _is_number(v)})
        content = RecordDict(
            {
                P.UPLOAD: encode(upload, self.config.comm_dtype),
                P.REPORT: ConfigRecord({"json": json.dumps(record)}),
                P.METRICS: metrics,
            }
        )
        return Message(content, reply_to=msg)

    def upload(self, factors: dict[str, ClientFactors]) -> dict[str, Tensor]:
        """What travels up, per method (as ``payload_params`` counts it): only R for Fed-SB, only B for FFA-LoRA."""
        if self.engine.is_sb:
            return {f"{n}.R": f.R for n, f in factors.items()}
        if self.engine.method.name == "ffa":
            return {f"{n}.B": f.B for n, f in factors.items()}
        return pack_factors({n: (f.B, f.A) for n, f in factors.items()})

    def fedsb_init(self, msg: Message, context: Context) -> Message:
        """Fed-SB (federated): this client's gradient estimate G_k on its first ``init_samples`` examples."""
        k, _ = node_partition(context, self.config)
        self.use_partition(k)
        examples = self.engine.data.clients[k]
        used = min(self.config.method.init_samples, len(examples))
        host = self.engine.host
        linears = linear_targets(self.engine.model, self.config.lora.target_modules, self.config.lora.r)
        with torch.no_grad():
            for name, weight in self.pristine.items():
                host.base_linear(name).weight.copy_(weight)
        with host.disable_adapter() if host.installed else nullcontext():
            _accumulate_gradients(
                self.engine.model,
                linears,
                [(list(examples[:used]), 1.0)],
                self.engine.data.collate,
                self.config.train.micro_batch_size,
            )
        grads = {}
        for name, linear in linears.items():
            grads[f"{name}.G"] = linear.weight.grad.detach().clone()
            linear.weight.grad = None
        report = {"id": k, "num_examples": len(examples), "samples": used}
        content = RecordDict(
            {P.UPLOAD: encode(grads, self.config.comm_dtype), P.REPORT: ConfigRecord({"json": json.dumps(report)})}
        )
        return Message(content, reply_to=msg)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# ----------------------------------------------------------------------------------- per-process cache

_RUNTIMES: dict[tuple[str, str | None], ClientRuntime] = {}


def runtime_for(context: Context, run_config: dict[str, Any] | None = None) -> ClientRuntime:
    """The cached runtime for this context's run config (one model per process, shared by its partitions)."""
    options = FlowerOptions.from_run_config({**context.run_config, **(run_config or {})})
    config = options.run_config()
    _, data_path = node_partition(context, config)
    key = (config.to_yaml(), data_path)
    if key not in _RUNTIMES:
        _RUNTIMES.clear()  # one model per process: a new run replaces the old one
        _RUNTIMES[key] = ClientRuntime(config, data_path)
    return _RUNTIMES[key]
