"""Peak memory does not grow with the number of clients: one base model, clients trained one after another.

    python benchmarks/memory.py [--model smollm2-135m-instruct] [--small 2] [--large 16] [--steps 1]

Runs the same federated round (FLoRA, which also holds the largest server-side stack) with 2 and with 16
clients, each client doing the same number of local steps, each run in a fresh process, and prints both peak
resident set sizes and their ratio (target <= 1.15). Prints, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap

CHILD = textwrap.dedent(
    """
    import json, resource, sys
    from fedlora.config import load_config
    from fedlora.engine.local import Engine
    overrides = json.loads(sys.argv[1])
    config = load_config("default", overrides)
    Engine(config, progress=False).run()
    print("PEAK_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """
)


def peak_rss_mb(model: str, clients: int, steps: int, method: str, out: str) -> float:
    overrides = [
        f"model={model}",
        f"output_dir={out}",
        f"method.name={method}",
        f"data.num_clients={clients}",
        "data.partition=iid",
        "data.max_examples_per_category=40",
        "data.holdout_per_category=0",
        "data.eval_examples=0",
        "data.cutoff_len=96",
        "federation.rounds=1",
        f"train.max_steps={steps}",
        "train.batch_size=4",
        "train.micro_batch_size=4",
        "eval.base=false",
    ]
    result = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(overrides)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise SystemExit(f"run with {clients} clients failed:\n{result.stderr[-3000:]}")
    line = next(x for x in result.stdout.splitlines() if x.startswith("PEAK_KB"))
    return int(line.split()[1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--small", type=int, default=2)
    parser.add_argument("--large", type=int, default=16)
    parser.add_argument("--steps", type=int, default=1, help="local optimizer steps per client")
    parser.add_argument("--method", default="flora")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        small = peak_rss_mb(args.model, args.small, args.steps, args.method, f"{tmp}/small")
        large = peak_rss_mb(args.model, args.large, args.steps, args.method, f"{tmp}/large")
    print(f"model {args.model}, method {args.method}, {args.steps} local step(s) per client")
    print(f"  peak RSS with {args.small:2d} clients: {small:8.0f} MB")
    print(f"  peak RSS with {args.large:2d} clients: {large:8.0f} MB")
    print(f"  ratio: {large / small:.3f}   (target <= 1.15)")


if __name__ == "__main__":
    main()
