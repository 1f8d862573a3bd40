"""PEFT glue for the engine: one base model, one LoRA adapter at a time, factors in and out, merges into the base.

The engine trains clients one after another on the same base model: ``install`` replaces the current adapter by a
client's (fresh PEFT init, or given start factors), ``factors`` reads what it trained, ``merge_into_base`` adds a
global update to the frozen weights. Module names are the names inside the base model
(``model.layers.0.self_attn.q_proj``), as in PEFT's saved adapters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from fedlora.lowrank import ClientFactors, lora_scaling


class TargetModuleError(ValueError):
    """A target module name that the model does not have, or a rank the module cannot hold."""


def linear_module_names(model: nn.Module) -> list[str]:
    """Suffixes of the model's linear layers (``q_proj``, ``up_proj``, ...), for error messages."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def check_targets(model: nn.Module, targets: list[str], max_rank: int) -> dict[str, tuple[int, int]]:
    """The ``(out, in)`` shape of every module matched by ``targets``; errors name bad targets and ranks."""
    valid = linear_module_names(model)
    unknown = [t for t in targets if t not in valid]
    if unknown:
        raise TargetModuleError(
            f"target module(s) {unknown} not in the model; its linear layers are: {', '.join(valid)}"
        )
    shapes = {
        name: (m.out_features, m.in_features)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    }
    smallest = min(min(s) for s in shapes.values())
    if max_rank > smallest:
        raise TargetModuleError(
            f"LoRA rank {max_rank} is larger than the smallest targeted dimension ({smallest}); "
            f"use a rank <= {smallest}"
        )
    return shapes


class LoraHost:
    """Holds the one PEFT-wrapped base model and the single adapter currently installed on it."""

    def __init__(self, model: nn.Module, target_modules: list[str], dropout: float = 0.0) -> None:
        self.base = model
        self.target_modules = list(target_modules)
        self.dropout = dropout
        self.peft: PeftModel | None = None
        self._counter = 0
        self.scaling = 1.0
        self.rank = 0

    # ---------------------------------------------------------------------------------------- adapters

    @property
    def model(self) -> nn.Module:
        """The model to run: the PEFT wrapper once an adapter is installed."""
        return self.peft if self.peft is not None else self.base

    def install(
        self,
        rank: int | Mapping[str, int],
        alpha: float | None = None,
        *,
        use_rslora: bool = False,
        start: Mapping[str, tuple[Tensor, Tensor]] | None = None,
        seed: int | None = None,
        train_A: bool = True,
        dropout: float | None = None,
    ) -> None:
        """Replace the current adapter by a new one.

        ``rank`` is one rank for all modules or a rank per module (then ``alpha`` is ignored and the scaling is 1,
        for global adapters whose scaling is folded in). ``start`` gives folded ``(B, A)`` factors to start from
        (B is divided by this adapter's scaling); otherwise PEFT's default init (A Kaiming, B zero), seeded.
        ``train_A=False`` freezes A (FFA-LoRA).
        """
        per_module = isinstance(rank, Mapping)
        if per_module:
            r0 = max(rank.values())
            config = LoraConfig(
                r=r0,
                lora_alpha=r0,
                rank_pattern=dict(rank),
                alpha_pattern=dict(rank),
                target_modules=self.target_modules,
                lora_dropout=self.dropout if dropout is None else dropout,
            )
            self.scaling, self.rank = 1.0, r0
        else:
            alpha = float(rank if alpha is None else alpha)
            config = LoraConfig(
                r=rank,
                lora_alpha=alpha,
                use_rslora=use_rslora,
                target_modules=self.target_modules,
                lora_dropout=self.dropout if dropout is None else dropout,
            )
            self.scaling, self.rank = lora_scaling(alpha, rank, use_rslora), rank
        if seed is not None:
            torch.manual_seed(seed)
        name = f"a{self._counter}"
        self._counter += 1
        if self.peft is None:
            self.peft = get_peft_model(self.base, config, adapter_name=name)
        else:
            old = self.peft.active_adapter
            self.peft.add_adapter(name, config)
            self.peft.set_adapter(name)
            self.peft.delete_adapter(old)
        if start is not None:
            self.set_factors(start)
        for layer in self.layers().values():
            layer.lora_A[name].weight.requires_grad_(train_A)
            layer.lora_B[name].weight.requires_grad_(True)

    def layers(self) -> dict[str, LoraLayer]:
        """The LoRA layers by module name (names inside the base model)."""
        if self.peft is None:
            return {}
        root = self.peft.base_model.model
        return {name: m for name, m in root.named_modules() if isinstance(m, LoraLayer)}

    @property
    def adapter_name(self) -> str:
        assert self.peft is not None, "no adapter installed"
        return self.peft.active_adapter

    def set_factors(self, factors: Mapping[str, tuple[Tensor, Tensor]]) -> None:
        """Load folded ``(B, A)`` per module into the current adapter (B divided by the adapter's scaling)."""
        layers, name = self.layers(), self.adapter_name
        missing = sorted(set(layers) - set(factors))
        if missing:
            raise KeyError(f"no start factors for modules {missing[:3]}...")
        with torch.no_grad():
            for module, layer in layers.items():
                B, A = factors[module]
                scaling = layer.scaling[name]
                lora_A, lora_B = layer.lora_A[name].weight, layer.lora_B[name].weight
                if lora_A.shape != A.shape or lora_B.shape != B.shape:
                    raise ValueError(
                        f"module {module!r}: start factors {tuple(B.shape)} / {tuple(A.shape)} do not fit the "
                        f"adapter's {tuple(lora_B.shape)} / {tuple(lora_A.shape)}"
                    )
                lora_A.copy_(A.to(lora_A.dtype))
                lora_B.copy_((B / scaling).to(lora_B.dtype))

    def factors(self) -> dict[str, ClientFactors]:
        """The current adapter's factors (detached copies on CPU) with its scaling, per module."""
        name = self.adapter_name
        return {
            module: ClientFactors(
                B=layer.lora_B[name].weight.detach().to("cpu", copy=True),
                A=layer.lora_A[name].weight.detach().to("cpu", copy=True),
                scaling=float(layer.scaling[name]),
            )
            for module, layer in self.layers().items()
        }

    @contextmanager
    def disable_adapter(self) -> Iterator[nn.Module]:
        """The base model (with any merges) without the current adapter; yields the model to run."""
        if self.peft is None:
            yield self.base
        else:
            with self.peft.disable_adapter():
                yield self.peft

    # ------------------------------------------------------------------------------------------ base

    def base_linear(self, module: str) -> nn.Linear:
        """The frozen linear layer under a module name, with or without the PEFT wrapper."""
        layer = self.layers().get(module)
        if layer is not None:
            return layer.get_base_layer()
        return self.base.get_submodule(module)

    def merge_into_base(self, update: Mapping[str, tuple[Tensor, Tensor]]) -> None:
        """``W0 <- W0 + B A`` per module, with folded factors (no scaling applied)."""
        add_to_base(self.base_linear, update)


def add_to_base(base_linear: Callable[[str], nn.Linear], update: Mapping[str, tuple[Tensor, Tensor]]) -> None:
    """``W0 <- W0 + B A`` for each module's frozen linear layer; the product in at least float32 (bf16 bases)."""
    with torch.no_grad():
        for module, (B, A) in update.items():
            if B.shape[1] == 0:
                continue
            weight = base_linear(module).weight
            dtype = torch.promote_types(torch.float32, weight.dtype)
            delta = B.to(weight.device, dtype) @ A.to(weight.device, dtype)
            weight.add_(delta.to(weight.dtype))
