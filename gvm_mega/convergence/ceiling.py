"""``gvm-mega bench ceiling``: what allocation could buy at a checkpoint, against the truth.

The convergence benchmark's variance ratio is computed on a GVM arm's own estimates of p_i
and G_i, from N' draws per prompt (and earlier visits). Noise in those estimates widens their
spread across prompts, so a ratio computed on them is optimistic. This probe starts two
one-iteration runs from the same checkpoint on the same prompts: a *reference* run that
draws many responses per prompt, whose p_i and G_i stand in for the truth, and an *estimate*
run that is a GVM arm's first visit (its N', its rule, its budget). Against the reference
statistics it scores uniform sampling, the best allocations (with and without the floor of N'
reused pre-samples) and the allocation the estimate run actually made. ``1 / ratio`` is what a
sample is worth in uniform samples for the step's gradient variance.
"""
from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NoReturn, Optional

import numpy as np

from gvm_mega.allocation.diagnostics import (best_variance_proxy, variance_proxy,
                                             weighting_of)
from gvm_mega.config.schema import POSTERIOR_ONLY, GVMConfig
from gvm_mega.convergence.arms import run_training
from gvm_mega.convergence.bench import (COMMON, DEFAULT_PER_ALGORITHM, DEFAULT_SIZE, QUICK_SIZE,
                                        _OverridesAnywhere)

DESCRIPTION = ("the gradient-variance ratio any allocation could reach at a checkpoint, from "
               "many draws per prompt, against what the GVM rule reaches from its N' draws")

ALGORITHM = "gvm-raft++"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.__class__ = _OverridesAnywhere
    parser.add_argument("--checkpoint", required=True,
                        help="weights to probe: a convergence benchmark's OUT/warm_start/weights "
                             "or a run's checkpoints/iter_NNNNNNN")
    parser.add_argument("--prompts", type=int, default=None,
                        help="prompts probed, one batch (default 256; 4 with --quick)")
    parser.add_argument("--draws", type=int, default=None,
                        help="responses per prompt of the reference run (default 32; 4 with "
                             "--quick)")
    parser.add_argument("--out", default="runs/bench-ceiling", help="output directory")
    parser.add_argument("--seed", type=int, default=1234,
                        help="run.seed of both runs, which picks the prompts (default 1234)")
    parser.add_argument("--quick", action="store_true",
                        help="the convergence benchmark's smoke-test size (tiny model)")
    parser.add_argument("--config", default=None,
                        help="base YAML config (default configs/demo_cpu.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides for both runs, after the convergence "
                             "benchmark's default size and its GVM-RAFT++ settings")


def _fail(message: str) -> NoReturn:
    from gvm_mega.cli import CLIError

    raise CLIError(message)


def first_allocation(run_dir: Path) -> dict:
    """The first ``allocations.jsonl`` record of a GVM run, with its per-prompt statistics."""
    path = run_dir / "allocations.jsonl"
    if not path.is_file():
        _fail(f"{path}: missing (the run did not finish its first iteration)")
    with open(path, encoding="utf-8") as f:
        line = f.readline()
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        _fail(f"{path}:1: invalid JSON ({exc.msg})")
    for key in ("samples", "accept_rate", "grad_norm"):
        if not isinstance(record.get(key), dict):
            _fail(f"{path}:1: no per-prompt {key!r} (not a GVM run?)")
    return record


