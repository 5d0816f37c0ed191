"""``gvm-mega serve``: the embedded engine behind SGLang's HTTP API."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="serve an HF model over SGLang's HTTP API (CPU)",
        description="Load an HF Llama/Qwen2 directory (config.json + *.safetensors, optional "
                    "tokenizer.json) and answer SGLang's /generate and control endpoints.")
    p.add_argument("--model", required=True, metavar="HF_DIR", help="HF model directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--max-batch-size", type=int, default=64,
                   help="samples decoded together in one batch")
    p.add_argument("--seed", type=int, default=0, help="seed for requests without sampling_seed")
    p.add_argument("--weight-version", default="default", help="initial weight version")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--weight-group-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="limit on joining a weight update group and on each broadcast bucket")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    import torch

    from gvm_mega.cli import CLIError
    from gvm_mega.rollout import EmbeddedEngine, RolloutServer, load_text_codec

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if not os.path.isdir(args.model):
        raise CLIError(f"--model {args.model}: not a directory")
    if args.max_batch_size < 1:
        raise CLIError("--max-batch-size must be >= 1")
    if not args.weight_group_timeout > 0:
        raise CLIError("--weight-group-timeout must be > 0")
    try:
        tokenizer = load_text_codec(args.model)
        engine = EmbeddedEngine.from_pretrained(args.model, tokenizer=tokenizer, seed=args.seed,
                                                max_batch_size=args.max_batch_size,
                                                weight_version=args.weight_version)
    except (OSError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    server = RolloutServer(engine, tokenizer=tokenizer, model_path=args.model, host=args.host,
                           port=args.port, max_batch_size=args.max_batch_size,
                           group_timeout_s=args.weight_group_timeout)
    server.run()
    return 0
