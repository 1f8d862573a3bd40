"""The in-process engine on the tiny random model: every method, merges, resume, export, bad input."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from fedlora.config import ConfigError, load_config
from fedlora.engine.local import Engine, RunError, select_clients
from fedlora.engine.state import load_state
from fedlora.models import load_model

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu"]


def write_seed_folder(folder: Path, num_clients: int, per_client: int = 6) -> Path:
    """The seeds' layout: local_training_{k}.json and global_test.json, Alpaca-style records."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)

    def record(i: int) -> dict:
        pick = [WORDS[j] for j in torch.randint(0, len(WORDS), (6,), generator=gen).tolist()]
        return {
            "instruction": f"Repeat the words {i}: " + " ".join(pick[:3]),
            "input": "",
            "output": " ".join(pick),
            "category": f"cat{i % 3}",
        }

    for k in range(num_clients):
        (folder / f"local_training_{k}.json").write_text(json.dumps([record(k * 100 + i) for i in range(per_client)]))
    (folder / "global_test.json").write_text(json.dumps([record(1000 + i) for i in range(5)]))
    return folder


def tiny_config(tmp_path: Path, *overrides: str, clients: int = 3):
    data = write_seed_folder(tmp_path / "data", clients)
    return load_config(
        "tiny",
        [
            f"output_dir={tmp_path / 'run'}",
            f"data.source={data}",
            "data.template=alpaca",
            "data.max_examples_per_category=null",
            f"data.num_clients={clients}",
            "federation.rounds=1",
            *overrides,
        ],
    )


def run_engine(config) -> Engine:
    engine = Engine(config, progress=False)
    engine.run()
    return engine


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


HOMOGENEOUS = ["fedit", "flora", "florist", "flexlora", "ffa", "fedex", "fedsb"]
HETEROGENEOUS = ["fedit", "flora", "florist", "flexlora"]


@pytest.mark.parametrize("method", HOMOGENEOUS)
def test_one_round_homogeneous(tmp_path: Path, method: str) -> None:
    engine = run_engine(tiny_config(tmp_path, f"method.name={method}"))
    run_dir = engine.run_dir
    lines = metrics(run_dir)
    assert [m["round"] for m in lines] == [0, 1]
    round1 = lines[1]
    assert {c["id"] for c in round1["clients"]} == {0, 1, 2}
    for c in round1["clients"]:
        assert c["num_examples"] == 6 and c["uplink_bytes"] > 0 and c["downlink_bytes"] > 0
        assert torch.isfinite(torch.tensor(c["train_loss"]))
    assert "eval_loss" in lines[0]["eval"] and "eval_loss" in round1["eval"]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "config.yaml").is_file()
    if method == "florist":
        assert set(round1["global_ranks"]) == set(engine.host.layers())


@pytest.mark.parametrize("method", HETEROGENEOUS)
def test_one_round_heterogeneous(tmp_path: Path, method: str) -> None:
    engine = run_engine(
        tiny_config(tmp_path, f"method.name={method}", "lora.heterogeneous=true", "lora.local_ranks=[8,4,2]")
    )
    ranks = {c["id"]: c["rank"] for c in metrics(engine.run_dir)[1]["clients"]}
    assert ranks == {0: 8, 1: 4, 2: 2}


@pytest.mark.parametrize("method", ["flora", "florist"])
def test_merge_adds_exact_weighted_sum(tmp_path: Path, method: str) -> None:
    """After a FLoRA or FLoRIST(tau = 1) round: base = old base + sum_k p_k s_k B_k A_k of the trained adapters."""
    config = tiny_config(
        tmp_path, f"method.name={method}", "method.threshold=1.0", "lora.heterogeneous=true", "lora.local_ranks=[4,2,3]"
    )
    engine = Engine(config, progress=False)
    captured: list = []
    real_aggregate = engine.method.aggregate

    def capture(clients, weights, module="module"):
        captured.append((module, list(clients), list(weights)))
        return real_aggregate(clients, weights, module)

    engine.method.aggregate = capture  # type: ignore[method-assign]
    engine.run()
    fresh = load_model("tiny-llama", seed=config.seed).model
    for module, clients, weights in captured:
        p = torch.tensor(weights, dtype=torch.float64) / sum(weights)
        dense = sum(float(pk) * c.scaling * c.B.double() @ c.A.double() for pk, c in zip(p, clients, strict=True))
        before = fresh.get_submodule(module).weight.double()
        after = engine.host.base_linear(module).weight.double()
        assert torch.allclose(after, before + dense, atol=1e-6), module
    assert len(captured) == len(engine.host.layers())


