"""Differential privacy: DP-SGD in clients (Opacus), its accounting, and client-level DP on the server.

Every check compares against an independent computation: per-example gradients from separate autograd calls,
epsilon from Opacus' accountants stepped by hand, aggregates from the unwrapped method.
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from typer.testing import CliRunner

from fedlora.adapters import LoraHost
from fedlora.cli import app
from fedlora.config import ConfigError, load_config
from fedlora.data.tokenize import collate
from fedlora.engine.local import Engine, RunError
from fedlora.lora_sb import LoraSBHost
from fedlora.lowrank import ClientFactors
from fedlora.methods import METHODS, get_method
from fedlora.models import build_tiny_llama
from fedlora.privacy import (
    ClientDPConfig,
    PrivacyConfig,
    PrivacyError,
    RecordPlan,
    epsilon_spent,
    plan_client_level,
    plan_record_level,
)
from fedlora.privacy.client_level import CLIENT_DP_METHODS, ClientLevelDP, product_norm_sq
from fedlora.privacy.dp_sgd import (
    grad_sample_module,
    make_dp_optimizer,
    noise_only_step,
    per_example_loss,
    train_client_private,
)
from fedlora.train import TrainSettings, summed_token_loss
from test_engine import run_engine, tiny_config

TARGETS = ["q_proj", "v_proj"]


# ------------------------------------------------------------------------------------------------ helpers


def fake_examples(n: int, seed: int = 0, prompt: int = 3) -> list[dict]:
    """Tokenised examples of different lengths; the first ``prompt`` tokens are masked (labels -100)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(6, 16, (1,), generator=gen))
        ids = torch.randint(3, 250, (length,), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def tiny_lora(rank: int = 4, train_A: bool = True, dropout: float = 0.0):
    model, tok = build_tiny_llama(0)
    for p in model.parameters():
        p.requires_grad_(False)
    host = LoraHost(model, TARGETS, dropout)
    host.install(rank, 2 * rank, seed=1, train_A=train_A)
    with torch.no_grad():  # non-zero B so that A gets gradients too
        for layer in host.layers().values():
            layer.lora_B[host.adapter_name].weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    return host, tok


def tiny_sb(rank: int = 4, dropout: float = 0.0):
    model, tok = build_tiny_llama(0)
    for p in model.parameters():
        p.requires_grad_(False)
    host = LoraSBHost(model, TARGETS, dropout)
    gen = torch.Generator().manual_seed(5)
    init = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
            out_f, in_f = m.weight.shape
            B = torch.linalg.qr(torch.randn(out_f, rank, generator=gen))[0]
            A = torch.linalg.qr(torch.randn(in_f, rank, generator=gen))[0].T
            init[name] = ClientFactors(B=B, A=A, scaling=1.0, R=0.1 * torch.randn(rank, rank, generator=gen))
    host.install(init)
    return host, tok


def plan_for(n: int, sigma: float = 0.0, clip: float = 1e6, batch: int = 4, steps: int = 2) -> RecordPlan:
    return RecordPlan(
        client=0,
        num_examples=n,
        sample_rate=batch / n,
        expected_batch_size=batch,
        steps_per_round=steps,
        max_rounds=1,
        noise_multiplier=sigma,
        clip_norm=clip,
        epsilon_target=3.0,
        delta=1.0 / n,
        accountant="prv",
    )


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def per_example_grads_independent(model, batch, seed: int) -> list[dict[str, torch.Tensor]]:
    """Per-example gradients by one autograd call per example (same forward, same dropout draw)."""
    params = trainable(model)
    torch.manual_seed(seed)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    losses = per_example_loss(logits, batch["labels"])
    out = []
    for i in range(len(losses)):
        grads = torch.autograd.grad(losses[i], list(params.values()), retain_graph=True, allow_unused=True)
        out.append(
            {n: (g if g is not None else torch.zeros_like(p)) for (n, p), g in zip(params.items(), grads, strict=True)}
        )
    return out


def opacus_per_example_grads(model, batch, seed: int) -> dict[str, torch.Tensor]:
    params = trainable(model)
    with grad_sample_module(model) as gsm:
        torch.manual_seed(seed)
        logits = gsm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        per_example_loss(logits, batch["labels"]).sum().backward()
        out = {n: p.grad_sample.detach().clone() for n, p in params.items()}
        for p in params.values():
            p.grad = None
    return out


# ------------------------------------------------------------------------------------------- per example


def test_per_example_loss_is_each_examples_mean_over_its_targets() -> None:
    host, tok = tiny_lora()
    examples = fake_examples(3)
    batch = collate(examples, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        logits = host.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        losses = per_example_loss(logits, batch["labels"])
        for i, ex in enumerate(examples):  # alone, unpadded
            single = collate([ex], pad_token_id=tok.pad_token_id)
            alone = host.model(input_ids=single["input_ids"]).logits
            targets = len(ex["input_ids"]) - 3  # 3 masked prompt tokens; the first token is never a target
            expected = summed_token_loss(alone, single["labels"]) / targets
            torch.testing.assert_close(losses[i], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("kind", ["lora", "ffa", "lora_sb", "lora_sb_dropout", "lora_dropout"])
def test_per_sample_gradients_match_separate_autograd(kind: str, padding_side: str) -> None:
    if kind.startswith("lora_sb"):
        host, tok = tiny_sb(dropout=0.3 if kind.endswith("dropout") else 0.0)
    else:
        host, tok = tiny_lora(train_A=kind != "ffa", dropout=0.3 if kind.endswith("dropout") else 0.0)
    model = host.model
    model.train()
    batch = collate(fake_examples(4, seed=1), pad_token_id=tok.pad_token_id, padding_side=padding_side)
    got = opacus_per_example_grads(model, batch, seed=11)
    expected = per_example_grads_independent(model, batch, seed=11)
    assert set(got) == set(expected[0])
    if kind == "ffa":
        assert all("lora_B" in n for n in got)
    if kind.startswith("lora_sb"):
        assert all(n.endswith(".R") for n in got)
    for name, per_sample in got.items():
        assert per_sample.shape[0] == 4
        for i in range(4):
            torch.testing.assert_close(per_sample[i], expected[i][name], rtol=1e-4, atol=1e-7)
    # nothing of Opacus stays behind on the reused model
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    assert not any(hasattr(m, "activations") for m in model.modules())


def test_step_is_the_clipped_per_example_sum_over_the_expected_batch() -> None:
    host, tok = tiny_lora()
    model = host.model
    model.train()
    batch = collate(fake_examples(4, seed=2), pad_token_id=tok.pad_token_id)
    clip, expected_batch = 1e-3, 5  # clip far below the gradients' norms: every example is clipped
    independent = per_example_grads_independent(model, batch, seed=0)
    norms = [math.sqrt(sum(float(g.pow(2).sum()) for g in per.values())) for per in independent]
    assert min(norms) > clip * 10
    params = trainable(model)
    with grad_sample_module(model) as gsm:
        optimizer = make_dp_optimizer(
            torch.optim.SGD(list(params.values()), lr=0.0), plan_for(20, 0.0, clip, expected_batch), None
        )
        logits = gsm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        per_example_loss(logits, batch["labels"]).sum().backward()
        optimizer.step()
        for name, p in params.items():
            expected = (
                sum(per[name] * min(1.0, clip / n) for per, n in zip(independent, norms, strict=True)) / expected_batch
            )
            torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-9)
        # each clipped per-example gradient has norm C
        clipped_total = sum(p.grad.pow(2).sum() for p in params.values()).sqrt() * expected_batch
        assert float(clipped_total) <= 4 * clip * (1 + 1e-4)
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("sigma", [0.5, 2.0])
def test_noise_has_the_expected_scale(sigma: float) -> None:
    """An empty Poisson batch leaves only the noise: std = sigma * C / expected batch size."""
    weight = torch.nn.Parameter(torch.zeros(200, 200))
    clip, batch = 0.1, 8
    optimizer = make_dp_optimizer(
        torch.optim.SGD([weight], lr=0.0), plan_for(100, sigma, clip, batch), torch.Generator().manual_seed(0)
    )
    noise_only_step(optimizer, [weight])
    expected = sigma * clip / batch
    std = float(weight.grad.std())
    # 40,000 draws: the sample std is within ~1 % of the truth (5 standard errors: 1.8 %)
    assert abs(std / expected - 1) < 0.02
    assert abs(float(weight.grad.mean())) < 5 * expected / 200


# ---------------------------------------------------------------------------------------------- accounting


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_reported_epsilon_equals_opacus_accountant(accountant: str) -> None:
    privacy = PrivacyConfig(enabled=True, epsilon=3.0, accountant=accountant)
    plans = plan_record_level(privacy, [40], batch_size=8, steps_per_round=[3], rounds=4)
    for plan in plans:
        assert plan.delta == 1.0 / plan.num_examples
        for participations in (1, 4):
            acc = PRVAccountant() if accountant == "prv" else RDPAccountant()
            for _ in range(plan.steps_per_round * participations):  # stepped as Opacus' optimizer hook would
                acc.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)
            record = plan.record(participations)
            assert record["epsilon"] == pytest.approx(acc.get_epsilon(delta=plan.delta), rel=1e-6)
            assert record["unit"] == "record" and record["accountant"] == accountant
        # calibrated once for every round (Opacus' search, tolerance 0.01): the whole run meets the target tightly
        final = plan.record(4)["epsilon"]
        assert 3.0 - 0.011 <= final <= 3.0
        assert plan.record(1)["epsilon"] < final


@pytest.mark.parametrize(
    ("kwargs", "sizes", "batch", "match"),
    [
        ({}, [40, 5], 8, r"client 1 \(5 examples\).*sampling rate 8/5 would be > 1"),
        ({"epsilon": 0.001}, [40], 8, r"client 0 .*epsilon 0.001 cannot be met.*noise multiplier <= 20"),
        ({"epsilon": 1.0, "max_noise_multiplier": 0.3}, [40], 8, r"raise privacy.max_noise_multiplier"),
        ({}, [1], 1, r"at least 2 examples"),
    ],
)
def test_impossible_privacy_is_refused(kwargs: dict, sizes: list[int], batch: int, match: str) -> None:
    privacy = PrivacyConfig(enabled=True, **kwargs)
    with pytest.raises(PrivacyError, match=match):
        plan_record_level(privacy, sizes, batch_size=batch, steps_per_round=[10] * len(sizes), rounds=3)


# ------------------------------------------------------------------------------------------ private training


def test_lora_weights_change_after_the_first_private_step() -> None:
    host, tok = tiny_lora()
    with torch.no_grad():  # PEFT's own init: B = 0 (A then has no gradient, only noise)
        for layer in host.layers().values():
            layer.lora_B[host.adapter_name].weight.zero_()
    before = {n: p.detach().clone() for n, p in trainable(host.model).items()}
    examples = fake_examples(20)
    settings = TrainSettings(max_steps=1, batch_size=4, micro_batch_size=2, learning_rate=1e-3)
    plan = plan_record_level(PrivacyConfig(enabled=True), [20], 4, [1], 1)[0]
    train_client_private(host.model, examples, settings, plan, partial(collate, pad_token_id=tok.pad_token_id))
    after = trainable(host.model)
    assert any("lora_A" in n for n in after) and any("lora_B" in n for n in after)
    for name, p in after.items():
        assert not torch.equal(p, before[name]), f"{name} did not change after the first private step"


def run_private(seed: int, micro: int = 2, dropout: float = 0.1) -> dict[str, torch.Tensor]:
    host, tok = tiny_lora(dropout=dropout)
    settings = TrainSettings(max_steps=3, batch_size=4, micro_batch_size=micro, learning_rate=1e-2, seed=seed)
    plan = plan_record_level(PrivacyConfig(enabled=True), [16], 4, [3], 1)[0]
    result = train_client_private(
        host.model, fake_examples(16), settings, plan, partial(collate, pad_token_id=tok.pad_token_id)
    )
    assert result.steps == 3 and len(result.losses) == 3
    return {n: p.detach().clone() for n, p in trainable(host.model).items()}


def test_same_seed_same_run_bit_for_bit() -> None:
    first, again, other = run_private(1), run_private(1), run_private(2)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert any(not torch.equal(first[n], other[n]) for n in first)


def test_virtual_batches_give_the_same_step() -> None:
    """Micro-batches of 1 or 4 examples: the same logical Poisson batches, the same clipped sum, the same noise.

    (Without dropout: its random draws depend on the micro-batches' padded shapes.)"""
    one, four = run_private(3, micro=1, dropout=0.0), run_private(3, micro=4, dropout=0.0)
    for n in one:
        torch.testing.assert_close(one[n], four[n], rtol=1e-4, atol=1e-6)


def test_secure_mode_without_torchcsprng_is_a_clear_error() -> None:
    pytest.importorskip("opacus")
    try:
        import torchcsprng  # noqa: F401

        pytest.skip("torchcsprng is installed")
    except ImportError:
        pass
    host, tok = tiny_lora()
    plan = plan_record_level(PrivacyConfig(enabled=True), [16], 4, [1], 1)[0]
    with pytest.raises(PrivacyError, match="torchcsprng"):
        train_client_private(
            host.model,
            fake_examples(16),
            TrainSettings(max_steps=1, batch_size=4, micro_batch_size=2),
            plan,
            partial(collate, pad_token_id=tok.pad_token_id),
            secure_mode=True,
        )


# -------------------------------------------------------------------------------------------- the engine


def private_config(tmp_path: Path, method: str, *overrides: str, rounds: int = 1):
    extra = ["method.init_mode=seeded"] if method == "fedsb" else []
    return tiny_config(
        tmp_path,
        f"method.name={method}",
        "privacy.enabled=true",
        f"federation.rounds={rounds}",
        "train.batch_size=2",
        "train.micro_batch_size=1",
        *extra,
        *overrides,
    )


def metrics_of(engine: Engine) -> list[dict]:
    return [json.loads(x) for x in (engine.run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_runs_one_private_round(tmp_path: Path, method: str) -> None:
    engine = run_engine(private_config(tmp_path, method))
    last = metrics_of(engine)[-1]
    for client in last["clients"]:
        p = client["privacy"]
        plan = engine.record_plans[client["id"]]
        assert p["epsilon"] == pytest.approx(
            epsilon_spent(plan.noise_multiplier, plan.sample_rate, 2, plan.delta, "prv")
        )
        assert p["delta"] == 1.0 / client["num_examples"] and p["unit"] == "record"
    summary = engine._summary(metrics_of(engine), 0.0)
    assert summary.privacy["record"]["epsilon"] <= 3.0
    assert "one training example" in summary.privacy["record"]["unit"]


def test_epsilon_accumulates_over_rounds_and_partial_participation(tmp_path: Path) -> None:
    engine = run_engine(private_config(tmp_path, "fedit", "federation.client_fraction=0.34", rounds=2))
    rounds = [m for m in metrics_of(engine) if m["round"] > 0]
    taken: dict[int, int] = {}
    for m in rounds:
        for c in m["clients"]:
            taken[c["id"]] = taken.get(c["id"], 0) + 1
            assert c["privacy"]["participations"] == taken[c["id"]]
            plan = engine.record_plans[c["id"]]
            assert c["privacy"]["epsilon"] == pytest.approx(plan.epsilon_after(taken[c["id"]]))
    # calibrated for 2 rounds: a client in fewer rounds spends less than the target
    assert all(plan.epsilon_after(2) <= 3.0 for plan in engine.record_plans)
    assert any(n < 2 for n in taken.values())


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["method.name=fedsb", "method.init_mode=federated"], "privacy.allow_unprotected_init"),
        (["train.gradient_checkpointing=true"], "gradient_checkpointing"),
        (["privacy.client.enabled=true", "privacy.client.noise_multiplier=1.0", "method.name=fedex",
          "federation.weighting=uniform"], "privacy.client does not support method 'fedex'"),
        (["privacy.client.enabled=true", "privacy.client.noise_multiplier=1.0", "method.name=fedit"],
         "federation.weighting=uniform"),
        (["privacy.client.enabled=true", "federation.weighting=uniform"], "exactly one of noise_multiplier"),
        (["privacy.accountant=gdp"], "privacy.accountant"),
        (["privacy.epsilon=0"], "privacy.epsilon"),
    ],
)  # fmt: skip
def test_bad_privacy_configs_fail_with_clear_messages(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config("tiny", ["privacy.enabled=true", *overrides])


def test_unreachable_target_fails_before_the_run_folder_is_touched(tmp_path: Path) -> None:
    config = private_config(
        tmp_path, "fedit", "privacy.epsilon=0.05", "privacy.delta=1e-5", "privacy.max_noise_multiplier=2"
    )
    with pytest.raises(PrivacyError, match=r"client 0 .*cannot be met"):
        Engine(config, progress=False).run()
    assert not (tmp_path / "run").exists()


def test_fedsb_with_data_dependent_init_is_flagged(tmp_path: Path) -> None:
    config = private_config(
        tmp_path, "fedsb", "method.init_mode=federated", "method.init_samples=2", "privacy.allow_unprotected_init=true"
    )
    engine = run_engine(config)
    assert metrics_of(engine)[0]["privacy_init_covered"] is False
    assert engine._summary(metrics_of(engine), 0.0).privacy["init_covered"] is False


def test_private_resume_refuses_more_rounds(tmp_path: Path) -> None:
    run_engine(private_config(tmp_path, "fedit"))
    more = private_config(tmp_path, "fedit", rounds=2)
    with pytest.raises(RunError, match="privacy noise was calibrated"):
        Engine(more, resume=True, progress=False).run()


def test_cli_states_the_protected_unit(tmp_path: Path) -> None:
    data = tiny_config(tmp_path).data.source
    args = [
        "run", "tiny", f"output_dir={tmp_path / 'cli'}", f"data.source={data}", "data.template=alpaca",
        "data.max_examples_per_category=null", "federation.rounds=1", "train.batch_size=2",
        "train.micro_batch_size=1", "privacy.enabled=true", "method.name=fedit", "federation.weighting=uniform",
        "privacy.client.enabled=true", "privacy.client.noise_multiplier=0.5", "--quiet",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "record-level DP: epsilon <=" in result.output and "protects one record" in result.output
    assert "client-level DP: epsilon =" in result.output and "protects one client" in result.output


def test_private_run_on_an_snli_style_jsonl_file(tmp_path: Path) -> None:
    """The private-snli preset on a fabricated SNLI file (Alpaca-style JSONL records), tiny model."""
    labels = ["entailment", "neutral", "contradiction"]
    rows = [
        {
            "instruction": f"Premise: A person number {i} walks.\nHypothesis: Someone {i % 5} moves.\n"
            "Does the premise entail the hypothesis? Answer entailment, neutral or contradiction.",
            "input": "",
            "output": labels[i % 3],
            "category": "snli",
        }
        for i in range(60)
    ]
    path = tmp_path / "snli_train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = load_config(
        "private-snli",
        [
            "model=tiny-llama",
            f"data.source={path}",
            f"output_dir={tmp_path / 'run'}",
            "data.holdout_per_category=6",
            "data.eval_examples=6",
            "data.cutoff_len=512",
            "lora.r=4",
            "lora.alpha=4",
            "lora.target_modules=[q_proj,v_proj]",
            "train.max_steps=2",
            "train.batch_size=4",
            "train.micro_batch_size=4",
        ],
    )
    engine = run_engine(config)
    last = metrics_of(engine)[-1]
    assert len(last["clients"]) == 3 and all(c["privacy"]["epsilon"] <= 3.0 for c in last["clients"])


@pytest.mark.integration
def test_data_tasks_selects_boolq_only(tmp_path: Path) -> None:
    from fedlora.engine.data import prepare_data
    from fedlora.models import load_model

    config = load_config("tiny", ["data.tasks=[boolq]", "data.max_examples_per_category=20"])
    data = prepare_data(config, load_model("tiny-llama").tokenizer)
    assert sum(len(c) for c in data.clients) == 20 - 1  # one held out per category: boolq only
    with pytest.raises(Exception, match="unknown commonsense task"):
        prepare_data(load_config("tiny", ["data.tasks=[nope]"]), load_model("tiny-llama").tokenizer)


# -------------------------------------------------------------------------------------------- client level


def random_upload(method: str, seed: int, m: int = 12, n: int = 10, r: int = 3) -> tuple[ClientFactors, ClientFactors]:
    """(start, trained) factors of one module for ``method``: fresh for flora/florist, shared frozen parts."""
    gen = torch.Generator().manual_seed(100)
    shared_B, shared_A = torch.randn(m, r, generator=gen), torch.randn(r, n, generator=gen)
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).float()  # noqa: E731
    if method == "fedsb":
        start = ClientFactors(shared_B, shared_A, 1.0, R=torch.ones(r, r))
        return start, ClientFactors(shared_B, shared_A, 1.0, R=torch.ones(r, r) + rnd(r, r))
    if method == "ffa":
        start = ClientFactors(torch.ones(m, r), shared_A, 2.0)
        return start, ClientFactors(torch.ones(m, r) + rnd(m, r), shared_A, 2.0)
    if method == "fedit":
        start = ClientFactors(torch.ones(m, r), torch.ones(r, n), 2.0)
        return start, ClientFactors(torch.ones(m, r) + rnd(m, r), torch.ones(r, n) + rnd(r, n), 2.0)
    return ClientFactors(torch.zeros(m, r), rnd(r, n), 2.0), ClientFactors(rnd(m, r), rnd(r, n), 2.0)


