"""The local training loop on a tiny random Llama with a PEFT LoRA, on synthetic token data of varied lengths."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from rich.progress import Progress
from transformers import LlamaConfig, LlamaForCausalLM

from fedlora.train import (
    StepLog,
    TrainingError,
    TrainSettings,
    autocast_dtype,
    build_scheduler,
    epoch_order,
    evaluate_loss,
    select_device,
    train_client,
)

PAD = 0
PROMPT = 2  # the first tokens of every example are "prompt": label -100


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread, and do not stall when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- tiny model, data and collate ------------------------------------------------------------------------------


def make_model(seed: int = 0, *, dropout: float = 0.0, random_b: bool = False) -> torch.nn.Module:
    """A tiny Llama with LoRA r=4 on q_proj, v_proj. ``random_b`` gives B non-zero so that A has gradients too."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=PAD,
    )
    base = LlamaForCausalLM(config)
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        lora_dropout=dropout,
        init_lora_weights=not random_b,
    )
    return get_peft_model(base, lora)


def make_examples(n: int, seed: int = 0, min_len: int = 4, max_len: int = 20) -> list[dict[str, list[int]]]:
    """Arithmetic sequences of varied lengths (learnable); the first PROMPT labels are ignored."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        start, stride = (int(v) for v in torch.randint(1, 7, (2,), generator=g))
        ids = [1 + (start + stride * t) % 127 for t in range(length)]
        out.append({"input_ids": ids, "labels": [-100] * PROMPT + ids[PROMPT:]})
    return out


def make_collate(extra_pad: int = 0):
    """Right padding to the longest example (+ ``extra_pad``); labels -100 on padding."""

    def collate(examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples) + extra_pad
        ids = torch.full((len(examples), width), PAD)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        labels = torch.full((len(examples), width), -100)
        for row, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[row, :n] = torch.tensor(e["input_ids"])
            mask[row, :n] = 1
            labels[row, :n] = torch.tensor(e["labels"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


collate = make_collate()


def lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def first_step_gradients(model: torch.nn.Module, examples, settings: TrainSettings, collate_fn) -> dict:
    """The accumulated gradient of every trainable parameter just before the first optimizer step."""
    grads: dict[str, torch.Tensor] = {}
    handles = [
        p.register_post_accumulate_grad_hook(lambda p, n=n: grads.__setitem__(n, p.grad.detach().clone()))
        for n, p in model.named_parameters()
        if p.requires_grad
    ]
    try:
        train_client(model, examples, settings.model_copy(update={"max_steps": 1}), collate_fn)
    finally:
        for h in handles:
            h.remove()
    return grads


def hand_mean_token_loss(model: torch.nn.Module, examples) -> torch.Tensor:
    """Independent reference: each example alone (no padding), log-softmax, gather the next-token targets."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    for e in examples:
        ids = torch.tensor([e["input_ids"]])
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        for t in range(len(e["input_ids"]) - 1):
            target = e["labels"][t + 1]
            if target != -100:
                total = total - logp[t, target]
                count += 1
    return total / count


SMALL = {"learning_rate": 1e-2, "max_grad_norm": None, "log_every": 1}


# --- learning ------------------------------------------------------------------------------------------------


def test_loss_decreases_and_only_lora_changes():
    model = make_model()
    examples = make_examples(16)
    before_base, before_lora = base_state(model), lora_state(model)
    eval_before = evaluate_loss(model, examples, collate)

    settings = TrainSettings(epochs=10, batch_size=8, micro_batch_size=4, learning_rate=1e-2, scheduler="constant")
    result = train_client(model, examples, settings, collate)

    assert result.steps == 20 and len(result.losses) == 20
    assert result.examples_seen == 160
    assert result.tokens == 10 * sum(len(e["input_ids"]) for e in examples)
    assert result.loss == pytest.approx(sum(result.losses) / 20)
    assert result.tokens_per_second > 0 and result.seconds > 0
    # a random tiny model with LoRA on q, v only learns slowly, but steadily (about 4.86 -> 4.64 here)
    assert sum(result.losses[-3:]) / 3 < sum(result.losses[:3]) / 3 - 0.15
    assert evaluate_loss(model, examples, collate) < eval_before - 0.15
    for name, value in base_state(model).items():
        assert torch.equal(value, before_base[name]), f"frozen {name} changed"
    after_lora = lora_state(model)
    assert all(not torch.equal(after_lora[n], before_lora[n]) for n in after_lora if "lora_B" in n)
    assert all(p.grad is None for p in model.parameters()), "gradients are freed after training"


