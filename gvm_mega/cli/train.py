"""``gvm-mega train CONFIG [section.key=value ...]``: run or resume a training run."""
from __future__ import annotations

import argparse


class _IntermixedParser(argparse.ArgumentParser):
    """Accepts ``key=value`` overrides before and after options (``CONFIG --run-dir D k=v``).

    Plain argparse binds a ``*`` positional once, so overrides after an option would be
    rejected as unrecognised; intermixed parsing collects them wherever they appear.
    """

    _nested = False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        if self._nested:
            return super().parse_known_args(args, namespace)
        self._nested = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._nested = False


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
    p.__class__ = _IntermixedParser


def run(args: argparse.Namespace) -> int:
    import warnings

    # megatron-core's notice about a CUDA-graph option the CPU path never uses
    warnings.filterwarnings("ignore", message="full scope is deprecated")
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