def wrapped(method: str, clip: float, sigma: float, clients: int = 3) -> ClientLevelDP:
    inner = get_method(method, **({"threshold": 1.0} if method == "florist" else {}))
    plan = plan_client_level(ClientDPConfig(enabled=True, clip_norm=clip, noise_multiplier=sigma), clients, clients, 1)
    return ClientLevelDP(inner, plan, seed=0)


def wrapped_round(method: str, clip: float, sigma: float, modules=("m0", "m1")):
    dp = wrapped(method, clip, sigma)
    uploads = []
    for k in range(3):
        pairs = {name: random_upload(method, 10 * k + i) for i, name in enumerate(modules)}
        dp.set_start(k, {name: s for name, (s, _) in pairs.items()})
        uploads.append({name: t for name, (_, t) in pairs.items()})
    info = dp.begin_round(1, [0, 1, 2], uploads)
    out = {name: dp.aggregate([u[name] for u in uploads], [1.0, 1.0, 1.0], module=name) for name in modules}
    return dp, uploads, out, info


@pytest.mark.parametrize("method", CLIENT_DP_METHODS)
def test_client_level_wrapper_is_exact_without_noise_or_clipping(method: str) -> None:
    dp, uploads, out, info = wrapped_round(method, clip=1e9, sigma=0.0)
    assert info["clipped"] == 0
    inner = dp.inner
    for name, update in out.items():
        expected = inner.aggregate([u[name] for u in uploads], [1.0, 1.0, 1.0], module=name)
        assert torch.equal(update.B, expected.B) and torch.equal(update.A, expected.A)
        if expected.R is not None:
            assert torch.equal(update.R, expected.R)


