"""What the server carries between rounds, and its atomic checkpoint on disk.

- ``history``: per round, the factors merged into the base weights (FLoRA/FLoRIST global adapters, FedEx-LoRA
  residuals). Replaying them in order on the original base reproduces the current base bit for bit.
- ``global_adapter``: the adapter clients continue from (FedIT, FlexLoRA, FFA-LoRA, FedEx-LoRA), folded scaling;
  for Fed-SB the standard-LoRA form ``(B R_g, A)`` of the global model.
- ``frozen`` and ``global_R``: Fed-SB's shared frozen ``(B, A)`` and the averaged ``R`` clients start from.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor

Factors = dict[str, tuple[Tensor, Tensor]]
CHECKPOINT = "checkpoint"


@dataclass
class ServerState:
    round: int = 0  # rounds completed
    history: list[Factors] = field(default_factory=list)
    global_adapter: Factors | None = None
    frozen: Factors | None = None
    global_R: dict[str, Tensor] | None = None

    def merged_factors(self) -> Factors:
        """All rounds' merged factors concatenated per module: one adapter equal to their sum."""
        import torch

        out: Factors = {}
        for step in self.history:
            for name, (B, A) in step.items():
                if name in out:
                    out[name] = (torch.cat([out[name][0], B], dim=1), torch.cat([out[name][1], A], dim=0))
                else:
                    out[name] = (B, A)
        return out


def save_state(run_dir: Path, state: ServerState) -> None:
    """Write the checkpoint atomically: a temp folder beside it, then a rename over the old one."""
    tensors: dict[str, Tensor] = {}
    for t, step in enumerate(state.history):
        for name, (B, A) in step.items():
            tensors[f"history.{t}.{name}.B"] = B.contiguous()
            tensors[f"history.{t}.{name}.A"] = A.contiguous()
    for kind, factors in (("global", state.global_adapter), ("frozen", state.frozen)):
        for name, (B, A) in (factors or {}).items():
            tensors[f"{kind}.{name}.B"] = B.contiguous()
            tensors[f"{kind}.{name}.A"] = A.contiguous()
    for name, R in (state.global_R or {}).items():
        tensors[f"R.{name}"] = R.contiguous()
    meta = {
        "round": state.round,
        "history_rounds": len(state.history),
        "has_global_adapter": state.global_adapter is not None,
        "has_frozen": state.frozen is not None,
        "has_global_R": state.global_R is not None,
    }
    target = run_dir / CHECKPOINT
    tmp = Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=run_dir))
    try:
        save_file(tensors, tmp / "state.safetensors")
        (tmp / "state.json").write_text(json.dumps(meta))
        old = run_dir / ".checkpoint-old"
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_state(run_dir: Path) -> ServerState | None:
    """The last complete checkpoint, or None. A crash between the two renames leaves ``.checkpoint-old``."""
    target = run_dir / CHECKPOINT
    if not (target / "state.json").is_file():
        old = run_dir / ".checkpoint-old"
        if not (old / "state.json").is_file():
            return None
        target = old
    meta = json.loads((target / "state.json").read_text())
    tensors = load_file(target / "state.safetensors")
    state = ServerState(round=meta["round"], history=[{} for _ in range(meta["history_rounds"])])
    state.global_adapter = {} if meta["has_global_adapter"] else None
    state.frozen = {} if meta.get("has_frozen") else None
    state.global_R = {} if meta.get("has_global_R") else None
    for key in sorted(tensors):
        kind, rest = key.split(".", 1)
        if kind == "R":
            state.global_R[rest] = tensors[key]
            continue
        if kind == "history":
            t, rest = rest.split(".", 1)
            bucket = state.history[int(t)]
        else:
            bucket = state.global_adapter if kind == "global" else state.frozen
        name, which = rest.rsplit(".", 1)
        B, A = bucket.get(name, (None, None))
        bucket[name] = (tensors[key], A) if which == "B" else (B, tensors[key])
    return state