def _stats(record: dict, ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return (np.array([record["grad_norm"][k] for k in ids], dtype=np.float64),
            np.array([record["accept_rate"][k] for k in ids], dtype=np.float64))


def score(reference: dict, estimate: dict, *, drawn: int, weighting: str) -> dict:
    """Variance ratios against uniform sampling of the same total, all under the reference
    statistics, plus the ratio the estimate run claims under its own.

    ``drawn``: reused pre-samples per prompt that count toward each n_i (the floor).
    """
    ids = list(estimate["samples"])
    missing = [k for k in ids if k not in reference["samples"]]
    if missing:
        raise ValueError(f"{len(missing)} of {len(ids)} prompts of the estimate run are not in "
                         f"the reference run (e.g. {missing[0]}): the runs drew different prompts")
    g_ref, p_ref = _stats(reference, ids)
    g_est, p_est = _stats(estimate, ids)
    n_est = np.array([estimate["samples"][k] for k in ids], dtype=np.float64) + drawn
    prompts = len(ids)
    total = float(n_est.sum())
    uniform = np.full(prompts, total / prompts)

    def ratio(n, g, p) -> Optional[float]:
        v, u = (variance_proxy(n, g, p, weighting=weighting),
                variance_proxy(uniform, g, p, weighting=weighting))
        return v / u if (v is not None and u) else None

    def best(g, p, floor: int) -> Optional[float]:
        b = best_variance_proxy(total - floor * prompts, g, p, drawn=floor, weighting=weighting)
        u = variance_proxy(uniform, g, p, weighting=weighting)
        return b / u if (b is not None and u) else None

    c_ref = g_ref ** 2 * (p_ref if weighting == "per-draw" else 1 / np.maximum(p_ref, 1e-12))
    c_est = g_est ** 2 * (p_est if weighting == "per-draw" else 1 / np.maximum(p_est, 1e-12))
    both = (p_ref > 0) & (p_est > 0)
    corr = (float(np.corrcoef(c_ref[both], c_est[both])[0, 1])
            if both.sum() > 2 and c_ref[both].std() > 0 and c_est[both].std() > 0 else None)
    return {
        "prompts": prompts,
        "samples_per_prompt": total / prompts,
        "drawn": drawn,
        "weighting": weighting,
        "reference_accept_rate": {"mean": float(p_ref.mean()), "std": float(p_ref.std()),
                                  "solved_share": float(np.mean(p_ref == 1.0)),
                                  "unsolved_share": float(np.mean(p_ref == 0.0))},
        "estimate_accept_rate": {"mean": float(p_est.mean()), "std": float(p_est.std())},
        "best_ratio": best(g_ref, p_ref, 0),
        "best_ratio_with_floor": best(g_ref, p_ref, drawn),
        "rule_ratio": ratio(n_est, g_ref, p_ref),
        "rule_ratio_claimed": ratio(n_est, g_est, p_est),
        "coefficient_correlation": corr,
    }


ROWS = (("best_ratio", "best allocation, no floor (the true ceiling)"),
        ("best_ratio_with_floor", "best allocation with the N' pre-sample floor"),
        ("rule_ratio", "the GVM rule on its N'-draw estimates"),
        ("rule_ratio_claimed", "the same allocation scored on its own estimates (what the run reports)"))


def to_markdown(result: dict) -> str:
    lines = ["| allocation | variance ratio | worth (uniform samples per sample) |",
             "|---|---:|---:|"]
    for key, label in ROWS:
        r = result[key]
        lines.append(f"| {label} | {r:.3f} | {1 / r:.2f}x |" if r else f"| {label} | n/a | n/a |")
    ref, est = result["reference_accept_rate"], result["estimate_accept_rate"]
    corr = result["coefficient_correlation"]
    lines += ["", f"- {result['prompts']} prompts, {result['samples_per_prompt']:g} samples per "
                  f"prompt, N' = {result['drawn']} reused ({result['weighting']} proxy)",
              f"- acceptance rate over the reference draws: mean {ref['mean']:.3f}, std "
              f"{ref['std']:.3f}, all solved {ref['solved_share']:.0%}, none solved "
              f"{ref['unsolved_share']:.0%}; the estimate run's: mean {est['mean']:.3f}, std "
              f"{est['std']:.3f}",
              "- correlation of the per-prompt variance coefficients, estimate vs reference: "
              + (f"{corr:.2f}" if corr is not None else "n/a")]
    return "\n".join(lines) + "\n"


def _posterior_options_off() -> list[str]:
    """Overrides that return the posterior-only keys to their defaults: the reference's
    per-iteration estimate refuses them, and a one-iteration run has nothing to pool."""
    default = GVMConfig()
    return [f"gvm.{key}={_override_value(getattr(default, key))}" for key in POSTERIOR_ONLY]


def _override_value(value) -> str:
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _check_settings(out: Path, settings: dict) -> None:
    """Finished runs in ``out`` are reused: refuse them when they were made otherwise."""
    path = out / "settings.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            _fail(f"{path}:{exc.lineno}: invalid JSON ({exc.msg}); remove it or use another --out")
        if old != settings:
            _fail(f"--out {out} holds probe runs made with other settings (checkpoint, size, "
                  f"--prompts, --draws, --seed or overrides); use another --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


def main(args: argparse.Namespace) -> int:
    from gvm_mega.config import ConfigError, load_config
    from gvm_mega.convergence.bench import _default_config

    config = args.config or _default_config()
    if config is None or not Path(config).is_file():
        _fail(f"--config {config}: no such file")
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_dir():
        _fail(f"--checkpoint {checkpoint}: no such directory")
    prompts = args.prompts if args.prompts is not None else (4 if args.quick else 256)
    draws = args.draws if args.draws is not None else (4 if args.quick else 32)
    if prompts < 2:
        _fail(f"--prompts {prompts}: must be >= 2")
    size = QUICK_SIZE if args.quick else DEFAULT_SIZE
    base = [*COMMON, *size, *DEFAULT_PER_ALGORITHM[ALGORITHM], *args.overrides,
            f"algorithm.name={ALGORITHM}", "train.warmup_steps=0", f"checkpoint.load={checkpoint}",
            "train.iterations=1", "train.eval_every=0", f"train.prompts_per_iteration={prompts}",
            f"run.seed={args.seed}"]
    try:
        cfg = load_config(config, base)
    except ConfigError as exc:
        _fail(str(exc))
    if draws <= cfg.gvm.presample_n:
        _fail(f"--draws {draws}: must exceed gvm.presample_n = {cfg.gvm.presample_n} "
              f"for the reference to know more than the estimate")
    runs = {"estimate": base,
            "reference": [*base, f"gvm.presample_n={draws}", "gvm.budget_per_prompt=1",
                          "gvm.estimator=per-iteration", *_posterior_options_off()]}
    out = Path(args.out)
    _check_settings(out, {"config": str(Path(config).resolve()), "runs": runs})
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = dict(zip(runs, pool.map(
            lambda name: run_training(name, config, out / name, runs[name], 1, out / "logs",
                                      threads=1), runs)))
    failed = [name for name, arm in done.items() if not arm.ok]
    if failed:
        _fail("; ".join(f"the {n} run failed: {done[n].log_tail}" for n in failed))
    drawn = cfg.gvm.presample_n if cfg.gvm.count_stage1 else 0
    try:
        result = score(first_allocation(out / "reference"), first_allocation(out / "estimate"),
                       drawn=drawn, weighting=weighting_of(cfg.algorithm.prompt_weight))
    except ValueError as exc:
        _fail(str(exc))
    result.update(checkpoint=str(checkpoint), draws=draws, seed=args.seed,
                  overrides=list(args.overrides))
    (out / "ceiling.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    markdown = to_markdown(result)
    (out / "ceiling.md").write_text(markdown, encoding="utf-8")
    print(markdown)
    print(f"wrote {out / 'ceiling.json'}\nwrote {out / 'ceiling.md'}")
    return 0


__all__ = ["DESCRIPTION", "add_arguments", "first_allocation", "main", "score", "to_markdown"]