def test_data_size_weights(tmp_path: Path) -> None:
    engine = Engine(tiny_config(tmp_path, "method.name=flora"), progress=False)
    seen = []
    real = engine.method.aggregate
    engine.method.aggregate = lambda c, w, module="m": seen.append(w) or real(c, w, module)  # type: ignore[method-assign]
    engine.run()
    assert seen[0] == [6, 6, 6]


def global_logits(engine: Engine, input_ids: torch.Tensor) -> torch.Tensor:
    state = load_state(engine.run_dir)
    with engine._global_model(state) as model, torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.mark.parametrize("method", ["florist", "fedit", "fedex", "ffa", "flexlora", "fedsb", "flora"])
def test_exported_adapter_reproduces_global_model(tmp_path: Path, method: str) -> None:
    engine = run_engine(tiny_config(tmp_path, f"method.name={method}", "federation.rounds=2"))
    ids = torch.tensor([[1, 5, 9, 30, 44, 2, 7, 80]])
    expected = global_logits(engine, ids)
    base = load_model("tiny-llama", seed=engine.config.seed).model  # the ORIGINAL base
    exported = PeftModel.from_pretrained(base, engine.run_dir / "adapter").eval()
    with torch.no_grad():
        got = exported(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5), float((got - expected).abs().max())


def test_resume_equals_uninterrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    straight = run_engine(tiny_config(tmp_path / "a", "method.name=florist", "federation.rounds=3"))

    config = tiny_config(tmp_path / "b", "method.name=florist", "federation.rounds=3")
    import fedlora.engine.local as local

    real_train = local.train_client
    calls = {"n": 0}

    def crash_in_round_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:  # first client of round 3
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    monkeypatch.setattr(local, "train_client", crash_in_round_3)
    with pytest.raises(KeyboardInterrupt):
        Engine(config, progress=False).run()
    assert load_state(Path(config.output_dir)).round == 2
    monkeypatch.setattr(local, "train_client", real_train)
    with pytest.raises(RunError, match="--resume"):
        Engine(config, progress=False).run()
    resumed = Engine(config, resume=True, progress=False)
    resumed.run()

    for name in straight.host.layers():
        assert torch.equal(straight.host.base_linear(name).weight, resumed.host.base_linear(name).weight), name
    a = metrics(straight.run_dir)
    b = metrics(resumed.run_dir)
    assert [m["round"] for m in b] == [0, 1, 2, 3]
    assert [m.get("train_loss") for m in a] == [m.get("train_loss") for m in b]


def test_client_fraction_is_seeded() -> None:
    assert select_clients(8, 0.5, 42, 1) == select_clients(8, 0.5, 42, 1)
    assert len(select_clients(8, 0.5, 42, 1)) == 4
    assert select_clients(8, 1.0, 42, 3) == list(range(8))
    assert len(select_clients(3, 0.01, 1, 1)) == 1


def test_seed_flags_and_yaml_give_the_same_config(tmp_path: Path) -> None:
    from fedlora.commands.run import parse_run_args

    flags = parse_run_args(
        shlex.split(
            "--global_model tiny-llama --florist True --num_clients 8 --threshold 0.8 "
            "--num_communication_rounds 5 --local_num_epochs 2 --lora_r 8 --lora_alpha 16 "
            "--lora_target_modules [q_proj,k_proj] --local_batch_size 64 --local_micro_batch_size 8 "
            "--local_learning_rate 1e-4 --cutoff_len 256 --train_on_inputs False "
            "--client_selection_frac 0.5 --output_dir out --data_path data"
        )
    )
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(
        "model: tiny-llama\noutput_dir: out\nmethod: {name: florist, threshold: 0.8}\n"
        "lora: {r: 8, alpha: 16, target_modules: [q_proj, k_proj]}\n"
        "data: {source: data, num_clients: 8, cutoff_len: 256, train_on_inputs: false}\n"
        "federation: {rounds: 5, client_fraction: 0.5}\n"
        "train: {epochs: 2, batch_size: 64, micro_batch_size: 8, learning_rate: 1.0e-4}\n"
    )
    assert flags == load_config(yaml_file)


def test_seed_flags_heterogeneous_fedit() -> None:
    from fedlora.commands.run import parse_run_args

    config = parse_run_args(
        shlex.split("--global_model tiny-llama --heter True --zero_padding True --local_ranks [64,32,16,16,8,8,4,4]")
    )
    assert config.method.name == "fedit" and config.lora.heterogeneous
    assert [config.lora.alpha_of(k) for k in range(8)] == [128, 64, 32, 32, 16, 16, 8, 8]
    with pytest.raises(ConfigError, match="several methods"):
        parse_run_args(["--flora", "True", "--florist", "True"])
    with pytest.raises(ConfigError, match="unknown flag --num_client"):
        parse_run_args(["--num_client", "3"])


