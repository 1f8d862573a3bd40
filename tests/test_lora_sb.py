"""LoRA-SB: the layer, the host, the gradient initialisation (three modes) and the export as standard PEFT LoRA.

Every check compares against an independent dense computation: ``W0 + s B R A`` built by hand, gradients from a
plain backward of the mean token loss, the best rank-r approximation from a dense ``torch.linalg.svd``.
"""

from __future__ import annotations

import copy
import resource
import time

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn

from fedlora.adapter_io import write_adapter
from fedlora.adapters import TargetModuleError
from fedlora.data import collate, load_commonsense, tokenize_records
from fedlora.lora_sb import (
    DEFAULT_TARGETS,
    LoraSBError,
    LoraSBHost,
    LoraSBLinear,
    SBInit,
    init_from_gradient,
)
from fedlora.lowrank import ClientFactors
from fedlora.methods import get_method
from fedlora.models import build_tiny_llama, load_model
from fedlora.train import TrainSettings, train_client

TARGETS = list(DEFAULT_TARGETS)
PAD = 3  # the tiny tokenizer's <pad>
ETA = 1e-3
NITER = 16  # enough power iterations for the randomised SVD to match the dense one to ~1e-6 on these shapes

# The tiny Llama: hidden 64, 4 heads of 16, 2 KV heads (k/v out 32), intermediate 128, 2 layers.
SHAPES = {
    "q_proj": (64, 64),
    "k_proj": (32, 64),
    "v_proj": (32, 64),
    "o_proj": (64, 64),
    "gate_proj": (128, 64),
    "up_proj": (128, 64),
    "down_proj": (64, 128),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread, and do not stall when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny64() -> nn.Module:
    """The tiny Llama in float64: exactness checks at round-off level."""
    return build_tiny_llama(0)[0].double()


def fresh(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def make_examples(n: int, seed: int, prompt: int = 2) -> list[dict[str, list[int]]]:
    """Token examples of varied lengths; the first ``prompt`` tokens are not targets."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(5, 13, (1,), generator=gen))
        ids = torch.randint(4, 250, (length,), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def collate_fn(examples):
    return collate(examples, PAD)


def logits_of(model: nn.Module, examples) -> torch.Tensor:
    batch = collate_fn(examples)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def target_names(model: nn.Module, targets=TARGETS) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets]


def dense_gradients(model: nn.Module, examples, names) -> dict[str, torch.Tensor]:
    """The gradient of the mean token loss over ``examples`` (one batch) for each named weight: a plain backward."""
    model = fresh(model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    weights = {n: model.get_submodule(n).weight for n in names}
    for w in weights.values():
        w.requires_grad_(True)
    batch = collate_fn(examples)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=-100
    )
    loss.backward()
    return {n: w.grad for n, w in weights.items()}


def best_rank_r(G: torch.Tensor, rank: int, eta: float = ETA) -> torch.Tensor:
    """The best rank-r approximation of ``-eta sign(G)`` by a dense SVD (Eckart-Young)."""
    U, S, Vh = torch.linalg.svd(-eta * G.sign(), full_matrices=False)
    return U[:, :rank] * S[:rank] @ Vh[:rank]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def assert_orthonormal(f: ClientFactors) -> None:
    r = f.rank
    eye = torch.eye(r, dtype=f.B.dtype)
    torch.testing.assert_close(f.B.T @ f.B, eye, atol=1e-10, rtol=0)
    torch.testing.assert_close(f.A @ f.A.T, eye, atol=1e-10, rtol=0)


# --- the layer ------------------------------------------------------------------------------------------------


def test_layer_forward_is_base_plus_scaled_B_R_A():
    torch.manual_seed(0)
    base = nn.Linear(6, 5, dtype=torch.float64)
    B, A, R = torch.randn(5, 3, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 3)
    layer = LoraSBLinear(base, B, A, R.double(), scaling=0.5)
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    dense = base.weight + 0.5 * B @ R.double() @ A
    torch.testing.assert_close(layer(x), x @ dense.T + base.bias, atol=1e-12, rtol=0)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["R"]
    assert layer.get_base_layer() is base and layer.weight is base.weight
    assert (layer.in_features, layer.out_features) == (6, 5)

    layer.disabled = True
    torch.testing.assert_close(layer(x), base(x))
    layer.disabled = False
    before = layer(x)
    layer.merge()
    torch.testing.assert_close(base.weight, dense.detach(), atol=1e-12, rtol=0)
    torch.testing.assert_close(layer(x), before, atol=1e-12, rtol=0)  # the adapter is not added twice
    layer.unmerge()
    torch.testing.assert_close(layer(x), before, atol=1e-12, rtol=0)


def test_layer_rejects_misshapen_factors():
    base = nn.Linear(6, 5)
    with pytest.raises(LoraSBError, match=r"B \(5, r\), A \(r, 6\)"):
        LoraSBLinear(base, torch.zeros(6, 3), torch.zeros(3, 6), torch.zeros(3, 3))
    with pytest.raises(LoraSBError, match="R"):
        LoraSBLinear(base, torch.zeros(5, 3), torch.zeros(3, 6), torch.zeros(2, 2))


# --- the host on the tiny Llama --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pooled_init(tiny64) -> SBInit:
    clients = [make_examples(6, seed=1), make_examples(4, seed=2)]
    return init_from_gradient(
        tiny64, clients, collate_fn, TARGETS, 4, learning_rate=ETA, mode="pooled", num_samples=10, niter=NITER
    )


def test_initial_model_is_W0_plus_B_R_A(tiny64, pooled_init):
    model = fresh(tiny64)
    host = LoraSBHost(model, TARGETS)
    host.install(pooled_init)
    assert sorted(host.layers()) == sorted(target_names(tiny64))
    assert host.rank == 4 and host.model is model

    dense = fresh(tiny64)
    with torch.no_grad():
        for name, f in pooled_init.factors.items():
            dense.get_submodule(name).weight.add_(f.B @ f.R @ f.A)
    examples = make_examples(3, seed=9)
    torch.testing.assert_close(logits_of(model, examples), logits_of(dense, examples), atol=1e-10, rtol=0)
    with host.disable_adapter():  # the base model, untouched by the initialisation
        torch.testing.assert_close(logits_of(model, examples), logits_of(tiny64, examples), atol=1e-12, rtol=0)

    # The forward pass never builds the m x n product: a dense check of the layer itself.
    name = next(iter(host.layers()))
    layer = host.layers()[name]
    x = torch.randn(2, 3, layer.in_features, dtype=torch.float64)
    W = tiny64.get_submodule(name).weight
    torch.testing.assert_close(layer(x), x @ (W + layer.B @ layer.R @ layer.A).T, atol=1e-12, rtol=0)


def test_only_R_trains(tiny64, pooled_init):
    model = fresh(tiny64).float()
    host = LoraSBHost(model, TARGETS)
    host.install(pooled_init)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.R" for n in host.layers()}
    assert host.trainable_parameters() == [layer.R for layer in host.layers().values()]

    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = TrainSettings(max_steps=1, batch_size=4, micro_batch_size=2, learning_rate=1e-2, max_grad_norm=None)
    train_client(model, make_examples(4, seed=5), settings, collate_fn)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"{n}.R" for n in host.layers()}


def test_install_resets_R_and_start_is_folded(tiny64, pooled_init):
    model = fresh(tiny64)
    host = LoraSBHost(model, TARGETS)
    host.install(pooled_init)
    names = list(host.layers())
    gen = torch.Generator().manual_seed(0)
    start = {n: torch.randn(4, 4, generator=gen, dtype=torch.float64) for n in names}
    host.install(start=start, scaling=2.0)  # folded R: the layer keeps R / s, the update is still B R A
    for n, f in host.factors().items():
        assert f.scaling == 2.0
        torch.testing.assert_close(f.R * 2.0, start[n])
        torch.testing.assert_close(f.delta(), f.B @ start[n] @ f.A)
    host.install()  # back to the initialisation's R
    for n, f in host.factors().items():
        torch.testing.assert_close(f.delta(), pooled_init.factors[n].delta())
    layer_objects = dict(host.layers())
    host.install()
    assert all(host.layers()[n] is layer_objects[n] for n in names)  # wrapped once, not twice

    host.uninstall()
    assert not host.layers()
    assert all(type(model.get_submodule(n)) is nn.Linear for n in names)


def test_fedsb_average_of_R_equals_average_of_dense_updates(tiny64, pooled_init):
    """Averaging R (the Fed-SB server) gives exactly the weighted average of the clients' B R_k A."""
    host = LoraSBHost(fresh(tiny64), TARGETS)
    host.install(pooled_init, scaling=0.5)
    gen = torch.Generator().manual_seed(1)
    uploads = []
    for _ in range(3):
        host.set_R({n: torch.randn(4, 4, generator=gen, dtype=torch.float64) for n in host.layers()})
        uploads.append(host.factors())
    weights = [5, 1, 2]
    p = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    method = get_method("fedsb")
    global_R = {}
    for name in host.layers():
        update = method.aggregate([u[name] for u in uploads], weights, module=name)
        ideal = sum(float(p[k]) * uploads[k][name].delta() for k in range(3))
        torch.testing.assert_close(update.delta(), ideal, atol=1e-10, rtol=0)
        global_R[name] = update.R
    # The averaged (folded) R installed in the host gives the same dense update.
    host.set_R(global_R)
    for name, f in host.factors().items():
        ideal = sum(float(p[k]) * uploads[k][name].delta() for k in range(3))
        torch.testing.assert_close(f.delta(), ideal, atol=1e-10, rtol=0)


def test_merge_into_base_then_disable_equals_adapter(tiny64, pooled_init):
    model = fresh(tiny64).float()
    host = LoraSBHost(model, TARGETS)
    host.install(pooled_init)
    examples = make_examples(3, seed=4)
    with_adapter = logits_of(model, examples)
    weights_before = host.base_state()
    host.merge_into_base(host.export_factors())
    with host.disable_adapter():
        torch.testing.assert_close(logits_of(model, examples), with_adapter, atol=1e-5, rtol=0)
    for name, w in host.base_state().items():
        f = pooled_init.factors[name]
        torch.testing.assert_close(w, weights_before[name] + (f.B @ f.R @ f.A).float(), atol=1e-6, rtol=0)
    assert not any(layer.disabled for layer in host.layers().values())


# --- the initialisation ---------------------------------------------------------------------------------------


def test_pooled_init_is_the_best_rank_r_approximation_of_the_sign_step(tiny64, pooled_init):
    """Pooled: G on the round-robin pooled subset; B R A = the dense truncated SVD of -eta sign(G)."""
    c0, c1 = make_examples(6, seed=1), make_examples(4, seed=2)
    # A fresh estimate on fewer samples than the pool: round-robin c0[0], c1[0], c0[1], c1[1], c0[2].
    model = fresh(tiny64)
    model.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    init = init_from_gradient(
        model, [c0, c1], collate_fn, TARGETS, 4, learning_rate=ETA, mode="pooled", num_samples=5, niter=NITER,
        micro_batch_size=2,
    )  # fmt: skip
    assert init.samples_per_client == [3, 2] and init.non_federated
    G = dense_gradients(tiny64, [c0[0], c1[0], c0[1], c1[1], c0[2]], list(init.factors))
    for name, f in init.factors.items():
        assert_orthonormal(f)
        S = torch.diagonal(f.R)
        assert torch.equal(f.R, torch.diag(S)) and (S[:-1] >= S[1:]).all() and (S > 0).all()
        assert rel_err(f.B @ f.R @ f.A, best_rank_r(G[name], 4)) < 1e-4, name
    # The model is left as it was: weights, flags, gradients, mode, RNG.
    for n, p in model.named_parameters():
        assert p.grad is None and p.requires_grad == flags[n]
    assert model.training
    assert torch.equal(torch.get_rng_state(), rng)
    for (n, p), q in zip(model.named_parameters(), tiny64.parameters(), strict=True):
        assert torch.equal(p, q), n

    # The whole pool (the fixture) against its own independent gradient.
    G = dense_gradients(tiny64, c0 + c1, list(pooled_init.factors))
    for name, f in pooled_init.factors.items():
        assert rel_err(f.B @ f.R @ f.A, best_rank_r(G[name], 4)) < 1e-4, name


def test_init_is_deterministic_and_svd_seeded(tiny64):
    clients = [make_examples(4, seed=1)]
    kwargs = dict(learning_rate=ETA, mode="pooled", num_samples=4, niter=2)
    a = init_from_gradient(tiny64, clients, collate_fn, ["q_proj"], 4, seed=7, **kwargs)
    b = init_from_gradient(tiny64, clients, collate_fn, ["q_proj"], 4, seed=7, **kwargs)
    for name in a.factors:
        for x, y in zip((a.factors[name].B, a.factors[name].A), (b.factors[name].B, b.factors[name].A), strict=True):
            assert torch.equal(x, y)


def test_federated_with_one_client_equals_pooled(tiny64):
    clients = [make_examples(7, seed=3)]
    common = dict(learning_rate=ETA, num_samples=5, niter=NITER, seed=1)
    pooled = init_from_gradient(tiny64, clients, collate_fn, TARGETS, 4, mode="pooled", **common)
    federated = init_from_gradient(tiny64, clients, collate_fn, TARGETS, 4, mode="federated", **common)
    assert federated.samples_per_client == pooled.samples_per_client == [5]
    assert not federated.non_federated
    for name, f in federated.factors.items():
        torch.testing.assert_close(f.delta(), pooled.factors[name].delta(), atol=1e-12, rtol=0)


@pytest.mark.parametrize("weights", [None, [1.0, 3.0]], ids=["data-size", "given"])
def test_federated_combines_client_gradients_by_weight(tiny64, weights):
    c0, c1 = make_examples(6, seed=11), make_examples(3, seed=12)
    init = init_from_gradient(
        tiny64, [c0, c1], collate_fn, TARGETS, 4, learning_rate=ETA, mode="federated", num_samples=4,
        weights=weights, niter=NITER, micro_batch_size=3,
    )  # fmt: skip
    p = [6 / 9, 3 / 9] if weights is None else [0.25, 0.75]
    assert init.samples_per_client == [4, 3]
    assert init.client_weights == pytest.approx(p)
    names = list(init.factors)
    G0, G1 = dense_gradients(tiny64, c0[:4], names), dense_gradients(tiny64, c1, names)
    for name, f in init.factors.items():
        assert_orthonormal(f)
        G = p[0] * G0[name] + p[1] * G1[name]
        assert rel_err(f.B @ f.R @ f.A, best_rank_r(G, 4)) < 1e-4, name
        # The weighting matters: the other client alone gives another step.
        assert rel_err(f.B @ f.R @ f.A, best_rank_r(G0[name], 4)) > 1e-2, name


def test_seeded_init_exchanges_nothing(tiny64):
    init = init_from_gradient(tiny64, [], collate_fn, TARGETS, 4, learning_rate=ETA, mode="seeded", seed=3)
    again = init_from_gradient(tiny64, [], collate_fn, TARGETS, 4, learning_rate=ETA, mode="seeded", seed=3)
    other = init_from_gradient(tiny64, [], collate_fn, TARGETS, 4, learning_rate=ETA, mode="seeded", seed=4)
    assert init.uplink_params_per_client == init.downlink_params_per_client == 0 and not init.non_federated
    names = list(init.factors)
    assert len(names) == 14
    for name, f in init.factors.items():
        assert_orthonormal(f)
        assert torch.equal(f.R, torch.zeros(4, 4, dtype=f.R.dtype))
        assert torch.equal(f.B, again.factors[name].B) and torch.equal(f.A, again.factors[name].A)
        assert not torch.allclose(f.B, other.factors[name].B)
    q0, q1 = (init.factors[n].B for n in names if n.endswith("q_proj"))
    assert not torch.allclose(q0, q1)  # each module draws its own factors from the shared seed
    model = fresh(tiny64)
    host = LoraSBHost(model, TARGETS)
    host.install(init)
    examples = make_examples(2, seed=0)
    torch.testing.assert_close(logits_of(model, examples), logits_of(tiny64, examples), atol=0, rtol=0)


def test_init_on_a_wrapped_model_and_reinstall(tiny64, pooled_init):
    """The estimate also runs on a model already wrapped by the host; a new init replaces B and A in place."""
    model = fresh(tiny64)
    host = LoraSBHost(model, TARGETS)
    host.install(init_from_gradient(model, [], collate_fn, TARGETS, 4, learning_rate=ETA, mode="seeded"))
    clients = [make_examples(6, seed=1), make_examples(4, seed=2)]
    again = init_from_gradient(
        model, clients, collate_fn, TARGETS, 4, learning_rate=ETA, mode="pooled", num_samples=10, niter=NITER
    )
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [f"{n}.R" for n in host.layers()]
    for name, f in again.factors.items():  # seeded R = 0: the wrapped model is the base model
        torch.testing.assert_close(f.delta(), pooled_init.factors[name].delta(), atol=1e-12, rtol=0)
    host.install(again)
    layer = host.layers()[name]
    torch.testing.assert_close(layer.B @ layer.R @ layer.A, pooled_init.factors[name].delta(), atol=1e-12, rtol=0)


def test_one_time_communication_counts(tiny64):
    per_layer_mn = sum(m * n for m, n in SHAPES.values())  # 36,864
    per_layer_m_plus_n = sum(m + n for m, n in SHAPES.values())  # 1,024
    layers, r = 2, 4
    clients = [make_examples(2, seed=1), make_examples(2, seed=2)]
    b_a_r = layers * (r * per_layer_m_plus_n + len(SHAPES) * r * r)  # B, A and the starting R
    for mode, up, down in [
        ("federated", layers * per_layer_mn, b_a_r),
        ("pooled", 0, b_a_r),
        ("seeded", 0, 0),
    ]:
        init = init_from_gradient(tiny64, clients, collate_fn, TARGETS, r, learning_rate=ETA, mode=mode, niter=1)
        assert (init.uplink_params_per_client, init.downlink_params_per_client) == (up, down), mode
        assert init.non_federated == (mode == "pooled")
        assert init.record()["mode"] == mode
    assert layers * per_layer_mn == 73_728 and layers * r * per_layer_m_plus_n == 8_192


# --- export as a standard PEFT LoRA adapter ---------------------------------------------------------------------


def test_export_loads_in_peft_with_the_same_logits(tmp_path):
    loaded = load_model("tiny-llama", seed=0)
    model = loaded.model
    for p in model.parameters():
        p.requires_grad_(False)
    clients = [make_examples(4, seed=1), make_examples(4, seed=2)]
    init = init_from_gradient(model, clients, collate_fn, TARGETS, 4, learning_rate=1e-2, mode="federated")
    host = LoraSBHost(model, TARGETS)
    host.install(init, scaling=2.0)
    settings = TrainSettings(max_steps=2, batch_size=4, micro_batch_size=4, learning_rate=1e-2, max_grad_norm=None)
    train_client(model, clients[0], settings, collate_fn)  # R moves away from the init
    examples = make_examples(3, seed=8)
    expected = logits_of(model, examples)

    folder = write_adapter(
        tmp_path / "adapter",
        host.export_factors(),
        {"base_model_name_or_path": loaded.path, "task_type": "CAUSAL_LM", "target_modules": TARGETS},
    )
    fresh_base = load_model("tiny-llama", seed=0).model
    peft_model = PeftModel.from_pretrained(fresh_base, str(folder))
    torch.testing.assert_close(logits_of(peft_model, examples), expected, atol=1e-5, rtol=0)
    with peft_model.disable_adapter(), host.disable_adapter():
        torch.testing.assert_close(logits_of(peft_model, examples), logits_of(model, examples), atol=1e-6, rtol=0)


# --- bad input ------------------------------------------------------------------------------------------------


def test_bad_input_errors_name_the_problem(tiny64, pooled_init):
    clients = [make_examples(2, seed=1)]
    kwargs = dict(learning_rate=ETA)
    with pytest.raises(TargetModuleError, match=r"\['qproj'\] not in the model.*q_proj"):
        init_from_gradient(tiny64, clients, collate_fn, ["qproj"], 4, **kwargs)
    with pytest.raises(TargetModuleError, match=r"rank 33 is larger .* \(32, module .*k_proj.*use a rank <= 32"):
        init_from_gradient(tiny64, clients, collate_fn, TARGETS, 33, **kwargs)
    with pytest.raises(LoraSBError, match="rank must be an integer >= 1"):
        init_from_gradient(tiny64, clients, collate_fn, TARGETS, 0, **kwargs)
    with pytest.raises(LoraSBError, match=r"mode 'pool'; valid: seeded, pooled, federated"):
        init_from_gradient(tiny64, clients, collate_fn, TARGETS, 4, mode="pool", **kwargs)
    with pytest.raises(LoraSBError, match="num_samples must be an integer >= 1, got 0"):
        init_from_gradient(tiny64, clients, collate_fn, TARGETS, 4, num_samples=0, **kwargs)
    with pytest.raises(LoraSBError, match="learning_rate"):
        init_from_gradient(tiny64, clients, collate_fn, TARGETS, 4, learning_rate=0.0)
    with pytest.raises(LoraSBError, match="needs the clients' examples"):
        init_from_gradient(tiny64, [], collate_fn, TARGETS, 4, mode="federated", **kwargs)
    with pytest.raises(LoraSBError, match=r"client\(s\) \[1\] have no examples"):
        init_from_gradient(tiny64, [clients[0], []], collate_fn, TARGETS, 4, mode="pooled", **kwargs)
    with pytest.raises(LoraSBError, match="2 clients but 1 weights"):
        init_from_gradient(tiny64, clients * 2, collate_fn, TARGETS, 4, mode="federated", weights=[1.0], **kwargs)
    no_targets = [{"input_ids": [5, 6, 7], "labels": [-100, -100, -100]}]
    with pytest.raises(LoraSBError, match="no target tokens"):
        init_from_gradient(tiny64, [no_targets], collate_fn, ["q_proj"], 4, **kwargs)
    assert all(p.grad is None for p in tiny64.parameters())  # a failed estimate leaves no gradients behind

    host = LoraSBHost(fresh(tiny64), TARGETS)
    with pytest.raises(LoraSBError, match="first LoRA-SB install needs init"):
        host.install()
    with pytest.raises(TargetModuleError, match="not in the model"):
        LoraSBHost(fresh(tiny64), ["nope"]).install(pooled_init)
    with pytest.raises(LoraSBError, match="missing modules"):
        LoraSBHost(fresh(tiny64), ["q_proj"]).install({})
    host.install(pooled_init)
    name = next(iter(host.layers()))
    with pytest.raises(LoraSBError, match="missing modules"):
        host.set_R({name: torch.zeros(4, 4)})
    bad = {n: torch.zeros(4, 4) for n in host.layers()} | {name: torch.zeros(3, 3)}
    with pytest.raises(LoraSBError, match=rf"module '{name}': R is \(3, 3\), expected \(4, 4\)"):
        host.set_R(bad)
    nan = {n: torch.zeros(4, 4) for n in host.layers()} | {name: torch.full((4, 4), float("nan"))}
    with pytest.raises(LoraSBError, match="NaN"):
        host.install(start=nan, scaling=3.0)
    assert host.scaling == 1.0  # a rejected install changes nothing
    with pytest.raises(LoraSBError, match="dropout"):
        LoraSBHost(tiny64, TARGETS, dropout=1.5)


# --- the real model ---------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_smollm2_init_all_projections_and_export(tmp_path):
    loaded = load_model("smollm2-135m-instruct")
    model, tokenizer = loaded.model, loaded.tokenizer
    for p in model.parameters():
        p.requires_grad_(False)
    records = load_commonsense(max_per_task=1)
    examples = tokenize_records(records, tokenizer, template="commonsense", cutoff_len=128, train_on_inputs=False)
    clients = [examples[: len(examples) // 2], examples[len(examples) // 2 :]]

    def smol_collate(batch):
        return collate(batch, tokenizer.pad_token_id)

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    init = init_from_gradient(
        model, clients, smol_collate, TARGETS, 8, learning_rate=1e-4, mode="federated", num_samples=4,
        micro_batch_size=4,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        f"\nSmolLM2 LoRA-SB init (federated, 7 projections x 30 layers, rank 8, {sum(init.samples_per_client)} "
        f"examples): {seconds:.1f} s, peak RSS {rss_after / 2**20:.2f} GB (before {rss_before / 2**20:.2f} GB)"
    )
    assert len(init.factors) == 7 * 30
    assert seconds < 600  # generous: the 2 shared cores make timings noisy
    assert rss_after < 8 * 2**20  # KB: well under 8 GB for a 0.5 GB model
    assert init.uplink_params_per_client == 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)
    for f in init.factors.values():
        assert torch.isfinite(f.R).all() and float(f.R[0, 0]) > 0

    host = LoraSBHost(model, TARGETS)
    host.install(init)
    batch_examples = examples[:2]
    expected = logits_of_with(model, batch_examples, smol_collate)
    with host.disable_adapter():
        base_logits = logits_of_with(model, batch_examples, smol_collate)
    assert (expected - base_logits).abs().max() > 1e-3  # the first step is pre-applied
    folder = write_adapter(
        tmp_path / "adapter",
        host.export_factors(),
        {"base_model_name_or_path": loaded.path, "task_type": "CAUSAL_LM", "target_modules": TARGETS},
    )
    del host, model
    peft_model = PeftModel.from_pretrained(load_model("smollm2-135m-instruct").model, str(folder))
    got = logits_of_with(peft_model, batch_examples, smol_collate)
    diff, scale = float((got - expected).abs().max()), float(expected.abs().max())
    effect = float((expected - base_logits).abs().max())
    print(f"SmolLM2 export: max |logit difference| {diff:.2e} (max |logit| {scale:.1f}, adapter effect {effect:.2e})")
    # float32 through 30 layers, B' (A x) in PEFT vs B (R (A x)) here: round-off relative to the logits' size
    assert diff <= 1e-5 * scale


def logits_of_with(model, examples, collate_fn_) -> torch.Tensor:
    batch = collate_fn_(examples)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
