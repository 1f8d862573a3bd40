"""Training throughput: ``fedlora.train.train_client`` against a minimal PEFT + torch loop, in one run.

Both train the same PEFT LoRA model (SmolLM2-135M-Instruct, r=16 on q_proj and v_proj by default) on the same
fixed synthetic batches (no padding, so every token counts for both), for the same number of optimizer steps.
The two are measured alternately, after warm-up steps, several times, to spread the noise of a shared machine
evenly. Prints tokens per second of each and the ratio (ours / baseline; target >= 0.95). Never asserts.

    .venv/bin/python benchmarks/throughput.py                 # about 2-3 minutes on 2 CPU cores
    .venv/bin/python benchmarks/throughput.py --model tiny-llama --steps 2 --repeats 2   # seconds (smoke test)
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from peft import LoraConfig, get_peft_model

from fedlora.models import load_model
from fedlora.train import TrainSettings, train_client


def synthetic_examples(count: int, length: int, vocab: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (length,), generator=g)} for _ in range(count)]


def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    ids = torch.stack([e["input_ids"] for e in examples])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def time_ours(model: torch.nn.Module, examples: list, batch: int, steps: int) -> list[float]:
    """Seconds of each optimizer step of one ``train_client`` call (fresh AdamW and schedule, as every round)."""
    settings = TrainSettings(max_steps=steps, batch_size=batch, micro_batch_size=batch, mixed_precision="no")
    stamps = [time.perf_counter()]
    train_client(model, examples, settings, collate, progress=lambda _: stamps.append(time.perf_counter()))
    return [b - a for a, b in itertools.pairwise(stamps)]


def time_plain_loop(model: torch.nn.Module, batch: dict[str, torch.Tensor], steps: int) -> list[float]:
    """Seconds of each step of the minimal loop: loss from the model, backward, AdamW step, zero_grad."""
    stamps = [time.perf_counter()]
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())
    del optimizer
    return [b - a for a, b in itertools.pairwise(stamps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per measurement")
    parser.add_argument("--repeats", type=int, default=4, help="alternating measurements of each loop")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps of each loop before the first")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=96)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model(args.model)
    torch.manual_seed(0)
    model = get_peft_model(
        loaded.model,
        LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.05, target_modules=["q_proj", "v_proj"]),
    )
    # One fixed batch for both loops (train_client reorders its rows; the tokens are the same). No padding.
    examples = synthetic_examples(args.batch, args.seq, model.config.vocab_size)
    batch = collate(examples)
    tokens_per_step = args.batch * args.seq
    print(
        f"model {args.model}, LoRA r={args.rank} on q_proj,v_proj, batch {args.batch} x {args.seq} tokens, "
        f"{args.repeats} x {args.steps} timed steps per loop after {args.warmup} warm-up, "
        f"{torch.get_num_threads()} threads"
    )

    loops = {
        "train_client": lambda steps: time_ours(model, examples, args.batch, steps),
        "plain loop": lambda steps: time_plain_loop(model, batch, steps),
    }
    if args.warmup:
        for run in loops.values():
            run(args.warmup)
    step_seconds: dict[str, list[float]] = {name: [] for name in loops}
    for repeat in range(args.repeats):
        order = list(loops) if repeat % 2 == 0 else list(reversed(loops))
        for name in order:
            times = loops[name](args.steps)
            step_seconds[name].extend(times)
            print(f"  repeat {repeat + 1} {name:>12}: {tokens_per_step * len(times) / sum(times):7.1f} tokens/s")

    # The median step resists the bursts of load of a shared machine; the mean is printed beside it.
    median = {name: statistics.median(t) for name, t in step_seconds.items()}
    for name, times in step_seconds.items():
        print(
            f"{name:>12}: {tokens_per_step / median[name]:7.1f} tokens/s at the median step "
            f"({median[name]:.2f} s/step; mean {statistics.mean(times):.2f} s/step over {len(times)} steps)"
        )
    ratio = median["plain loop"] / median["train_client"]
    mean_ratio = statistics.mean(step_seconds["plain loop"]) / statistics.mean(step_seconds["train_client"])
    print(f"ratio train_client / plain loop: {ratio:.3f} (median steps), {mean_ratio:.3f} (mean)  target >= 0.95")


if __name__ == "__main__":
    main()