def test_first_step_loss_is_mean_token_loss_of_the_effective_batch():
    examples = make_examples(8)
    model = make_model(random_b=True)
    expected = hand_mean_token_loss(model, examples).item()
    for micro in (8, 2):
        model = make_model(random_b=True)
        settings = TrainSettings(max_steps=1, batch_size=8, micro_batch_size=micro, **SMALL)
        result = train_client(model, examples, settings, collate)
        assert result.losses[0] == pytest.approx(expected, rel=1e-5)


def test_partial_last_batch_is_normalised_by_its_own_tokens():
    examples = make_examples(14)  # batch 8: the second step holds the 6 examples left, as 3 micro-batches of 2
    model = make_model(random_b=True)
    settings = TrainSettings(epochs=1, batch_size=8, micro_batch_size=2, **SMALL)
    left = [examples[i] for i in epoch_order(14, settings.seed, 0)[8:]]
    expected: list[float] = []

    def after_step(log: StepLog) -> None:
        if log.step == 1:  # the model the second step starts from
            with torch.no_grad():
                expected.append(hand_mean_token_loss(model, left).item())

    result = train_client(model, examples, settings, collate, progress=after_step)
    assert result.steps == 2 and result.examples_seen == 14
    assert result.losses[1] == pytest.approx(expected[0], rel=1e-5)


def test_accumulation_gives_the_same_gradient():
    examples = make_examples(8, min_len=3, max_len=30)  # very different lengths per micro-batch
    full = first_step_gradients(
        make_model(random_b=True), examples, TrainSettings(batch_size=8, micro_batch_size=8, **SMALL), collate
    )
    accumulated = first_step_gradients(
        make_model(random_b=True), examples, TrainSettings(batch_size=8, micro_batch_size=2, **SMALL), collate
    )
    assert full.keys() == accumulated.keys() and len(full) == 8  # A and B of q, v in 2 layers
    for name in full:
        assert full[name].abs().max() > 0
        torch.testing.assert_close(accumulated[name], full[name], atol=1e-6, rtol=1e-5)

    # The test can fail: a mean of per-micro-batch means (the naive loop) gives a different gradient.
    model = make_model(random_b=True)
    order = epoch_order(8, 42, 0)
    for start in range(0, 8, 2):
        batch = collate([examples[i] for i in order[start : start + 2]])
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        (out.loss / 4).backward()
    naive = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any((naive[n] - full[n]).abs().max() > 1e-4 for n in full)


def test_extra_padding_changes_nothing():
    examples = make_examples(8)
    model = make_model(random_b=True)
    assert evaluate_loss(model, examples, make_collate(extra_pad=7)) == pytest.approx(
        evaluate_loss(model, examples, collate), rel=1e-6
    )
    settings = TrainSettings(batch_size=8, micro_batch_size=4, **SMALL)
    plain = first_step_gradients(make_model(random_b=True), examples, settings, collate)
    padded = first_step_gradients(make_model(random_b=True), examples, settings, make_collate(extra_pad=7))
    for name in plain:
        torch.testing.assert_close(padded[name], plain[name], atol=1e-6, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_weights_and_is_restored():
    examples = make_examples(12)
    settings = TrainSettings(max_steps=3, batch_size=4, micro_batch_size=2, **SMALL)
    plain = make_model(random_b=True)
    train_client(plain, examples, settings, collate)
    checkpointed = make_model(random_b=True)
    train_client(checkpointed, examples, settings.model_copy(update={"gradient_checkpointing": True}), collate)
    for name, value in lora_state(plain).items():
        torch.testing.assert_close(lora_state(checkpointed)[name], value, atol=1e-6, rtol=1e-5)
    assert not checkpointed.is_activation_checkpointing
    assert not getattr(checkpointed, "_require_grads_hooks", None)


# --- data order and determinism --------------------------------------------------------------------------------


def test_same_seed_same_weights_whatever_the_global_rng():
    examples = make_examples(20)
    settings = TrainSettings(epochs=2, batch_size=8, micro_batch_size=4, seed=7, **SMALL)
    runs = []
    for global_seed in (1, 2):
        model = make_model(dropout=0.1)  # dropout must be seeded too
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        train_client(model, examples, settings, collate)
        assert torch.equal(torch.get_rng_state(), state), "the caller's RNG state is left untouched"
        runs.append(lora_state(model))
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name])

    other = make_model(dropout=0.1)
    train_client(other, examples, settings.model_copy(update={"seed": 8}), collate)
    assert any(not torch.equal(lora_state(other)[n], runs[0][n]) for n in runs[0])


