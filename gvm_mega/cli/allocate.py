"""``gvm-mega allocate``: per-prompt sample counts from a statistics file."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "allocate",
        help="turn per-prompt statistics into per-prompt sample counts (GVM)",
        description="Read per-prompt stage-1 statistics (JSONL rows {prompt_id, num_samples, "
                    "num_accepted, grad_norm}), allocate BUDGET samples with the GVM rule "
                    "n_i ~ G_i / sqrt(p_i + alpha / p_i^(beta-1)), and write "
                    "{\"samples\": {prompt_id: n_i}, ...diagnostics} as JSON. Unset options "
                    "take their values from the gvm section of --config (or its defaults).",
    )
    p.add_argument("--stats", required=True, metavar="STATS.jsonl", help="statistics file")
    p.add_argument("--budget", required=True, type=int, metavar="N",
                   help="total number of samples to allocate")
    p.add_argument("--out", required=True, metavar="ALLOC.json", help="output file")
    p.add_argument("--config", metavar="CONFIG.yaml",
                   help="take defaults for the options below from this config's gvm section")
    p.add_argument("--alpha", type=float, help="regulariser weight (default 1e-3)")
    p.add_argument("--beta", type=float, help="regulariser exponent (default 2)")
    p.add_argument("--filter-threshold", type=float, metavar="P",
                   help="drop prompts with acceptance rate above P")
    p.add_argument("--filter-insufficient", type=float, metavar="K",
                   help="drop prompts whose expected accepted count p_i * n_i is below K")
    p.add_argument("--min-samples", type=int, metavar="K", help="floor on n_i for kept prompts")
    p.add_argument("--max-samples", type=int, metavar="K",
                   help="cap on n_i; the excess goes to the other prompts")
    p.add_argument("--drawn", type=int, default=0, metavar="K",
                   help="samples each prompt already has that are trained on too (reused "
                        "pre-samples): the rule then sets K + n_i (default 0)")
    p.add_argument("--weighting", choices=("per-prompt", "per-draw"), default=None,
                   help="variance proxy of the diagnostics: per-prompt, sum G^2/(n p) (pooled or "
                        "prompt-mean loss weights, the default), or per-draw, sum p G^2/n "
                        "(algorithm.prompt_weight=per-draw; the default with such a --config)")
    p.add_argument("--estimator", choices=("per-iteration", "posterior"),
                   help="p_i = accepted / samples, or the Beta(prior_a, prior_b) posterior mean")
    p.add_argument("--prior-a", type=float, help="Beta prior a for --estimator posterior")
    p.add_argument("--prior-b", type=float, help="Beta prior b for --estimator posterior")
    p.add_argument("--prior", choices=("fixed", "fitted"),
                   help="--estimator posterior: the prior as --prior-a/--prior-b give it, or "
                        "fitted to the file's counts (empirical Bayes)")
    p.add_argument("--grad-norm-fallback", choices=("mean", "similar-p"),
                   help="--estimator posterior: G for a prompt with nothing accepted, the mean "
                        "of all known norms or of the 16 prompts nearest in p")
    p.add_argument("--grad-norm-shrink", type=float, metavar="S",
                   help="--estimator posterior: pseudo-observations of that pooled G mixed "
                        "into each observed G (default 0: none)")
    p.add_argument("--uniform", action="store_true",
                   help="allocate uniformly instead (the vanilla RAFT / GRPO baseline)")
    p.add_argument("--dp", type=int, metavar="D",
                   help="also split the samples over D data-parallel ranks (balanced by "
                        "count) and include the split in the output")
    p.set_defaults(func=run)


_GVM_OPTIONS = ("alpha", "beta", "filter_threshold", "filter_insufficient", "min_samples",
                "max_samples", "estimator", "prior_a", "prior_b", "prior", "grad_norm_fallback",
                "grad_norm_shrink")


def run(args: argparse.Namespace) -> int:
    import json
    import os
    import tempfile
    from pathlib import Path

    from gvm_mega.allocation import (
        InfeasibleAllocationError,
        PromptStatsStore,
        StatsFileError,
        allocate_detailed,
        diagnose,
        read_stats_jsonl,
        split_across_ranks,
        uniform_allocate,
    )
    from gvm_mega.allocation.diagnostics import weighting_of
    from gvm_mega.allocation.gvm import KEPT
    from gvm_mega.cli import CLIError
    from gvm_mega.config import ConfigError, apply_overrides, load_config, validate

    if args.budget < 0:
        raise CLIError(f"--budget must be non-negative, got {args.budget}")
    if args.drawn < 0:
        raise CLIError(f"--drawn must be non-negative, got {args.drawn}")
    if args.dp is not None and args.dp < 1:
        raise CLIError(f"--dp must be at least 1, got {args.dp}")
    out = Path(args.out)
    if not out.parent.is_dir():
        raise CLIError(f"--out: directory {str(out.parent)!r} does not exist")

    cfg = load_config(args.config)
    for key in _GVM_OPTIONS:  # one at a time, so that an error names the option
        value = getattr(args, key)
        if value is not None:
            try:
                apply_overrides(cfg, [f"gvm.{key}={value}"])
            except ConfigError as exc:
                raise CLIError(f"--{key.replace('_', '-')}: {exc}") from None
    try:
        validate(cfg)   # the checks between keys, e.g. a prior without the posterior estimator
    except ConfigError as exc:
        raise CLIError(f"options: {exc}") from None
    gvm = cfg.gvm

    try:
        table = read_stats_jsonl(args.stats)
    except StatsFileError as exc:
        raise CLIError(str(exc)) from None
    store = PromptStatsStore.from_config(gvm)
    store.update(table.prompt_ids, table.num_samples, table.num_accepted, table.grad_norms)
    grad_norms, accept_rates = store.estimates(table.prompt_ids)

    if args.uniform:
        import numpy as np

        samples = uniform_allocate(len(table), args.budget)
        reasons = np.full(len(table), KEPT, dtype=np.int8)
    else:
        try:
            result = allocate_detailed(
                grad_norms, accept_rates, args.budget, alpha=gvm.alpha, beta=gvm.beta,
                filter_threshold=gvm.filter_threshold,
                filter_insufficient=gvm.filter_insufficient,
                min_samples=gvm.min_samples, max_samples=gvm.max_samples, drawn=args.drawn)
        except (InfeasibleAllocationError, ValueError) as exc:
            raise CLIError(str(exc)) from None
        samples, reasons = result.samples, result.reasons

    weighting = args.weighting or weighting_of(cfg.algorithm.prompt_weight)
    diag = diagnose(samples, grad_norms, accept_rates, reasons, drawn=args.drawn,
                    weighting=weighting)
    doc = {
        "samples": {pid: int(n) for pid, n in zip(table.prompt_ids, samples)},
        **diag.to_dict(),
        "strategy": "uniform" if args.uniform else "gvm",
        "budget": args.budget,
        "params": {**{k: getattr(gvm, k) for k in _GVM_OPTIONS}, "drawn": args.drawn},
        "prior_used": list(store.prior()) if gvm.estimator == "posterior" else None,
        "estimates": {pid: {"p": float(p), "grad_norm": float(g)}
                      for pid, p, g in zip(table.prompt_ids, accept_rates, grad_norms)},
    }
    if args.dp is not None:
        doc["dp_split"] = split_across_ranks(samples, args.dp).to_dict(table.prompt_ids)

    # Write to a temporary file next to the target and rename, so a failure leaves nothing.
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=2)
            fh.write("\n")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    def show(ratio):
        return "n/a" if ratio is None else f"{ratio:.3f}"

    print(f"allocated {diag.total_samples} samples to {diag.num_allocated} of "
          f"{diag.num_prompts} prompts (n_max {diag.n_max}, Gini {diag.n_gini:.2f}); "
          f"{weighting} variance proxy vs uniform: {show(diag.variance_ratio)} "
          f"(best possible {show(diag.best_variance_ratio)}); wrote {out}")
    return 0
