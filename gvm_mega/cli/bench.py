"""``gvm-mega bench NAME``: the project's benchmarks, each reproducible from one command.

A benchmark module defines ``DESCRIPTION``, ``add_arguments(parser)`` and ``main(args)``.
"""
from __future__ import annotations

import argparse
import importlib

# name -> module implementing it
BENCHMARKS = {
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark",
                       description="Benchmarks: " + ", ".join(BENCHMARKS))
    bench_sub = p.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, module_name in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        bp = bench_sub.add_parser(name, help=module.DESCRIPTION, description=module.DESCRIPTION)
        module.add_arguments(bp)
        bp.set_defaults(func=module.main)