def test_epoch_order_is_a_seeded_permutation():
    orders = [epoch_order(50, seed, epoch) for seed in (0, 1) for epoch in (0, 1)]
    assert all(sorted(o) == list(range(50)) for o in orders)
    assert len({tuple(o) for o in orders}) == 4  # seeds and epochs all differ
    torch.manual_seed(123)
    first = epoch_order(50, 0, 0)
    torch.manual_seed(456)
    assert epoch_order(50, 0, 0) == first == orders[0]


def test_each_epoch_sees_every_example_once():
    seen: list[int] = []

    def recording_collate(batch):
        seen.extend(e["id"] for e in batch)
        return collate(batch)

    examples = [dict(e, id=i) for i, e in enumerate(make_examples(11))]
    settings = TrainSettings(epochs=2, batch_size=4, micro_batch_size=2, **SMALL)
    result = train_client(make_model(), examples, settings, recording_collate)
    assert result.steps == 6  # ceil(11 / 4) per epoch: the partial last batch is still stepped
    assert result.examples_seen == 22
    assert sorted(seen[:11]) == list(range(11)) and sorted(seen[11:]) == list(range(11))
    assert seen[:11] == epoch_order(11, settings.seed, 0) and seen[11:] == epoch_order(11, settings.seed, 1)


# --- step counts and schedules ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "steps", "seen"),
    [
        ({"epochs": 2}, 6, 40),  # 20 examples, batch 8: steps of 8, 8, 4 per epoch
        ({"epochs": 1}, 3, 20),
        ({"max_steps": 7}, 7, 48),  # max_steps overrides epochs and runs into a third epoch
        ({"max_steps": 2, "epochs": 5}, 2, 16),
    ],
)
def test_max_steps_and_epochs_step_counts(overrides, steps, seen):
    settings = TrainSettings(batch_size=8, micro_batch_size=4, **SMALL, **overrides)
    assert settings.total_steps(20) == steps
    result = train_client(make_model(), make_examples(20), settings, collate)
    assert result.steps == steps and result.examples_seen == seen


def _rates(settings: TrainSettings, total: int) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=settings.learning_rate)
    scheduler = build_scheduler(optimizer, settings, total)
    rates = []
    for _ in range(total):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    rates.append(optimizer.param_groups[0]["lr"])  # after the last step
    return rates


def test_linear_schedule_warms_up_then_decays_to_zero():
    lr, total, warm = 1e-3, 10, 3
    expected = [lr * s / warm if s < warm else lr * (total - s) / (total - warm) for s in range(total + 1)]
    for settings in (
        TrainSettings(learning_rate=lr, warmup_steps=warm),
        TrainSettings(learning_rate=lr, warmup_ratio=0.25),  # ceil(2.5) = 3
    ):
        assert _rates(settings, total) == pytest.approx(expected)
    assert _rates(TrainSettings(learning_rate=lr), 4) == pytest.approx([lr, 0.75 * lr, 0.5 * lr, 0.25 * lr, 0.0])


def test_cosine_and_constant_schedules():
    lr, total, warm = 1e-3, 10, 2
    cosine = [
        lr * s / warm if s < warm else lr * 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm)))
        for s in range(total + 1)
    ]
    assert _rates(TrainSettings(learning_rate=lr, scheduler="cosine", warmup_steps=warm), total) == pytest.approx(
        cosine
    )
    constant = [lr * s / warm if s < warm else lr for s in range(total + 1)]
    assert _rates(TrainSettings(learning_rate=lr, scheduler="constant", warmup_steps=warm), total) == pytest.approx(
        constant
    )


def test_train_client_uses_the_schedule_and_restarts_it_every_call():
    model, examples = make_model(), make_examples(8)
    settings = TrainSettings(max_steps=5, batch_size=4, micro_batch_size=4, learning_rate=1e-3, warmup_steps=1)
    first = train_client(model, examples, settings, collate)
    second = train_client(model, examples, settings, collate)
    expected = [0.0, 1e-3, 0.75e-3, 0.5e-3, 0.25e-3]
    assert first.learning_rates == pytest.approx(expected)
    assert second.learning_rates == pytest.approx(expected)


