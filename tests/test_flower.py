"""The Flower app: messages, validation, and the whole protocol on an in-process Grid against the engine."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedlora.config import ConfigError, load_config
from fedlora.engine.local import Engine, RunError
from fedlora.engine.state import load_state
from fedlora.flower import protocol as P
from fedlora.flower.client_app import make_client_app
from fedlora.flower.messages import ReplyError, decode, decode_checked, encode, payload_bytes
from fedlora.flower.options import FlowerOptions
from fedlora.flower.server_app import run_server
from flower_helpers import LocalGrid, assert_same_bytes, assert_same_global_adapter, metrics


@pytest.fixture(autouse=True)
def task_identity():
    """Messages made outside a Flower runtime need a run id and node id (the runtime sets them)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


# ------------------------------------------------------------------------------------------- messages


@pytest.mark.parametrize(("dtype", "item"), [("fp32", 4), ("fp16", 2), ("bf16", 2)])
def test_encode_decode_and_payload_bytes(dtype: str, item: int) -> None:
    tensors = {
        "model.layers.0.self_attn.q_proj.B": torch.randn(6, 2),
        "model.layers.0.self_attn.q_proj.A": torch.ones(2, 5),
    }
    record = encode(tensors, dtype)
    assert payload_bytes(record) == (12 + 10) * item
    assert record.count_bytes() > payload_bytes(record)  # Flower's count adds NumPy headers and keys
    back = decode(record)
    ref = {
        k: v.to({"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]).float()
        for k, v in tensors.items()
    }
    assert all(torch.equal(back[k], ref[k]) for k in tensors)
    expected = {k: tuple(v.shape) for k, v in tensors.items()}
    assert set(decode_checked(record, expected, dtype, "client 0")) == set(tensors)


def _record(**arrays: torch.Tensor) -> ArrayRecord:
    return encode(arrays)


@pytest.mark.parametrize(
    ("record", "match"),
    [
        (_record(**{"m.B": torch.zeros(4, 2)}), r"missing \['m.A'\]"),
        (
            _record(**{"m.B": torch.zeros(4, 2), "m.A": torch.zeros(2, 3), "x.B": torch.zeros(1)}),
            r"unexpected \['x.B'\]",
        ),
        (_record(**{"m.B": torch.zeros(4, 3), "m.A": torch.zeros(2, 3)}), r"m.B has shape \(4, 3\), expected \(4, 2\)"),
        (encode({"m.B": torch.zeros(4, 2), "m.A": torch.zeros(2, 3)}, "fp16"), "dtype float16, expected float32"),
        (
            _record(**{"m.B": torch.zeros(4, 2), "m.A": torch.tensor([[0.0, math.nan, 0], [0, 0, 0]])}),
            "m.A contains NaN",
        ),
        (_record(**{"m.B": torch.full((4, 2), math.inf), "m.A": torch.zeros(2, 3)}), "m.B contains NaN or Inf"),
        (None, "holds no tensors"),
    ],
)
def test_validation_rejects_bad_tensors(record, match: str) -> None:
    with pytest.raises(ReplyError, match=match):
        decode_checked(record, {"m.B": (4, 2), "m.A": (2, 3)}, "fp32", "client 1")


def test_validation_rejects_lying_metadata() -> None:
    record = ArrayRecord()
    good = Array(torch.zeros(2, 3).numpy())
    record["m.A"] = Array(dtype="float32", shape=(3, 2), stype=good.stype, data=good.data)  # declares 3x2, holds 2x3
    with pytest.raises(ReplyError, match="holds shape"):
        decode_checked(record, {"m.A": (3, 2)}, "fp32", "client 1")
    record["m.A"] = Array(dtype="float32", shape=(3, 2), stype=good.stype, data=b"garbage")
    with pytest.raises(ReplyError, match="cannot be decoded"):
        decode_checked(record, {"m.A": (3, 2)}, "fp32", "client 1")


def test_run_config_keys() -> None:
    opts = FlowerOptions.from_run_config({"config": "tiny", "overrides": "method.name=flora federation.rounds=1"})
    assert opts.run_config().method.name == "flora" and opts.run_config().federation.rounds == 1
    with pytest.raises(ConfigError, match="unknown Flower run config key"):
        FlowerOptions.from_run_config({"confg": "tiny"})
    with pytest.raises(ConfigError, match=r"federation\.round"):
        FlowerOptions.from_run_config({"config": "tiny", "overrides": "federation.round=1"}).run_config()
    with pytest.raises(ConfigError, match="min-replies"):
        FlowerOptions.from_run_config({"min-replies": 0})


# ------------------------------------------------------------------------- the protocol vs the engine


def run_both(tmp_path: Path, method: str, *extra: str, grid_setup=None, run_config: dict | None = None):
    """The same config in-process and through the Flower apps on an in-process Grid; returns both run folders."""
    engine_dir, flower_dir = tmp_path / "engine", tmp_path / "flower"
    base = [f"method.name={method}", "federation.rounds=2", *extra]
    Engine(load_config("tiny", [f"output_dir={engine_dir}", *base]), progress=False).run()
    overrides = " ".join([f"output_dir={flower_dir}", *base])
    config = {"config": "tiny", "overrides": overrides, **(run_config or {})}
    grid = LocalGrid(make_client_app(), 3, config)
    if grid_setup is not None:
        grid_setup(grid)
    run_server(grid, config)
    return engine_dir, flower_dir, grid


@pytest.mark.parametrize("method", ["fedit", "flora", "florist", "fedsb", "flexlora", "ffa", "fedex"])
def test_flower_protocol_equals_engine(tmp_path: Path, method: str) -> None:
    engine_dir, flower_dir, _ = run_both(tmp_path, method)
    assert_same_global_adapter(engine_dir, flower_dir)
    assert_same_bytes(engine_dir, flower_dir)
    assert (flower_dir / "config.yaml").is_file() and load_state(flower_dir).round == 2


@pytest.mark.parametrize("method", ["fedit", "flora", "florist"])
def test_flower_protocol_heterogeneous_ranks(tmp_path: Path, method: str) -> None:
    engine_dir, flower_dir, _ = run_both(tmp_path, method, "lora.heterogeneous=true", "lora.local_ranks=[8,4,2]")
    assert_same_global_adapter(engine_dir, flower_dir)
    assert_same_bytes(engine_dir, flower_dir)


def test_partial_participation_catches_up(tmp_path: Path) -> None:
    """Half the clients per round: every client still receives every merge (sync), so the math is the engine's."""
    engine_dir, flower_dir, _ = run_both(tmp_path, "flora", "federation.client_fraction=0.5", "federation.rounds=3")
    assert_same_global_adapter(engine_dir, flower_dir)
    assert_same_bytes(engine_dir, flower_dir)


# ------------------------------------------------------------------------------------------ faults


def _nan_reply(reply: Message) -> Message:
    upload = reply.content[P.UPLOAD]
    key = sorted(upload)[0]
    bad = torch.full(tuple(upload[key].shape), math.nan).numpy()
    upload[key] = Array(bad)
    return reply


def _wrong_shape_reply(reply: Message) -> Message:
    upload = reply.content[P.UPLOAD]
    key = sorted(upload)[0]
    upload[key] = Array(torch.zeros(3, 3).numpy())
    return reply


@pytest.mark.parametrize("tamper", [_nan_reply, _wrong_shape_reply])
def test_malformed_reply_is_rejected_and_the_round_goes_on(tmp_path: Path, caplog, tamper) -> None:
    def setup(grid: LocalGrid) -> None:
        node = 1001  # partition 1
        grid.tamper[node] = lambda r: tamper(r) if r.metadata.message_type == P.TRAIN and r.has_content() else r

    caplog.set_level(logging.ERROR, logger="fedlora.flower")
    _, flower_dir, _ = run_both(tmp_path, "fedit", grid_setup=setup, run_config={"max-retries": 0})
    for m in metrics(flower_dir)[1:]:
        assert m["selected"] == [0, 2] and "client 1" in m["failed"]["1"]
    assert any("rejected the reply of client 1" in r.message for r in caplog.records)
    assert load_state(flower_dir).round == 2


def test_reweighting_over_the_clients_that_replied(tmp_path: Path) -> None:
    """With client 1 down, round 1 equals the engine's aggregation of clients 0 and 2 alone (weights renormalised)."""
    engine = Engine(
        load_config("tiny", [f"output_dir={tmp_path / 'e'}", "method.name=flora", "federation.rounds=1"]),
        progress=False,
    )
    captured = []
    real = engine.server_update

    def drop_client_1(round_, state, records, uploads):
        keep = [i for i, r in enumerate(records) if r["id"] != 1]
        captured.append(keep)
        return real(round_, state, [records[i] for i in keep], [uploads[i] for i in keep])

    engine.server_update = drop_client_1  # type: ignore[method-assign]
    engine.run()
    config = {
        "config": "tiny",
        "overrides": f"output_dir={tmp_path / 'f'} method.name=flora federation.rounds=1",
        "max-retries": 0,
    }
    grid = LocalGrid(make_client_app(), 3, config)
    grid.down.add(1001)
    grid.contexts[1001].node_config["partition-id"] = 1
    grid_ids = grid.get_node_ids  # client 1 says hello, then dies before round 1

    calls = {"n": 0}

    def get_ids():
        calls["n"] += 1
        return list(grid.contexts) if calls["n"] == 1 else grid_ids()

    grid.get_node_ids = get_ids  # type: ignore[method-assign]
    grid.down.discard(1001)
    real_send = grid.send_and_receive

    def send(messages, *, timeout=None):
        messages = list(messages)
        if messages and messages[0].metadata.message_type == P.TRAIN:
            grid.down.add(1001)
        return real_send(messages, timeout=timeout)

    grid.send_and_receive = send  # type: ignore[method-assign]
    run_server(grid, config)
    assert_same_global_adapter(tmp_path / "e", tmp_path / "f")
    assert metrics(tmp_path / "f")[1]["selected"] == [0, 2]


def test_too_few_replies_stops_with_a_clear_message_and_an_intact_checkpoint(tmp_path: Path) -> None:
    overrides = f"output_dir={tmp_path / 'run'} method.name=florist federation.rounds=2"
    config = {"config": "tiny", "overrides": overrides, "min-replies": 3, "max-retries": 1}
    grid = LocalGrid(make_client_app(), 3, config)
    real_send = grid.send_and_receive
    trains = {"n": 0}

    def send(messages, *, timeout=None):
        messages = list(messages)
        if messages and messages[0].metadata.message_type == P.TRAIN:
            trains["n"] += 1
            if trains["n"] in (2, 3):  # round 2 and its retry: partition 2 is gone
                grid.down.add(1002)
        return real_send(messages, timeout=timeout)

    grid.send_and_receive = send  # type: ignore[method-assign]
    with pytest.raises(RunError, match=r"round 2: only 2 of 3 selected clients replied.*min-replies=3.*client 2"):
        run_server(grid, config)
    state = load_state(tmp_path / "run")
    assert state.round == 1 and len(state.history) == 1
    assert [m["round"] for m in metrics(tmp_path / "run")] == [0, 1]
    # The client comes back: the run resumes from its checkpoint and finishes.
    grid.down.clear()
    run_server(grid, {**config, "resume": True})
    assert load_state(tmp_path / "run").round == 2


def test_client_with_a_bad_node_config_is_reported(tmp_path: Path) -> None:
    config = {
        "config": "tiny",
        "overrides": f"output_dir={tmp_path / 'run'} federation.rounds=1",
        "connect-timeout": 1.0,
    }
    grid = LocalGrid(make_client_app(), 3, config)
    grid.contexts[1002].node_config["partition-id"] = 7
    with pytest.raises(RunError, match=r"missing partition-id\(s\) \[2\].*partition-id=7"):
        run_server(grid, config)


def test_pooled_fedsb_init_is_refused(tmp_path: Path) -> None:
    config = {
        "config": "tiny",
        "overrides": f"output_dir={tmp_path / 'run'} method.name=fedsb method.init_mode=pooled",
        "connect-timeout": 1.0,
    }
    grid = LocalGrid(make_client_app(), 3, config)
    with pytest.raises(RunError, match="init_mode=pooled"):
        run_server(grid, config)


def test_fabricated_train_reply_for_the_wrong_client(tmp_path: Path) -> None:
    """A reply that claims another client's id is rejected (no crash), through the strategy's parser."""
    from fedlora.flower.strategy import FedLoraStrategy

    config = load_config("tiny", [f"output_dir={tmp_path / 'run'}", "method.name=fedit"])
    engine = Engine(config, progress=False)
    engine.prepare()
    strategy = FedLoraStrategy(engine, FlowerOptions(config="tiny"))
    strategy.state = engine._initial_state()
    msg = Message(RecordDict({P.CONFIG: ConfigRecord({"round": 1})}), dst_node_id=5, message_type=P.TRAIN)
    reply = Message(RecordDict({P.REPORT: ConfigRecord({"json": '{"id": 2, "num_examples": 4}'})}), reply_to=msg)
    with pytest.raises(ReplyError, match="is for client 2"):
        strategy.parse_train_reply(1, reply)
    reply = Message(RecordDict({P.REPORT: ConfigRecord({"json": "[]"})}), reply_to=msg)
    with pytest.raises(ReplyError, match="JSON object"):
        strategy.parse_train_reply(1, reply)
