"""Communication accounting: published figures reproduced exactly, per-method formulas, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from fedlora.comm import (
    PRESETS,
    TARGETS,
    CommError,
    comm_to_dict,
    communication_cost,
    load_arch_config,
    parse_targets,
    resolve_arch,
    tensor_bytes,
    tensor_params,
)
from fedlora.commands.comm import comm
from fedlora.methods import METHODS

QV = "q_proj,v_proj"
HET = [64, 32, 16, 16, 8, 8, 4, 4]


def cost(model, method, ranks, targets=QV, **kw):
    return communication_cost(model, targets, method, ranks, **kw)


# --- published figures ---------------------------------------------------------------------------------


def test_tinyllama_qv_rank16_uplink_and_flora_stack():
    # q: 16 * (2048 + 2048), v: 16 * (256 + 2048), 22 layers
    assert 22 * 16 * (4096 + 2304) == 2_252_800
    res = cost("tinyllama-1.1b", "fedit", 16, clients=8)
    assert res.modules == 44
    assert res.uplink_params == [2_252_800] * 8
    assert res.downlink_params == [2_252_800] * 8
    flora = cost("tinyllama-1.1b", "flora", 16, clients=8)
    assert flora.uplink_params == [2_252_800] * 8
    assert flora.downlink_params == [18_022_400] * 8


def test_llama7b_qv_rank16():
    fedit = cost("llama-7b", "fedit", 16, clients=8)
    assert fedit.modules == 64
    assert fedit.uplink_params[0] == 8_388_608
    assert cost("llama-7b", "flora", 16, clients=8).downlink_params[0] == 67_108_864  # the 67.1 M stack


@pytest.mark.parametrize(
    ("model", "method", "rank_sum", "efficiency_e4"),
    [
        ("tinyllama-1.1b", "fedit", 44 * 16, 14.20),
        ("tinyllama-1.1b", "flora", 44 * 128, 1.78),
        ("tinyllama-1.1b", "ffa", 44 * 8, 28.40),
        ("llama-7b", "fedit", 64 * 16, 9.77),
        ("llama-7b", "flora", 64 * 128, 1.22),
    ],
)
def test_florist_paper_efficiency_column(model, method, rank_sum, efficiency_e4):
    res = cost(model, method, 16, clients=8)
    assert res.global_rank_sum == rank_sum
    assert res.efficiency == pytest.approx(1 / rank_sum)
    # the paper prints 1/352 = 28.409e-4 as 28.40 (truncated); the other four are rounded
    assert res.efficiency * 1e4 == pytest.approx(efficiency_e4, abs=0.01)


@pytest.mark.parametrize(
    ("model", "lora_params", "fedsb_params"),
    [("llama-3.2-3b", 48_627_712, 7_840_000), ("mistral-7b", 83_886_080, 8_960_000)],
)
def test_all_linear_lora_vs_fedsb(model, lora_params, fedsb_params):
    lora = cost(model, "fedit", 32, targets="all-linear", clients=4)
    assert lora.modules == 7 * PRESETS[model].num_layers
    assert lora.uplink_params == [lora_params] * 4
    sb = cost(model, "fedsb", 200, targets="all-linear", clients=4)
    assert sb.uplink_params == [fedsb_params] * 4
    assert sb.downlink_params == [fedsb_params] * 4


def test_fedsb_independent_of_clients_flora_grows():
    sb = [cost("llama-3.2-3b", "fedsb", 200, targets="all-linear", clients=k).downlink_params[0] for k in (2, 8, 25)]
    assert sb == [7_840_000] * 3
    flora = [cost("llama-3.2-3b", "flora", 32, targets="all-linear", clients=k).downlink_params[0] for k in (2, 8, 25)]
    assert flora == [k * 48_627_712 for k in (2, 8, 25)]


# --- shapes ----------------------------------------------------------------------------------------------


def independent_shapes(hidden, heads, kv, head_dim, inter):
    q, kvd = heads * head_dim, kv * head_dim
    return {
        "q_proj": (q, hidden),
        "k_proj": (kvd, hidden),
        "v_proj": (kvd, hidden),
        "o_proj": (hidden, q),
        "gate_proj": (inter, hidden),
        "up_proj": (inter, hidden),
        "down_proj": (hidden, inter),
    }


@pytest.mark.parametrize(
    ("name", "layers", "dims"),
    [
        ("smollm2-135m", 30, (576, 9, 3, 64, 1536)),
        ("tinyllama-1.1b", 22, (2048, 32, 4, 64, 5632)),
        ("llama-3.2-1b", 16, (2048, 32, 8, 64, 8192)),
        ("llama-3.2-3b", 28, (3072, 24, 8, 128, 8192)),
        ("llama-7b", 32, (4096, 32, 32, 128, 11008)),
        ("mistral-7b", 32, (4096, 32, 8, 128, 14336)),
        ("gemma-2-9b", 42, (3584, 16, 8, 256, 14336)),
    ],
)
def test_preset_shapes(name, layers, dims):
    arch = resolve_arch(name.upper())
    assert arch.num_layers == layers
    for target, shape in independent_shapes(*dims).items():
        assert arch.module_shape(target) == shape


def test_gemma2_q_proj_is_not_square():
    res = cost("gemma-2-9b", "fedit", 8, targets="q_proj", clients=2)
    assert res.targets[0].shape == (4096, 3584)
    assert res.uplink_params[0] == 42 * 8 * (4096 + 3584)
    assert cost("gemma-2-9b", "ffa", 8, targets="q_proj", clients=2).uplink_params[0] == 42 * 8 * 4096  # r*m


def test_smollm2_real_model_count():
    # SmolLM2-135M with q,v at r=16: PEFT's trainable parameter count 30 * 16 * ((576+576) + (192+576))
    assert cost("smollm2-135m", "fedit", 16, clients=1).uplink_params == [921_600]


def test_targets_order_dedup_and_errors():
    assert parse_targets("v_proj, q_proj,q_proj") == ("q_proj", "v_proj")
    assert parse_targets(["all-linear"]) == TARGETS
    with pytest.raises(CommError, match=r"unknown target module.*'qkv'.*valid: q_proj"):
        parse_targets("q_proj,qkv")


def test_config_json(tmp_path):
    config = {
        "num_hidden_layers": 3,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 100,
        "head_dim": None,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    arch = load_arch_config(tmp_path)  # a model folder
    assert arch.head_dim == 16
    assert arch.module_shape("k_proj") == (32, 64)
    res = cost(str(tmp_path / "config.json"), "flexlora", 4, targets="k_proj,down_proj", clients=2)
    assert res.uplink_params == [3 * 4 * ((32 + 64) + (64 + 100))] * 2
    # explicit head_dim (Gemma-style) and missing KV heads (pre-GQA)
    del config["num_key_value_heads"]
    config["head_dim"] = 32
    (tmp_path / "other.json").write_text(json.dumps(config))
    assert load_arch_config(tmp_path / "other.json").module_shape("q_proj") == (128, 64)
    assert load_arch_config(tmp_path / "other.json").module_shape("v_proj") == (128, 64)
    del config["intermediate_size"]
    (tmp_path / "bad.json").write_text(json.dumps(config))
    with pytest.raises(CommError, match=r"bad\.json: missing field\(s\) intermediate_size"):
        load_arch_config(tmp_path / "bad.json")
    with pytest.raises(CommError, match="config file not found"):
        resolve_arch(tmp_path / "nope.json")
    with pytest.raises(CommError, match=r"unknown model 'gpt-5'.*tinyllama-1\.1b"):
        resolve_arch("gpt-5")


# --- per-method formulas, heterogeneous ranks ---------------------------------------------------------------


def test_heterogeneous_ranks():
    q, v = 4096, 2304  # TinyLlama m + n of q_proj and v_proj
    per_rank = 22 * (q + v)
    fedit = cost("tinyllama-1.1b", "fedit", HET)
    assert fedit.clients == 8
    assert fedit.uplink_params == [r * per_rank for r in HET]
    assert fedit.downlink_params == [r * per_rank for r in HET]  # each client its own truncation
    assert fedit.global_rank_sum == 44 * 64
    flex = cost("tinyllama-1.1b", "flexlora", HET)
    assert flex.downlink_params == fedit.downlink_params
    assert flex.global_rank_sum == 44 * 64
    flora = cost("tinyllama-1.1b", "flora", HET)
    assert flora.uplink_params == [r * per_rank for r in HET]
    assert flora.downlink_params == [152 * per_rank] * 8
    assert flora.global_rank_sum == 44 * 152
    florist = cost("tinyllama-1.1b", "florist", HET)
    assert florist.global_rank_upper_bound
    assert florist.downlink_params == [152 * per_rank] * 8  # k* <= min(152, m, n) = 152
    assert any("upper bound" in n for n in florist.notes)


@pytest.mark.parametrize("method", ["ffa", "fedex", "fedsb"])
def test_mixed_ranks_rejected(method):
    assert not METHODS[method].heterogeneous
    with pytest.raises(CommError, match=rf"{method} needs the same rank on every client.*64, 32"):
        cost("tinyllama-1.1b", method, HET)


def test_florist_global_rank_inputs():
    one = cost("tinyllama-1.1b", "florist", 16, clients=8, global_rank=10)
    assert not one.global_rank_upper_bound
    assert one.downlink_params == [22 * 10 * (4096 + 2304)] * 8
    assert one.global_rank_sum == 440
    per_target = cost("tinyllama-1.1b", "florist", 16, clients=8, global_rank=[10, 2])
    assert per_target.downlink_params == [22 * (10 * 4096 + 2 * 2304)] * 8
    per_module = list(range(44))  # layer 0 q, layer 0 v, layer 1 q, ...
    res = cost("tinyllama-1.1b", "florist", 16, clients=8, global_rank=per_module)
    assert res.global_ranks == tuple(per_module)
    q_down = sum(per_module[0::2]) * 4096
    v_down = sum(per_module[1::2]) * 2304
    assert res.downlink_params == [q_down + v_down] * 8
    with pytest.raises(CommError, match="3 values given"):
        cost("tinyllama-1.1b", "florist", 16, clients=8, global_rank=[1, 2, 3])
    # bound min(sum r_k, m, n) = min(128, 2048, 2048) for q_proj
    with pytest.raises(CommError, match=r"layer 0 q_proj must be an integer in \[0, 128\]"):
        cost("tinyllama-1.1b", "florist", 16, clients=8, global_rank=129)
    with pytest.raises(CommError, match="florist only"):
        cost("tinyllama-1.1b", "fedit", 16, clients=8, global_rank=4)


def test_florist_upper_bound_uses_module_shape():
    # sum of ranks 8 * 64 = 512 > v_proj's m = 256 on TinyLlama
    res = cost("tinyllama-1.1b", "florist", 64, clients=8)
    assert res.global_ranks[:2] == (512, 256)


def test_ffa_fedex_formulas():
    m_q, m_v, n = 2048, 256, 2048
    ffa = cost("tinyllama-1.1b", "ffa", 16, clients=3)
    assert ffa.uplink_params == ffa.downlink_params == [22 * 16 * (m_q + m_v)] * 3
    fedex = cost("tinyllama-1.1b", "fedex", 16, clients=3)
    assert fedex.uplink_params == [2_252_800] * 3
    assert fedex.downlink_params == [2_252_800 + 22 * (m_q * n + m_v * n)] * 3
    assert fedex.global_rank_sum == 44 * 16
    assert cost("tinyllama-1.1b", "ffa", 5, clients=2).global_rank_sum == 44 * 2.5


def test_fedsb_init_modes():
    r, layers = 200, 28
    shapes = [PRESETS["llama-3.2-3b"].module_shape(t) for t in TARGETS]
    ab = layers * sum(r * (m + n) + r * r for m, n in shapes)  # B, A and the starting R
    dense = layers * sum(m * n for m, n in shapes)
    seeded = cost("llama-3.2-3b", "fedsb", r, targets="all-linear", clients=5)
    assert seeded.one_time.mode == "seeded"
    assert (seeded.one_time.uplink_params, seeded.one_time.downlink_params) == (0, 0)
    pooled = cost("llama-3.2-3b", "fedsb", r, targets="all-linear", clients=5, init_mode="pooled")
    assert (pooled.one_time.uplink_params, pooled.one_time.downlink_params) == (0, ab)
    assert not pooled.one_time.federated
    assert "NOT FEDERATED" in pooled.one_time.note and "not counted" in pooled.one_time.note
    fed = cost("llama-3.2-3b", "fedsb", r, targets="all-linear", clients=5, init_mode="federated", rounds=3)
    assert (fed.one_time.uplink_params, fed.one_time.downlink_params) == (dense, ab)
    assert fed.total_uplink_params == 3 * 5 * 7_840_000 + 5 * dense
    assert fed.total_downlink_params == 3 * 5 * 7_840_000 + 5 * ab
    with pytest.raises(CommError, match="valid: seeded, pooled, federated"):
        cost("llama-3.2-3b", "fedsb", r, init_mode="magic", clients=2)
    with pytest.raises(CommError, match="fedsb only"):
        cost("llama-3.2-3b", "flora", r, init_mode="pooled", clients=2)


def test_bytes_rounds_and_dict():
    res = cost("tinyllama-1.1b", "flora", 16, clients=8, dtype="bf16", rounds=5)
    assert res.uplink_bytes == [2 * 2_252_800] * 8
    d = json.loads(json.dumps(comm_to_dict(res)))
    assert d["modules"] == 44 and d["clients"] == 8 and d["ranks"] == [16] * 8
    assert d["per_round"]["uplink_params"] == 8 * 2_252_800
    assert d["per_round"]["downlink_bytes"] == 2 * 8 * 18_022_400
    assert d["total"]["params"] == 5 * 8 * (2_252_800 + 18_022_400)
    assert d["global_rank_sum"] == 44 * 128
    assert cost("llama-7b", "fedit", 16, clients=1, dtype="fp64").uplink_bytes == [8 * 8_388_608]
    with pytest.raises(CommError, match="unknown dtype 'int3'"):
        cost("llama-7b", "fedit", 16, clients=1, dtype="int3")


@pytest.mark.parametrize(
    ("ranks", "clients", "match"),
    [(16, None, "needs the number of clients"), ([8, 8], 3, "2 ranks given for 3 clients"), ([8, 0], None, "positive")],
)
def test_bad_ranks(ranks, clients, match):
    with pytest.raises(CommError, match=match):
        cost("tinyllama-1.1b", "fedit", ranks, clients=clients)


def test_unknown_method():
    with pytest.raises(CommError, match="unknown method 'fedavg'; valid: fedit, flora"):
        cost("tinyllama-1.1b", "fedavg", 8, clients=2)


def test_tensor_counts_match_analytic_payload():
    # A real FLoRA uplink payload of one client of a small config equals the analytic count.
    payload = {"q": {"A": torch.zeros(4, 64), "B": torch.zeros(64, 4)}, "v": [torch.zeros(4, 64), torch.zeros(32, 4)]}
    assert tensor_params(payload) == 4 * (64 + 64) + 4 * (64 + 32)
    assert tensor_bytes(payload) == 4 * tensor_params(payload)
    assert tensor_bytes([torch.zeros(3, dtype=torch.bfloat16), None]) == 6
    with pytest.raises(CommError, match="cannot count"):
        tensor_params({"x": 3.0})


# --- the CLI -----------------------------------------------------------------------------------------------

app = typer.Typer()
app.command()(comm)
runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))


def test_cli_json_single_method():
    result = run("--model", "tinyllama-1.1b", "--method", "flora", "--clients", "8", "--rank", "16", "--json")
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert d["model"] == "tinyllama-1.1b" and d["method"] == "flora" and d["modules"] == 44
    assert d["uplink_params"] == [2_252_800] * 8
    assert d["downlink_params"] == [18_022_400] * 8
    assert d["uplink_bytes"] == [4 * 2_252_800] * 8
    assert d["efficiency"] == pytest.approx(1 / (44 * 128))


def test_cli_json_fedsb_pooled_and_ranks_sets_clients():
    result = run(
        "--model", "llama-3.2-3b", "--targets", "all-linear", "--method", "fedsb", "--ranks", "200,200,200",
        "--init-mode", "pooled", "--json", "--rounds", "2",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert d["clients"] == 3 and d["uplink_params"] == [7_840_000] * 3
    assert d["one_time"]["mode"] == "pooled" and d["one_time"]["non_federated"] is True
    assert d["total"]["uplink_params"] == 2 * 3 * 7_840_000


def test_cli_all_methods_table_and_json():
    args = ["--model", "tinyllama-1.1b", "--method", "all", "--ranks", ",".join(map(str, HET))]
    table = run(*args)
    assert table.exit_code == 0, table.output
    assert "florist" in table.stdout and "skipped ffa" in table.stdout
    d = json.loads(run(*args, "--json").stdout)
    by_method = {entry["method"]: entry for entry in d}
    assert set(by_method) == set(METHODS)
    assert "error" in by_method["fedsb"] and by_method["flora"]["downlink_params"] == [152 * 22 * 6400] * 8
    single = run("--model", "mistral-7b", "--method", "fedsb", "--rank", "200", "--targets", "all-linear")
    assert single.exit_code == 0 and "Totals" in single.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "gpt-5", "--method", "fedit", "--rank", "8"], "unknown model"),
        (["--model", "llama-7b", "--method", "fedavg", "--rank", "8"], "unknown method"),
        (["--model", "llama-7b", "--method", "fedit", "--rank", "8", "--targets", "qkv"], "unknown target"),
        (["--model", "llama-7b", "--method", "fedit", "--ranks", "8,x"], "expects integers"),
        (["--model", "llama-7b", "--method", "fedit", "--ranks", "8,8", "--clients", "3"], "2 ranks given"),
        (["--model", "llama-7b", "--method", "ffa", "--ranks", "8,4"], "same rank"),
        (["--model", "llama-7b", "--method", "fedit"], "give --rank"),
        (["--model", "/no/such/config.json", "--method", "fedit", "--rank", "8"], "config file not found"),
        (["--model", "llama-7b", "--method", "fedit", "--rank", "8", "--global-rank", "4"], "florist only"),
    ],
)
def test_cli_errors(args, message):
    result = run(*args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
