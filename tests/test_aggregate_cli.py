"""``fedlora aggregate`` end to end: PEFT-saved client adapters in, a folder PEFT loads out.

Every method's output is checked against numbers computed here from what PEFT itself reports about the clients
(``get_delta_weight``, its factors and scalings), never against fedlora's own code: the loaded output's delta per
module, and the logits of the adapted model against a base model with that dense delta added.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import typer
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from torch import Tensor
from typer.testing import CliRunner

from fedlora.commands.aggregate import aggregate
from test_adapter_io import CONFIG_NAME, Client, edit_tensors, make_client, tiny_llama

app = typer.Typer()
app.command()(aggregate)
runner = CliRunner()


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


@pytest.fixture(scope="module")
def client_sets(base, tmp_path_factory) -> dict[str, list[Client]]:
    root = tmp_path_factory.mktemp("sets")
    qv = ["q_proj", "v_proj"]
    ko = ["k_proj", "o_proj"]
    return {
        # Mixed ranks and alphas, rank_pattern / alpha_pattern, rsLoRA with a pattern; v_proj is 32 x 64.
        "hetero": [
            make_client(base, root / "h0", seed=1, r=4, lora_alpha=8, target_modules=qv),
            make_client(
                base,
                root / "h1",
                seed=2,
                r=2,
                lora_alpha=16,
                target_modules=qv,
                rank_pattern={"v_proj": 3},
                alpha_pattern={"model.layers.1.self_attn.q_proj": 5},
            ),
            make_client(
                base,
                root / "h2",
                seed=3,
                r=8,
                lora_alpha=4,
                use_rslora=True,
                target_modules=qv,
                rank_pattern={"layers.0.self_attn.v_proj": 6},
            ),
        ],
        # One rank per module on every client (o_proj rank 2 by rank_pattern), different alphas: FedEx.
        "same_rank": [
            make_client(base, root / "s0", seed=4, r=4, lora_alpha=8, target_modules=ko, rank_pattern={"o_proj": 2}),
            make_client(
                base,
                root / "s1",
                seed=5,
                r=4,
                lora_alpha=16,
                use_rslora=True,
                target_modules=ko,
                rank_pattern={"o_proj": 2},
            ),
            make_client(base, root / "s2", seed=6, r=4, lora_alpha=4, target_modules=ko, rank_pattern={"o_proj": 2}),
        ],
        # FFA-LoRA: lora_A from one shared seed, own B and alpha per client.
        "shared_a": [
            make_client(base, root / "f0", seed=7, a_seed=100, r=4, lora_alpha=8, target_modules=qv),
            make_client(base, root / "f1", seed=8, a_seed=100, r=4, lora_alpha=16, target_modules=qv),
        ],
        # LoRA-SB exports: shared lora_A, lora_B = B R_k, lora_alpha = r (scaling 1).
        "lora_sb": [
            make_client(base, root / f"b{k}", seed=9 + k, a_seed=200, r=4, lora_alpha=4, target_modules=["k_proj"])
            for k in range(3)
        ],
    }


def weighted(values: list[float]) -> list[float]:
    return [v / sum(values) for v in values]


def exact_sum(clients: list[Client], p: list[float]) -> dict[str, Tensor]:
    return {name: sum(w * c.deltas[name] for w, c in zip(p, clients, strict=True)) for name in clients[0].deltas}


def truncated_svd(dense: Tensor, tau: float, cap: int | None) -> Tensor:
    """FLoRIST's rule computed on the dense matrix: smallest k holding a share tau of the energy, then the cap."""
    U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
    energy = torch.cumsum(S.square(), 0) / S.square().sum()
    k = int(torch.nonzero(energy >= tau - 1e-12)[0]) + 1
    if k > 1:
        assert energy[k - 2] < tau - 1e-3, "test data puts an energy level too close to tau"
    if cap is not None and cap < k:
        k = cap
        assert S[k - 1] - S[k] > 1e-3 * S[0], "test data has a near-tie at the rank cap"
    return U[:, :k] * S[:k] @ Vh[:k]


def fedit_average(clients: list[Client], p: list[float]) -> dict[str, Tensor]:
    """Zero-pad s_k B_k and A_k to the largest rank, average each, multiply."""
    out = {}
    for name in clients[0].factors:
        r_max = max(c.ranks[name] for c in clients)
        B_g, A_g = 0.0, 0.0
        for w, c in zip(p, clients, strict=True):
            B, A = c.factors[name]
            r = c.ranks[name]
            B_g = B_g + w * torch.nn.functional.pad(c.scalings[name] * B, (0, r_max - r))
            A_g = A_g + w * torch.nn.functional.pad(A, (0, 0, 0, r_max - r))
        out[name] = B_g @ A_g
    return out


