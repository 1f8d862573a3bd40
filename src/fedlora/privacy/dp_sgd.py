"""Record-level DP-SGD for one client's local training, with Opacus.

``train_client_private`` is the private twin of :func:`fedlora.train.train_client` and returns the same
``TrainResult``. What differs, and why:

- **Poisson sampling**: every logical step includes each example independently with probability
  ``q = batch_size / N`` (the accountant's assumption); the batch size varies and may be 0 (a noise-only step).
  The step count per round is fixed (``TrainSettings.total_steps(N)``), so the accounting does not depend on data.
- **Per-example loss**: example i's loss is the mean token cross-entropy over ITS target tokens (labels != -100,
  causal shift; padding and masked prompt tokens never count). The backward pass uses the sum of these losses, so
  Opacus' per-sample gradient of row i is exactly the gradient of example i's loss.
- **Clipping and noise** (``opacus.optimizers.DPOptimizer``): each per-sample gradient (over ALL trainable
  parameters jointly: A and B; only B for FFA-LoRA; only R for Fed-SB) is clipped to ``clip_norm``; the clipped sum
  gets Gaussian noise of std ``noise_multiplier * clip_norm`` and is divided by the EXPECTED batch size. The
  update is ``(sum_i clip(g_i) + N(0, sigma^2 C^2)) / batch_size``, then AdamW and the usual schedule.
  ``train.max_grad_norm`` is not used (per-example clipping replaces it).
- **Virtual batches**: a logical (Poisson) batch is processed in chunks of ``micro_batch_size`` examples; the
  optimizer clips and accumulates each chunk and steps (adding noise once) after the last one, as Opacus'
  ``BatchMemoryManager`` does. Memory is bounded by the micro-batch; the privacy of the step is unchanged.
- **Reproducibility**: the Poisson sampler, the noise and dropout draw from generators seeded by
  ``settings.seed`` (the engine derives one per client and round): the same seed gives the same run bit for bit.
  ``secure_mode`` uses a cryptographically secure generator instead (Opacus' floating-point-attack-safe noise;
  needs ``torchcsprng``), and is then not reproducible.
- Full precision only (no autocast) and no gradient checkpointing (its re-run forward would confuse the hooks).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import Tensor, nn

from fedlora.privacy.accounting import PrivacyError, RecordPlan, require_opacus
from fedlora.train import (
    IGNORE_INDEX,
    CollateFn,
    ProgressLike,
    StepLog,
    TrainingError,
    TrainResult,
    TrainSettings,
    _collate,
    _forward_logits,
    _mix_seed,
    _mode,
    _num_tokens,
    _resolve_device,
    _seeded_rng,
    _synchronize,
    build_scheduler,
    make_optimizer,
    shifted_labels,
)

#: attributes Opacus and this module leave on parameters and modules; removed after training
_PARAM_ATTRS = ("grad_sample", "_forward_counter", "_current_grad_sample", "_norm_sample", "summed_grad")
_MODULE_ATTRS = ("activations", "max_batch_len", "_dp_dropped")


def per_example_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Shape (batch,): each example's mean causal-LM cross-entropy over its own target tokens (0 if it has none)."""
    targets = shifted_labels(labels)
    tokens = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(targets.shape)
    counts = (targets != IGNORE_INDEX).sum(dim=1)
    return tokens.sum(dim=1) / counts.clamp(min=1)


def poisson_batches(
    num_examples: int, sample_rate: float, steps: int, generator: torch.Generator
) -> Iterator[list[int]]:
    """Per step, the indices of the examples drawn independently with probability ``sample_rate`` (maybe none)."""
    for _ in range(steps):
        mask = torch.rand(num_examples, generator=generator) < sample_rate
        yield mask.nonzero().flatten().tolist()


# ------------------------------------------------------------------------------------------- Opacus glue


