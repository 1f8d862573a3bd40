"""LoRA-SB on any torch model: frozen B and A, a trainable r x r core R, and its gradient-based initialisation.

A LoRA-SB layer computes ``y = W0 x + s * B R A x`` with ``B`` (m x r, orthonormal columns) and ``A`` (r x n,
orthonormal rows) frozen and shared by every client, and only ``R`` trained. Fed-SB averages ``R`` across clients,
which is exact because ``B (sum_k p_k R_k) A = sum_k p_k B R_k A``.

``init_from_gradient`` approximates the first step of full fine-tuning (ALGORITHMS.md, "LoRA-SB and Fed-SB"):
``dW1 = -eta * sign(G)`` for the gradient ``G`` of each target weight, then ``B = U_r``, ``A = V_r^T``,
``R = diag(S_r)`` from a seeded truncated randomised SVD. ``W0`` is not modified: the model starts at
``W0 + B R A``. Modes: ``pooled`` (the reference: gradient on the pooled data of all clients, not federated),
``federated`` (each client sends its gradient estimate once; the server combines them) and ``seeded`` (random
orthonormal ``B`` and ``A`` from a shared seed, ``R = 0``; nothing is exchanged).

``LoraSBHost`` plays the role of :class:`fedlora.adapters.LoraHost` for LoRA-SB: it wraps the target ``nn.Linear``
modules in place (no PEFT wrapper), installs a client's ``R``, reads it back, merges updates into the frozen
weights, and exports a standard PEFT LoRA adapter (``B' = s B R``, ``A' = A``).
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedlora.adapters import TargetModuleError, add_to_base
from fedlora.comm import INIT_MODES, fedsb_init_traffic
from fedlora.lowrank import ClientFactors, normalize_weights
from fedlora.train import CollateFn, count_targets, summed_token_loss

logger = logging.getLogger(__name__)

#: LoRA-SB's targets in the reference: every projection of a Llama-style decoder layer.
DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: Extra columns of the randomised SVD's sketch beyond the rank, and its power iterations.
DEFAULT_OVERSAMPLING = 10
DEFAULT_NITER = 8


class LoraSBError(ValueError):
    """Bad input to LoRA-SB: the message names the module, argument or mode and what would be valid."""


# ------------------------------------------------------------------------------------------------------ layer


class LoraSBLinear(nn.Module):
    """A frozen ``nn.Linear`` plus ``s * B R A``: ``B`` and ``A`` frozen buffers, ``R`` the only parameter.

    The base layer is frozen. The adapter is applied as ``((x @ A^T) @ R^T) @ B^T`` (never the m x n product).
    Adapters of a half-precision base are kept in float32, as PEFT does. ``disabled`` skips the adapter
    (evaluation of the base); ``merge()`` adds ``s B R A`` to the base weight and skips the adapter until
    ``unmerge()``.
    """

    def __init__(
        self, base_layer: nn.Linear, B: Tensor, A: Tensor, R: Tensor, scaling: float = 1.0, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise LoraSBError(f"LoRA-SB wraps nn.Linear layers, got {type(base_layer).__name__}")
        self.base_layer = base_layer.requires_grad_(False)
        weight = base_layer.weight
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        check_factor_shapes("layer", weight.shape, B, A, R)
        self.register_buffer("B", B.detach().to(weight.device, dtype, copy=True))
        self.register_buffer("A", A.detach().to(weight.device, dtype, copy=True))
        self.R = nn.Parameter(R.detach().to(weight.device, dtype, copy=True))
        self.scaling = float(scaling)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False
        self.merged = False

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def weight(self) -> Tensor:  # code that reads ``proj.weight`` (dtype, device) keeps working
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def get_base_layer(self) -> nn.Linear:
        return self.base_layer

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        if self.disabled or self.merged:
            return out
        h = self.dropout(x).to(self.R.dtype)
        h = F.linear(F.linear(F.linear(h, self.A), self.R), self.B)
        return out + (h * self.scaling).to(out.dtype)

    def delta_weight(self) -> Tensor:
        """The dense ``s B R A`` (m x n), in the adapter's dtype."""
        return (self.B @ self.R @ self.A) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """``W0 += s B R A``; the adapter is then skipped in ``forward`` until ``unmerge``."""
        if not self.merged:
            weight = self.base_layer.weight
            weight.add_(self.delta_weight().to(weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            weight = self.base_layer.weight
            weight.sub_(self.delta_weight().to(weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling}"


def check_factor_shapes(name: str, shape: Sequence[int], B: Tensor, A: Tensor, R: Tensor | None) -> int:
    """Check ``B`` (m x r), ``A`` (r x n), ``R`` (r x r) against a weight of shape (m, n); return r."""
    m, n = int(shape[0]), int(shape[1])
    r = A.shape[0] if A.ndim == 2 else -1
    ok = B.ndim == 2 and A.ndim == 2 and tuple(B.shape) == (m, r) and A.shape[1] == n and r >= 1
    if ok and R is not None:
        ok = tuple(R.shape) == (r, r)
    if not ok:
        got = f"B {tuple(B.shape)}, A {tuple(A.shape)}" + (f", R {tuple(R.shape)}" if R is not None else "")
        raise LoraSBError(
            f"module {name!r}: LoRA-SB factors {got} do not fit its {m} x {n} weight; expected B ({m}, r), "
            f"A (r, {n}) and R (r, r) with 1 <= r"
        )
    return r


# ------------------------------------------------------------------------------------------------- targets


def linear_targets(model: nn.Module, targets: Sequence[str], rank: int | None = None) -> dict[str, nn.Linear]:
    """The frozen ``nn.Linear`` of every module whose last name component is in ``targets``, by module name.

    Works on a plain model and on one whose targets are already wrapped in ``LoraSBLinear`` (the base layer is
    returned under the wrapper's name). Errors list the model's linear layers, or the largest valid rank.
    """
    if isinstance(targets, str) or not targets:
        raise TargetModuleError(f"target modules must be a non-empty list of names, got {targets!r}")
    found: dict[str, nn.Linear] = {}
    suffixes: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, LoraSBLinear):
            linear, key = module.base_layer, name
        elif isinstance(module, nn.Linear) and not name.endswith(".base_layer"):
            linear, key = module, name
        else:
            continue
        suffix = key.rsplit(".", 1)[-1]
        suffixes.add(suffix)
        if suffix in targets:
            found[key] = linear
    unknown = [t for t in targets if t not in suffixes]
    if unknown:
        raise TargetModuleError(
            f"target module(s) {unknown} not in the model; its linear layers are: {', '.join(sorted(suffixes))}"
        )
    if rank is not None:
        check_rank(rank, {name: tuple(m.weight.shape) for name, m in found.items()})
    return found


def check_rank(rank: int, shapes: Mapping[str, tuple[int, int]]) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise LoraSBError(f"LoRA-SB rank must be an integer >= 1, got {rank!r}")
    name, shape = min(shapes.items(), key=lambda kv: min(kv[1]))
    if rank > min(shape):
        raise TargetModuleError(
            f"LoRA-SB rank {rank} is larger than the smallest targeted dimension ({min(shape)}, module {name!r} of "
            f"shape {shape[0]} x {shape[1]}); use a rank <= {min(shape)}"
        )


# -------------------------------------------------------------------------------------------------------- host


class LoraSBHost:
    """Holds one base model whose target linears are wrapped in ``LoraSBLinear``; the engine swaps clients' R.

    Same interface as :class:`fedlora.adapters.LoraHost` where it applies. ``R`` values crossing the interface
    (``install(start=...)``, ``set_R``) are *folded* (scaling applied, like ``ModuleUpdate.R``); ``factors()``
    reports the layer's own ``R`` with its scaling, like ``ClientFactors``.
    """

    def __init__(self, model: nn.Module, target_modules: Sequence[str] = DEFAULT_TARGETS, dropout: float = 0.0) -> None:
        if not 0.0 <= dropout < 1.0:
            raise LoraSBError(f"LoRA-SB dropout must be in [0, 1), got {dropout!r}")
        self.base = model
        self.target_modules = list(target_modules)
        self.dropout = dropout
        self.scaling = 1.0
        self._init_R: dict[str, Tensor] = {}  # folded R of the initialisation, restored by ``install()``

    @property
    def model(self) -> nn.Module:
        """The model to run (the base model itself, its target linears wrapped in place)."""
        return self.base

    @property
    def installed(self) -> bool:
        return bool(self._init_R)

    @property
    def rank(self) -> int:
        return max((layer.rank for layer in self.layers().values()), default=0)

    def install(
        self,
        init: SBInit | Mapping[str, ClientFactors] | None = None,
        *,
        start: Mapping[str, Tensor] | None = None,
        scaling: float | None = None,
        dropout: float | None = None,
    ) -> None:
        """Install LoRA-SB: wrap the targets (first call), set ``B``/``A`` from ``init``, reset ``R``.

        ``init`` (an ``SBInit`` or ``{module: ClientFactors(B, A, scaling, R)}``) is required on the first call;
        later calls without it keep ``B`` and ``A``. ``R`` becomes ``start`` (folded R per module, e.g. the
        server's average) when given, else the initialisation's ``R``. Afterwards only the ``R`` parameters
        require grad. ``scaling`` (default 1, or the value of the previous call) and ``dropout`` apply to every
        layer.
        """
        if scaling is not None and not (math.isfinite(scaling) and scaling != 0):
            raise LoraSBError(f"LoRA-SB scaling must be a finite non-zero number, got {scaling!r}")
        drop = self.dropout if dropout is None else dropout
        if not 0.0 <= drop < 1.0:
            raise LoraSBError(f"LoRA-SB dropout must be in [0, 1), got {drop!r}")
        if init is None and not self.installed:
            raise LoraSBError("the first LoRA-SB install needs init (B, A and R per module, e.g. init_from_gradient)")
        if init is not None:
            self._set_init(init.factors if isinstance(init, SBInit) else init, drop)
        if start is not None:
            self._check_R(start)  # before anything changes: a bad start leaves the host as it was
        if scaling is not None:
            self.scaling = float(scaling)
        for layer in self.layers().values():
            layer.scaling = self.scaling
            layer.dropout = nn.Dropout(drop) if drop > 0 else nn.Identity()
        self.set_R(self._init_R if start is None else start)
        for p in self.base.parameters():
            p.requires_grad_(False)
        for layer in self.layers().values():
            layer.R.requires_grad_(True)

    def _set_init(self, factors: Mapping[str, ClientFactors], dropout: float) -> None:
        linears = linear_targets(self.base, self.target_modules)
        missing = sorted(set(linears) - set(factors))
        extra = sorted(set(factors) - set(linears))
        if missing or extra:
            raise LoraSBError(
                f"LoRA-SB init does not match the targets {self.target_modules}: missing modules {missing[:3]}, "
                f"unknown modules {extra[:3]}"
            )
        for name, f in factors.items():
            if f.R is None:
                raise LoraSBError(f"module {name!r}: LoRA-SB init has no R")
            check_factor_shapes(name, linears[name].weight.shape, f.B, f.A, f.R)
        init_R = {}
        for name, f in factors.items():
            layer = self.base.get_submodule(name)
            R = f.R * f.scaling  # folded: the module's update is B (s R) A
            if isinstance(layer, LoraSBLinear):
                if layer.merged:
                    raise LoraSBError(f"module {name!r}: the LoRA-SB adapter is merged; unmerge it first")
                layer.B = f.B.detach().to(layer.A.device, layer.A.dtype, copy=True)
                layer.A = f.A.detach().to(layer.A.device, layer.A.dtype, copy=True)
                layer.R = nn.Parameter(torch.zeros_like(f.R, dtype=layer.R.dtype, device=layer.R.device))
            else:
                self.base.set_submodule(name, LoraSBLinear(layer, f.B, f.A, torch.zeros_like(f.R), 1.0, dropout))
            init_R[name] = R.detach().to("cpu", copy=True)
        self._init_R = init_R

    def uninstall(self) -> None:
        """Put the original ``nn.Linear`` modules back (merged adapters stay merged in their weights)."""
        for name, layer in self.layers().items():
            self.base.set_submodule(name, layer.base_layer)
        self._init_R = {}

    def layers(self) -> dict[str, LoraSBLinear]:
        """The LoRA-SB layers by module name (names inside the base model)."""
        return {name: m for name, m in self.base.named_modules() if isinstance(m, LoraSBLinear)}

    def set_R(self, R: Mapping[str, Tensor]) -> None:
        """Load folded ``R`` per module (divided by the layers' scaling); every layer must get one."""
        layers = self._check_R(R)
        with torch.no_grad():
            for name, layer in layers.items():
                layer.R.copy_(R[name].to(layer.R.dtype) / layer.scaling)

    def _check_R(self, R: Mapping[str, Tensor]) -> dict[str, LoraSBLinear]:
        """One finite r x r matrix per layer, no other names, no merged layer; returns the layers."""
        layers = self.layers()
        missing = sorted(set(layers) - set(R))
        extra = sorted(set(R) - set(layers))
        if missing or extra:
            raise LoraSBError(f"LoRA-SB R: missing modules {missing[:3]}, unknown modules {extra[:3]}")
        for name, layer in layers.items():
            value = R[name]
            if tuple(value.shape) != tuple(layer.R.shape):
                raise LoraSBError(f"module {name!r}: R is {tuple(value.shape)}, expected {tuple(layer.R.shape)}")
            if not torch.isfinite(value).all():
                raise LoraSBError(f"module {name!r}: R contains NaN or Inf")
            if layer.merged:
                raise LoraSBError(f"module {name!r}: the LoRA-SB adapter is merged into its weight; unmerge it first")
        return layers

    def factors(self) -> dict[str, ClientFactors]:
        """Detached CPU copies of every layer's ``B``, ``A``, ``R`` and scaling (a Fed-SB client's upload)."""
        return {
            name: ClientFactors(
                B=layer.B.detach().to("cpu", copy=True),
                A=layer.A.detach().to("cpu", copy=True),
                scaling=layer.scaling,
                R=layer.R.detach().to("cpu", copy=True),
            )
            for name, layer in self.layers().items()
        }

    def export_factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Standard LoRA factors with the scaling folded in: ``B' = s B R``, ``A' = A`` (for ``write_adapter``)."""
        with torch.no_grad():
            return {
                name: ((layer.B @ layer.R * layer.scaling).to("cpu", copy=True), layer.A.detach().to("cpu", copy=True))
                for name, layer in self.layers().items()
            }

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.base.parameters() if p.requires_grad]

    @contextmanager
    def disable_adapter(self) -> Iterator[nn.Module]:
        """Run the base model (with any merges) without the LoRA-SB adapters; yields the model."""
        layers = list(self.layers().values())
        previous = [layer.disabled for layer in layers]
        for layer in layers:
            layer.disabled = True
        try:
            yield self.base
        finally:
            for layer, was in zip(layers, previous, strict=True):
                layer.disabled = was

    # ------------------------------------------------------------------------------------------ base

    def base_linear(self, module: str) -> nn.Linear:
        """The frozen linear layer under a module name, wrapped or not."""
        layer = self.base.get_submodule(module)
        return layer.base_layer if isinstance(layer, LoraSBLinear) else layer

    def merge_into_base(self, update: Mapping[str, tuple[Tensor, Tensor]]) -> None:
        """``W0 <- W0 + B A`` per module, with folded factors (no scaling applied)."""
        add_to_base(self.base_linear, update)

    def base_state(self) -> dict[str, Tensor]:
        """Copies of the targeted base weights (tests compare them before and after a merge)."""
        return {n: self.base_linear(n).weight.detach().clone() for n in self.layers()}


# ----------------------------------------------------------------------------------------------- initialisation


@dataclass
class SBInit:
    """The result of ``init_from_gradient``: shared ``B``, ``A`` and the starting ``R`` per module.

    ``factors[name]`` is ``ClientFactors(B, A, scaling=1, R)`` (CPU). ``non_federated`` is True for ``pooled``
    (the server saw every client's data: not a federated result). The one-time traffic per client, in parameters
    summed over modules, follows ``fedlora.comm.fedsb_init_traffic``: ``federated`` uplinks the dense ``m x n``
    gradient estimate per module; ``pooled`` and ``federated`` downlink ``r (m + n)``; ``seeded`` exchanges
    nothing. ``samples_per_client[k]``: how many of client k's examples entered the estimate.
    """

    factors: dict[str, ClientFactors]
    mode: str
    rank: int
    learning_rate: float
    seed: int
    non_federated: bool
    uplink_params_per_client: int
    downlink_params_per_client: int
    samples_per_client: list[int] = field(default_factory=list)
    client_weights: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def record(self) -> dict[str, Any]:
        """A JSON-ready summary (no tensors) for logs and results."""
        return {
            "mode": self.mode,
            "non_federated": self.non_federated,
            "rank": self.rank,
            "learning_rate": self.learning_rate,
            "seed": self.seed,
            "modules": len(self.factors),
            "uplink_params_per_client": self.uplink_params_per_client,
            "downlink_params_per_client": self.downlink_params_per_client,
            "samples_per_client": list(self.samples_per_client),
            "client_weights": list(self.client_weights),
            "seconds": round(self.seconds, 3),
        }


def init_from_gradient(
    model: nn.Module,
    examples_by_client: Sequence[Sequence[Any]],
    collate_fn: CollateFn,
    targets: Sequence[str] = DEFAULT_TARGETS,
    rank: int = 8,
    *,
    learning_rate: float,
    mode: str = "pooled",
    num_samples: int = 170,
    seed: int = 0,
    weights: Sequence[float] | None = None,
    micro_batch_size: int = 8,
    oversampling: int = DEFAULT_OVERSAMPLING,
    niter: int = DEFAULT_NITER,
) -> SBInit:
    """LoRA-SB's ``B``, ``A``, ``R`` per target module from ``dW1 = -learning_rate * sign(G)`` (or seeded).

    ``examples_by_client[k]`` are client k's tokenised examples, batched by ``collate_fn`` (as in
    ``fedlora.train``). ``G`` is the gradient of the mean token loss (summed token losses / target tokens, as
    ``fedlora.train``) with respect to each target weight, in eval mode (no dropout), at the model's current
    weights (adapters included, if installed):

    - ``pooled``: over the first ``num_samples`` examples of the pooled data, taken round-robin across clients
      (client 0's first, client 1's first, ...) so that every client is represented; flagged non-federated.
    - ``federated``: client k's ``G_k`` over its own first ``num_samples`` examples; the server forms
      ``G = sum_k p_k G_k`` (``p_k`` from ``weights``, default the clients' data sizes ``len(examples)``).
    - ``seeded``: no data; ``B`` and ``A`` orthonormal from ``seed`` (QR of Gaussians), ``R = 0``.

    ``learning_rate`` is ``eta``, the first step's learning rate. The SVD is ``torch.svd_lowrank`` with
    ``q = rank + oversampling`` (capped by the shape) and ``niter`` power iterations, seeded per module from
    ``seed``; the caller's RNG state is left unchanged. ``weights`` apply to ``federated`` only (pooled data is
    weighted by its examples). The model's weights, ``requires_grad`` flags and train/eval mode are restored;
    each module's gradient is turned into its factors and freed in turn, so the target weights end without
    ``.grad`` (other parameters' gradients are not touched).
    """
    start = time.perf_counter()
    if mode not in INIT_MODES:
        raise LoraSBError(f"unknown LoRA-SB init mode {mode!r}; valid: {', '.join(INIT_MODES)}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise LoraSBError(f"LoRA-SB init num_samples must be an integer >= 1, got {num_samples!r}")
    if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int) or micro_batch_size < 1:
        raise LoraSBError(f"LoRA-SB init micro_batch_size must be an integer >= 1, got {micro_batch_size!r}")
    if not (isinstance(learning_rate, int | float) and math.isfinite(learning_rate) and learning_rate > 0):
        raise LoraSBError(f"LoRA-SB init learning_rate (eta) must be a positive number, got {learning_rate!r}")
    if oversampling < 0 or niter < 0:
        raise LoraSBError(f"oversampling and niter must be >= 0, got {oversampling} and {niter}")
    linears = linear_targets(model, targets, rank)
    num_clients = len(examples_by_client)
    uplink = downlink = 0
    for linear in linears.values():
        up, down = fedsb_init_traffic(mode, linear.out_features, linear.in_features, rank)
        uplink, downlink = uplink + up, downlink + down

    if mode == "seeded":
        factors = {name: _seeded_factors(name, linear, rank, seed) for name, linear in linears.items()}
        used, p = [0] * num_clients, []
    else:
        batches, used, p = _estimate_plan(examples_by_client, mode, num_samples, weights)
        _accumulate_gradients(model, linears, batches, collate_fn, micro_batch_size)
        factors = {}
        try:
            with torch.no_grad():
                for name, linear in linears.items():
                    factors[name] = _sign_svd_factors(name, linear, rank, learning_rate, seed, oversampling, niter)
        finally:
            for linear in linears.values():
                linear.weight.grad = None
    init = SBInit(
        factors=factors,
        mode=mode,
        rank=rank,
        learning_rate=float(learning_rate),
        seed=seed,
        non_federated=mode == "pooled",
        uplink_params_per_client=uplink,
        downlink_params_per_client=downlink,
        samples_per_client=used,
        client_weights=p,
        seconds=time.perf_counter() - start,
    )
    logger.info(
        "LoRA-SB init (%s%s): %d modules, rank %d, %s samples per client, %.1f s",
        mode,
        ", NOT federated: the server used pooled client data" if init.non_federated else "",
        len(factors),
        rank,
        used,
        init.seconds,
    )
    return init


def _estimate_plan(
    examples_by_client: Sequence[Sequence[Any]], mode: str, num_samples: int, weights: Sequence[float] | None
) -> tuple[list[tuple[list[Any], float]], list[int], list[float]]:
    """Which examples enter the estimate, as ``[(examples, weight)]`` groups, plus samples used and weights."""
    if isinstance(examples_by_client, str) or not examples_by_client:
        raise LoraSBError(f"LoRA-SB init mode {mode!r} needs the clients' examples, got none")
    empty = [k for k, ex in enumerate(examples_by_client) if len(ex) == 0]
    if empty:
        raise LoraSBError(f"LoRA-SB init: client(s) {empty} have no examples")
    sizes = [len(ex) for ex in examples_by_client]
    if mode == "pooled":
        # Round-robin over the clients: the pooled subset holds every client, not only the first ones.
        taken, used = [], [0] * len(sizes)
        for i in range(max(sizes)):
            for k, ex in enumerate(examples_by_client):
                if i < len(ex) and len(taken) < num_samples:
                    taken.append(ex[i])
                    used[k] += 1
        return [(taken, 1.0)], used, []
    if weights is not None and len(weights) != len(sizes):
        raise LoraSBError(f"LoRA-SB init: {len(sizes)} clients but {len(weights)} weights; give one per client")
    p = normalize_weights(sizes if weights is None else weights).tolist()
    used = [min(num_samples, n) for n in sizes]
    groups = [(list(ex[:u]), w) for ex, u, w in zip(examples_by_client, used, p, strict=True)]
    return [(g, w) for g, w in groups if w > 0], used, p


def _accumulate_gradients(
    model: nn.Module,
    linears: Mapping[str, nn.Linear],
    groups: Sequence[tuple[list[Any], float]],
    collate_fn: CollateFn,
    micro_batch_size: int,
) -> None:
    """``weight.grad = sum_g w_g * grad(mean token loss of group g)`` for the target weights only.

    Each group's micro-batches are collated first: the group's target-token count normalises every micro-batch,
    so micro-batching and padding do not change the result. The gradients accumulate in the weights' own
    ``.grad`` (no copy per client). Other parameters do not get gradients.
    """
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    weights = [linear.weight for linear in linears.values()]
    device = weights[0].device
    was_training = model.training
    try:
        for p in params:
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
            w.grad = None
        model.eval()
        for k, (examples, group_weight) in enumerate(groups):
            chunks = [examples[i : i + micro_batch_size] for i in range(0, len(examples), micro_batch_size)]
            batches = [collate_fn(chunk) for chunk in chunks]
            num_targets = sum(count_targets(b["labels"]) for b in batches)
            if num_targets == 0:
                raise LoraSBError(f"LoRA-SB init: the examples of group {k} have no target tokens (all labels -100)")
            for batch in batches:
                batch = {
                    key: v.to(device) for key, v in batch.items() if key in ("input_ids", "attention_mask", "labels")
                }
                logits = model(
                    input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False
                ).logits
                loss = summed_token_loss(logits, batch["labels"]) * (group_weight / num_targets)
                del logits
                if not torch.isfinite(loss):
                    raise LoraSBError(f"LoRA-SB init: the loss of group {k} is {float(loss)}; check the model and data")
                loss.backward()
    except BaseException:
        for w in weights:
            w.grad = None
        raise
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)


def _sign_svd_factors(
    name: str, linear: nn.Linear, rank: int, eta: float, seed: int, oversampling: int, niter: int
) -> ClientFactors:
    """Turn one weight's accumulated gradient into ``(B, A, R)`` of ``-eta sign(G)`` and free the gradient."""
    weight = linear.weight
    grad = weight.grad
    if grad is None:  # the module did not take part in the loss: no gradient, a zero step
        grad = torch.zeros_like(weight)
    weight.grad = None
    dtype = torch.promote_types(torch.float32, grad.dtype)
    # In place on the gradient buffer (or its one float32 copy): the only dense m x n tensor of this module.
    dW1 = grad.to(dtype).sign_().mul_(-eta)
    del grad
    m, n = dW1.shape
    q = min(rank + oversampling, m, n)
    with _seeded(_module_seed(seed, name), dW1.device):
        U, S, V = torch.svd_lowrank(dW1, q=q, niter=niter)
    del dW1
    B, A, R = U[:, :rank], V[:, :rank].T, torch.diag(S[:rank])
    return ClientFactors(B=B.contiguous().cpu(), A=A.contiguous().cpu(), scaling=1.0, R=R.cpu())


def _seeded_factors(name: str, linear: nn.Linear, rank: int, seed: int) -> ClientFactors:
    """Random ``B`` (orthonormal columns) and ``A`` (orthonormal rows) from a shared seed; ``R = 0``."""
    m, n = linear.out_features, linear.in_features
    dtype = torch.promote_types(torch.float32, linear.weight.dtype)
    generator = torch.Generator().manual_seed(_module_seed(seed, name))
    B = torch.linalg.qr(torch.randn(m, rank, generator=generator, dtype=torch.float64))[0]
    A = torch.linalg.qr(torch.randn(n, rank, generator=generator, dtype=torch.float64))[0].T
    return ClientFactors(B=B.to(dtype).contiguous(), A=A.to(dtype).contiguous(), R=torch.zeros(rank, rank, dtype=dtype))


def _module_seed(seed: int, name: str) -> int:
    """A per-module seed: every client derives the same one from the shared seed and the module's name."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed the global RNG (which ``torch.svd_lowrank`` draws from) without changing the caller's state."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)  # seeds CUDA too
        yield
