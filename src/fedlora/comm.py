"""Exact communication accounting: parameters and bytes each method moves per client, direction and round.

Analytic counts from the shapes of the adapted modules (no weights needed), following the table
"Communication per round" of ALGORITHMS.md, for a module of shape ``m x n`` (out x in, PEFT convention):

=========  =======================  ================================================
method     uplink per client        downlink per client
=========  =======================  ================================================
fedit      r_k (m+n)                r_k (m+n)  (each client gets its own truncation)
flora      r_k (m+n)                (sum_k r_k)(m+n)  (the whole stack, to everyone)
florist    r_k (m+n)                k* (m+n)  (k* per module; default: upper bound)
flexlora   r_k (m+n)                r_k (m+n)
ffa        r m  (only B travels)    r m
fedex      r (m+n)                  r (m+n) + m n  (the dense residual)
fedsb      r^2                      r^2  (+ a one-time agreement on B and A)
=========  =======================  ================================================

Every round assumes full participation (all K clients train and receive). ``global_rank_sum`` is the sum over
adapted modules of the rank of the global adapter; its inverse is the communication-efficiency column of the
FLoRIST paper. ``tensor_params``/``tensor_bytes`` count real payloads for engines.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.methods import METHODS


class CommError(ValueError):
    """Bad input to the communication accounting: names the input and the valid choices."""


#: The seven linear projections of a Llama-style decoder layer, in the order the model holds them.
TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALL_LINEAR = "all-linear"

#: Bytes per value; names as torch, numpy and the CLI spell them.
DTYPE_BYTES: dict[str, int] = {
    "fp32": 4,
    "float32": 4,
    "bf16": 2,
    "bfloat16": 2,
    "fp16": 2,
    "float16": 2,
    "half": 2,
    "fp64": 8,
    "float64": 8,
    "double": 8,
}

#: How Fed-SB's clients agree on the shared, frozen B and A (see ``fedsb_init_cost``).
INIT_MODES: tuple[str, ...] = ("seeded", "pooled", "federated")


@dataclass(frozen=True)
class ArchShape:
    """The dimensions of a Llama-style decoder that fix the shapes of its linear projections."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int

    def __post_init__(self) -> None:
        for field in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise CommError(f"model {self.name!r}: {field} must be a positive integer, got {value!r}")

    def module_shape(self, target: str) -> tuple[int, int]:
        """``(out m, in n)`` of one projection, as ``nn.Linear.weight`` holds it."""
        q_out = self.num_heads * self.head_dim
        kv_out = self.num_kv_heads * self.head_dim
        shapes = {
            "q_proj": (q_out, self.hidden_size),
            "k_proj": (kv_out, self.hidden_size),
            "v_proj": (kv_out, self.hidden_size),
            "o_proj": (self.hidden_size, q_out),
            "gate_proj": (self.intermediate_size, self.hidden_size),
            "up_proj": (self.intermediate_size, self.hidden_size),
            "down_proj": (self.hidden_size, self.intermediate_size),
        }
        if target not in shapes:
            raise CommError(f"unknown target module {target!r}; valid: {', '.join(TARGETS)} or {ALL_LINEAR!r}")
        return shapes[target]


