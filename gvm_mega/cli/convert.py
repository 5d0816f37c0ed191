"""``gvm-mega convert``: HF safetensors <-> megatron dist-checkpoint of the policy.

``hf-to-mcore --hf DIR --out DIR [--tp N --pp N]`` imports an HF Llama/Qwen2 directory and saves
it with megatron ``dist_checkpointing`` (loadable at any TP/PP later) plus the model config and
the HF config/tokenizer files. ``mcore-to-hf --mcore DIR --out DIR`` writes it back as an HF
directory. A conversion runs as a TP x PP world: under torchrun/srun it uses that world; else a
single rank runs in this process and larger worlds are started as local worker processes
(``python -m gvm_mega.cli.convert --worker ...``, gloo or NCCL, loopback rendezvous).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from gvm_mega.cli import CLIError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert policy weights between HF and megatron formats",
                       description=__doc__.split("\n\n")[1] if __doc__ else None)
    conv = p.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    a = conv.add_parser("hf-to-mcore", help="HF safetensors directory -> megatron dist checkpoint")
    a.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    a.add_argument("--out", required=True, help="output directory (created; must be empty)")
    b = conv.add_parser("mcore-to-hf", help="megatron dist checkpoint -> HF safetensors directory")
    b.add_argument("--mcore", required=True, help="directory written by hf-to-mcore or training")
    b.add_argument("--out", required=True, help="output directory (created; must be empty)")
    for q in (a, b):
        q.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks for the conversion")
        q.add_argument("--pp", type=int, default=1, help="pipeline stages for the conversion")
        q.add_argument("--timeout", type=float, default=3600.0,
                       help="seconds before local workers are stopped")
    p.set_defaults(func=run)


def _check_out(out: str) -> None:
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise CLIError(f"--out {out}: exists and is not an empty directory")


def _plan(args: argparse.Namespace) -> dict:
    """Validate everything that can be checked without starting workers."""
    from gvm_mega.config import ConfigError
    from gvm_mega.models.arch import check_model_parallel_fit, model_config_from_hf

    if args.tp < 1 or args.pp < 1:
        raise CLIError(f"--tp ({args.tp}) and --pp ({args.pp}) must be >= 1")
    _check_out(args.out)
    try:
        if args.direction == "hf-to-mcore":
            from gvm_mega.models.hf_weights import HFCheckpointReader

            cfg = model_config_from_hf(args.hf)
            try:
                HFCheckpointReader(args.hf)
            except (FileNotFoundError, ValueError) as exc:
                raise CLIError(str(exc)) from None
            source = args.hf
        else:
            from gvm_mega.models.mcore_checkpoint import read_mcore_metadata

            cfg, _ = read_mcore_metadata(args.mcore)
            source = args.mcore
        check_model_parallel_fit(cfg, args.tp, args.pp)
    except ConfigError as exc:
        raise CLIError(str(exc)) from None
    return {"direction": args.direction, "source": str(source), "out": str(args.out),
            "tp": args.tp, "pp": args.pp}


def run(args: argparse.Namespace) -> int:
    from gvm_mega.parallel.launch import launch_local
    from gvm_mega.parallel.launch_env import detect_launch_env

    plan = _plan(args)
    world = plan["tp"] * plan["pp"]
    launch = detect_launch_env()
    launched = launch.source != "single"
    if launched or world == 1:
        _convert(plan)
    else:
        results = launch_local([sys.executable, "-m", "gvm_mega.cli.convert", "--worker",
                                json.dumps(plan)], world, timeout_s=args.timeout,
                               env={"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
        bad = [r for r in results if r.returncode != 0]
        if bad:
            first = min(bad, key=lambda r: (r.returncode < 0, r.rank))
            tail = "\n".join(first.output.strip().splitlines()[-15:])
            raise CLIError(f"conversion rank {first.rank} failed "
                           f"(exit {first.returncode}):\n{tail}")
    if launch.rank == 0:
        print(f"{plan['direction']}: wrote {plan['out']}")
    return 0


def _convert(plan: dict) -> None:
    """One rank's share of a conversion (collective over the TP x PP world)."""
    from gvm_mega.config.schema import ParallelConfig
    from gvm_mega.models import (build_gpt_model, export_mcore_to_hf, load_hf_into_mcore,
                                 load_mcore_checkpoint, model_config_from_hf, read_mcore_metadata,
                                 save_mcore_checkpoint)
    from gvm_mega.models.mcore_checkpoint import HF_SIDE_DIR
    from gvm_mega.parallel import init_distributed, shutdown

    # torch.distributed.checkpoint deprecation notices raised inside megatron's savers/loaders
    warnings.filterwarnings("ignore", category=FutureWarning)
    init_distributed(ParallelConfig(tp=plan["tp"], pp=plan["pp"]))
    try:
        if plan["direction"] == "hf-to-mcore":
            cfg = model_config_from_hf(plan["source"])
            model = build_gpt_model(cfg, perform_initialization=False)
            load_hf_into_mcore(model, plan["source"])
            save_mcore_checkpoint(model, plan["out"], cfg, hf_side_dir=plan["source"])
        else:
            cfg, _ = read_mcore_metadata(plan["source"])
            model = build_gpt_model(cfg, perform_initialization=False)
            load_mcore_checkpoint(model, plan["source"])
            side = Path(plan["source"]) / HF_SIDE_DIR
            export_mcore_to_hf(model, plan["out"], hf_side_dir=side if side.is_dir() else None)
    finally:
        shutdown()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _convert(json.loads(sys.argv[2]))
    else:
        raise SystemExit("usage: python -m gvm_mega.cli.convert --worker PLAN_JSON "
                         "(started by gvm-mega convert)")