# (id, client set, weights, CLI options, expected global update per module)
CASES = [
    ("flora", "hetero", [1, 2, 3], ["--method", "flora"], exact_sum),
    ("florist-tau1", "hetero", [1, 2, 3], ["--method", "florist", "--threshold", "1"], exact_sum),
    (
        "florist-tau0.8",
        "hetero",
        [1, 2, 3],
        ["--method", "florist", "--threshold", "0.8"],
        lambda cs, p: {n: truncated_svd(d, 0.8, None) for n, d in exact_sum(cs, p).items()},
    ),
    (
        "florist-rank3",
        "hetero",
        [3, 1, 1],
        ["--method", "florist", "--threshold", "0.95", "--rank", "3"],
        lambda cs, p: {n: truncated_svd(d, 0.95, 3) for n, d in exact_sum(cs, p).items()},
    ),
    ("flexlora", "hetero", [1, 2, 3], ["--method", "flexlora"], exact_sum),
    (
        "flexlora-rank2",
        "hetero",
        [1, 1, 1],
        ["--method", "flexlora", "--rank", "2"],
        lambda cs, p: {n: truncated_svd(d, 1.0, 2) for n, d in exact_sum(cs, p).items()},
    ),
    ("fedit", "hetero", [1, 2, 3], ["--method", "fedit"], fedit_average),
    ("fedex", "same_rank", [10, 30, 60], ["--method", "fedex"], exact_sum),
    ("ffa", "shared_a", [100, 300], ["--method", "ffa"], exact_sum),
    ("fedsb", "lora_sb", [1, 2, 1], ["--method", "fedsb"], exact_sum),
]


def run(args: list[str]):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    return result


def load_adapted(base, folder: Path) -> PeftModel:
    return PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()


@pytest.mark.parametrize(("case", "set_name", "weights", "options", "expected_fn"), CASES, ids=[c[0] for c in CASES])
def test_output_loads_in_peft_and_equals_the_global_update(
    base, client_sets, tmp_path, case, set_name, weights, options, expected_fn
):
    clients = client_sets[set_name]
    out = tmp_path / "out"
    result = run([*options, "--weights", ",".join(map(str, weights)), "--output", out, *(c.path for c in clients)])
    assert result.exit_code == 0, result.output
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert "total (" in result.stdout and "MB" in result.stdout

    expected = expected_fn(clients, weighted(weights))
    model = load_adapted(base, out)
    layers = {n: m for n, m in model.base_model.model.named_modules() if isinstance(m, LoraLayer)}
    assert layers.keys() == expected.keys()
    for name, delta in expected.items():
        got = layers[name].get_delta_weight("default").double()
        torch.testing.assert_close(got, delta, atol=1e-5, rtol=0, msg=f"{case}: module {name}")

    merged = copy.deepcopy(base)
    with torch.no_grad():
        for name, delta in expected.items():
            merged.get_submodule(name).weight += delta.float()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_fedex_output_starts_with_the_global_adapter(client_sets, tmp_path):
    clients, p = client_sets["same_rank"], weighted([10, 30, 60])
    run(["--method", "fedex", "--weights", "10,30,60", "--output", tmp_path / "out", *(c.path for c in clients)])
    tensors = load_file(tmp_path / "out" / "adapter_model.safetensors")
    config = json.loads((tmp_path / "out" / CONFIG_NAME).read_text())
    for name in clients[0].factors:
        r = clients[0].ranks[name]
        B_g = sum(w * c.scalings[name] * c.factors[name][0] for w, c in zip(p, clients, strict=True))
        A_g = sum(w * c.factors[name][1] for w, c in zip(p, clients, strict=True))
        B = tensors[f"base_model.model.{name}.lora_B.weight"].double()
        A = tensors[f"base_model.model.{name}.lora_A.weight"].double()
        assert A.shape[0] > r  # the residual follows the global adapter
        torch.testing.assert_close(B[:, :r], B_g, atol=1e-6, rtol=0)
        torch.testing.assert_close(A[:r], A_g, atol=1e-6, rtol=0)
        assert config["rank_pattern"].get(name, config["r"]) == A.shape[0]


def _output_tensors(client_sets, tmp_path: Path, name: str, weights: str | None) -> dict[str, Tensor]:
    clients = client_sets["hetero"][:2]
    args = ["--method", "flora", "--output", tmp_path / name, *(c.path for c in clients)]
    if weights is not None:
        args = ["--weights", weights, *args]
    assert run(args).exit_code == 0
    return load_file(tmp_path / name / "adapter_model.safetensors")


def test_weights_default_uniform_and_counts_equal_fractions(client_sets, tmp_path):
    default = _output_tensors(client_sets, tmp_path, "default", None)
    ones = _output_tensors(client_sets, tmp_path, "ones", "2,2")
    counts = _output_tensors(client_sets, tmp_path, "counts", "100,300")
    fractions = _output_tensors(client_sets, tmp_path, "fractions", "0.25, 0.75")
    for key in default:
        torch.testing.assert_close(default[key], ones[key], atol=1e-7, rtol=0)
        torch.testing.assert_close(counts[key], fractions[key], atol=1e-7, rtol=0)
    assert any(not torch.allclose(default[k], counts[k]) for k in default)


# ------------------------------------------------------------------------------------------------- bad inputs


