"""MMLU log-likelihood scoring speed on SmolLM2-135M-Instruct: batched + prefix-cached vs one question at a time.

    python benchmarks/eval.py [--subjects 16] [--per-subject 2] [--shots 0] [--batch-size 16] [--threads N]

The same questions (the first ``--per-subject`` of the seeds' subset in each of the first ``--subjects`` subjects),
scored three ways in one run, each printed as questions per second:

1. baseline: one question at a time, one plain forward pass per answer letter (context + letter, no batching, no
   cache): what a straightforward loop does;
2. one question at a time with fedlora's scorer (``batch_size=1``, no shared prefix): one pass per question, the
   four letters read from its last position;
3. fedlora's scorer batched (``--batch-size``) with the shared-prefix cache (the subject line, and the few-shot
   examples with ``--shots``).

It also prints the largest difference between the methods' log-likelihoods (they must agree) and the ratios.
Asserts nothing. On a shared machine, ``--threads 1`` avoids OpenMP threads waiting for a busy core.
"""

from __future__ import annotations

import argparse
import time

import torch

from fedlora.evaluate.mmlu import SUBJECTS, letter_continuations, load_mmlu, load_subject, loglik_context
from fedlora.evaluate.scoring import ChoiceRequest, loglik_choices, loglik_reference
from fedlora.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=16)
    parser.add_argument("--per-subject", type=int, default=2)
    parser.add_argument("--shots", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    subjects = SUBJECTS[: args.subjects]
    questions = [q for s in subjects for q in load_mmlu("seeds", [s])[: args.per_subject]]
    shots = {s: load_subject(s, "dev")[: args.shots] for s in subjects}
    requests = [
        ChoiceRequest(loglik_context(q, shots[q.subject]), letter_continuations(q), q.subject) for q in questions
    ]
    loaded = load_model("smollm2-135m-instruct")
    model, tok = loaded.model, loaded.tokenizer
    tokens = [len(tok(r.context)["input_ids"]) for r in requests]
    print(
        f"SmolLM2-135M-Instruct, {len(requests)} MMLU questions ({len(subjects)} subjects, {args.shots}-shot, "
        f"{sum(tokens) / len(tokens):.0f} prompt tokens on average), torch threads: {torch.get_num_threads()}"
    )
    loglik_choices(model, tok, requests[:2], batch_size=2)  # warm-up

    start = time.perf_counter()
    baseline = [[loglik_reference(model, tok, r.context, c) for c in r.continuations] for r in requests]
    t_baseline = time.perf_counter() - start

    start = time.perf_counter()
    single = loglik_choices(model, tok, requests, batch_size=1, share_prefix=False)
    t_single = time.perf_counter() - start

    start = time.perf_counter()
    batched = loglik_choices(model, tok, requests, batch_size=args.batch_size, share_prefix=True)
    t_batched = time.perf_counter() - start

    def rate(seconds: float) -> str:
        return f"{len(requests) / seconds:6.2f} q/s ({seconds:6.1f} s)"

    def diff(scores: list[tuple[float, ...]]) -> float:
        return max(abs(a - b) for s, r in zip(scores, baseline, strict=True) for a, b in zip(s, r, strict=True))

    batched_name = f"batch {args.batch_size} + shared-prefix cache"
    print(f"1. baseline, one forward per answer, one question at a time: {rate(t_baseline)}")
    print(f"2. fedlora scorer, one question at a time:{' ' * 19}{rate(t_single)}  max |diff| {diff(single):.1e}")
    print(f"3. fedlora scorer, {batched_name:<41}{rate(t_batched)}  max |diff| {diff(batched):.1e}")
    print(f"speed-up 3 vs 1: {t_baseline / t_batched:.2f}x   3 vs 2: {t_single / t_batched:.2f}x")


if __name__ == "__main__":
    main()