def _preset(name: str, layers: int, hidden: int, heads: int, kv: int, inter: int, head_dim: int = 0) -> ArchShape:
    return ArchShape(name, layers, hidden, heads, kv, head_dim or hidden // heads, inter)


#: Shapes from the models' public ``config.json`` files.
PRESETS: dict[str, ArchShape] = {
    a.name: a
    for a in (
        _preset("smollm2-135m", 30, 576, 9, 3, 1536, head_dim=64),
        _preset("tinyllama-1.1b", 22, 2048, 32, 4, 5632),
        _preset("llama-3.2-1b", 16, 2048, 32, 8, 8192, head_dim=64),
        _preset("llama-3.2-3b", 28, 3072, 24, 8, 8192, head_dim=128),
        _preset("llama-7b", 32, 4096, 32, 32, 11008),
        _preset("mistral-7b", 32, 4096, 32, 8, 14336),
        _preset("gemma-2-9b", 42, 3584, 16, 8, 14336, head_dim=256),
    )
}


def arch_from_config(config: Mapping[str, Any], name: str = "config") -> ArchShape:
    """Shapes from a Hugging Face config dict (multimodal configs: their ``text_config``)."""
    if "num_hidden_layers" not in config and isinstance(config.get("text_config"), Mapping):
        config = config["text_config"]
    missing = [
        k for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size") if k not in config
    ]
    if missing:
        raise CommError(f"{name}: missing field(s) {', '.join(missing)} (need a decoder config.json)")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads  # absent in pre-GQA configs (LLaMA-1/2 7B)
    head_dim = config.get("head_dim")  # absent or null when it is hidden / heads
    if head_dim is None:
        if not isinstance(hidden, int) or not isinstance(heads, int) or heads <= 0 or hidden % heads:
            raise CommError(f"{name}: no head_dim and hidden_size {hidden!r} is not a multiple of {heads!r} heads")
        head_dim = hidden // heads
    return ArchShape(name, config["num_hidden_layers"], hidden, heads, kv_heads, head_dim, config["intermediate_size"])


def load_arch_config(path: str | Path) -> ArchShape:
    """Shapes from a ``config.json`` file, or a model folder that holds one."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise CommError(f"config file not found: {path}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CommError(f"cannot read {path} as JSON: {err}") from None
    if not isinstance(config, Mapping):
        raise CommError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return arch_from_config(config, name=str(path))


def resolve_arch(model: str | Path | ArchShape) -> ArchShape:
    """A preset name (case-insensitive), a ``config.json`` path or model folder, or an ``ArchShape``."""
    if isinstance(model, ArchShape):
        return model
    key = str(model).strip().lower()
    if key in PRESETS:
        return PRESETS[key]
    path = Path(model)
    if path.exists() or path.suffix == ".json" or len(path.parts) > 1:
        return load_arch_config(path)
    raise CommError(f"unknown model {str(model)!r}: not a config.json path, nor a preset ({', '.join(PRESETS)})")


def parse_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
    """Target names (comma string or list; ``all-linear`` = all seven) in the model's order, no duplicates."""
    names = targets.split(",") if isinstance(targets, str) else list(targets)
    names = [t.strip() for t in names if t.strip()]
    if not names:
        raise CommError(f"no target modules given; valid: {', '.join(TARGETS)} or {ALL_LINEAR!r}")
    if ALL_LINEAR in names:
        return TARGETS
    unknown = [t for t in names if t not in TARGETS]
    if unknown:
        raise CommError(
            f"unknown target module(s) {', '.join(map(repr, unknown))}; valid: {', '.join(TARGETS)} or {ALL_LINEAR!r}"
        )
    return tuple(t for t in TARGETS if t in names)


def bytes_per_value(dtype: str) -> int:
    """Bytes of one transmitted value: fp32 4, bf16/fp16 2, fp64 8."""
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in DTYPE_BYTES:
        raise CommError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[key]


def check_method(method: str) -> str:
    """The registry name of a method, or an error listing the valid ones."""
    key = str(method).strip().lower()
    if key not in METHODS:
        raise CommError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    return key


def check_ranks(ranks: int | Sequence[int], clients: int | None = None) -> tuple[int, ...]:
    """Per-client ranks: one rank for ``clients`` clients, or one entry per client (length must match)."""
    if isinstance(ranks, int) and not isinstance(ranks, bool):
        if clients is None:
            raise CommError("a single rank needs the number of clients")
        if not isinstance(clients, int) or clients < 1:
            raise CommError(f"clients must be a positive integer, got {clients!r}")
        ranks = [ranks] * clients
    ranks = tuple(ranks)
    if not ranks:
        raise CommError("ranks: need at least one client")
    bad = [r for r in ranks if not isinstance(r, int) or isinstance(r, bool) or r < 1]
    if bad:
        raise CommError(f"ranks must be positive integers, got {bad}")
    if clients is not None and clients != len(ranks):
        raise CommError(f"{len(ranks)} ranks given for {clients} clients: give one rank per client")
    return ranks


# --- per-module counts ---------------------------------------------------------------------------------


def module_global_rank(method: str, ranks: Sequence[int], florist_rank: int | None = None) -> float:
    """Rank of the global adapter of one module, as the FLoRIST paper's efficiency column counts it.

    FFA-LoRA counts ``r / 2``: only one of the two factors travels.
    """
    if method == "fedit":
        return max(ranks)
    if method == "flora":
        return sum(ranks)
    if method == "florist":
        if florist_rank is None:
            raise CommError("florist needs the global rank k* of every module")
        return florist_rank
    if method == "flexlora":
        return max(ranks)
    if method == "ffa":
        r = ranks[0]
        return r // 2 if r % 2 == 0 else r / 2
    if method in ("fedex", "fedsb"):
        return ranks[0]
    raise CommError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")


def module_traffic(
    method: str, m: int, n: int, ranks: Sequence[int], florist_rank: int | None = None
) -> tuple[list[int], list[int]]:
    """Parameters per client per round for one module of shape ``m x n``: ``(uplink, downlink)`` lists."""
    if method in ("fedit", "flexlora"):
        per_client = [r * (m + n) for r in ranks]
        return per_client, list(per_client)
    if method == "flora":
        return [r * (m + n) for r in ranks], [sum(ranks) * (m + n)] * len(ranks)
    if method == "florist":
        if florist_rank is None:
            raise CommError("florist needs the global rank k* of every module")
        return [r * (m + n) for r in ranks], [florist_rank * (m + n)] * len(ranks)
    r = ranks[0]
    if method == "ffa":
        return [r * m] * len(ranks), [r * m] * len(ranks)
    if method == "fedex":
        return [r * (m + n)] * len(ranks), [r * (m + n) + m * n] * len(ranks)
    if method == "fedsb":
        return [r * r] * len(ranks), [r * r] * len(ranks)
    raise CommError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")


def fedsb_init_traffic(mode: str, m: int, n: int, r: int) -> tuple[int, int]:
    """Fed-SB's one-time cost per client of agreeing on ``B`` (m x r), ``A`` (r x n) and the starting ``R`` (r x r):
    ``(uplink, downlink)``.

    ``seeded``: drawn from a shared seed (``R = 0``), nothing travels. ``pooled``: the server computes them on
    pooled data and sends them (the raw data's uplink is not counted). ``federated``: each client sends its dense
    gradient estimate ``G_k`` once and receives ``B``, ``A`` and ``R``.
    """
    if mode == "seeded":
        return 0, 0
    if mode == "pooled":
        return 0, r * (m + n) + r * r
    if mode == "federated":
        return m * n, r * (m + n) + r * r
    raise CommError(f"unknown Fed-SB init mode {mode!r}; valid: {', '.join(INIT_MODES)}")


# --- the result ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetComm:
    """Traffic of one target type (e.g. every layer's ``q_proj``), per client per round, summed over layers."""

    target: str
    shape: tuple[int, int]
    layers: int
    uplink_params: tuple[int, ...]
    downlink_params: tuple[int, ...]
    global_rank_sum: float


@dataclass(frozen=True)
class OneTimeCost:
    """Fed-SB's one-time agreement on ``B`` and ``A``, per client (summed over modules)."""

    mode: str
    uplink_params: int
    downlink_params: int
    federated: bool
    note: str


@dataclass(frozen=True)
class CommResult:
    """Parameters and bytes a method moves; lists are per client per round unless named ``total_*``."""

    model: str
    arch: ArchShape
    method: str
    ranks: tuple[int, ...]
    rounds: int
    dtype: str
    bytes_per_value: int
    targets: tuple[TargetComm, ...]
    #: rank of the global adapter per adapted module, in model order (layer by layer, targets in model order)
    global_ranks: tuple[float, ...]
    #: True when FLoRIST's k* was not given and the upper bound min(sum r_k, m, n) was used
    global_rank_upper_bound: bool = False
    one_time: OneTimeCost | None = None
    exact: bool = True
    notes: tuple[str, ...] = ()

    @property
    def modules(self) -> int:
        return len(self.global_ranks)

    @property
    def clients(self) -> int:
        return len(self.ranks)

    @property
    def uplink_params(self) -> list[int]:
        return [sum(t.uplink_params[k] for t in self.targets) for k in range(self.clients)]

    @property
    def downlink_params(self) -> list[int]:
        return [sum(t.downlink_params[k] for t in self.targets) for k in range(self.clients)]

    @property
    def uplink_bytes(self) -> list[int]:
        return [p * self.bytes_per_value for p in self.uplink_params]

    @property
    def downlink_bytes(self) -> list[int]:
        return [p * self.bytes_per_value for p in self.downlink_params]

    @property
    def round_uplink_params(self) -> int:
        """All clients' uplink in one round."""
        return sum(self.uplink_params)

    @property
    def round_downlink_params(self) -> int:
        return sum(self.downlink_params)

    @property
    def one_time_uplink_params(self) -> int:
        """All clients' one-time uplink (Fed-SB's initialisation), 0 for the other methods."""
        return self.one_time.uplink_params * self.clients if self.one_time else 0

    @property
    def one_time_downlink_params(self) -> int:
        return self.one_time.downlink_params * self.clients if self.one_time else 0

    @property
    def total_uplink_params(self) -> int:
        """Over all rounds and clients, one-time cost included."""
        return self.rounds * self.round_uplink_params + self.one_time_uplink_params

    @property
    def total_downlink_params(self) -> int:
        return self.rounds * self.round_downlink_params + self.one_time_downlink_params

    @property
    def global_rank_sum(self) -> float:
        return sum(self.global_ranks)

    @property
    def efficiency(self) -> float | None:
        """``1 / global_rank_sum`` (None when the global adapter is empty)."""
        total = self.global_rank_sum
        return 1.0 / total if total > 0 else None

    def to_dict(self) -> dict[str, Any]:
        return comm_to_dict(self)


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def comm_to_dict(result: CommResult) -> dict[str, Any]:
    """A JSON-ready dict of a result (lists per client per round; totals per round and over the rounds)."""
    bpv = result.bytes_per_value
    round_up, round_down = result.round_uplink_params, result.round_downlink_params
    total_up, total_down = result.total_uplink_params, result.total_downlink_params
    out: dict[str, Any] = {
        "model": result.model,
        "method": result.method,
        "exact": result.exact,
        "targets": [t.target for t in result.targets],
        "layers": result.arch.num_layers,
        "modules": result.modules,
        "clients": result.clients,
        "ranks": list(result.ranks),
        "rounds": result.rounds,
        "dtype": result.dtype,
        "bytes_per_value": bpv,
        "uplink_params": result.uplink_params,
        "downlink_params": result.downlink_params,
        "uplink_bytes": result.uplink_bytes,
        "downlink_bytes": result.downlink_bytes,
        "per_round": {
            "uplink_params": round_up,
            "downlink_params": round_down,
            "params": round_up + round_down,
            "uplink_bytes": round_up * bpv,
            "downlink_bytes": round_down * bpv,
            "bytes": (round_up + round_down) * bpv,
        },
        "total": {
            "uplink_params": total_up,
            "downlink_params": total_down,
            "params": total_up + total_down,
            "uplink_bytes": total_up * bpv,
            "downlink_bytes": total_down * bpv,
            "bytes": (total_up + total_down) * bpv,
        },
        "global_rank_sum": _number(result.global_rank_sum),
        "global_rank_upper_bound": result.global_rank_upper_bound,
        "efficiency": result.efficiency,
        "per_target": [
            {
                "target": t.target,
                "shape": list(t.shape),
                "layers": t.layers,
                "uplink_params": list(t.uplink_params),
                "downlink_params": list(t.downlink_params),
                "global_rank_sum": _number(t.global_rank_sum),
            }
            for t in result.targets
        ],
        "notes": list(result.notes),
    }
    if result.one_time is not None:
        ot = result.one_time
        out["one_time"] = {
            "mode": ot.mode,
            "uplink_params": ot.uplink_params,
            "downlink_params": ot.downlink_params,
            "uplink_bytes": ot.uplink_params * bpv,
            "downlink_bytes": ot.downlink_params * bpv,
            "federated": ot.federated,
            "non_federated": not ot.federated,
            "note": ot.note,
        }
    return out


# --- the main entry point ----------------------------------------------------------------------------------


def _florist_ranks(
    given: int | Sequence[int] | None, targets: tuple[str, ...], arch: ArchShape, ranks: Sequence[int]
) -> tuple[list[int], bool]:
    """k* per module in model order, and whether it is the upper bound (not given)."""
    shapes = [arch.module_shape(t) for t in targets]
    bounds = [min(sum(ranks), m, n) for m, n in shapes] * arch.num_layers
    if given is None:
        return bounds, True
    n_modules = len(bounds)
    if isinstance(given, int) and not isinstance(given, bool):
        values = [given] * n_modules
    else:
        values = list(given)
        if len(values) == len(targets):  # one k* per target type, the same in every layer
            values = values * arch.num_layers
        elif len(values) != n_modules:
            raise CommError(
                f"global rank: {len(values)} values given; give one value, one per target ({len(targets)}), "
                f"or one per adapted module ({n_modules}, layer by layer)"
            )
    for i, (k, bound) in enumerate(zip(values, bounds, strict=True)):
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= bound:
            layer, target = divmod(i, len(targets))
            raise CommError(
                f"global rank of layer {layer} {targets[target]} must be an integer in [0, {bound}] "
                f"(min(sum of ranks, m, n)), got {k!r}"
            )
    return values, False


def communication_cost(
    model: str | Path | ArchShape,
    targets: str | Sequence[str],
    method: str,
    ranks: int | Sequence[int],
    *,
    clients: int | None = None,
    global_rank: int | Sequence[int] | None = None,
    rounds: int = 1,
    dtype: str = "fp32",
    init_mode: str | None = None,
) -> CommResult:
    """Count what ``method`` moves on ``model`` with LoRA on ``targets`` (full participation every round).

    ``ranks``: one rank per client, or one rank with ``clients``. ``global_rank`` (FLoRIST only): k* as one
    value, one per target type, or one per adapted module in model order; default its upper bound
    ``min(sum r_k, m, n)``. ``init_mode`` (Fed-SB only, default ``seeded``): see ``fedsb_init_traffic``.
    """
    arch = resolve_arch(model)
    method = check_method(method)
    target_names = parse_targets(targets)
    ranks = check_ranks(ranks, clients)
    bpv = bytes_per_value(dtype)
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
        raise CommError(f"rounds must be a positive integer, got {rounds!r}")
    if not METHODS[method].heterogeneous and len(set(ranks)) > 1:
        raise CommError(
            f"{method} needs the same rank on every client, got {list(ranks)}; "
            f"methods that accept mixed ranks: {', '.join(k for k, c in METHODS.items() if c.heterogeneous)}"
        )
    if global_rank is not None and method != "florist":
        raise CommError(f"a global rank k* applies to florist only, not {method}")
    if init_mode is not None and method != "fedsb":
        raise CommError(f"an init mode applies to fedsb only, not {method}")

    notes: list[str] = []
    per_module_k: list[int] | None = None
    upper_bound = False
    if method == "florist":
        per_module_k, upper_bound = _florist_ranks(global_rank, target_names, arch, ranks)
        if upper_bound:
            notes.append(
                "FLoRIST's k* is data-dependent; the upper bound min(sum r_k, m, n) is used: downlink and "
                "global_rank_sum are upper bounds, efficiency a lower bound"
            )

    # Per target type, summed over layers; per module, the global rank in model order.
    per_target: list[TargetComm] = []
    global_ranks: list[float] = [0.0] * (arch.num_layers * len(target_names))
    for t_idx, target in enumerate(target_names):
        m, n = arch.module_shape(target)
        up, down = [0] * len(ranks), [0] * len(ranks)
        rank_sum: float = 0
        for layer in range(arch.num_layers):
            idx = layer * len(target_names) + t_idx
            k_star = per_module_k[idx] if per_module_k is not None else None
            u, d = module_traffic(method, m, n, ranks, k_star)
            up = [a + b for a, b in zip(up, u, strict=True)]
            down = [a + b for a, b in zip(down, d, strict=True)]
            global_ranks[idx] = module_global_rank(method, ranks, k_star)
            rank_sum += global_ranks[idx]
        per_target.append(TargetComm(target, (m, n), arch.num_layers, tuple(up), tuple(down), rank_sum))

    one_time = None
    if method == "fedsb":
        mode = (init_mode or "seeded").strip().lower()
        r = ranks[0]
        init = [fedsb_init_traffic(mode, *arch.module_shape(t), r) for t in target_names]
        one_up = sum(u for u, _ in init) * arch.num_layers
        one_down = sum(d for _, d in init) * arch.num_layers
        note = {
            "seeded": "B and A drawn from a seed shared by all clients: nothing travels (a random, not a "
            "gradient-based LoRA-SB initialisation)",
            "pooled": "NOT FEDERATED (the reference): the server computes B and A on the clients' pooled raw "
            "data, whose uplink is not counted; each client receives B and A",
            "federated": "each client sends its dense gradient estimate G_k once (m*n per module) and receives "
            "B and A (r(m+n) per module)",
        }[mode]
        one_time = OneTimeCost(mode, one_up, one_down, federated=mode != "pooled", note=note)
        notes.append(f"Fed-SB init ({mode}): {note}; R's initial value travels with round 1's downlink")
    elif method == "flora":
        notes.append("FLoRA's downlink is the whole stack of all clients' factors: it grows with the number of clients")
    elif method == "fedex":
        notes.append("FedEx-LoRA's downlink includes the dense m x n residual of every module")
    elif method == "ffa":
        notes.append("FFA-LoRA: A is frozen from a shared seed, only B travels; global rank counted as r/2")

    return CommResult(
        model=arch.name,
        arch=arch,
        method=method,
        ranks=ranks,
        rounds=rounds,
        dtype=str(dtype).strip().lower().removeprefix("torch."),
        bytes_per_value=bpv,
        targets=tuple(per_target),
        global_ranks=tuple(global_ranks),
        global_rank_upper_bound=upper_bound,
        one_time=one_time,
        exact=METHODS[method].exact,
        notes=tuple(notes),
    )


# --- real payloads -----------------------------------------------------------------------------------------


def _leaves(tensors: object) -> Iterable[Any]:
    """Tensors inside a tensor, a mapping or a sequence (nested), skipping ``None``."""
    if tensors is None:
        return
    if hasattr(tensors, "numel") and hasattr(tensors, "element_size"):
        yield tensors
    elif isinstance(tensors, Mapping):
        for value in tensors.values():
            yield from _leaves(value)
    elif isinstance(tensors, Sequence) and not isinstance(tensors, str | bytes):
        for value in tensors:
            yield from _leaves(value)
    else:
        raise CommError(f"cannot count parameters of {type(tensors).__name__}: expected tensors in a dict or list")


def tensor_params(tensors: object) -> int:
    """Number of values in a tensor or a (nested) dict/list of tensors: a real payload's parameters."""
    return sum(int(t.numel()) for t in _leaves(tensors))


def tensor_bytes(tensors: object) -> int:
    """Bytes of a tensor or a (nested) dict/list of tensors, in their own dtypes."""
    return sum(int(t.numel()) * int(t.element_size()) for t in _leaves(tensors))
