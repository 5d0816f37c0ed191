"""``gvm-mega bench allocation``: the vectorised allocator against a per-prompt Python loop.

The loop follows the structure of the paper's reference script: a Python loop over prompts
for the weights, Python lists for normalisation, then numpy for rounding. Both run on the
same synthetic stage-1 statistics (N' = 8 samples per prompt, so p_i is a multiple of 1/8
and about a fifth of the prompts have p_i = 0).
"""
from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np

DESCRIPTION = "time GVM allocation (vectorised numpy vs a per-prompt Python loop)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", type=int, default=1_000_000, help="number of prompts")
    parser.add_argument("--budget-per-prompt", type=int, default=8,
                        help="budget N = this x prompts")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs of the vectorised allocator (best is reported)")
    parser.add_argument("--max-samples", type=int, default=None,
                        help="also time the capped (water-filling) path with this cap")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def synthetic_stats(num_prompts: int, seed: int = 0, presample: int = 8):
    """(grad_norms, accept_rates) resembling one stage-1 pass."""
    rng = np.random.default_rng(seed)
    accepted = rng.binomial(presample, rng.beta(0.5, 0.8, size=num_prompts))
    p = accepted / presample
    g = np.where(accepted > 0, rng.lognormal(0.0, 0.7, size=num_prompts), 0.0)
    return g, p


def allocate_loop(grad_norms, accept_rates, budget: int, alpha: float = 1e-3,
                  beta: float = 2.0) -> np.ndarray:
    """One prompt at a time in Python, as the reference script does (no filters or caps).

    Like the reference, the per-prompt arithmetic uses numpy's scalar functions on Python
    floats read from lists.
    """
    weights = []
    for G, p in zip(grad_norms.tolist(), accept_rates.tolist()):
        if G == 0 or p == 0:
            weights.append(0.0)
        else:
            weights.append(G / np.sqrt(p + alpha / np.power(p, beta - 1.0)))
    total = sum(weights)
    shares = np.array([w / total * budget for w in weights])
    counts = np.floor(shares).astype(np.int64)
    rest = budget - int(counts.sum())
    order = np.argsort(-(shares - counts), kind="stable")
    counts[order[:rest]] += 1
    return counts


def _best(fn, repeats: int) -> tuple[float, object]:
    best, out = math.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def run_benchmark(prompts: int, budget_per_prompt: int = 8, repeats: int = 3,
                  max_samples: int | None = None, seed: int = 0) -> dict:
    from gvm_mega.allocation.gvm import allocate

    if prompts < 1 or repeats < 1 or budget_per_prompt < 1:
        raise ValueError("--prompts, --repeats and --budget-per-prompt must be positive")
    g, p = synthetic_stats(prompts, seed)
    budget = budget_per_prompt * prompts
    vec_s, vec = _best(lambda: allocate(g, p, budget), repeats)
    loop_s, loop = _best(lambda: allocate_loop(g, p, budget), 1)
    result = {
        "prompts": prompts,
        "budget": budget,
        "vectorised_s": vec_s,
        "loop_s": loop_s,
        "speedup": loop_s / vec_s,
        "totals": [int(vec.sum()), int(loop.sum())],
        "prompts_differing": int(np.count_nonzero(vec != loop)),
    }
    if max_samples is not None:
        capped_s, capped = _best(lambda: allocate(g, p, budget, max_samples=max_samples),
                                 repeats)
        result.update(max_samples=max_samples, vectorised_capped_s=capped_s,
                      capped_max=int(capped.max()))
    return result


def main(args: argparse.Namespace) -> int:
    from gvm_mega.cli import CLIError

    try:
        result = run_benchmark(args.prompts, args.budget_per_prompt, args.repeats,
                               args.max_samples, args.seed)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"allocation of {result['budget']} samples over {result['prompts']} prompts")
    print(f"  vectorised numpy   {result['vectorised_s'] * 1e3:10.1f} ms (best of {args.repeats})")
    print(f"  per-prompt loop    {result['loop_s'] * 1e3:10.1f} ms")
    print(f"  speedup            {result['speedup']:10.1f} x")
    print(f"  prompts differing  {result['prompts_differing']:10d}")
    if "vectorised_capped_s" in result:
        print(f"  vectorised, max_samples={result['max_samples']}"
              f"  {result['vectorised_capped_s'] * 1e3:.1f} ms")
    return 0
