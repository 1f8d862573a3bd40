"""Shared pieces of the Flower tests: an in-process Grid, tiny configs, and comparisons with the engine."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def tiny_overrides(output_dir: Path, method: str, *extra: str) -> list[str]:
    """The tiny preset on the built-in commonsense data: 3 clients, 2 rounds, seconds per run."""
    return [f"output_dir={output_dir}", f"method.name={method}", "federation.rounds=2", *extra]


class LocalGrid(Grid):
    """Flower's Grid interface over ClientApps called in this process: one Context per node, as a SuperNode keeps.

    ``down`` holds node ids that never answer (a killed SuperNode); ``tamper`` rewrites a node's replies.
    """

    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: dict | None = None) -> None:
        self.app = client_app
        self.contexts = {
            1000 + i: Context(
                run_id=1,
                node_id=1000 + i,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for i in range(num_nodes)
        }
        self.down: set[int] = set()
        self.tamper: dict[int, Callable[[Message], Message]] = {}
        self.sent: list[Message] = []

    def set_run(self, run_id: int) -> None:  # pragma: no cover - not used by the strategy
        pass

    @property
    def run(self):  # pragma: no cover
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # pragma: no cover
        return Message(content, dst_node_id=dst_node_id, message_type=message_type)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.contexts if n not in self.down]

    def push_messages(self, messages):  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            if node in self.down:
                continue
            try:
                reply = self.app(msg, self.contexts[node])
            except Exception as err:  # the runtime turns a ClientApp exception into an error reply
                reply = Message(Error(code=1, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
            if node in self.tamper:
                reply = self.tamper[node](reply)
            replies.append(reply)
        return replies


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(Path(run_dir) / "adapter" / "adapter_model.safetensors")


def assert_same_global_adapter(a: Path, b: Path, atol: float = 1e-5) -> None:
    """The exported adapters reproduce the same global update ``sum_t B_t A_t`` per module (atol on the product)."""
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert set(ta) == set(tb)
    for key in ta:
        if key.endswith("lora_B.weight"):
            a_key = key.replace("lora_B", "lora_A")
            da = ta[key].double() @ ta[a_key].double()
            db = tb[key].double() @ tb[a_key].double()
            assert torch.allclose(da, db, atol=atol), (key, float((da - db).abs().max()))


def assert_same_bytes(engine_dir: Path, flower_dir: Path) -> None:
    """Per round and per client (and Fed-SB's one-time round 0), Flower's counted bytes equal the engine's."""
    me, mf = metrics(engine_dir), metrics(flower_dir)
    assert [m["round"] for m in me] == [m["round"] for m in mf]
    for e, f in zip(me, mf, strict=True):
        if e["round"] == 0:
            assert e.get("uplink_bytes", 0) == f.get("uplink_bytes", 0)
            assert e.get("downlink_bytes", 0) == f.get("downlink_bytes", 0)
            continue
        assert e["selected"] == f["selected"]
        assert e["uplink_bytes"] == f["uplink_bytes"] and e["downlink_bytes"] == f["downlink_bytes"], e["round"]
        for ce, cf in zip(e["clients"], f["clients"], strict=True):
            assert ce["id"] == cf["id"]
            assert ce["uplink_bytes"] == cf["uplink_bytes"] and ce["downlink_bytes"] == cf["downlink_bytes"]
            assert abs(ce["train_loss"] - cf["train_loss"]) < 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_env(home: Path) -> dict[str, str]:
    env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(home)}
    return env
