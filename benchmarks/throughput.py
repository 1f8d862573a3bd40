"""Training throughput: ``fedlora.train.train_client`` against a minimal PEFT + torch loop, in one run.

Both train the same PEFT LoRA model (SmolLM2-135M-Instruct, r=16 on q_proj and v_proj by default) on the same
fixed synthetic batches (no padding, so every token counts for both), for the same number of optimizer steps.
The two alternate step by step (each step a fresh call with a fresh AdamW, for both), so that adjacent steps
share the load of a busy machine; the median of the adjacent-step ratios is the headline. Per-call costs of
``train_client`` (schedule, RNG fork, checks) are charged on every step, which only counts against it. Prints
tokens per second of each and the ratio (ours / baseline; target >= 0.95). Never asserts.

    .venv/bin/python benchmarks/throughput.py                 # about 2-3 minutes on 2 idle CPU cores
    .venv/bin/python benchmarks/throughput.py --threads 1     # steadier when other jobs share the cores
    .venv/bin/python benchmarks/throughput.py --model tiny-llama --steps 4     # seconds (smoke test)
"""

from __future__ import annotations

import argparse
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


def time_ours(model: torch.nn.Module, examples: list, batch: int) -> float:
    """Seconds of one ``train_client`` call of one optimizer step (its fresh AdamW and schedule included)."""
    settings = TrainSettings(max_steps=1, batch_size=batch, micro_batch_size=batch, mixed_precision="no")
    start = time.perf_counter()
    train_client(model, examples, settings, collate)
    return time.perf_counter() - start


def time_plain_loop(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """Seconds of one step of the minimal loop (a fresh AdamW, as ours): loss from the model, backward, step."""
    start = time.perf_counter()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    del optimizer
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each loop, alternating")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps of each loop before")
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
    tokens = args.batch * args.seq
    print(
        f"model {args.model}, LoRA r={args.rank} on q_proj,v_proj, batch {args.batch} x {args.seq} tokens, "
        f"{args.steps} timed steps of each loop (alternating) after {args.warmup} warm-up, "
        f"{torch.get_num_threads()} threads"
    )

    loops = {
        "train_client": lambda: time_ours(model, examples, args.batch),
        "plain loop": lambda: time_plain_loop(model, batch),
    }
    for _ in range(args.warmup):
        for run in loops.values():
            run()
    seconds: dict[str, list[float]] = {name: [] for name in loops}
    for step in range(args.steps):
        # Adjacent steps share the machine's load of the moment; alternate which loop goes first.
        for name in list(loops) if step % 2 == 0 else list(reversed(loops)):
            seconds[name].append(loops[name]())
        ours, plain = seconds["train_client"][-1], seconds["plain loop"][-1]
        print(f"  step {step + 1:2d}: train_client {ours:6.2f} s, plain loop {plain:6.2f} s, ratio {plain / ours:.3f}")

    for name, times in seconds.items():
        print(
            f"{name:>12}: {tokens * len(times) / sum(times):7.1f} tokens/s "
            f"(mean {statistics.mean(times):.2f} s/step, median {statistics.median(times):.2f} s/step)"
        )
    pair_ratios = [plain / ours for ours, plain in zip(seconds["train_client"], seconds["plain loop"], strict=True)]
    total_ratio = sum(seconds["plain loop"]) / sum(seconds["train_client"])
    print(
        f"ratio train_client / plain loop: {statistics.median(pair_ratios):.3f} (median of adjacent-step ratios), "
        f"{total_ratio:.3f} (total time); target >= 0.95"
    )


if __name__ == "__main__":
    main()
