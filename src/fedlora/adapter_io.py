"""Standard PEFT LoRA adapter folders: read clients' adapters, aggregate them module by module, write the result.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (never a pickle: ``adapter_model.bin``
is refused). Tensors are keyed ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` where
``<module>`` is the layer's name inside the base model (e.g. ``model.layers.0.self_attn.q_proj``). Only plain
LoRA on linear layers is accepted; DoRA, LoRA on embeddings or convolutions, extra trainable modules and LoRA
biases are refused with a message naming the folder and the module.

The math lives in ``fedlora.methods`` and ``fedlora.lowrank``; this module only reads, checks and writes.
peft is imported lazily (its import pulls in transformers) so that ``fedlora --help`` stays fast.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fedlora.lowrank import AggregationError, ClientFactors, lora_scaling, normalize_weights
from fedlora.methods import Method, ModuleUpdate, get_method

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
#: PEFT's prefix of every saved key (the ``PeftModel`` -> ``LoraModel`` -> base model path).
KEY_PREFIX = "base_model.model."

# `<module>.lora_A.weight` or, with an adapter name, `<module>.lora_A.<adapter>.weight`.
_FACTOR_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")

# Config fields of LoRA variants whose update is not ``scaling * B @ A`` on a linear layer, or that carry
# extra tensors: any non-empty value is refused.
_VARIANT_FIELDS = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "lora_bias": "a trainable LoRA bias",
    "modules_to_save": "fully trained extra modules (modules_to_save)",
    "trainable_token_indices": "trainable token embeddings",
    "target_parameters": "LoRA on nn.Parameter targets",
    "layer_replication": "layer replication",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_bdlora": "BD-LoRA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "megatron_config": "Megatron parallel layers",
}
# Initialisations that change the base weights themselves (an adapter saved without PEFT's conversion only
# works on that modified base).
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# Template fields kept in a written config: which base model, and which of its modules carry LoRA.
_KEPT_CONFIG_FIELDS = (
    "base_model_name_or_path",
    "revision",
    "task_type",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "fan_in_fan_out",
    "lora_dropout",
)


class AdapterError(ValueError):
    """A folder is not a readable plain-LoRA PEFT adapter, or cannot be written; names the file and module."""


@dataclass
class LoraAdapter:
    """One PEFT LoRA adapter folder: its parsed config and, per module, the factors and PEFT's scaling."""

    path: Path
    config: dict[str, Any]
    modules: dict[str, ClientFactors]

    @property
    def num_parameters(self) -> int:
        return sum(f.A.numel() + f.B.numel() for f in self.modules.values())

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for f in self.modules.values() for t in (f.A, f.B))


# ----------------------------------------------------------------------------------------------------- reading


