"""fedlora's methods as a Flower strategy: per-client messages, validated replies, the engine's own aggregation.

``FedLoraStrategy`` wraps an in-process ``Engine`` on the server: the engine holds the global model (base with
merges, global adapter), aggregates with the method object (``Engine.server_update``: the same code as
``fedlora run``), evaluates, checkpoints atomically and writes ``metrics.jsonl``. The strategy adds what a real
federation needs: the node <-> client map, messages tailored to each client (its rank's truncation, the merges
it has not applied yet, Fed-SB's R only), replies checked before use, retries, a minimum number of replies, and
bytes counted from the messages themselves.

The round loop is Flower's (``configure_train`` -> ``Grid.send_and_receive`` -> ``aggregate_train``) plus a
``query.sync`` exchange after each round that brings every client up to date (see ``fedlora.flower.protocol``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedlora.comm import fedsb_init_traffic
from fedlora.engine.local import Engine, RunError, RunSummary, select_clients, truncate
from fedlora.engine.seeding import mix_seed
from fedlora.engine.state import ServerState, save_state
from fedlora.flower import protocol as P
from fedlora.flower.messages import ReplyError, decode_checked, encode, pack_factors, payload_bytes, wire_bytes
from fedlora.flower.options import FlowerOptions
from fedlora.lora_sb import DEFAULT_NITER, DEFAULT_OVERSAMPLING, SBInit, _sign_svd_factors, linear_targets
from fedlora.lowrank import ClientFactors, lora_scaling, normalize_weights

log = logging.getLogger("fedlora.flower")


@dataclass
class ClientInfo:
    """What the server knows about client ``id``: its node and what it holds (from its hello and our syncs)."""

    id: int
    node_id: int
    num_examples: int
    synced: int = 0  # last round whose downlink it acknowledged
    steps: int = 0  # merged steps it holds
    has_frozen: bool = False  # Fed-SB's shared B and A


@dataclass
class Collected:
    """The valid replies of one round, by client, and what was rejected."""

    uploads: dict[int, dict[str, ClientFactors]] = field(default_factory=dict)
    records: dict[int, dict[str, Any]] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)


class FedLoraStrategy(Strategy):
    def __init__(self, engine: Engine, options: FlowerOptions) -> None:
        self.engine = engine
        self.options = options
        self.config = engine.config
        self.K = self.config.data.num_clients
        self.clients: dict[int, ClientInfo] = {}
        self.bad_nodes: dict[int, str] = {}
        self.state: ServerState | None = None
        self.catchup_bytes: dict[int, int] = {}

    # ------------------------------------------------------------------------------------ Flower hooks

    def summary(self) -> None:
        cfg = self.config
        log.info(
            "fedlora strategy: method %s %s, %d clients, fraction %s, %d rounds, min-replies %d, comm %s",
            self.engine.method.name,
            self.engine.method.options(),
            self.K,
            cfg.federation.client_fraction,
            cfg.federation.rounds,
            self.options.min_replies,
            cfg.comm_dtype,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord | None, config: ConfigRecord | None, grid: Grid
    ) -> Iterable[Message]:
        """One message per selected client with a node: its id and round, plus what it missed while away."""
        cfg = self.config
        selected = select_clients(self.K, cfg.federation.client_fraction, cfg.seed, server_round)
        return [self.train_message(server_round, k) for k in selected if k in self.clients]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate the replies and aggregate the valid ones (Flower's hook; the round loop uses ``collect``)."""
        collected = self.collect(server_round, replies)
        if not collected.uploads:
            return None, None
        record = self.aggregate(server_round, collected)
        return None, MetricRecord({"train_loss": float(record["train_loss"]), "clients": len(collected.uploads)})

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []  # the global model is evaluated on the server's held-out set, as in fedlora run

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    # ----------------------------------------------------------------------------------------- nodes

    def connect(self, grid: Grid, *, wait: bool) -> None:
        """Say hello to nodes not seen yet; with ``wait``, until every partition has a node (or time runs out)."""
        deadline = time.monotonic() + self.options.connect_timeout
        while True:
            known = {c.node_id for c in self.clients.values()} | set(self.bad_nodes)
            new = [n for n in grid.get_node_ids() if n not in known]
            if new:
                messages = [_request(P.HELLO, n) for n in new]
                for reply in grid.send_and_receive(messages, timeout=self.options.round_timeout):
                    self._register(reply)
            if not wait or len(self.clients) >= self.K:
                return
            if time.monotonic() > deadline:
                missing = sorted(set(range(self.K)) - set(self.clients))
                raise RunError(
                    f"after {self.options.connect_timeout:.0f} s only {len(self.clients)} of {self.K} partitions have "
                    f"a node; missing partition-id(s) {missing}. Start one SuperNode per partition with --node-config "
                    f"'partition-id=<k> num-partitions={self.K}'" + self._bad_nodes_text()
                )
            time.sleep(0.5)

    def _register(self, reply: Message) -> None:
        node = reply.metadata.src_node_id
        try:
            if reply.has_error():
                raise ReplyError(f"node {node}: {reply.error.reason}")
            report = _report(reply, f"node {node}")
            k = int(report["id"])
            if not 0 <= k < self.K:
                raise ReplyError(f"node {node}: partition-id {k} is not in 0..{self.K - 1}")
        except (ReplyError, KeyError, ValueError, TypeError) as err:
            self.bad_nodes[node] = str(err)
            log.error("ignoring node %s: %s", node, err)
            return
        old = self.clients.get(k)
        if old is not None and old.node_id != node:
            log.warning("partition %d moved from node %s to node %s (a restarted SuperNode)", k, old.node_id, node)
        self.clients[k] = ClientInfo(
            id=k,
            node_id=node,
            num_examples=int(report["num_examples"]),
            synced=int(report["synced"]),
            steps=int(report["steps"]),
            has_frozen=bool(report["has_frozen"]),
        )

    def _bad_nodes_text(self) -> str:
        if not self.bad_nodes:
            return ""
        return "; rejected nodes: " + "; ".join(f"{n}: {why}" for n, why in self.bad_nodes.items())

    # ------------------------------------------------------------------------------------------ messages

    def train_message(self, round_: int, k: int) -> Message:
        config: dict[str, Any] = {"round": round_, "client": k, "synced": self.state.round}
        content = self.catchup(k, config)
        content[P.CONFIG] = ConfigRecord(config)
        self.catchup_bytes[k] = payload_bytes(content)
        return Message(content, dst_node_id=self.clients[k].node_id, message_type=P.TRAIN)

    def catchup(self, k: int, config: dict[str, Any]) -> RecordDict:
        """What client ``k`` lacks to start from the current global state (empty when it is up to date).

        A client ahead of the server (the server resumed from a checkpoint older than the client's last sync) is
        told to drop the steps the server no longer has (``keep_steps``) and gets the current start again.
        """
        state, info = self.state, self.clients[k]
        held = len(state.history)
        content = RecordDict()
        if info.steps > held or info.synced > state.round:
            config["keep_steps"] = held
            content = self.downlink(k, [], first_step=held)
        elif info.steps < held:
            content = self.downlink(k, state.history[info.steps :], first_step=info.steps)
        elif info.synced < state.round:
            content = self.downlink(k, [], first_step=info.steps)
        if self.engine.is_sb and not info.has_frozen and self.config.method.init_mode != "seeded":
            content[P.FROZEN] = self._frozen_record(state.global_R)
        return content

    def downlink(self, k: int, new_steps: list, first_step: int) -> RecordDict:
        """The merges, start adapter or R that client ``k`` receives (as ``Engine._downlink_params`` counts)."""
        engine, state, dtype = self.engine, self.state, self.config.comm_dtype
        content = RecordDict()
        for i, step in enumerate(new_steps):
            content[f"{P.STEP}{first_step + i}"] = encode(pack_factors(step), dtype)
        if engine.is_sb:
            content[P.R] = encode({f"{n}.R": R for n, R in state.global_R.items()}, dtype)
        elif not engine.method.merges_into_base and state.global_adapter is not None:
            rank = self.config.lora.rank_of(k)
            start = {n: truncate(f, rank) for n, f in state.global_adapter.items()}
            if engine.method.name == "ffa":  # A is shared and frozen: only B travels
                content[P.START] = encode({f"{n}.B": B for n, (B, _) in start.items()}, dtype)
            else:
                content[P.START] = encode(pack_factors(start), dtype)
        return content

    def _frozen_record(self, R: dict[str, torch.Tensor]) -> ArrayRecord:
        tensors = pack_factors(self.state.frozen)
        tensors.update({f"{n}.R": r for n, r in R.items()})
        return encode(tensors, self.config.comm_dtype)

    def sync(self, grid: Grid, round_: int, new_steps: list, first_step: int) -> dict[int, int]:
        """Send round ``round_``'s downlink to every client with a node; returns bytes per acknowledging client."""
        sent: dict[int, int] = {}
        messages = []
        for k, info in sorted(self.clients.items()):
            if info.steps != first_step:  # behind (or ahead after a resume): it catches up when next selected
                continue
            content = self.downlink(k, new_steps, first_step)
            content[P.CONFIG] = ConfigRecord({"round": round_, "synced": round_, "first_step": first_step})
            sent[k] = payload_bytes(content)
            messages.append(Message(content, dst_node_id=info.node_id, message_type=P.SYNC))
        acked = self._acks(grid, messages, "sync")
        for k in acked:
            self.clients[k].synced = round_
            self.clients[k].steps = first_step + len(new_steps)
        return {k: sent[k] for k in acked}

    def _acks(self, grid: Grid, messages: list[Message], what: str) -> list[int]:
        by_node = {info.node_id: k for k, info in self.clients.items()}
        acked = []
        for reply in grid.send_and_receive(messages, timeout=self.options.round_timeout):
            k = by_node.get(reply.metadata.src_node_id)
            if k is None:
                continue
            if reply.has_error():
                log.warning("client %d did not take the %s: %s", k, what, reply.error.reason)
                continue
            acked.append(k)
        missing = sorted({by_node[m.metadata.dst_node_id] for m in messages} - set(acked))
        if missing:
            log.warning("clients %s did not acknowledge the %s; they catch up when next selected", missing, what)
        return sorted(acked)

    # ------------------------------------------------------------------------------------------ replies

    def expected_upload(self, k: int) -> dict[str, tuple[int, ...]]:
        """Names and shapes client ``k``'s upload must have (as ``payload_params`` counts it)."""
        rank = self.config.lora.rank_of(k)
        out: dict[str, tuple[int, ...]] = {}
        for name, (m, n) in self.engine.shapes.items():
            if self.engine.is_sb:
                out[f"{name}.R"] = (rank, rank)
            else:
                out[f"{name}.B"] = (m, rank)
                if self.engine.method.name != "ffa":
                    out[f"{name}.A"] = (rank, n)
        return out

    def expected_scaling(self, k: int) -> float:
        lora = self.config.lora
        return 1.0 if self.engine.is_sb else lora_scaling(lora.alpha_of(k), lora.rank_of(k), lora.use_rslora)

    def parse_train_reply(self, k: int, reply: Message) -> tuple[dict[str, ClientFactors], dict[str, Any]]:
        """Client ``k``'s factors and record from its reply; ``ReplyError`` for anything unusable."""
        who = f"client {k} (node {reply.metadata.src_node_id})"
        if reply.has_error():
            raise ReplyError(f"{who}: the ClientApp failed: {reply.error.reason}")
        record = _report(reply, who)
        if record.get("id") != k:
            raise ReplyError(f"{who}: the reply is for client {record.get('id')!r}")
        examples = record.get("num_examples")
        if not isinstance(examples, int) or isinstance(examples, bool) or examples < 1:
            raise ReplyError(f"{who}: num_examples must be a positive integer, got {examples!r}")
        loss = record.get("train_loss")
        if not isinstance(loss, int | float) or not math.isfinite(loss):
            raise ReplyError(f"{who}: train_loss must be a finite number, got {loss!r}")
        scaling = self.expected_scaling(k)
        if not math.isclose(float(record.get("scaling", math.nan)), scaling, rel_tol=1e-6):
            raise ReplyError(
                f"{who}: LoRA scaling {record.get('scaling')!r} differs from the server's {scaling} "
                "(client and server run different lora settings)"
            )
        upload = reply.content.array_records.get(P.UPLOAD)
        tensors = decode_checked(upload, self.expected_upload(k), self.config.comm_dtype, who)
        factors = {}
        for name in self.engine.shapes:
            # Copies of what the server holds, as an upload is in-process (the checkpoint refuses shared tensors).
            if self.engine.is_sb:
                B, A = self.state.frozen[name]
                factors[name] = ClientFactors(B.clone(), A.clone(), scaling, tensors[f"{name}.R"])
            elif self.engine.method.name == "ffa":
                A = truncate(self.state.global_adapter[name], self.config.lora.rank_of(k))[1]
                factors[name] = ClientFactors(tensors[f"{name}.B"], A.clone(), scaling)
            else:
                factors[name] = ClientFactors(tensors[f"{name}.B"], tensors[f"{name}.A"], scaling)
        record["uplink_bytes"] = payload_bytes(upload)
        record["uplink_params"] = record["uplink_bytes"] // self.engine.bytes_per_value
        record["uplink_wire_bytes"] = upload.count_bytes()
        return factors, record

    def collect(self, round_: int, replies: Iterable[Message], into: Collected | None = None) -> Collected:
        """Sort replies into valid uploads and failures; a bad reply is logged and dropped, never raised."""
        out = into or Collected()
        by_node = {info.node_id: k for k, info in self.clients.items()}
        for reply in replies:
            k = by_node.get(reply.metadata.src_node_id)
            if k is None:
                log.warning("round %d: reply from unknown node %s ignored", round_, reply.metadata.src_node_id)
                continue
            try:
                factors, record = self.parse_train_reply(k, reply)
            except ReplyError as err:
                out.failures[k] = str(err)
                log.error("round %d: rejected the reply of client %d: %s", round_, k, err)
                continue
            record["downlink_catchup_bytes"] = self.catchup_bytes.get(k, 0)
            out.uploads[k], out.records[k] = factors, record
            out.failures.pop(k, None)
            info = self.clients[k]  # it trained from the current global state, so it holds it now
            info.steps, info.synced = len(self.state.history), self.state.round
            info.has_frozen = info.has_frozen or self.engine.is_sb
        return out

    def aggregate(self, round_: int, collected: Collected) -> dict[str, Any]:
        """The engine's server step on the valid uploads (in client order: the same sums as in-process)."""
        order = sorted(collected.uploads)
        return self.engine.server_update(
            round_, self.state, [collected.records[k] for k in order], [collected.uploads[k] for k in order]
        )

    # -------------------------------------------------------------------------------------- the run

    def run_round(self, grid: Grid, round_: int) -> dict[str, Any]:
        cfg, opts = self.config, self.options
        selected = select_clients(self.K, cfg.federation.client_fraction, cfg.seed, round_)
        collected = Collected()
        self.catchup_bytes = {}
        pending = list(selected)
        for attempt in range(opts.max_retries + 1):
            if attempt:
                log.warning("round %d: retrying clients %s (attempt %d)", round_, pending, attempt + 1)
                self.connect(grid, wait=False)  # a restarted SuperNode comes back as a new node
            messages = [self.train_message(round_, k) for k in pending if k in self.clients]
            for k in pending:
                if k not in self.clients:
                    collected.failures[k] = f"client {k}: no node connected for partition {k}"
            replies = list(grid.send_and_receive(messages, timeout=opts.round_timeout)) if messages else []
            self.collect(round_, replies, collected)
            for m in messages:
                k = next(c for c, i in self.clients.items() if i.node_id == m.metadata.dst_node_id)
                if k not in collected.uploads and k not in collected.failures:
                    collected.failures[k] = f"client {k}: no reply within {opts.round_timeout:.0f} s"
            pending = [k for k in selected if k not in collected.uploads]
            if not pending:
                break
        needed = min(opts.min_replies, len(selected))
        if len(collected.uploads) < needed:
            raise RunError(
                f"round {round_}: only {len(collected.uploads)} of {len(selected)} selected clients replied with valid "
                f"tensors (min-replies={opts.min_replies}); failures: "
                + "; ".join(collected.failures[k] for k in sorted(collected.failures))
                + f". The checkpoint holds round {round_ - 1}; fix the clients and rerun with run config resume=true"
            )
        steps_before = len(self.state.history)
        record = self.aggregate(round_, collected)
        new_steps = self.state.history[steps_before:]
        down = self.sync(grid, round_, new_steps, steps_before)
        for rec in record["clients"]:
            k = rec["id"]
            rec["downlink_bytes"] = down.get(k, 0) + rec.pop("downlink_catchup_bytes", 0)
            rec["downlink_params"] = rec["downlink_bytes"] // self.engine.bytes_per_value
        record["uplink_bytes"] = sum(r["uplink_bytes"] for r in record["clients"])
        record["downlink_bytes"] = sum(down.values()) + sum(self.catchup_bytes.get(k, 0) for k in collected.uploads)
        record["sync_bytes"] = {str(k): b for k, b in sorted(down.items())}
        failed = {k: why for k, why in collected.failures.items() if k not in collected.uploads}
        if failed:
            record["failed"] = {str(k): why for k, why in sorted(failed.items())}
        return record

    def fedsb_init(self, grid: Grid) -> dict[str, Any]:
        """Fed-SB's one-time agreement on B and A; returns the bytes of round 0 counted from the messages."""
        engine, cfg = self.engine, self.config
        if cfg.method.init_mode == "seeded":  # every client derives B and A from the shared seed: nothing travels
            self.state = engine._initial_sb_state(ServerState())
            return {"uplink_bytes": 0, "downlink_bytes": 0}
        start = time.perf_counter()
        messages = [_request(P.FEDSB_INIT, info.node_id) for _, info in sorted(self.clients.items())]
        linears = linear_targets(engine.model, cfg.lora.target_modules, cfg.lora.r)
        expected = {f"{n}.G": tuple(lin.weight.shape) for n, lin in linears.items()}
        grads, reports, up = {}, {}, 0
        by_node = {info.node_id: k for k, info in self.clients.items()}
        for reply in grid.send_and_receive(messages, timeout=self.options.round_timeout):
            k = by_node.get(reply.metadata.src_node_id)
            who = f"client {k} (node {reply.metadata.src_node_id})"
            try:
                if reply.has_error():
                    raise ReplyError(f"{who}: the ClientApp failed: {reply.error.reason}")
                report = _report(reply, who)
                grads[k] = decode_checked(reply.content.array_records.get(P.UPLOAD), expected, cfg.comm_dtype, who)
                reports[k] = report
                up += payload_bytes(reply.content[P.UPLOAD])
            except ReplyError as err:
                log.error("Fed-SB init: rejected %s", err)
        if len(grads) < min(self.options.min_replies, self.K):
            raise RunError(
                f"Fed-SB init: only {len(grads)} of {self.K} clients sent a valid gradient estimate "
                f"(min-replies={self.options.min_replies})"
            )
        order = sorted(grads)
        if cfg.federation.weighting == "uniform":
            p = normalize_weights([1.0] * len(order))
        else:
            p = normalize_weights([float(reports[k]["num_examples"]) for k in order])
        seed = mix_seed(cfg.seed, "fedsb-init")
        factors = {}
        for name, linear in linears.items():
            total = torch.zeros_like(linear.weight)
            for k, w in zip(order, p.tolist(), strict=True):
                total += grads[k][f"{name}.G"].to(total.dtype) * w
            linear.weight.grad = total  # the sum of the clients' weighted estimates, then the engine's own step
            factors[name] = _sign_svd_factors(
                name, linear, cfg.lora.r, cfg.train.learning_rate, seed, DEFAULT_OVERSAMPLING, DEFAULT_NITER
            )
        uplink = downlink = 0
        for linear in linears.values():
            u, d = fedsb_init_traffic("federated", linear.out_features, linear.in_features, cfg.lora.r)
            uplink, downlink = uplink + u, downlink + d
        weights = dict(zip(order, p.tolist(), strict=True))
        engine.sb_init = SBInit(
            factors=factors,
            mode="federated",
            rank=cfg.lora.r,
            learning_rate=float(cfg.train.learning_rate),
            seed=seed,
            non_federated=False,
            uplink_params_per_client=uplink,
            downlink_params_per_client=downlink,
            samples_per_client=[int(reports[k]["samples"]) if k in reports else 0 for k in range(self.K)],
            client_weights=[weights.get(k, 0.0) for k in range(self.K)],
            seconds=time.perf_counter() - start,
        )
        self.state = engine.install_sb_init(ServerState())
        frozen = self._frozen_record(self.state.global_R)
        sync = [
            Message(
                RecordDict({P.CONFIG: ConfigRecord({"round": 0, "synced": 0}), P.FROZEN: frozen}),
                dst_node_id=info.node_id,
                message_type=P.SYNC,
            )
            for _, info in sorted(self.clients.items())
        ]
        acked = self._acks(grid, sync, "Fed-SB init")
        for k in acked:
            self.clients[k].has_frozen = True
        down = sum(payload_bytes(m.content) for m in sync if by_node[m.metadata.dst_node_id] in acked)
        return {"uplink_bytes": up, "downlink_bytes": down}

    def start(self, grid: Grid, *args: Any, **kwargs: Any) -> RunSummary:  # type: ignore[override]
        """The whole run: prepare, connect, (Fed-SB init), rounds with checkpoints, export. Returns the summary."""
        t0 = time.perf_counter()
        engine, cfg = self.engine, self.config
        engine.prepare()
        self.summary()
        resumed = engine.resume
        if resumed or not engine.is_sb:
            self.state = engine._initial_state()
        self.connect(grid, wait=True)
        metrics = engine._metrics_so_far(self.state.round if self.state is not None else 0)
        traffic = self.fedsb_init(grid) if not resumed and engine.is_sb else None
        if self.state.round == 0 and not any(m["round"] == 0 for m in metrics):
            record = engine.round0_record(self.state)
            if traffic is not None:
                record.update(traffic)
            metrics.append(engine._write_metrics(record))
        for round_ in range(self.state.round + 1, cfg.federation.rounds + 1):
            log.info("round %d/%d", round_, cfg.federation.rounds)
            self.connect(grid, wait=False)
            record = self.run_round(grid, round_)
            self.state.round = round_
            if engine._evaluate_now(round_):
                record["eval"] = engine._evaluate(self.state)
            save_state(engine.run_dir, self.state)
            metrics.append(engine._write_metrics(record))
        engine._export(self.state)
        return engine._summary(metrics, time.perf_counter() - t0)


def _request(kind: str, node_id: int) -> Message:
    return Message(RecordDict({P.CONFIG: ConfigRecord({"round": 0})}), dst_node_id=node_id, message_type=kind)


def _report(reply: Message, who: str) -> dict[str, Any]:
    try:
        report = json.loads(reply.content[P.REPORT]["json"])
    except (KeyError, TypeError, ValueError) as err:
        raise ReplyError(f"{who}: the reply has no readable report ({err})") from None
    if not isinstance(report, dict):
        raise ReplyError(f"{who}: the report must be a JSON object")
    return report


def wire_total(messages: Iterable[Message]) -> int:
    """Flower's byte count (with framing) of messages' arrays: for logs beside the payload counts."""
    return sum(wire_bytes(m.content) for m in messages)
