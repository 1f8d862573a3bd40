"""FLoRIST's factored SVD against the dense route, on LLaMA-7B shapes. Prints measured figures, asserts nothing.

    python benchmarks/aggregation.py [--clients 8] [--rank 16] [--dim 4096] [--threshold 0.9] [--repeats 3]

1. One q_proj (dim x dim): the factored route (QR of both stacks + R x R core, ``fedlora.methods.florist``)
   against forming ``B_s A_s`` and calling ``torch.linalg.svd``; both times, the ratio, and the largest
   relative difference of the reconstructed update.
2. The full LLaMA-7B q,v set (32 layers x 2 = 64 modules) aggregated with FLoRIST: total time.
"""

from __future__ import annotations

import argparse
import time

import torch

from fedlora.lowrank import ClientFactors, energy_rank, lora_scaling
from fedlora.methods import get_method


def make_clients(num_clients: int, rank: int, m: int, n: int, gen: torch.Generator) -> list[ClientFactors]:
    # Trained LoRA factors share directions across clients; random ones are the hard case for a threshold.
    return [
        ClientFactors(
            B=torch.randn(m, rank, generator=gen) * 0.02,
            A=torch.randn(rank, n, generator=gen) / n**0.5,
            scaling=lora_scaling(2 * rank, rank),
        )
        for _ in range(num_clients)
    ]


def dense_florist(clients: list[ClientFactors], weights: torch.Tensor, tau: float) -> torch.Tensor:
    """The slow route: form the m x n aggregate, full SVD, truncate by energy."""
    p = weights / weights.sum()
    dense = sum(float(pk) * c.scaled_B() @ c.A for pk, c in zip(p, clients, strict=True))
    U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
    k = energy_rank(S, tau)
    return U[:, :k] * S[:k] @ Vh[:k]


def best_of(repeats: int, fn) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    d = args.dim
    clients = make_clients(args.clients, args.rank, d, d, gen)
    weights = torch.randint(50, 500, (args.clients,), generator=gen).double()
    method = get_method("florist", threshold=args.threshold)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32")
    print(f"FLoRIST on one {d} x {d} module, {args.clients} clients, rank {args.rank}, tau {args.threshold}")

    t_fact, update = best_of(args.repeats, lambda: method.aggregate(clients, weights))
    t_dense, dense_result = best_of(1, lambda: dense_florist(clients, weights, args.threshold))
    diff = float((update.delta() - dense_result).abs().max() / dense_result.abs().max())
    print(f"  factored: {t_fact * 1e3:9.1f} ms   (kept rank {update.rank}, energy {update.energy_kept:.4f})")
    print(f"  dense:    {t_dense * 1e3:9.1f} ms   (form B_s A_s, torch.linalg.svd)")
    print(f"  speed-up: {t_dense / t_fact:9.1f}x   (target >= 200x)")
    print(f"  largest relative difference of the update: {diff:.2e}   (target <= 1e-4)")

    modules = {
        f"model.layers.{i}.self_attn.{proj}": make_clients(args.clients, args.rank, d, d, gen)
        for i in range(args.layers)
        for proj in ("q_proj", "v_proj")
    }

    def aggregate_all() -> dict:
        return {name: method.aggregate(cl, weights, module=name) for name, cl in modules.items()}

    t_all, updates = best_of(args.repeats, aggregate_all)
    ranks = [u.rank for u in updates.values()]
    print(f"LLaMA-7B q,v: {len(modules)} modules, {args.clients} clients, rank {args.rank}")
    print(f"  FLoRIST, all modules: {t_all:.2f} s   (target <= 3 s; kept ranks {min(ranks)}-{max(ranks)})")


if __name__ == "__main__":
    main()