@pytest.fixture(scope="module")
def bad_folders(base, client_sets, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    good = client_sets["hetero"][0].path
    folders = {"good": good, "good2": client_sets["hetero"][1].path}
    folders["only_q"] = make_client(base, root / "only_q", seed=20, r=4, lora_alpha=8, target_modules=["q_proj"]).path

    def copy_of(name: str) -> Path:
        return Path(shutil.copytree(good, root / name))

    folders["narrow"] = copy_of("narrow")  # q_proj of layer 0 adapts a 64 x 32 weight: another base model

    def narrow(t):
        t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.randn(4, 32)

    edit_tensors(folders["narrow"], narrow)
    folders["nan"] = copy_of("nan")

    def nan(t):
        t["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"][1, 2] = float("inf")

    edit_tensors(folders["nan"], nan)
    folders["prefix_tuning"] = root / "prefix_tuning"
    folders["prefix_tuning"].mkdir()
    (folders["prefix_tuning"] / CONFIG_NAME).write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    folders["empty"] = root / "empty"
    folders["empty"].mkdir()
    folders["pickle"] = copy_of("pickle")
    (folders["pickle"] / "adapter_model.safetensors").rename(folders["pickle"] / "adapter_model.bin")
    folders["dora"] = make_client(
        base, root / "dora", seed=21, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True
    ).path
    folders["missing"] = root / "no_such_folder"
    return folders


# (id, extra options, input folder names, exit code, texts the message must contain)
BAD = [
    ("module-sets", ["--method", "flora"], ["good", "only_q"], 1, ["only_q", "v_proj", "different set of modules"]),
    ("shapes", ["--method", "flora"], ["good", "narrow"], 1, ["narrow", "model.layers.0.self_attn.q_proj", "64 x 32"]),
    ("nan", ["--method", "flora"], ["good", "nan"], 1, ["nan", "model.layers.1.self_attn.v_proj", "NaN or Inf"]),
    ("tau>1", ["--method", "florist", "--threshold", "1.5"], ["good", "good2"], 2, ["tau", "(0, 1]", "1.5"]),
    ("tau=0", ["--method", "florist", "--threshold", "0"], ["good", "good2"], 2, ["tau", "(0, 1]"]),
    ("negative-weights", ["--method", "flora", "--weights=-1,2"], ["good", "good2"], 2, ["--weights", "non-negative"]),
    ("zero-weights", ["--method", "flora", "--weights", "0,0"], ["good", "good2"], 2, ["--weights", "all zero"]),
    ("nan-weights", ["--method", "flora", "--weights", "nan,1"], ["good", "good2"], 2, ["--weights", "finite"]),
    ("text-weights", ["--method", "flora", "--weights", "1,many"], ["good", "good2"], 2, ["'many' is not a number"]),
    ("weight-count", ["--method", "flora", "--weights", "1,2,3"], ["good", "good2"], 2, ["3 weight(s) for 2"]),
    ("unknown-method", ["--method", "fedavg"], ["good", "good2"], 2, ["fedavg", "flora", "florist", "fedsb"]),
    ("threshold-not-florist", ["--method", "flora", "--threshold", "0.9"], ["good", "good2"], 2, ["--threshold"]),
    ("rank-not-flexlora", ["--method", "fedit", "--rank", "2"], ["good", "good2"], 2, ["--rank", "flexlora"]),
    ("bad-rank", ["--method", "flexlora", "--rank", "0"], ["good", "good2"], 2, ["max_rank", "0"]),
    ("not-lora", ["--method", "flora"], ["good", "prefix_tuning"], 1, ["prefix_tuning", "PREFIX_TUNING"]),
    ("not-adapter", ["--method", "flora"], ["good", "empty"], 1, ["empty", "adapter_config.json is missing"]),
    ("pickle", ["--method", "flora"], ["good", "pickle"], 1, ["adapter_model.bin", "convert"]),
    ("dora", ["--method", "flora"], ["good", "dora"], 1, ["dora", "use_dora"]),
    ("missing-folder", ["--method", "flora"], ["good", "missing"], 1, ["no_such_folder", "does not exist"]),
    ("mixed-ranks-fedex", ["--method", "fedex"], ["good", "good2"], 1, ["fedex", "same LoRA rank", "q_proj"]),
]


@pytest.mark.parametrize(("case", "options", "inputs", "code", "texts"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_fails_cleanly(bad_folders, tmp_path, case, options, inputs, code, texts):
    out = tmp_path / "out"
    result = run([*options, "--output", out, *(bad_folders[name] for name in inputs)])
    assert result.exit_code == code, result.output
    assert "Error:" in result.stderr
    for text in texts:
        assert text in result.stderr, f"{case}: {text!r} not in {result.stderr!r}"
    assert list(tmp_path.iterdir()) == []  # no output folder, no temporary folder


def test_existing_output_needs_overwrite(client_sets, tmp_path):
    clients = client_sets["hetero"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    args = ["--method", "flora", "--output", out, *(c.path for c in clients)]
    result = run(args)
    assert result.exit_code == 1 and "not empty" in result.stderr and "--overwrite" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    assert run([*args, "--overwrite"]).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_NAME, "adapter_model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]

    result = run(["--method", "flora", "--overwrite", "--output", clients[0].path, *(c.path for c in clients)])
    assert result.exit_code == 2 and "one of the input folders" in result.stderr