def _register_lora_sb_sampler() -> None:
    """Per-sample gradients of LoRA-SB's R: ``grad_R[i] = s * sum_t (B^T g_it)(A h_it)^T``.

    ``h`` is the layer's input after its dropout; a forward hook on the dropout stores it (Opacus itself only
    sees the layer's input, before dropout). Registered once, globally, in Opacus' sampler table.
    """
    from opacus.grad_sample import GradSampleModule
    from opacus.grad_sample.utils import register_grad_sampler

    from fedlora.lora_sb import LoraSBLinear

    if LoraSBLinear in GradSampleModule.GRAD_SAMPLERS:
        return

    @register_grad_sampler(LoraSBLinear)
    def _lora_sb_grad_sample(layer: LoraSBLinear, activations: list[Tensor], backprops: Tensor) -> dict:
        dropped = getattr(layer, "_dp_dropped", None)
        h = dropped.pop() if dropped else activations[0]
        a = F.linear(h.to(layer.R.dtype), layer.A)  # (n, ..., r)
        g = F.linear(backprops.to(layer.R.dtype), layer.B.t()) * layer.scaling  # (n, ..., r) = s B^T g
        return {layer.R: torch.einsum("n...i,n...j->nij", g, a)}


def _check_trainable_modules(model: nn.Module) -> list[Any]:
    """Opacus cannot privatise a trainable layer with buffers (e.g. batch norm); LoRA-SB's frozen B, A are fine.

    Returns forward hooks that capture LoRA-SB's post-dropout input (removed after training).
    """
    from fedlora.lora_sb import LoraSBLinear

    hooks = []
    for name, module in model.named_modules():
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        if isinstance(module, LoraSBLinear):
            if isinstance(module.dropout, nn.Dropout):
                hooks.append(module.dropout.register_forward_hook(_capture_dropped(module)))
            continue
        if list(module.buffers(recurse=False)):
            raise PrivacyError(
                f"module {name!r} ({type(module).__name__}) trains and holds buffers; DP-SGD cannot give per-example "
                "gradients for it. Train only adapter parameters"
            )
    return hooks


def _capture_dropped(layer: nn.Module):
    def hook(_module: nn.Module, _inputs: Any, output: Tensor) -> None:
        if layer.training and torch.is_grad_enabled():
            if not hasattr(layer, "_dp_dropped"):
                layer._dp_dropped = []
            layer._dp_dropped.append(output.detach())

    return hook


def _cleanup(model: nn.Module) -> None:
    for p in model.parameters():
        for attr in _PARAM_ATTRS:
            if hasattr(p, attr):
                delattr(p, attr)
    for module in model.modules():
        for attr in _MODULE_ATTRS:
            if attr in module.__dict__:
                delattr(module, attr)


