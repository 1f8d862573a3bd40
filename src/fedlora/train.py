"""The local training loop: a plain torch loop over one client's examples.

One call of ``train_client`` is one client's local training in one round: a fresh AdamW over the trainable
parameters and a fresh learning-rate schedule (the seeds' "linear decay restarting every round"), a seeded
shuffle per epoch, gradient accumulation up to the effective batch, clipping, optional gradient checkpointing and
mixed precision on CUDA. The model is trained in place (no copies): the engine trains many clients one after the
other on a single base model.

The loss of an optimizer step is the mean token loss over all target tokens of the whole effective batch (every
label that is not -100, causal shift), not a mean of per-micro-batch means: each micro-batch contributes its
summed token loss divided by the effective batch's total target-token count, so gradient accumulation and
padding do not change the update.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from rich.progress import Progress
from torch import Tensor, nn

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
SCHEDULERS = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "no", "bf16", "fp16")

#: ``collate_fn(list_of_examples) -> {"input_ids", "attention_mask", "labels"}`` (labels -100 where ignored)
CollateFn = Callable[[list[Any]], Mapping[str, Tensor]]


class TrainingError(ValueError):
    """Training cannot go on (bad settings, empty data, a non-finite loss); the message names the client."""


class TrainSettings(BaseModel):
    """Local training settings of one client in one round. Defaults follow the seeds (FLoRIST on Dolly)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    epochs: int = Field(3, ge=1, description="local epochs per round (ignored when max_steps is set)")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps per round; overrides epochs")
    batch_size: int = Field(128, ge=1, description="effective batch (examples per optimizer step)")
    micro_batch_size: int = Field(16, ge=1, description="examples per forward pass; batch_size is a multiple")
    learning_rate: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(1e-8, gt=0)
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="share of the steps spent warming up")
    warmup_steps: int = Field(0, ge=0, description="warm-up steps (instead of warmup_ratio)")
    max_grad_norm: float | None = Field(1.0, description="clip the trainable gradients' norm; None or 0: off")
    seed: int = Field(42, ge=0, description="data order and dropout; derive one per round and client")
    gradient_checkpointing: bool = False
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    log_every: int = Field(10, ge=1, description="log the loss every this many optimizer steps (INFO level)")

    @model_validator(mode="after")
    def _check_consistency(self) -> TrainSettings:
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size ({self.micro_batch_size})"
            )
        if self.warmup_ratio and self.warmup_steps:
            raise ValueError(f"give warmup_ratio ({self.warmup_ratio}) or warmup_steps ({self.warmup_steps}), not both")
        if not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas must lie in [0, 1), got {self.adam_betas}")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0 (0 or None turns clipping off), got {self.max_grad_norm}")
        return self

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step."""
        return self.batch_size // self.micro_batch_size

    def total_steps(self, num_examples: int) -> int:
        """Optimizer steps of one ``train_client`` call on ``num_examples`` examples.

        An epoch has ``ceil(num_examples / batch_size)`` steps (a partial last batch is still stepped).
        """
        if self.max_steps is not None:
            return self.max_steps
        return self.epochs * math.ceil(num_examples / self.batch_size)

    def num_warmup_steps(self, total_steps: int) -> int:
        return self.warmup_steps or math.ceil(self.warmup_ratio * total_steps)


@dataclass
class StepLog:
    """What a progress callback receives after every optimizer step."""

    step: int
    total_steps: int
    loss: float
    learning_rate: float
    desc: str = ""


#: a rich ``Progress`` (a per-step bar is added and removed) or a callable receiving a ``StepLog`` per step
ProgressLike = Progress | Callable[[StepLog], None]


@dataclass
class TrainResult:
    """Summary of one ``train_client`` call."""

    loss: float  # mean of the per-step losses
    losses: list[float]  # per optimizer step: mean token loss of the effective batch
    steps: int
    examples_seen: int
    tokens: int  # non-padding tokens processed (attention mask), forward passes only
    seconds: float
    tokens_per_second: float
    learning_rates: list[float] = field(default_factory=list)  # the rate each step used

    @classmethod
    def of_steps(
        cls, losses: list[float], rates: list[float], examples_seen: int, tokens: int, seconds: float
    ) -> TrainResult:
        """The summary of a finished loop; ``loss`` averages the finite step losses (DP's noise-only steps: NaN)."""
        finite = [x for x in losses if math.isfinite(x)]
        return cls(
            loss=sum(finite) / len(finite) if finite else math.nan,
            losses=losses,
            steps=len(losses),
            examples_seen=examples_seen,
            tokens=tokens,
            seconds=seconds,
            tokens_per_second=tokens / seconds if seconds > 0 else float("inf"),
            learning_rates=rates,
        )


# ---------------------------------------------------------------------------------------------------------------
# Devices and precision


def select_device(name: str | torch.device = "auto") -> torch.device:
    """``auto``: CUDA, then MPS, then CPU. An explicit name (``cuda``, ``cuda:1``, ``mps``, ``cpu``) must exist."""
    if isinstance(name, torch.device):
        name = str(name)
    key = name.strip().lower()
    if key == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(key)
    except RuntimeError:
        raise TrainingError(f"unknown device {name!r}; valid: auto, cpu, cuda, cuda:N, mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise TrainingError(f"device {name!r} requested but CUDA is not available; use 'cpu' or 'auto'")
        if device.index is not None and device.index >= count:
            raise TrainingError(f"device {name!r} requested but only {count} CUDA device(s) exist")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise TrainingError(f"device {name!r} requested but MPS is not available; use 'cpu' or 'auto'")
    elif device.type != "cpu":
        raise TrainingError(f"unsupported device {name!r}; valid: auto, cpu, cuda, cuda:N, mps")
    return device


def autocast_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``mixed_precision`` on ``device``; None means full precision.

    Autocast is used on CUDA only; elsewhere training runs in the model's own dtype (a warning is logged when
    bf16/fp16 was asked for explicitly).
    """
    if mixed_precision not in PRECISIONS:
        raise TrainingError(f"unknown mixed_precision {mixed_precision!r}; valid: {', '.join(PRECISIONS)}")
    if mixed_precision == "no":
        return None
    if device.type != "cuda":
        if mixed_precision != "auto":
            logger.warning(
                "mixed_precision=%s applies to CUDA only; training on %s in full precision", mixed_precision, device
            )
        return None
    if mixed_precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if mixed_precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise TrainingError("mixed_precision=bf16 requested but this GPU does not support bf16; use fp16 or auto")
    return torch.bfloat16 if mixed_precision == "bf16" else torch.float16


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    raise TrainingError("the model has no parameters")


def _resolve_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """None: where the model already is. Otherwise the model is moved there (in place)."""
    if device is None:
        return _model_device(model)
    target = select_device(device)
    if _model_device(model) != target:
        model.to(target)
    return target


# ---------------------------------------------------------------------------------------------------------------
# Pure pieces: data order, batches, loss, schedule


def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of one epoch: a function of ``(seed, epoch)`` only, never of global RNG."""
    generator = torch.Generator().manual_seed(_mix_seed(seed, epoch))
    return torch.randperm(num_examples, generator=generator).tolist()


def _mix_seed(*parts: int) -> int:
    # SeedSequence mixes the parts so that (seed, epoch) pairs do not collide as seed + epoch would.
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> 1)