@pytest.mark.parametrize("method", CLIENT_DP_METHODS)
def test_client_level_clipping_bounds_each_clients_whole_update(method: str) -> None:
    clip = 0.5
    dp, _, out, info = wrapped_round(method, clip=clip, sigma=0.0)
    assert info["clipped"] == 3  # random updates are far larger than 0.5
    # independent: the aggregate's update is the mean of per-client updates scaled to norm <= C
    total = 0.0
    for name, update in out.items():
        start = dp._starts[0][name]
        if method in ("flora", "florist"):
            delta = update.B @ update.A
        elif method == "fedsb":
            delta = update.R - start.R
        elif method == "ffa":
            delta = update.B - start.scaled_B()
        else:
            delta = torch.cat([(update.B - start.scaled_B()).flatten(), (update.A - start.A).flatten()])
        total += float(delta.double().pow(2).sum())
    assert math.sqrt(total) <= clip * (1 + 1e-5)  # mean of three vectors of norm <= C


@pytest.mark.parametrize("method", ["fedit", "fedsb", "flora"])
def test_client_level_noise_has_the_expected_scale(method: str) -> None:
    clip, sigma = 1e9, 3.0
    modules = tuple(f"m{i}" for i in range(40))
    _, _, clean, _ = wrapped_round(method, clip, 0.0, modules)
    dp, _, noisy, _ = wrapped_round(method, clip, sigma, modules)
    if method == "flora":
        diffs = [(noisy[n].B @ noisy[n].A - clean[n].B @ clean[n].A).flatten() for n in modules]
    elif method == "fedsb":
        diffs = [(noisy[n].R - clean[n].R).flatten() for n in modules]
    else:
        diffs = [torch.cat([(noisy[n].B - clean[n].B).flatten(), (noisy[n].A - clean[n].A).flatten()]) for n in modules]
    std = float(torch.cat(diffs).double().std())
    assert std == pytest.approx(sigma * clip / 3, rel=0.05)
    assert dp.plan.noise_std == pytest.approx(sigma * clip / 3)


def test_product_norm_matches_dense() -> None:
    B, A = torch.randn(7, 3), torch.randn(3, 5)
    assert product_norm_sq(B, A) == pytest.approx(float((B @ A).double().pow(2).sum()), rel=1e-6)


def test_client_level_accounting_is_rdp_of_the_gaussian(tmp_path: Path) -> None:
    config = private_config(
        tmp_path,
        "fedsb",
        "federation.weighting=uniform",
        "privacy.client.enabled=true",
        "privacy.client.epsilon=8",
        "privacy.client.clip_norm=0.05",
        rounds=2,
    )
    engine = run_engine(config)
    rounds = [m for m in metrics_of(engine) if m["round"] > 0]
    plan = engine.client_dp.plan
    for m in rounds:
        acc = RDPAccountant()
        for _ in range(m["round"]):
            acc.step(noise_multiplier=plan.noise_multiplier, sample_rate=1.0)
        assert m["client_privacy"]["epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-6)
        assert m["client_privacy"]["unit"] == "client"
    assert rounds[-1]["client_privacy"]["epsilon"] <= 8.0
    summary = engine._summary(metrics_of(engine), 0.0).privacy
    assert "record" in summary and "client" in summary
