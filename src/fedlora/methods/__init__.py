"""The registry of federated LoRA methods: one file per method, pure tensor math."""

from __future__ import annotations

from fedlora.lowrank import AggregationError
from fedlora.methods.base import Method, ModuleUpdate
from fedlora.methods.fedex import FedEx
from fedlora.methods.fedit import FedIT
from fedlora.methods.fedsb import FedSB
from fedlora.methods.ffa import FFA
from fedlora.methods.flexlora import FlexLoRA
from fedlora.methods.flora import FLoRA
from fedlora.methods.florist import FLoRIST

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (FedIT, FLoRA, FLoRIST, FlexLoRA, FFA, FedEx, FedSB)}


def get_method(name: str, **options: object) -> Method:
    """Build a method by its registry name, e.g. ``get_method("florist", threshold=0.9)``.

    Options the method does not take are an error (a typo must not silently fall back to a default); options
    whose value is ``None`` are ignored, so callers can pass every CLI option through.
    """
    key = name.strip().lower()
    if key not in METHODS:
        raise AggregationError(f"unknown method {name!r}; valid: {', '.join(METHODS)}")
    cls = METHODS[key]
    given = {k: v for k, v in options.items() if v is not None}
    try:
        return cls(**given)
    except TypeError as err:
        raise AggregationError(f"method {key!r} does not take option(s) {sorted(given)}: {err}") from None


__all__ = [
    "FFA",
    "METHODS",
    "AggregationError",
    "FLoRA",
    "FLoRIST",
    "FedEx",
    "FedIT",
    "FedSB",
    "FlexLoRA",
    "Method",
    "ModuleUpdate",
    "get_method",
]
