"""``gvm-mega bench NAME``: the project's benchmarks, each reproducible from one command.

A benchmark module defines ``DESCRIPTION``, ``add_arguments(parser)`` and ``main(args)``.
Only the chosen benchmark's module is imported (some import torch), so ``gvm-mega`` starts
fast whatever the command.
"""
from __future__ import annotations

import argparse
import importlib

# name -> (module implementing it, one-line summary for the listing)
BENCHMARKS = {
    "allocation": ("gvm_mega.allocation.bench", "GVM allocation: vectorised numpy vs a per-prompt loop"),
    "ceiling": ("gvm_mega.convergence.ceiling",
                "what allocation could buy at a checkpoint: many draws per prompt vs GVM's N'"),
    "convergence": ("gvm_mega.convergence.bench",
                    "GVM vs uniform RAFT++/GRPO: held-out accuracy per sample, speedup"),
    "gradnorm": ("gvm_mega.gradnorm.bench", "per-response gradient norms: batched vs autograd loop"),
    "reward": ("gvm_mega.reward.bench", "verifications/s on typical and adversarial answers"),
    "rollout": ("gvm_mega.rollout.bench", "embedded-engine tokens/s, client overhead, weight sync"),
}


def register(sub: argparse._SubParsersAction) -> None:
    listing = "\n".join(f"  {name:<12} {summary}" for name, (_, summary) in BENCHMARKS.items())
    p = sub.add_parser("bench", help="run a benchmark",
                       description="Run one benchmark; `gvm-mega bench NAME --help` for its options.",
                       epilog="benchmarks:\n" + listing,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("benchmark", choices=sorted(BENCHMARKS), metavar="BENCHMARK")
    p.add_argument("options", nargs=argparse.REMAINDER, help="the benchmark's own options")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    module = importlib.import_module(BENCHMARKS[args.benchmark][0])
    parser = argparse.ArgumentParser(prog=f"gvm-mega bench {args.benchmark}",
                                     description=module.DESCRIPTION)
    module.add_arguments(parser)
    return int(module.main(parser.parse_args(args.options)) or 0)
