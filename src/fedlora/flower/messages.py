"""Tensors <-> Flower ``ArrayRecord``s, byte counts taken from the records, and validation of what arrives.

Keys are ``<module>.<part>``: the module's name inside the base model (``model.layers.0.self_attn.q_proj``) and
the part (``B``, ``A``, ``R``, ``G`` for Fed-SB's gradient estimate). Tensors travel in the run's ``comm_dtype``:
fp32 and fp16 as Flower's standard NumPy arrays; bf16 (which NumPy lacks) as its 16-bit patterns with the Array's
``dtype`` set to ``bfloat16``.

Nothing received is trusted: ``decode_checked`` rejects wrong or missing names, shapes, dtypes and non-finite
values with a ``ReplyError`` that names the sender and the key, before any tensor reaches the aggregation.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict
from torch import Tensor

from fedlora.engine.state import Factors

#: comm_dtype -> (torch dtype on the wire, the Array's dtype string)
WIRE_DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "fp32": (torch.float32, "float32"),
    "fp16": (torch.float16, "float16"),
    "bf16": (torch.bfloat16, "bfloat16"),
}
ITEM_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
NUMPY_STYPE = "numpy.ndarray"


class ReplyError(ValueError):
    """A message whose tensors cannot be used: the text names the sender, the key and what was expected."""


# ------------------------------------------------------------------------------------------------ encoding


def encode(tensors: Mapping[str, Tensor], comm_dtype: str = "fp32") -> ArrayRecord:
    """One ``ArrayRecord`` holding ``tensors`` in the wire dtype of ``comm_dtype``."""
    torch_dtype, name = WIRE_DTYPES[comm_dtype]
    record = ArrayRecord()
    for key, tensor in tensors.items():
        t = tensor.detach().to("cpu", torch_dtype).contiguous()
        if torch_dtype == torch.bfloat16:  # NumPy has no bfloat16: send the bit patterns
            buffer = io.BytesIO()
            np.save(buffer, t.view(torch.int16).numpy(), allow_pickle=False)
            record[key] = Array(dtype=name, shape=tuple(t.shape), stype=NUMPY_STYPE, data=buffer.getvalue())
        else:
            record[key] = Array(t.numpy())
    return record


def decode(record: ArrayRecord) -> dict[str, Tensor]:
    """The tensors of a record as float32 (no checks: for records this process wrote itself)."""
    return {key: _to_tensor(array) for key, array in record.items()}


def _to_tensor(array: Array) -> Tensor:
    values = array.numpy()
    if array.dtype == "bfloat16":
        return torch.from_numpy(values.astype(np.int16, copy=True)).view(torch.bfloat16).float()
    return torch.from_numpy(np.array(values, copy=True)).float()


def pack_factors(factors: Mapping[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """``{module: (B, A)}`` -> ``{"<module>.B": B, "<module>.A": A}``."""
    out: dict[str, Tensor] = {}
    for name, (B, A) in factors.items():
        out[f"{name}.B"], out[f"{name}.A"] = B, A
    return out


def unpack_factors(tensors: Mapping[str, Tensor]) -> Factors:
    """The inverse of ``pack_factors``."""
    names = sorted({key.rsplit(".", 1)[0] for key in tensors})
    return {name: (tensors[f"{name}.B"], tensors[f"{name}.A"]) for name in names}


def unpack_part(tensors: Mapping[str, Tensor], part: str) -> dict[str, Tensor]:
    """``{"<module>.<part>": T}`` -> ``{module: T}``."""
    suffix = f".{part}"
    return {key[: -len(suffix)]: t for key, t in tensors.items() if key.endswith(suffix)}


# ------------------------------------------------------------------------------------------------ counting


def array_payload_bytes(array: Array) -> int:
    """The tensor bytes an Array carries (shape x item size), without NumPy's header or the key."""
    item = ITEM_BYTES[array.dtype] if array.dtype in ITEM_BYTES else np.dtype(array.dtype).itemsize
    return math.prod(array.shape) * item


def payload_bytes(content: RecordDict | ArrayRecord) -> int:
    """Tensor bytes of every Array in a message's content (what ``fedlora.comm`` counts)."""
    records = [content] if isinstance(content, ArrayRecord) else list(content.array_records.values())
    return sum(array_payload_bytes(a) for record in records for a in record.values())


def wire_bytes(content: RecordDict) -> int:
    """Flower's own count of the arrays' bytes: payload plus NumPy headers and key names."""
    return sum(record.count_bytes() for record in content.array_records.values())


# ---------------------------------------------------------------------------------------------- validation


def decode_checked(
    record: ArrayRecord | None, expected: Mapping[str, tuple[int, ...]], comm_dtype: str, sender: str
) -> dict[str, Tensor]:
    """Decode ``record`` if it holds exactly the ``expected`` keys and shapes, in the wire dtype, all finite.

    Raises ``ReplyError`` naming ``sender``, the offending key and what was expected; never anything else.
    """
    if record is None:
        raise ReplyError(f"{sender}: the reply holds no tensors; expected {len(expected)} arrays")
    dtype = WIRE_DTYPES[comm_dtype][1]
    missing = sorted(set(expected) - set(record))
    extra = sorted(set(record) - set(expected))
    if missing or extra:
        raise ReplyError(
            f"{sender}: wrong tensor names: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}"
        )
    out: dict[str, Tensor] = {}
    for key, shape in expected.items():
        array = record[key]
        if array.dtype != dtype:
            raise ReplyError(f"{sender}: {key} has dtype {array.dtype}, expected {dtype} (comm_dtype {comm_dtype})")
        if tuple(array.shape) != tuple(shape):
            raise ReplyError(f"{sender}: {key} has shape {tuple(array.shape)}, expected {tuple(shape)}")
        if array.stype != NUMPY_STYPE:
            raise ReplyError(f"{sender}: {key} is serialised as {array.stype!r}, expected {NUMPY_STYPE!r}")
        try:
            tensor = _to_tensor(array)
        except Exception as err:  # corrupt bytes: np.load raises many kinds of errors
            raise ReplyError(f"{sender}: {key} cannot be decoded: {err}") from None
        if tuple(tensor.shape) != tuple(shape):
            raise ReplyError(f"{sender}: {key} holds shape {tuple(tensor.shape)} but declares {tuple(shape)}")
        if not torch.isfinite(tensor).all():
            raise ReplyError(f"{sender}: {key} contains NaN or Inf")
        out[key] = tensor
    return out