def _batches_of_steps(num_examples: int, settings: TrainSettings, total_steps: int) -> Iterator[list[list[int]]]:
    """Per optimizer step, its micro-batches as lists of example indices.

    Epochs follow one another until ``total_steps``; an effective batch never spans two epochs, so the last one
    of an epoch may be partial (fewer micro-batches, or a shorter last micro-batch).
    """
    step, epoch = 0, 0
    while step < total_steps:
        order = epoch_order(num_examples, settings.seed, epoch)
        for start in range(0, num_examples, settings.batch_size):
            batch = order[start : start + settings.batch_size]
            yield [batch[i : i + settings.micro_batch_size] for i in range(0, len(batch), settings.micro_batch_size)]
            step += 1
            if step == total_steps:
                return
        epoch += 1


def shifted_labels(labels: Tensor) -> Tensor:
    """Labels aligned with the logits of a causal LM: position t predicts token t+1; the last position ignored.

    Shifting the labels (not the logits) avoids copying the large logits tensor.
    """
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def count_targets(labels: Tensor) -> int:
    """Target tokens of a batch: shifted labels that are not ``IGNORE_INDEX``."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def summed_token_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Sum (not mean) of the causal-LM cross-entropy over the target tokens, in float32."""
    targets = shifted_labels(labels)
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def make_optimizer(params: list[nn.Parameter], settings: TrainSettings) -> torch.optim.AdamW:
    """A fresh AdamW over ``params`` with the settings' learning rate, betas, eps and weight decay."""
    return torch.optim.AdamW(
        params,
        lr=settings.learning_rate,
        betas=settings.adam_betas,
        eps=settings.adam_eps,
        weight_decay=settings.weight_decay,
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, settings: TrainSettings, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule of one round, as Hugging Face defines it (warm-up from 0, then the shape)."""
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    warmup = settings.num_warmup_steps(total_steps)
    if settings.scheduler == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    if settings.scheduler == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    if settings.scheduler == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    raise TrainingError(f"unknown scheduler {settings.scheduler!r}; valid: {', '.join(SCHEDULERS)}")


def _collate(collate_fn: CollateFn, items: list[Any], desc: str) -> dict[str, Tensor]:
    """Collate and keep the model inputs; counting tokens here, before the move to the device, needs no sync."""
    batch = collate_fn(items)
    missing = [k for k in ("input_ids", "labels") if k not in batch]
    if missing:
        raise TrainingError(
            f"{desc}: collate_fn returned no {missing}; it must return input_ids, attention_mask and labels, "
            f"got {sorted(batch)}"
        )
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}


def _to_device(batch: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _forward_logits(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False).logits


def _num_tokens(batch: Mapping[str, Tensor]) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


# ---------------------------------------------------------------------------------------------------------------
# Model state that training changes and must restore


@contextmanager
def _checkpointing(model: nn.Module, settings: TrainSettings, base_frozen: bool) -> Iterator[None]:
    """Turn gradient (activation) checkpointing on for the call; restore the model's previous state after it."""
    if not settings.gradient_checkpointing:
        yield
        return
    # transformers 5.x renamed the API to "activation checkpointing"; prefer the new names when present
    new_api = hasattr(model, "activation_checkpointing_enable")
    if not new_api and not hasattr(model, "gradient_checkpointing_enable"):
        raise TrainingError(f"gradient_checkpointing=True but {type(model).__name__} does not support it")
    was_on = bool(getattr(model, "is_activation_checkpointing" if new_api else "is_gradient_checkpointing", False))
    had_input_grads = _has_input_grad_hooks(model)
    if new_api:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # With a frozen base the embeddings' output must require grad for gradients to reach the adapters through the
    # checkpointed layers (transformers usually adds this hook itself).
    if base_frozen and not _has_input_grad_hooks(model):
        model.enable_input_require_grads()
    try:
        yield
    finally:
        if not had_input_grads and _has_input_grad_hooks(model):
            model.disable_input_require_grads()
        if not was_on:
            (model.activation_checkpointing_disable if new_api else model.gradient_checkpointing_disable)()


def _has_input_grad_hooks(model: nn.Module) -> bool:
    # transformers keeps the hooks of enable_input_require_grads here (older releases: one "_require_grads_hook")
    return bool(getattr(model, "_require_grads_hooks", None) or getattr(model, "_require_grads_hook", None))


@contextmanager
def _seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Seed dropout for the call without touching the caller's global RNG state afterwards."""
    devices = [device.index or 0] if device.type in ("cuda", "mps") else []
    device_type = device.type if device.type in ("cuda", "mps") else None
    with torch.random.fork_rng(devices=devices, device_type=device_type):
        torch.manual_seed(_mix_seed(seed, 1_000_003))
        yield


@contextmanager
def _mode(model: nn.Module, training: bool) -> Iterator[None]:
    was_training = model.training
    model.train(training)
    try:
        yield
    finally:
        model.train(was_training)


class _Precision:
    """Autocast, loss scaling (fp16 only) and the clipped optimizer step, in one place."""

    def __init__(self, dtype: torch.dtype | None):
        self.dtype = dtype
        self.scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None

    def autocast(self) -> AbstractContextManager[None]:
        return torch.autocast("cuda", dtype=self.dtype) if self.dtype is not None else nullcontext()

    def backward(self, loss: Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter], max_grad_norm: float | None) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(optimizer)  # skips the step when fp16 gradients overflowed
            self.scaler.update()
        else:
            optimizer.step()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------------------