@pytest.mark.parametrize("preset", sorted(p.stem for p in (Path(__file__).parents[1] / "configs").glob("*.yaml")))
def test_every_shipped_preset_loads(preset: str) -> None:
    config = load_config(preset)
    assert config.method.name


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("model=no-such-model", "no-such-model"),
        ("lora.target_modules=[q_proj,qkv_proj]", "qkv_proj"),
        ("lora.r=100", "larger than the smallest"),
    ],
)
def test_bad_input_fails_before_training(tmp_path: Path, override: str, match: str, monkeypatch) -> None:
    import fedlora.engine.local as local

    monkeypatch.setattr(local, "train_client", lambda *a, **k: pytest.fail("training started"))
    config = tiny_config(tmp_path, override)
    with pytest.raises(ValueError, match=match):
        Engine(config, progress=False).run()
    assert not (Path(config.output_dir) / "checkpoint").exists()


def test_bad_records_and_empty_shard(tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    data = Path(config.data.source)
    (data / "local_training_1.json").write_text(json.dumps([{"instruction": "x"}]))
    with pytest.raises(ValueError, match=r"local_training_1\.json"):
        Engine(config, progress=False).run()
    (data / "local_training_1.json").write_text("[]")
    with pytest.raises(ValueError, match=r"local_training_1\.json|client 1"):
        Engine(config, progress=False).run()


def test_config_typo_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"federation\.round"):
        load_config("tiny", ["federation.round=3"])
    with pytest.raises(ConfigError, match="unknown method 'florest'"):
        load_config("tiny", ["method.name=florest"])


