"""``gvm-mega plot``: learning curves of one or more runs as a PNG.

Four panels: held-out eval accuracy and train reward (``accept_rate_mean``) against
``samples_total`` (every response generated, stage 1 included), one line per run; each GVM
run's gradient-variance ratio against uniform sampling (``variance_ratio``) and the best any
allocation could reach (``variance_ratio_best``) per iteration; and the histogram of
per-prompt sample counts n_i of each run's last recorded allocation (``allocations.jsonl``).
Reads only files in the run directories; matplotlib draws off-screen.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from gvm_mega.cli import CLIError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="plot eval accuracy, train reward, variance ratios and "
                                    "allocations of runs",
                       description=__doc__.split("\n\n")[1] if __doc__ else None)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories to compare")
    p.add_argument("--out", metavar="FILE.png",
                   help="output image (default: RUN_DIR/curves.png for one run, "
                        "else curves.png here)")
    p.add_argument("--title", default=None, help="figure title")
    p.set_defaults(func=run)


@dataclass
class RunCurves:
    label: str
    eval_x: list[float] = field(default_factory=list)
    eval_y: list[float] = field(default_factory=list)
    reward_x: list[float] = field(default_factory=list)
    reward_y: list[float] = field(default_factory=list)
    variance_it: list[int] = field(default_factory=list)
    variance: list[float] = field(default_factory=list)
    variance_best: list[Optional[float]] = field(default_factory=list)
    allocation: Optional[dict] = None  # the last allocations.jsonl row


def _number(record: dict, key: str) -> Optional[float]:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def load_run(run_dir: str, label: str) -> RunCurves:
    """The curves of one run directory; :class:`CLIError` naming file and line if unusable."""
    from gvm_mega.runlog import ALLOCATIONS_FILE, METRICS_FILE, RunLogError, read_records

    path = Path(run_dir)
    if not path.is_dir():
        raise CLIError(f"{run_dir}: not a directory")
    metrics = path / METRICS_FILE
    if not metrics.is_file():
        raise CLIError(f"{metrics}: no such file (is {run_dir} a run directory?)")
    try:
        records = read_records(metrics)
    except RunLogError as exc:
        raise CLIError(str(exc)) from None
    if not records:
        raise CLIError(f"{metrics}: no records (the run has not finished an iteration)")
    curves = RunCurves(label)
    for record in records:
        x = _number(record, "samples_total")
        if x is None:
            continue
        acc, reward = _number(record, "eval_accuracy"), _number(record, "accept_rate_mean")
        if acc is not None:
            curves.eval_x.append(x)
            curves.eval_y.append(acc)
        if reward is not None:
            curves.reward_x.append(x)
            curves.reward_y.append(reward)
        ratio = _number(record, "variance_ratio")
        if ratio is not None:
            curves.variance_it.append(int(record["iteration"]))
            curves.variance.append(ratio)
            curves.variance_best.append(_number(record, "variance_ratio_best"))
    allocations = path / ALLOCATIONS_FILE
    if allocations.is_file():
        try:
            rows = read_records(allocations)
        except RunLogError as exc:
            raise CLIError(str(exc)) from None
        if rows:
            row = rows[-1]
            samples = row.get("samples")
            if not isinstance(samples, dict) or not all(
                    isinstance(n, int) and not isinstance(n, bool) for n in samples.values()):
                raise CLIError(f"{allocations}: last row (iteration {row['iteration']}): "
                               f"'samples' must map prompt ids to integer counts")
            curves.allocation = row
    return curves


def _labels(run_dirs: list[str]) -> list[str]:
    names = [os.path.basename(os.path.normpath(d)) or d for d in run_dirs]
    return [n if names.count(n) == 1 else os.path.normpath(d) for n, d in zip(names, run_dirs)]


def draw(runs: list[RunCurves], out: str, *, title: Optional[str] = None) -> str:
    """Render the four panels to ``out`` (PNG) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 8), dpi=100, layout="constrained")
    (ax_eval, ax_reward), (ax_var, ax_alloc) = fig.subplots(2, 2)
    for r in runs:
        ax_eval.plot(r.eval_x, r.eval_y, marker="o", label=r.label)
        ax_reward.plot(r.reward_x, r.reward_y, marker=".", label=r.label)
    _draw_variance(ax_var, runs)
    for ax, name in ((ax_eval, "eval accuracy"), (ax_reward, "train reward (accept rate)")):
        ax.set_xlabel("samples generated (samples_total)")
        ax.set_ylabel(name)
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    with_alloc = [r for r in runs if r.allocation is not None]
    if with_alloc:
        top = max(max(r.allocation["samples"].values(), default=0) for r in with_alloc)
        bins = [b - 0.5 for b in range(0, top + 2)]
        for r in with_alloc:
            counts = list(r.allocation["samples"].values())
            ax_alloc.hist(counts, bins=bins, histtype="step", linewidth=1.5,
                          label=f"{r.label} (it {r.allocation['iteration']})")
        ax_alloc.legend(fontsize="small")
    else:
        ax_alloc.text(0.5, 0.5, "no allocations.jsonl in these runs", ha="center", va="center",
                      transform=ax_alloc.transAxes)
    from matplotlib.ticker import MaxNLocator

    ax_alloc.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax_alloc.set_xlabel("samples per prompt (n_i)")
    ax_alloc.set_ylabel("prompts")
    ax_alloc.set_title("allocation, last iteration")
    ax_alloc.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, format="png")
    return out


def _draw_variance(ax, runs: list[RunCurves]) -> None:
    """Per GVM run: its allocation's variance ratio (solid) and the best possible (dashed),
    in the run's own colour; 1 is uniform sampling."""
    import matplotlib

    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn = False
    for i, r in enumerate(runs):
        if not r.variance:
            continue
        colour = colours[i % len(colours)]  # the colour of the run's lines in the other panels
        ax.plot(r.variance_it, r.variance, color=colour, label=f"{r.label}")
        best = [(it, b) for it, b in zip(r.variance_it, r.variance_best) if b is not None]
        if best:
            ax.plot(*zip(*best), "--", color=colour, label=f"{r.label}: best possible")
        drawn = True
    ax.axhline(1.0, color="grey", linewidth=1)
    if drawn:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no variance_ratio in these runs (uniform sampling)", ha="center",
                va="center", transform=ax.transAxes)
    ax.set_xlabel("iteration")
    ax.set_ylabel("variance ratio (1 = uniform)")
    ax.set_title("gradient variance against uniform sampling")
    ax.grid(alpha=0.3)


def run(args: argparse.Namespace) -> int:
    if args.out is not None and not args.out.lower().endswith(".png"):
        raise CLIError(f"--out {args.out}: the output must be a .png file")
    runs = [load_run(d, label) for d, label in zip(args.run_dirs, _labels(args.run_dirs))]
    if all(not r.eval_x and not r.reward_x for r in runs):
        raise CLIError("no run has eval_accuracy or accept_rate_mean values with samples_total "
                       "in its metrics.jsonl: nothing to plot")
    out = args.out or (os.path.join(args.run_dirs[0], "curves.png") if len(args.run_dirs) == 1
                       else "curves.png")
    draw(runs, out, title=args.title)
    print(f"wrote {out}")
    return 0