# Training and evaluation


def train_client(
    model: nn.Module,
    examples: Sequence[Any],
    settings: TrainSettings,
    collate_fn: CollateFn,
    *,
    device: str | torch.device | None = None,
    progress: ProgressLike | None = None,
    desc: str = "",
) -> TrainResult:
    """Train ``model`` in place on one client's ``examples``; return the loss curve and throughput.

    Only parameters with ``requires_grad`` are optimised (a fresh AdamW and schedule per call). ``device``:
    None trains where the model is; otherwise the model is moved there. ``desc`` names the client in progress
    bars, logs and errors.
    """
    name = desc or "client"
    if len(examples) == 0:
        raise TrainingError(f"{name}: no training examples")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError(f"{name}: the model has no trainable parameters (requires_grad is False everywhere)")
    base_frozen = any(not p.requires_grad for p in model.parameters())
    device = _resolve_device(model, device)
    total_steps = settings.total_steps(len(examples))
    precision = _Precision(autocast_dtype(settings.mixed_precision, device))
    optimizer = make_optimizer(params, settings)
    scheduler = build_scheduler(optimizer, settings, total_steps)
    batches = _batches_of_steps(len(examples), settings, total_steps)

    losses: list[float] = []
    rates: list[float] = []
    examples_seen = tokens = 0
    task = progress.add_task(name, total=total_steps) if isinstance(progress, Progress) else None
    _synchronize(device)
    start = time.perf_counter()
    try:
        with _mode(model, True), _checkpointing(model, settings, base_frozen), _seeded_rng(settings.seed, device):
            for step, micro_indices in enumerate(batches, 1):
                # Collate the whole effective batch first: its target-token count normalises every micro-batch.
                micro_batches = [_collate(collate_fn, [examples[i] for i in idx], name) for idx in micro_indices]
                num_targets = sum(count_targets(b["labels"]) for b in micro_batches)
                if num_targets == 0:
                    raise TrainingError(
                        f"{name}: step {step} has no target tokens (every label is {IGNORE_INDEX}); "
                        "check the prompt cutoff and train_on_inputs"
                    )
                summed = torch.zeros((), device=device)
                for cpu_batch in micro_batches:
                    tokens += _num_tokens(cpu_batch)
                    examples_seen += cpu_batch["input_ids"].shape[0]
                    batch = _to_device(cpu_batch, device)
                    with precision.autocast():
                        logits = _forward_logits(model, batch)
                    micro_loss = summed_token_loss(logits, batch["labels"]) / num_targets
                    del logits
                    precision.backward(micro_loss)
                    summed += micro_loss.detach()

                loss = summed.item()
                if not math.isfinite(loss):
                    raise TrainingError(
                        f"{name}: loss is {loss} at step {step}/{total_steps} (stopped before applying this step); "
                        "lower the learning rate or check the data"
                    )
                rates.append(optimizer.param_groups[0]["lr"])
                precision.step(optimizer, params, settings.max_grad_norm)
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss)

                if step % settings.log_every == 0 or step == total_steps:
                    logger.info("%s step %d/%d loss %.4f lr %.3g", name, step, total_steps, loss, rates[-1])
                if task is not None:
                    progress.update(task, advance=1, description=f"{name} loss {loss:.4f}")
                elif progress is not None:
                    progress(StepLog(step, total_steps, loss, rates[-1], name))
    finally:
        # Free the optimizer state and gradients now: the next client reuses the same model and memory.
        optimizer.zero_grad(set_to_none=True)
        del optimizer, scheduler
        if task is not None:
            progress.remove_task(task)
    _synchronize(device)
    return TrainResult.of_steps(losses, rates, examples_seen, tokens, time.perf_counter() - start)


def evaluate_loss(
    model: nn.Module,
    examples: Sequence[Any],
    collate_fn: CollateFn,
    batch_size: int = 8,
    device: str | torch.device | None = None,
) -> float:
    """Mean token loss over all target tokens of ``examples`` (the training loss's definition), in eval mode.

    The model's previous train/eval mode is restored.
    """
    if len(examples) == 0:
        raise TrainingError("evaluate_loss: no examples")
    if batch_size < 1:
        raise TrainingError(f"evaluate_loss: batch_size must be >= 1, got {batch_size}")
    device = _resolve_device(model, device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    num_targets = 0
    with _mode(model, False), torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = [examples[i] for i in range(start, min(start + batch_size, len(examples)))]
            batch = _collate(collate_fn, chunk, "evaluate_loss")
            num_targets += count_targets(batch["labels"])
            batch = _to_device(batch, device)
            total += summed_token_loss(_forward_logits(model, batch), batch["labels"]).double()
    if num_targets == 0:
        raise TrainingError(f"evaluate_loss: no target tokens (every label is {IGNORE_INDEX})")
    return float(total) / num_targets
