"""Reading and writing PEFT LoRA adapter folders, on a tiny random Llama and adapters saved by PEFT itself.

The helpers at the top (``tiny_llama``, ``make_client``) are also used by ``test_aggregate_cli.py``.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import LlamaConfig, LlamaForCausalLM

from fedlora.adapter_io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterError,
    aggregate_adapters,
    read_adapter,
    write_adapter,
)
from fedlora.lowrank import AggregationError

TINY_LLAMA = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
}


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).eval()


@dataclass
class Client:
    """A client adapter saved by PEFT, with what PEFT itself says about it (independent of fedlora)."""

    path: Path
    ranks: dict[str, int]
    scalings: dict[str, float]
    factors: dict[str, tuple[Tensor, Tensor]]  # (B, A) as trained, float64
    deltas: dict[str, Tensor]  # PEFT's get_delta_weight: s * B @ A, float64


def make_client(base: LlamaForCausalLM, folder: Path, seed: int, a_seed: int | None = None, **lora: object) -> Client:
    """Save a PEFT LoRA adapter with random A and B (PEFT inits B to 0). ``a_seed`` shares lora_A across clients."""
    torch.manual_seed(seed if a_seed is None else a_seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(**lora))
    torch.manual_seed(seed)
    layers = {name: m for name, m in model.base_model.model.named_modules() if isinstance(m, LoraLayer)}
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B["default"].weight.normal_(0.0, 0.1)
    model.save_pretrained(folder)
    return Client(
        path=folder,
        ranks={n: m.r["default"] for n, m in layers.items()},
        scalings={n: m.scaling["default"] for n, m in layers.items()},
        factors={
            n: (m.lora_B["default"].weight.detach().double(), m.lora_A["default"].weight.detach().double())
            for n, m in layers.items()
        },
        deltas={n: m.get_delta_weight("default").detach().double() for n, m in layers.items()},
    )


def edit_config(folder: Path, **changes: object) -> None:
    config = json.loads((folder / CONFIG_NAME).read_text())
    config.update(changes)
    (folder / CONFIG_NAME).write_text(json.dumps(config))


def edit_tensors(folder: Path, edit) -> None:
    tensors = load_file(folder / WEIGHTS_NAME)
    edit(tensors)
    save_file(tensors, folder / WEIGHTS_NAME)


Q0 = "model.layers.0.self_attn.q_proj"
V0 = "model.layers.0.self_attn.v_proj"
Q1 = "model.layers.1.self_attn.q_proj"
V1 = "model.layers.1.self_attn.v_proj"
PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def base() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="module")
def clients(base, tmp_path_factory) -> list[Client]:
    root = tmp_path_factory.mktemp("clients")
    targets = ["q_proj", "v_proj"]
    return [
        make_client(base, root / "c0", seed=1, r=4, lora_alpha=8, target_modules=targets),
        make_client(
            base,
            root / "c1",
            seed=2,
            r=2,
            lora_alpha=16,
            target_modules=targets,
            rank_pattern={"v_proj": 3},
            alpha_pattern={Q1: 5},
        ),
        make_client(
            base,
            root / "c2",
            seed=3,
            r=8,
            lora_alpha=4,
            use_rslora=True,
            target_modules=targets,
            rank_pattern={"layers.0.self_attn.v_proj": 6},
        ),
    ]


@pytest.fixture
def client_copy(clients, tmp_path) -> Path:
    """A writable copy of client c1 (rank_pattern and alpha_pattern) to break in a test."""
    return Path(shutil.copytree(clients[1].path, tmp_path / "broken"))


# ------------------------------------------------------------------------------------------------------ reading


def test_read_gives_peft_ranks_scalings_and_factors(clients):
    for client in clients:
        adapter = read_adapter(client.path)
        assert list(adapter.modules) == [Q0, V0, Q1, V1]
        for name, factors in adapter.modules.items():
            B, A = client.factors[name]
            assert factors.rank == client.ranks[name]
            assert factors.scaling == pytest.approx(client.scalings[name], rel=1e-12)
            assert torch.equal(factors.B.double(), B) and torch.equal(factors.A.double(), A)
            torch.testing.assert_close(factors.delta().double(), client.deltas[name], atol=1e-6, rtol=0)
        assert adapter.num_parameters == sum(B.numel() + A.numel() for B, A in client.factors.values())
        assert adapter.num_bytes == 4 * adapter.num_parameters


def test_scaling_parsing_by_hand(clients):
    c1, c2 = read_adapter(clients[1].path), read_adapter(clients[2].path)
    # c1: r=2, alpha=16; v_proj rank 3 by rank_pattern; layer 1's q_proj alpha 5 by alpha_pattern.
    assert (c1.modules[Q0].rank, c1.modules[Q0].scaling) == (2, 8.0)
    assert (c1.modules[V0].rank, c1.modules[V0].scaling) == (3, pytest.approx(16 / 3))
    assert (c1.modules[Q1].rank, c1.modules[Q1].scaling) == (2, 2.5)
    # c2: rsLoRA, alpha 4 / sqrt(r), layer 0's v_proj rank 6.
    assert (c2.modules[V0].rank, c2.modules[V0].scaling) == (6, pytest.approx(4 / math.sqrt(6)))
    assert (c2.modules[V1].rank, c2.modules[V1].scaling) == (8, pytest.approx(4 / math.sqrt(8)))


def test_keys_with_adapter_name_are_accepted(clients, client_copy):
    def rename(tensors):
        for key in list(tensors):
            tensors[key.replace(".weight", ".default.weight")] = tensors.pop(key)

    edit_tensors(client_copy, rename)
    renamed, original = read_adapter(client_copy), read_adapter(clients[1].path)
    assert renamed.modules.keys() == original.modules.keys()
    for name, factors in renamed.modules.items():
        assert torch.equal(factors.B, original.modules[name].B) and factors.scaling == original.modules[name].scaling


def _nan_in_b(t):
    t[f"{PREFIX}{V1}.lora_B.weight"][0, 0] = float("nan")


def _drop_b(t):
    del t[f"{PREFIX}{V1}.lora_B.weight"]


def _embedding(t):
    t[f"{PREFIX}model.embed_tokens.lora_embedding_A"] = torch.zeros(2, 128)


def _extra_head(t):
    t[f"{PREFIX}lm_head.weight"] = torch.zeros(128, 64)


def _lora_bias(t):
    t[f"{PREFIX}{V1}.lora_B.bias"] = torch.zeros(32)


def _dora(t):
    t[f"{PREFIX}{V1}.lora_magnitude_vector.weight"] = torch.ones(32)


def _conv(t):
    t[f"{PREFIX}{V1}.lora_A.weight"] = torch.zeros(3, 64, 1, 1)


def _second_adapter(t):
    t[f"{PREFIX}{V1}.lora_A.other.weight"] = torch.zeros(3, 64)


def _rank_mismatch(t):
    key = f"{PREFIX}{V1}.lora_A.weight"
    t[key] = t[key][:2].clone()


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (_nan_in_b, [V1, "NaN", WEIGHTS_NAME]),
        (_drop_b, [V1, "lora_B is missing"]),
        (_embedding, ["embed_tokens", "embedding"]),
        (_extra_head, ["lm_head.weight", "modules_to_save"]),
        (_lora_bias, [V1, "LoRA bias"]),
        (_dora, [V1, "DoRA"]),
        (_conv, [V1, "convolutions"]),
        (_second_adapter, ["several adapters"]),
        (_rank_mismatch, [V1, "lora_B is (32, 3) but lora_A is (2, 64)"]),
    ],
)
def test_refuses_bad_tensors(client_copy, edit, expected):
    edit_tensors(client_copy, edit)
    with pytest.raises(AdapterError) as err:
        read_adapter(client_copy)
    for text in expected:
        assert text in str(err.value)
    assert "broken" in str(err.value)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"peft_type": "PREFIX_TUNING"}, ["peft_type", "PREFIX_TUNING"]),
        ({"use_dora": True}, ["use_dora", "DoRA"]),
        ({"lora_bias": True}, ["lora_bias"]),
        ({"modules_to_save": ["lm_head"]}, ["modules_to_save"]),
        ({"init_lora_weights": "pissa"}, ["pissa", "path_initial_model_for_weight_conversion"]),
        ({"rank_pattern": {"v_proj": 4}}, [V0, "rank 3", "r = 4"]),
        ({"rank_pattern": {}}, [V0, "rank 3", "r = 2"]),
        ({"r": "eight"}, ["r = 'eight'"]),
    ],
)
def test_refuses_bad_configs(client_copy, changes, expected):
    edit_config(client_copy, **changes)
    with pytest.raises(AdapterError) as err:
        read_adapter(client_copy)
    for text in [*expected, "broken"]:
        assert text in str(err.value)


def test_refuses_pickle_missing_and_non_adapter_folders(client_copy, tmp_path):
    (client_copy / WEIGHTS_NAME).rename(client_copy / "adapter_model.bin")
    with pytest.raises(AdapterError, match=r"adapter_model\.bin.*never loaded.*convert"):
        read_adapter(client_copy)
    with pytest.raises(AdapterError, match="does not exist"):
        read_adapter(tmp_path / "nowhere")
    with pytest.raises(AdapterError, match=r"adapter_config\.json is missing"):
        read_adapter(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(AdapterError, match="cannot be read as JSON"):
        read_adapter(tmp_path)


# ------------------------------------------------------------------------------------------------------ writing


def _factors(m: int, n: int, r: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, generator=g), torch.randn(r, n, generator=g)


def test_write_read_round_trip_and_peft_loads_it(base, clients, tmp_path):
    modules = {
        Q0: _factors(64, 64, 5, 0),
        V0: _factors(32, 64, 3, 1),
        Q1: _factors(64, 64, 5, 2),
        V1: (torch.zeros(32, 0), torch.zeros(0, 64)),  # a zero update: stored as rank 1 zeros
    }
    template = read_adapter(clients[1].path).config | {"base_model_name_or_path": "tiny", "task_type": "CAUSAL_LM"}
    out = write_adapter(tmp_path / "out", modules, template)

    config = json.loads((out / CONFIG_NAME).read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (5, 5, False)
    assert config["rank_pattern"] == config["alpha_pattern"] == {V0: 3, V1: 1}
    assert config["base_model_name_or_path"] == "tiny" and config["task_type"] == "CAUSAL_LM"
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left

    adapter = read_adapter(out)
    assert list(adapter.modules) == [Q0, V0, Q1, V1]
    for name, (B, A) in modules.items():
        got = adapter.modules[name]
        assert got.scaling == 1.0
        if A.shape[0] == 0:
            assert got.rank == 1 and not got.B.any() and not got.A.any()
        else:
            assert torch.equal(got.B, B) and torch.equal(got.A, A)

    model = PeftModel.from_pretrained(copy.deepcopy(base), out)
    for name, (B, A) in modules.items():
        delta = model.base_model.model.get_submodule(name).get_delta_weight("default")
        torch.testing.assert_close(delta, B @ A, atol=1e-5, rtol=1e-5)


def test_write_dtype_overwrite_and_refusals(clients, tmp_path):
    template = read_adapter(clients[0].path).config
    modules = {Q0: _factors(64, 64, 2, 0)}
    out = write_adapter(tmp_path / "out", modules, template, dtype=torch.bfloat16)
    assert read_adapter(out).modules[Q0].A.dtype == torch.bfloat16

    with pytest.raises(AdapterError, match="exists and is not empty"):
        write_adapter(out, {Q0: _factors(64, 64, 3, 1)}, template)
    assert read_adapter(out).modules[Q0].rank == 2  # untouched
    write_adapter(out, {Q0: _factors(64, 64, 3, 1)}, template, overwrite=True)
    assert read_adapter(out).modules[Q0].rank == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    (tmp_path / "empty").mkdir()
    write_adapter(tmp_path / "empty", modules, template)  # an empty folder is fine
    with pytest.raises(AdapterError, match="NaN"):
        write_adapter(tmp_path / "nan", {Q0: (torch.full((64, 2), math.nan), torch.zeros(2, 64))}, template)
    with pytest.raises(AdapterError, match=r"do not select.*lm_head"):
        write_adapter(tmp_path / "head", {"lm_head": _factors(128, 64, 2, 0)}, template)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "out"]


def test_failed_write_leaves_nothing_behind(clients, tmp_path, monkeypatch):
    import safetensors.torch

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    template = read_adapter(clients[0].path).config
    with pytest.raises(OSError, match="No space"):
        write_adapter(tmp_path / "out", {Q0: _factors(64, 64, 2, 0)}, template)
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------------------------------------- aggregating


def test_aggregate_adapters_report_and_sizes(clients):
    result = aggregate_adapters([c.path for c in clients], "flora", weights=[1, 2, 3])
    torch.testing.assert_close(result.weights, torch.tensor([1, 2, 3], dtype=torch.float64) / 6)
    row = {r.module: r for r in result.rows}[V0]
    assert (row.ranks_in, row.rank_out, row.energy_kept) == ((4, 3, 6), 13, 1.0)
    in_params = sum(B.numel() + A.numel() for c in clients for B, A in c.factors.values())
    assert (result.input_parameters, result.input_bytes) == (in_params, 4 * in_params)
    # FLoRA's stack holds every client's factors: the output is exactly as large as the inputs.
    assert result.output_size() == (in_params, 4 * in_params)
    for name, (B, A) in result.output_modules().items():
        expected = sum(w * c.deltas[name] for w, c in zip([1 / 6, 2 / 6, 3 / 6], clients, strict=True))
        torch.testing.assert_close((B @ A).double(), expected, atol=1e-6, rtol=0)


def test_aggregate_adapters_refuses_mismatched_inputs(base, clients, tmp_path):
    only_q = make_client(base, tmp_path / "only_q", seed=4, r=4, lora_alpha=8, target_modules=["q_proj"])
    with pytest.raises(AggregationError, match=r"only_q.*different set of modules.*missing 2.*v_proj"):
        aggregate_adapters([clients[0].path, only_q.path], "flora")

    paths = [c.path for c in clients]
    with pytest.raises(AggregationError, match="3 adapter folders but 2 weights"):
        aggregate_adapters(paths, "flora", weights=[1, 2])
    with pytest.raises(AggregationError, match="non-negative"):
        aggregate_adapters(paths, "flora", weights=[1, -2, 3])
    with pytest.raises(AggregationError, match="all zero"):
        aggregate_adapters(paths, "flora", weights=[0, 0, 0])
    with pytest.raises(AggregationError, match="finite"):
        aggregate_adapters(paths, "flora", weights=[1, math.nan, 3])
    # A method error names the module and says which folder each client index is.
    with pytest.raises(AggregationError, match=r"same LoRA rank.*model\.layers\.0.*clients: 0 = .*c0"):
        aggregate_adapters(paths, "fedex")