# --- progress --------------------------------------------------------------------------------------------------


def test_progress_callback_and_rich_bar():
    logs: list[StepLog] = []
    settings = TrainSettings(max_steps=3, batch_size=4, micro_batch_size=4, **SMALL)
    result = train_client(make_model(), make_examples(8), settings, collate, progress=logs.append, desc="client 2")
    assert [(s.step, s.total_steps, s.desc) for s in logs] == [
        (1, 3, "client 2"),
        (2, 3, "client 2"),
        (3, 3, "client 2"),
    ]
    assert [s.loss for s in logs] == result.losses

    with Progress(disable=True) as progress:
        train_client(make_model(), make_examples(8), settings, collate, progress=progress, desc="client 2")
        assert not progress.tasks, "the per-client bar is removed when the client is done"


# --- errors ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"batch_size": 100, "micro_batch_size": 16}, "multiple of micro_batch_size"),
        ({"max_steps": 0}, "max_steps"),
        ({"epochs": 0}, "epochs"),
        ({"scheduler": "step"}, "linear"),
        ({"mixed_precision": "fp8"}, "bf16"),
        ({"warmup_steps": 2, "warmup_ratio": 0.1}, "not both"),
        ({"learning_rate": 0}, "learning_rate"),
        ({"lr": 1e-3}, "lr"),  # typos are errors, not silently ignored
    ],
)
def test_bad_settings_are_clear_errors(fields, message):
    with pytest.raises(ValueError, match=message):
        TrainSettings(**fields)


def test_devices():
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(TrainingError, match="valid: auto, cpu"):
        select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(TrainingError, match="CUDA is not available"):
            select_device("cuda")
        with pytest.raises(TrainingError, match="CUDA is not available"):
            train_client(
                make_model(), make_examples(4), TrainSettings(batch_size=4, micro_batch_size=4), collate, device="cuda"
            )
    if not torch.backends.mps.is_available():
        with pytest.raises(TrainingError, match="MPS is not available"):
            select_device("mps")


def test_mixed_precision_is_cuda_only():
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None
    assert autocast_dtype("no", cpu) is None
    assert autocast_dtype("bf16", cpu) is None  # logged: runs in full precision
    with pytest.raises(TrainingError, match="valid: auto, no, bf16, fp16"):
        autocast_dtype("fp8", cpu)
    if torch.cuda.is_available():
        assert autocast_dtype("fp16", torch.device("cuda")) == torch.float16


def test_bad_inputs_are_clear_errors():
    settings = TrainSettings(max_steps=1, batch_size=4, micro_batch_size=4)
    with pytest.raises(TrainingError, match="client 5: no training examples"):
        train_client(make_model(), [], settings, collate, desc="client 5")
    with pytest.raises(TrainingError, match="labels"):
        train_client(make_model(), make_examples(4), settings, lambda b: {"input_ids": collate(b)["input_ids"]})
    frozen = make_model()
    frozen.requires_grad_(False)
    with pytest.raises(TrainingError, match="no trainable parameters"):
        train_client(frozen, make_examples(4), settings, collate)
    no_targets = [{"input_ids": [1, 2, 3], "labels": [-100, -100, -100]}] * 4
    with pytest.raises(TrainingError, match="no target tokens"):
        train_client(make_model(), no_targets, settings, collate)


def test_non_finite_loss_stops_with_the_client_and_step():
    model = make_model()
    settings = TrainSettings(max_steps=3, batch_size=4, micro_batch_size=2, **SMALL)
    lora_b = next(p for n, p in model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        lora_b.fill_(float("nan"))
    model.eval()
    with pytest.raises(TrainingError, match=r"client 3: loss is nan at step 1/3"):
        train_client(model, make_examples(8), settings, collate, desc="client 3")
    assert model.training is False, "the model's mode is restored after an error"
    assert all(p.grad is None for p in model.parameters())


# --- evaluation ------------------------------------------------------------------------------------------------


def test_evaluate_loss_matches_a_hand_computation_and_restores_the_mode():
    model = make_model(random_b=True)
    examples = make_examples(7)
    expected = hand_mean_token_loss(model, examples).item()
    for batch_size in (1, 3, 8):
        model.train()
        assert evaluate_loss(model, examples, collate, batch_size=batch_size) == pytest.approx(expected, rel=1e-5)
        assert model.training
    model.eval()
    evaluate_loss(model, examples, collate)
    assert not model.training