def read_adapter(folder: str | os.PathLike[str]) -> LoraAdapter:
    """Read a standard PEFT LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``).

    Per module: the rank comes from the tensor shapes and must equal the configured ``r`` (``rank_pattern``
    first, matched as PEFT does); alpha is ``alpha_pattern``'s match else ``lora_alpha``; the scaling is
    ``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``). Tensors keep their stored dtype.
    """
    from peft.utils.other import get_pattern_key

    path = Path(folder)
    config = read_adapter_config(path)
    tensors = _read_tensors(path)
    factors = _group_factors(path, tensors)
    if not factors:
        raise AdapterError(f"{path / WEIGHTS_NAME}: holds no LoRA tensors (lora_A / lora_B)")

    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    use_rslora = bool(config.get("use_rslora", False))
    modules: dict[str, ClientFactors] = {}
    for name in sorted(factors, key=natural_key):
        where = f"{path / WEIGHTS_NAME}, module {name!r}"
        A, B = factors[name].get("A"), factors[name].get("B")
        if A is None or B is None:
            raise AdapterError(f"{where}: {'lora_A' if A is None else 'lora_B'} is missing (a LoRA needs both)")
        if A.ndim != 2 or B.ndim != 2:
            raise AdapterError(
                f"{where}: lora_A is {tuple(A.shape)} and lora_B {tuple(B.shape)}; only LoRA on linear layers "
                "(2-D factors) is supported, not convolutions"
            )
        rank = A.shape[0]
        if B.shape[1] != rank:
            raise AdapterError(
                f"{where}: lora_B is {tuple(B.shape)} but lora_A is {tuple(A.shape)}; lora_B must be (out, r) and "
                "lora_A (r, in) with the same r"
            )
        configured = rank_pattern.get(get_pattern_key(rank_pattern.keys(), name), config["r"])
        if configured != rank:
            raise AdapterError(
                f"{where}: the tensors have rank {rank} but {path / CONFIG_NAME} gives r = {configured} "
                "(rank_pattern, else r); the config does not describe these weights"
            )
        for label, t in (("lora_A", A), ("lora_B", B)):
            if not torch.is_floating_point(t):
                raise AdapterError(f"{where}: {label} has dtype {t.dtype}; expected floating point")
            if not torch.isfinite(t).all():
                raise AdapterError(f"{where}: {label} contains NaN or Inf")
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), name), config["lora_alpha"])
        if not isinstance(alpha, int | float) or not math.isfinite(alpha):
            raise AdapterError(f"{path / CONFIG_NAME}: lora_alpha of module {name!r} is {alpha!r}, not a number")
        modules[name] = ClientFactors(B=B, A=A, scaling=lora_scaling(alpha, rank, use_rslora))
    return LoraAdapter(path=path, config=config, modules=modules)


def read_adapter_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse and check ``adapter_config.json``: a plain LoRA adapter, no variant that changes the update."""
    path = Path(folder)
    if not path.exists():
        raise AdapterError(f"adapter folder {str(path)!r} does not exist")
    if not path.is_dir():
        raise AdapterError(f"{str(path)!r} is not a folder; expected a PEFT LoRA adapter folder")
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise AdapterError(f"{str(path)!r} is not a PEFT adapter folder: {CONFIG_NAME} is missing")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterError(f"{config_file}: cannot be read as JSON ({err})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{config_file}: expected a JSON object, got {type(config).__name__}")

    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise AdapterError(f"{config_file}: peft_type is {peft_type!r}; only LoRA adapters ('LORA') are supported")
    for key, what in _VARIANT_FIELDS.items():
        if config.get(key):
            raise AdapterError(
                f"{config_file}: {key} = {config[key]!r} ({what}); only plain LoRA on linear layers is supported"
            )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise AdapterError(
            f"{config_file}: init_lora_weights = {init!r} changes the base weights; save the adapter with PEFT's "
            "path_initial_model_for_weight_conversion to get a plain LoRA adapter of the original base"
        )
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise AdapterError(f"{config_file}: {key} = {value!r} is not a number")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise AdapterError(f"{config_file}: {key} must be a mapping from module pattern to a number")
    return config


def _read_tensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        if (path / PICKLE_WEIGHTS_NAME).is_file():
            raise AdapterError(
                f"{path / PICKLE_WEIGHTS_NAME}: pickled weights are never loaded (unpickling runs code); convert "
                f"it to {WEIGHTS_NAME}, e.g. load the adapter with PEFT and save_pretrained(..., "
                "safe_serialization=True)"
            )
        raise AdapterError(f"{str(path)!r} is not a PEFT adapter folder: {WEIGHTS_NAME} is missing")
    try:
        return load_file(weights)
    except (OSError, SafetensorError) as err:
        raise AdapterError(f"{weights}: not a readable safetensors file ({err})") from None


def _group_factors(path: Path, tensors: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """``{module: {"A": lora_A, "B": lora_B}}``; anything that is not a LoRA factor of a linear layer is refused."""
    file = path / WEIGHTS_NAME
    factors: dict[str, dict[str, Tensor]] = {}
    adapters: set[str] = set()
    for key in sorted(tensors):
        name = key.removeprefix(KEY_PREFIX)
        match = _FACTOR_KEY.match(name)
        if match is None:
            raise AdapterError(f"{file}: tensor {key!r} is {_describe_extra(key)}; only plain LoRA is supported")
        module, factor = match["module"], match["factor"]
        adapters.add(match["adapter"] or "")
        if len(adapters) > 1:
            raise AdapterError(f"{file}: holds several adapters ({sorted(adapters)}); save one adapter per folder")
        factors.setdefault(module, {})[factor] = tensors[key]
    return factors


def _describe_extra(key: str) -> str:
    if "lora_embedding" in key:
        return "LoRA on an embedding layer"
    if "lora_magnitude_vector" in key:
        return "a DoRA magnitude vector"
    if re.search(r"\.lora_B(\.[^.]+)?\.bias$", key):
        return "a LoRA bias (lora_bias)"
    return "not a LoRA factor (modules_to_save or another extra tensor)"


def natural_key(name: str) -> tuple[object, ...]:
    """Sort module names by layer number: ``layers.2`` before ``layers.10``."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split("."))


