"""Time overhead of DP-SGD (Opacus, per-example gradients) against non-private training: same steps and data.

    OMP_NUM_THREADS=1 python benchmarks/privacy.py                 # SmolLM2-135M, LoRA r=16 on q,v
    OMP_NUM_THREADS=1 python benchmarks/privacy.py --model tiny-llama --steps 5

Both runs train the same fresh LoRA on the same examples for the same number of optimizer steps: the non-private
loop on fixed batches of ``--batch`` examples, DP-SGD on Poisson batches of the same expected size (clip 0.1,
noise for epsilon 3). Prints seconds per step of each and their ratio (measured in this one process).
"""

from __future__ import annotations

import argparse
import os
from functools import partial

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch

from fedlora.adapters import LoraHost
from fedlora.data.tokenize import collate
from fedlora.models import load_model
from fedlora.privacy import PrivacyConfig, plan_record_level
from fedlora.privacy.dp_sgd import train_client_private
from fedlora.train import TrainSettings, train_client


def examples(n: int, length: int, vocab: int, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(10, vocab, (length,), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (length // 2) + ids[length // 2 :]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--length", type=int, default=96)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model(args.model)
    model, tok = loaded.model, loaded.tokenizer
    for p in model.parameters():
        p.requires_grad_(False)
    host = LoraHost(model, ["q_proj", "v_proj"], 0.0)
    data = examples(args.examples, args.length, min(len(tok), 30000))
    coll = partial(collate, pad_token_id=tok.pad_token_id)
    settings = TrainSettings(
        max_steps=args.steps, batch_size=args.batch, micro_batch_size=args.micro, learning_rate=1e-4
    )
    plan = plan_record_level(PrivacyConfig(enabled=True), [args.examples], args.batch, [args.steps], 1)[0]

    timings = {}
    for name in ("warm-up", "plain", "dp-sgd"):
        host.install(16, 32, seed=0)
        if name == "dp-sgd":
            result = train_client_private(host.model, data, settings, plan, coll)
        else:
            result = train_client(
                host.model, data, settings.model_copy(update={"max_steps": 1} if name == "warm-up" else {}), coll
            )
        timings[name] = (result.seconds / result.steps, result.examples_seen)
    plain, dp = timings["plain"][0], timings["dp-sgd"][0]
    print(f"model {args.model}, LoRA r=16 on q,v, batch {args.batch} x {args.length} tokens, {args.steps} steps")
    print(f"non-private: {plain:.3f} s/step ({timings['plain'][1]} examples)")
    print(f"DP-SGD:      {dp:.3f} s/step ({timings['dp-sgd'][1]} examples, Poisson; sigma {plan.noise_multiplier:.3f})")
    print(f"overhead ratio DP-SGD / non-private: {dp / plain:.2f}x")


if __name__ == "__main__":
    main()