@contextmanager
def grad_sample_module(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` wrapped in Opacus' ``GradSampleModule`` (sum reduction); hooks and attributes removed afterwards."""
    require_opacus()
    from opacus.grad_sample import GradSampleModule

    _register_lora_sb_sampler()
    hooks = _check_trainable_modules(model)
    gsm = None
    try:
        # strict=False: LoRA-SB's frozen buffers B and A are checked above; nothing else with buffers trains
        gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=False)
        yield gsm
    finally:
        if gsm is not None:
            gsm.remove_hooks()
        for h in hooks:
            h.remove()
        _cleanup(model)


def _generators(seed: int, device: torch.device, secure_mode: bool) -> tuple[torch.Generator, torch.Generator]:
    """(sampling generator on CPU, noise generator on the device)."""
    if secure_mode:
        try:
            import torchcsprng as csprng
        except ImportError:
            raise PrivacyError(
                "privacy.secure_mode needs the torchcsprng package (a cryptographically secure generator); install "
                "it or set privacy.secure_mode=false"
            ) from None
        rng = csprng.create_random_device_generator("/dev/urandom")
        return rng, rng
    sampling = torch.Generator().manual_seed(_mix_seed(seed, 7_000_001))
    noise = torch.Generator(device=device).manual_seed(_mix_seed(seed, 7_000_003))
    return sampling, noise


def make_dp_optimizer(
    optimizer: torch.optim.Optimizer, plan: RecordPlan, generator: torch.Generator | None, secure_mode: bool = False
) -> Any:
    """Opacus' ``DPOptimizer`` around ``optimizer``: clip per example to ``plan.clip_norm``, add
    ``N(0, (noise_multiplier * clip_norm)^2)`` to the clipped sum, divide by the EXPECTED batch size."""
    require_opacus()
    from opacus.optimizers import DPOptimizer

    return DPOptimizer(
        optimizer,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.clip_norm,
        expected_batch_size=plan.expected_batch_size,
        loss_reduction="mean",  # the per-sample gradients are of a sum; "mean" here sets the 1/batch scaling
        generator=generator,
        secure_mode=secure_mode,
    )


def noise_only_step(optimizer: Any, params: Sequence[nn.Parameter]) -> None:
    """An empty Poisson batch still steps: zero examples, so the update is the noise alone."""
    for p in params:
        p.grad_sample = p.new_zeros((0, *p.shape))
    optimizer.step()


# ------------------------------------------------------------------------------------------------ training


def train_client_private(
    model: nn.Module,
    examples: Sequence[Any],
    settings: TrainSettings,
    plan: RecordPlan,
    collate_fn: CollateFn,
    *,
    device: str | torch.device | None = None,
    progress: ProgressLike | None = None,
    desc: str = "",
    secure_mode: bool = False,
) -> TrainResult:
    """Train ``model`` in place with DP-SGD on one client's ``examples`` (one round); see the module docstring.

    ``plan`` fixes the noise multiplier, clip norm, sampling rate and steps (``plan_record_level``); its
    ``num_examples`` must equal ``len(examples)``. The returned losses are the mean per-example losses of each
    logical batch (NaN for an empty batch; a diagnostic that is NOT covered by the privacy guarantee).
    """
    name = desc or "client"
    if len(examples) != plan.num_examples:
        raise PrivacyError(f"{name}: the privacy plan is for {plan.num_examples} examples, got {len(examples)}")
    if settings.gradient_checkpointing:
        raise PrivacyError(f"{name}: DP-SGD does not support train.gradient_checkpointing; turn it off")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError(f"{name}: the model has no trainable parameters (requires_grad is False everywhere)")
    device = _resolve_device(model, device)
    total_steps = plan.steps_per_round
    sampling_gen, noise_gen = _generators(settings.seed, device, secure_mode)

    losses: list[float] = []
    rates: list[float] = []
    examples_seen = tokens = 0
    task = progress.add_task(name, total=total_steps) if isinstance(progress, Progress) else None
    _synchronize(device)
    start = time.perf_counter()
    with grad_sample_module(model) as gsm:
        optimizer = make_optimizer(params, settings)
        scheduler = build_scheduler(optimizer, settings, total_steps)
        dp_optimizer = make_dp_optimizer(optimizer, plan, noise_gen, secure_mode)
        try:
            with _mode(model, True), _seeded_rng(settings.seed, device), warnings.catch_warnings():
                # the frozen base's activations do not require grad; Opacus' hooks only need the output grads
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                batches = poisson_batches(len(examples), plan.sample_rate, total_steps, sampling_gen)
                for step, indices in enumerate(batches, 1):
                    rates.append(optimizer.param_groups[0]["lr"])
                    micro = settings.micro_batch_size
                    chunks = [indices[i : i + micro] for i in range(0, len(indices), micro)]
                    if not chunks:  # an empty Poisson batch: the step is noise only
                        noise_only_step(dp_optimizer, params)
                        loss = math.nan
                    else:
                        summed = torch.zeros((), device=device)
                        for j, chunk in enumerate(chunks):
                            batch = _collate(collate_fn, [examples[i] for i in chunk], name)
                            tokens += _num_tokens(batch)
                            examples_seen += len(chunk)
                            batch = {k: v.to(device) for k, v in batch.items()}
                            logits = _forward_logits(gsm, batch)
                            per_example = per_example_loss(logits, batch["labels"])
                            del logits
                            per_example.sum().backward()
                            summed += per_example.detach().sum()
                            last = j == len(chunks) - 1
                            dp_optimizer.signal_skip_step(do_skip=not last)
                            if not math.isfinite(float(summed)):
                                raise TrainingError(
                                    f"{name}: loss is not finite at step {step}/{total_steps} (stopped before "
                                    "applying it); lower the learning rate or check the data"
                                )
                            dp_optimizer.step()  # clips and accumulates; adds noise and steps after the last chunk
                            if not last:
                                dp_optimizer.zero_grad(set_to_none=True)  # keeps the accumulated clipped sum
                        loss = float(summed) / len(indices)
                    scheduler.step()
                    dp_optimizer.zero_grad(set_to_none=True)
                    losses.append(loss)
                    if task is not None:
                        progress.update(task, advance=1, description=f"{name} loss {loss:.4f} (DP)")
                    elif progress is not None:
                        progress(StepLog(step, total_steps, loss, rates[-1], name))
        finally:
            dp_optimizer.zero_grad(set_to_none=True)
            del optimizer, dp_optimizer, scheduler
            if task is not None:
                progress.remove_task(task)
    _synchronize(device)
    return TrainResult.of_steps(losses, rates, examples_seen, tokens, time.perf_counter() - start)
