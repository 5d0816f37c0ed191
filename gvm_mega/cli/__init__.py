"""The ``gvm-mega`` command: one subcommand per module in this folder.

Each subcommand module defines ``register(subparsers)``, which adds its parser and sets
``func`` to a callable taking the parsed args and returning an exit code. Heavy imports
happen inside that callable so ``--help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from gvm_mega import __version__

# Subcommand modules, in the order ``--help`` lists them.
COMMANDS = ("train", "eval", "allocate", "serve", "convert", "plot", "bench", "config")


class CLIError(Exception):
    """A user-facing failure: printed as ``gvm-mega: error: ...`` with exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gvm-mega",
        description="GVM-RAFT / GRPO trainer for math reasoning on megatron-core.",
    )
    parser.add_argument("--version", action="version", version=f"gvm-mega {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"gvm_mega.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from gvm_mega.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CLIError, ConfigError) as exc:
        print(f"gvm-mega: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
