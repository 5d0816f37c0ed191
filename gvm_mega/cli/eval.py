"""``gvm-mega eval``: mean@k and pass@k of an HF-layout model on math problem sets.

The model directory (config.json + *.safetensors + tokenizer) is decoded in this process by
the embedded engine, or, with ``--url``, served by SGLang (or ``gvm-mega serve``) at that
address; the directory then only supplies the tokenizer. Each ``--data`` is a JSONL/parquet
file (MATH500-style ``problem``/``answer`` fields) or ``builtin:arithmetic-test``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from gvm_mega.cli import CLIError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="mean@k / pass@k of an HF model on math problem sets",
                       description=__doc__.split("\n\n")[1] if __doc__ else None)
    p.add_argument("--model", required=True, metavar="DIR",
                   help="HF model directory (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("--data", required=True, action="append", metavar="FILE",
                   help="JSONL/parquet problem file or builtin:arithmetic-test (repeatable)")
    p.add_argument("--samples", type=int, default=1, metavar="K", help="samples per problem (k)")
    p.add_argument("--max-new-tokens", type=int, default=1024, metavar="N",
                   help="longest response; the model's context also ends a response")
    p.add_argument("--temperature", type=float, default=None, metavar="T",
                   help="sampling temperature (default: 0, greedy, for k=1; else 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P")
    p.add_argument("--template", default="plain",
                   help="prompt template: plain, qwen-math-cot, or hf-chat (the model's own)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="evaluate only the first N problems of each set")
    p.add_argument("--prompt-field", default="problem")
    p.add_argument("--answer-field", default="answer")
    p.add_argument("--url", action="append", default=[], metavar="URL",
                   help="SGLang server or router to generate with (repeatable)")
    p.add_argument("--out", metavar="FILE.json", help="write the results as JSON ('-': stdout)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (per problem, order-free)")
    p.add_argument("--max-batch-size", type=int, default=64,
                   help="embedded engine: samples decoded together")
    p.add_argument("--reward-workers", type=int, default=2, help="answer-verifier processes")
    p.add_argument("--reward-timeout", type=float, default=5.0,
                   help="seconds allowed per answer verification")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
    if args.samples < 1:
        raise CLIError(f"--samples must be >= 1, got {args.samples}")
    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.limit is not None and args.limit < 1:
        raise CLIError(f"--limit must be >= 1, got {args.limit}")
    if args.temperature is not None and args.temperature < 0:
        raise CLIError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise CLIError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.max_batch_size < 1 or args.reward_workers < 1 or args.reward_timeout <= 0:
        raise CLIError("--max-batch-size and --reward-workers must be >= 1, "
                       "--reward-timeout > 0")
    if not os.path.isdir(args.model):
        raise CLIError(f"--model {args.model}: not a directory")
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise CLIError(f"--model {args.model}: no config.json (expected an HF model directory)")


def _context_length(model_dir: str) -> int:
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as exc:
            raise CLIError(f"{model_dir}/config.json: invalid JSON ({exc})") from None
    return int(cfg.get("max_position_embeddings") or 1 << 30)


def _load_sets(args: argparse.Namespace, tokenizer, template, context: int) -> list:
    from gvm_mega.config.schema import DataConfig
    from gvm_mega.data import DataError, load_prompts

    data_cfg = DataConfig(prompt_field=args.prompt_field, answer_field=args.answer_field,
                          arithmetic_test_size=args.limit or DataConfig().arithmetic_test_size)
    sets = []
    for spec in args.data:
        try:
            prompts = load_prompts(spec, data_cfg).prompts
        except DataError as exc:
            raise CLIError(str(exc)) from None
        # A prompt must leave room for at least one generated token.
        fits = [p for p in prompts
                if len(tokenizer.encode_prompt(template.render(p.problem))) < context]
        if not fits:
            raise CLIError(f"{spec}: all {len(prompts)} problems are longer than the model's "
                           f"context ({context} tokens) with template {template.name!r}")
        if len(fits) < len(prompts):
            print(f"gvm-mega eval: {spec}: skipped {len(prompts) - len(fits)} of {len(prompts)} "
                  f"problems longer than the model's context ({context} tokens)", file=sys.stderr)
        if args.limit:
            fits = fits[:args.limit]
        name = spec if spec.startswith("builtin:") else os.path.basename(spec)
        if any(name == other for other, _ in sets):  # same file name in two folders
            name = spec
        if any(name == other for other, _ in sets):
            raise CLIError(f"--data {spec} is given twice")
        sets.append((name, fits))
    return sets


def _build_engine(args: argparse.Namespace, tokenizer):
    from gvm_mega.rollout import EmbeddedEngine, SGLangClient, SGLangEngine

    if args.url:
        with open(os.path.join(args.model, "config.json"), encoding="utf-8") as f:
            hf_config = json.load(f)
        client = SGLangClient(args.url, max_retries=1, check_weight_version=False)
        # Weights are never updated here, so the weights directory is not written.
        return SGLangEngine(client, hf_config, weights_dir=args.model)
    try:
        return EmbeddedEngine.from_pretrained(args.model, tokenizer=tokenizer, seed=args.seed,
                                              max_batch_size=args.max_batch_size)
    except (OSError, ValueError) as exc:
        raise CLIError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    import torch
    from tqdm import tqdm

    from gvm_mega.data import TemplateError, build_template
    from gvm_mega.evaluation import evaluate, format_table
    from gvm_mega.reward import RewardScorer
    from gvm_mega.rollout import RolloutError, SamplingParams, load_text_codec
    from gvm_mega.tokenizer import TokenizerError

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        tokenizer = load_text_codec(args.model)
    except TokenizerError as exc:
        raise CLIError(str(exc)) from None
    if tokenizer is None:
        raise CLIError(f"--model {args.model}: no tokenizer.json or tokenizer.model in the "
                       f"model directory")
    try:
        template = build_template(args.template, tokenizer_dir=args.model)
    except TemplateError as exc:
        raise CLIError(str(exc)) from None
    sets = _load_sets(args, tokenizer, template, _context_length(args.model))
    engine = _build_engine(args, tokenizer)
    temperature = args.temperature if args.temperature is not None else (
        0.0 if args.samples == 1 else 1.0)
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=temperature,
                              top_p=args.top_p, stop_token_ids=tuple(tokenizer.eos_token_ids))
    results = []
    with RewardScorer(workers=args.reward_workers) as scorer:
        for name, prompts in sets:
            with tqdm(total=len(prompts), desc=name, unit="problem", leave=False,
                      disable=not sys.stderr.isatty()) as bar:
                try:
                    results.append(evaluate(engine, tokenizer, prompts, template,
                                            samples=args.samples, sampling=sampling,
                                            scorer=scorer, name=name, seed=args.seed,
                                            timeout=args.reward_timeout, progress=bar.update))
                except RolloutError as exc:
                    raise CLIError(f"generation failed: {exc}") from None
    report = {"model": os.path.abspath(args.model), "samples": args.samples,
              "temperature": temperature, "top_p": args.top_p,
              "max_new_tokens": args.max_new_tokens, "template": args.template,
              "seed": args.seed, "datasets": {r.name: r.to_dict() for r in results}}
    if args.out == "-":
        json.dump(report, sys.stdout, indent=2)
        print()
        return 0
    print(format_table(results))
    if args.out:
        out_dir = os.path.dirname(os.path.abspath(args.out))
        os.makedirs(out_dir, exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.out}")
    return 0