# ----------------------------------------------------------------------------------------------------- writing


def write_adapter(
    folder: str | os.PathLike[str],
    modules: Mapping[str, tuple[Tensor, Tensor]],
    template_config: Mapping[str, Any],
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ONE standard PEFT LoRA folder from ``{module: (B, A)}`` whose scaling is already folded in.

    ``B`` is ``(out, r)`` and ``A`` ``(r, in)``; the folder's update of each module is exactly ``B @ A``.
    The config takes ``r`` = the most common rank and ``lora_alpha = r`` (scaling 1, no rsLoRA); every module of
    another rank gets ``rank_pattern`` and ``alpha_pattern`` entries equal to its rank, keyed by its full name.
    A rank-0 module (zero update) is written as rank 1 with zeros, since PEFT needs ``r >= 1``.
    ``base_model_name_or_path``, ``revision``, ``task_type``, the module selection (``target_modules``,
    ``exclude_modules``, ``layers_to_transform``, ``layers_pattern``), ``fan_in_fan_out`` and ``lora_dropout``
    come from ``template_config`` (without ``target_modules`` there, the full module names are used). Tensors
    are written in ``dtype`` (default: as given).

    The folder is built in a temporary folder beside ``folder`` and renamed into place, so a failure leaves
    nothing behind. An existing non-empty ``folder`` is an error unless ``overwrite=True``. Returns the path.
    """
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from safetensors.torch import save_file

    target = Path(folder)
    check_output_folder(target, overwrite)
    if not modules:
        raise AdapterError(f"{target}: no modules to write")

    factors = {name: writable_factors(name, B, A, dtype) for name, (B, A) in modules.items()}
    ranks = {name: A.shape[0] for name, (_, A) in factors.items()}
    counts = Counter(ranks.values())
    r = max(counts, key=lambda rank: (counts[rank], rank))  # most common; ties: the larger rank
    pattern = {name: rank for name, rank in sorted(ranks.items(), key=lambda kv: natural_key(kv[0])) if rank != r}
    kept = {k: template_config[k] for k in _KEPT_CONFIG_FIELDS if template_config.get(k) is not None}
    kept.setdefault("target_modules", sorted(factors, key=natural_key))
    try:
        config = LoraConfig(
            r=r, lora_alpha=r, use_rslora=False, rank_pattern=dict(pattern), alpha_pattern=dict(pattern), **kept
        )
    except (TypeError, ValueError) as err:
        raise AdapterError(f"{target}: the template config gives an invalid LoRA config: {err}") from None
    untargeted = [name for name in factors if not check_target_module_exists(config, name)]
    if untargeted:
        raise AdapterError(
            f"{target}: the template's target_modules {config.target_modules!r} do not select module(s) "
            f"{sorted(untargeted, key=natural_key)[:3]}; PEFT would drop their weights on loading"
        )
    config.inference_mode = True
    state = {
        f"{KEY_PREFIX}{name}.lora_{which}.weight": t
        for name, (B, A) in factors.items()
        for which, t in (("A", A), ("B", B))
    }

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        config.save_pretrained(str(tmp))
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        _move_into_place(tmp, target, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def writable_factors(name: str, B: Tensor, A: Tensor, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Check one module's ``(B, A)`` and return them as written: contiguous, in ``dtype``, rank 0 -> rank 1 zeros."""
    if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
        raise AdapterError(
            f"module {name!r}: B is {tuple(B.shape)} and A {tuple(A.shape)}; expected B (out, r) and A (r, in)"
        )
    if not (torch.isfinite(B).all() and torch.isfinite(A).all()):
        raise AdapterError(f"module {name!r}: the factors contain NaN or Inf")
    if A.shape[0] == 0:
        B, A = B.new_zeros(B.shape[0], 1), A.new_zeros(1, A.shape[1])
    if dtype is not None:
        B, A = B.to(dtype), A.to(dtype)
    return B.detach().cpu().contiguous(), A.detach().cpu().contiguous()


def check_output_folder(folder: str | os.PathLike[str], overwrite: bool = False) -> None:
    """Refuse an output path that is a file, or a non-empty folder unless ``overwrite``."""
    target = Path(folder)
    if target.exists() and not target.is_dir():
        raise AdapterError(f"output {str(target)!r} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise AdapterError(
            f"output folder {str(target)!r} exists and is not empty; pass overwrite=True (--overwrite) to replace it"
        )


def _move_into_place(tmp: Path, target: Path, overwrite: bool) -> None:
    if not target.exists():
        tmp.rename(target)
        return
    check_output_folder(target, overwrite)  # it may have changed since the first check
    if not any(target.iterdir()):
        target.rmdir()
        tmp.rename(target)
        return
    # Replace a non-empty folder: move it aside, move the new one in, then delete the old one.
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    old.rmdir()
    target.rename(old)
    try:
        tmp.rename(target)
    except BaseException:
        old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------- aggregating


@dataclass(frozen=True)
class ModuleReport:
    """One row of the aggregation report. ``energy_kept`` is None for inexact methods without an SVD (FedIT)."""

    module: str
    ranks_in: tuple[int, ...]
    rank_out: int
    energy_kept: float | None


@dataclass
class AggregationResult:
    """The aggregate of several adapter folders: per-module updates, the report, and sizes.

    ``output_modules()`` gives the factors of the output adapter, whose update per module is the method's global
    update ``B @ A``, plus FedEx-LoRA's residual: ``[B_g, B_E] [A_g; A_E]``, so that the folder reproduces the
    exact weighted sum (its first ``r`` columns/rows are the global adapter clients continue from, the rest is
    the residual in SVD form).
    """

    method: Method
    folders: list[Path]
    weights: Tensor
    template_config: dict[str, Any]
    updates: dict[str, ModuleUpdate]
    rows: list[ModuleReport]
    input_parameters: int
    input_bytes: int

    def output_modules(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{module: (B, A)}`` of the output adapter (scaling folded in)."""
        return {name: output_factors(update) for name, update in self.updates.items()}

    def output_size(self, dtype: torch.dtype | None = None) -> tuple[int, int]:
        """Parameters and bytes of the output adapter as ``write`` stores it (rank 0 is stored as rank 1)."""
        written = [writable_factors(n, B, A, dtype) for n, (B, A) in self.output_modules().items()]
        return sum(B.numel() + A.numel() for B, A in written), sum(
            t.numel() * t.element_size() for pair in written for t in pair
        )

    def write(self, folder: str | os.PathLike[str], dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
        """Write the output adapter with ``write_adapter``, the first input's config as template."""
        return write_adapter(folder, self.output_modules(), self.template_config, dtype=dtype, overwrite=overwrite)


def output_factors(update: ModuleUpdate) -> tuple[Tensor, Tensor]:
    """The ``(B, A)`` whose product is the update's whole effect: the global adapter, then any residual."""
    if update.residual is None:
        return update.B, update.A
    B_E, A_E = update.residual
    return torch.cat([update.B, B_E.to(update.B.dtype)], dim=1), torch.cat([update.A, A_E.to(update.A.dtype)], dim=0)


def aggregate_adapters(
    folders: Sequence[str | os.PathLike[str]],
    method: Method | str,
    weights: Sequence[float] | None = None,
) -> AggregationResult:
    """Read client adapter folders and aggregate them module by module with ``method``.

    All folders must adapt the same modules with the same shapes. ``weights`` are per-folder example counts or
    fractions (normalised; default uniform). The result's adapter (``AggregationResult.write``) carries the
    method's global update per module, plus FedEx-LoRA's residual (see ``AggregationResult``).
    """
    if isinstance(method, str):
        method = get_method(method)
    if not folders:
        raise AggregationError("no adapter folders given")
    if weights is not None and len(weights) != len(folders):
        raise AggregationError(f"{len(folders)} adapter folders but {len(weights)} weights; give one per folder")
    p = normalize_weights([1.0] * len(folders) if weights is None else weights)
    adapters = [read_adapter(f) for f in folders]
    check_same_modules(adapters)

    updates: dict[str, ModuleUpdate] = {}
    rows: list[ModuleReport] = []
    for name in adapters[0].modules:
        clients = [a.modules[name] for a in adapters]
        try:
            update = method.aggregate(clients, p, module=name)
        except AggregationError as err:
            legend = ", ".join(f"{k} = {a.path}" for k, a in enumerate(adapters))
            raise AggregationError(f"{err} (clients: {legend})") from None
        updates[name] = update
        # Exact methods without an SVD keep the whole update; FedIT's inexact average has no energy to report.
        exact = 1.0 if method.exact else None
        energy = update.energy_kept if update.singular_values is not None else exact
        rank_out = output_factors(update)[1].shape[0]
        rows.append(ModuleReport(name, tuple(c.rank for c in clients), rank_out, energy))
    return AggregationResult(
        method=method,
        folders=[a.path for a in adapters],
        weights=p,
        template_config=dict(adapters[0].config),
        updates=updates,
        rows=rows,
        input_parameters=sum(a.num_parameters for a in adapters),
        input_bytes=sum(a.num_bytes for a in adapters),
    )


def check_same_modules(adapters: Sequence[LoraAdapter]) -> None:
    """All adapters adapt the same modules, each of the same ``out x in`` shape as in the first adapter."""
    first = adapters[0]
    names = set(first.modules)
    for adapter in adapters[1:]:
        other = set(adapter.modules)
        if other != names:
            missing = sorted(names - other, key=natural_key)
            extra = sorted(other - names, key=natural_key)
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} module(s), e.g. {missing[:3]}")
            if extra:
                parts.append(f"{len(extra)} extra module(s), e.g. {extra[:3]}")
            raise AggregationError(
                f"adapter {str(adapter.path)!r} adapts a different set of modules than {str(first.path)!r}: "
                f"{'; '.join(parts)}"
            )
        for name in first.modules:
            a, b = first.modules[name], adapter.modules[name]
            shape_a, shape_b = (a.B.shape[0], a.A.shape[1]), (b.B.shape[0], b.A.shape[1])
            if shape_a != shape_b:
                raise AggregationError(
                    f"module {name!r}: adapter {str(adapter.path)!r} updates a {shape_b[0]} x {shape_b[1]} weight "
                    f"but {str(first.path)!r} a {shape_a[0]} x {shape_a[1]} one; the adapters belong to different "
                    "base models"
                )