def test_overwrite_checks_inputs_before_touching_the_run(tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    run_engine(config)
    before = (Path(config.output_dir) / "metrics.jsonl").read_text()
    bad = config.model_copy(update={"model": "no-such-model"})
    with pytest.raises(ValueError, match="no-such-model"):
        Engine(bad, overwrite=True, progress=False).run()
    assert (Path(config.output_dir) / "metrics.jsonl").read_text() == before  # nothing lost
    Engine(config, overwrite=True, progress=False).run()
    assert [m["round"] for m in metrics(Path(config.output_dir))] == [0, 1]


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fedlora.engine.state as state_module

    config = tiny_config(tmp_path, "method.name=flora", "federation.rounds=2")
    real_save = state_module.save_file
    calls = {"n": 0}

    def disk_full(tensors, path):
        calls["n"] += 1
        if calls["n"] == 2:
            real_save(tensors, path)
            Path(path).write_bytes(b"\0" * 10)  # a torn write...
            raise OSError("No space left on device")  # ...and the failure it causes
        real_save(tensors, path)

    monkeypatch.setattr(state_module, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        Engine(config, progress=False).run()
    state = load_state(Path(config.output_dir))
    assert state is not None and state.round == 1 and len(state.history) == 1
    assert not list(Path(config.output_dir).glob(".checkpoint-*"))
    monkeypatch.setattr(state_module, "save_file", real_save)
    Engine(config, resume=True, progress=False).run()
    assert load_state(Path(config.output_dir)).round == 2


def test_resume_refuses_a_different_config(tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    run_engine(config)
    changed = config.model_copy(update={"seed": 7})
    with pytest.raises(RunError, match=r"differs from the saved one in \['seed'\]"):
        Engine(changed, resume=True, progress=False).run()


@pytest.mark.integration
def test_smollm2_round_and_export(tmp_path: Path) -> None:
    """One FLoRIST round on the real SmolLM2 with the built-in commonsense data; the export reproduces it."""
    config = load_config(
        "default",
        [
            f"output_dir={tmp_path / 'run'}",
            "data.num_clients=2",
            "data.partition=iid",
            "data.max_examples_per_category=4",
            "data.holdout_per_category=1",
            "data.cutoff_len=64",
            "data.eval_examples=4",
            "federation.rounds=1",
            "train.max_steps=1",
            "train.batch_size=2",
            "train.micro_batch_size=2",
        ],
    )
    engine = run_engine(config)
    lines = metrics(engine.run_dir)
    assert lines[1]["clients"][0]["num_examples"] > 0 and len(lines[1]["global_ranks"]) == 60  # 30 layers x q,v
    ids = engine.tokenizer("Please answer the following question with true or false", return_tensors="pt").input_ids
    expected = global_logits(engine, ids)
    base = load_model("smollm2-135m-instruct").model
    exported = PeftModel.from_pretrained(base, engine.run_dir / "adapter").eval()
    with torch.no_grad():
        got = exported(input_ids=ids).logits
    # The engine merged the round into W0 ((W0 + BA) x); PEFT computes W0 x + B (A x): float32 rounding through 30
    # layers leaves ~1e-5 of the logits' scale (the tiny-model tests hold atol 1e-5 exactly).
    assert float((got - expected).abs().max()) <= 1e-5 * float(expected.abs().max())


def test_fedsb_averages_only_each_rounds_clients(tmp_path: Path) -> None:
    """Two rounds with half the clients each: round t averages exactly round t's R_k (the reference's bug)."""
    config = tiny_config(
        tmp_path, "method.name=fedsb", "federation.rounds=2", "federation.client_fraction=0.5", clients=4
    )
    engine = Engine(config, progress=False)
    calls: dict[str, list] = {}
    real = engine.method.aggregate

    def capture(clients, weights, module="module"):
        calls.setdefault(module, []).append((list(clients), list(weights)))
        return real(clients, weights, module)

    engine.method.aggregate = capture  # type: ignore[method-assign]
    engine.run()
    state = load_state(engine.run_dir)
    for module, rounds in calls.items():
        assert [len(c) for c, _ in rounds] == [2, 2]
        clients, weights = rounds[-1]
        p = torch.tensor(weights, dtype=torch.float64) / sum(weights)
        expected = sum(float(pk) * c.R.double() for pk, c in zip(p, clients, strict=True))
        assert torch.allclose(state.global_R[module].double(), expected, atol=1e-6)
        B, A = state.frozen[module]
        assert all(torch.equal(c.B, B) and torch.equal(c.A, A) for c, _ in [(c, 0) for c in clients])
    selected = [m["selected"] for m in metrics(engine.run_dir)[1:]]
    assert all(len(s) == 2 for s in selected)
    for m in metrics(engine.run_dir)[1:]:
        r = config.lora.r
        assert all(c["uplink_params"] == len(calls) * r * r for c in m["clients"])


@pytest.mark.parametrize(
    ("mode", "uplink", "flag"), [("federated", True, False), ("pooled", False, True), ("seeded", False, False)]
)
def test_fedsb_init_modes_are_recorded(tmp_path: Path, mode: str, uplink: bool, flag: bool) -> None:
    engine = run_engine(tiny_config(tmp_path, "method.name=fedsb", f"method.init_mode={mode}", "method.init_samples=4"))
    first = metrics(engine.run_dir)[0]
    assert first["fedsb_init"]["mode"] == mode
    assert first["fedsb_init"]["non_federated"] is flag
    assert (first["uplink_bytes"] > 0) is uplink
    assert (first["downlink_bytes"] > 0) is (mode != "seeded")


def test_fedsb_rejects_mixed_ranks(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"fedsb.*needs one rank"):
        tiny_config(tmp_path, "method.name=fedsb", "lora.heterogeneous=true", "lora.local_ranks=[4,2,2]")


def test_fedsb_resume_equals_uninterrupted(tmp_path: Path) -> None:
    straight = run_engine(tiny_config(tmp_path / "a", "method.name=fedsb", "federation.rounds=2"))
    config = tiny_config(tmp_path / "b", "method.name=fedsb", "federation.rounds=1")
    run_engine(config)
    longer = config.model_copy(update={"federation": config.federation.model_copy(update={"rounds": 2})})
    resumed = Engine(longer, resume=True, progress=False)
    resumed.run()
    a, b = load_state(straight.run_dir), load_state(resumed.run_dir)
    assert all(torch.equal(a.global_R[n], b.global_R[n]) for n in a.global_R)


def test_task_accuracy_before_and_after(tmp_path: Path) -> None:
    questions = tmp_path / "quiz.jsonl"
    questions.write_text(
        "\n".join(
            json.dumps({"question": f"Which word comes first: {a} or {b}?", "choices": [a, b], "answer": 0})
            for a, b in [("alpha", "beta"), ("gamma", "delta"), ("eta", "theta")]
        )
    )
    engine = run_engine(tiny_config(tmp_path, f"eval.tasks=[{questions}]", "eval.batch_size=2"))
    lines = metrics(engine.run_dir)
    for line in (lines[0], lines[-1]):
        task = line["eval"]["tasks"][str(questions)]
        assert task["num_questions"] == 3 and 0.0 <= task["accuracy"] <= 1.0 and task["scorer"] == "loglik"
        assert line["eval"]["accuracy"] == task["accuracy"]


def test_unknown_eval_task_fails_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fedlora.engine.local as local

    monkeypatch.setattr(local, "train_client", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(ValueError, match="unknown task 'mmlx'"):
        Engine(tiny_config(tmp_path, "eval.tasks=[mmlx]"), progress=False).run()
