"""``gvm-mega train CONFIG [section.key=value ...]``: run or resume a training run."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a policy with GVM-RAFT++, GVM-GRPO or a uniform baseline",
        description="Train with the algorithm in algorithm.name. Run it under torchrun for "
                    "TP/PP/DP (e.g. torchrun --nproc_per_node=4 -m gvm_mega train CONFIG "
                    "parallel.tp=2). Re-running with the same --run-dir resumes from its "
                    "latest checkpoint.")
    p.add_argument("config", help="YAML config file (e.g. configs/demo_cpu.yaml)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.add_argument("--run-dir", help="run directory (default runs/<run.name>-<timestamp>)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gvm_mega.cli import CLIError
    from gvm_mega.config import load_config
    from gvm_mega.data import DataError
    from gvm_mega.rollout import RolloutError
    from gvm_mega.runlog import RunLogError
    from gvm_mega.trainer import SetupError, train

    cfg = load_config(args.config, args.overrides)
    try:
        run_dir = train(cfg, args.run_dir)
    except (SetupError, DataError, RolloutError, RunLogError) as exc:
        raise CLIError(str(exc)) from exc
    print(f"run directory: {run_dir}")
    return 0
