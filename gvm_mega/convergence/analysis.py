"""Accuracy-vs-samples curves and the sample-efficiency speedup of GVM over uniform sampling.

A run's curve is its held-out ``eval_accuracy`` against ``samples_total`` (every generated
response, stage-1 pre-sampling included) at the iterations where it evaluated. Seeds of one
algorithm are averaged point by point at the eval iterations they share, so the mean curve
keeps the x-axis in samples. A GVM variant's speedup is measured against its uniform
baseline: the samples the baseline needs to first reach its own final mean accuracy, divided
by the samples the variant needs to first reach that same accuracy, reading both off the
seed-mean curves with linear interpolation between eval points. A baseline that ends less
than ``min_gain`` above its own starting accuracy has not improved beyond evaluation noise,
so no speedup is defined against it.

That headline ratio is read at one accuracy, the baseline's last, which a baseline that
flattens reaches late; ``by_level`` repeats the reading at a quarter, half, three quarters
and all of the baseline's rise from its start, to show whether the gain holds along the way.

Where the runs stop matters too: the baseline's final accuracy moves with the run's length,
and with it the headline. ``by_horizon`` reads the headline as if both arms had stopped at
each eighth of the run (their curves cut at the last eval iteration there).

Three seeds make a noisy mean, and the headline ratio reads it at one point, so
``seed_bootstrap`` redraws each arm's seeds with replacement and recomputes the ratio: its
quantiles over draws say how much of the headline is down to which seeds ran.

A GVM run's curve also carries the mean over its iterations of the logged ``variance_ratio``
(its allocation's gradient-variance proxy over uniform's) and ``variance_ratio_best`` (the
best any allocation could do on the same statistics): what the allocation bought per
iteration, and the most that allocation could have bought.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

# The uniform algorithm each GVM variant is compared with.
BASELINES = {"gvm-raft++": "raft++", "gvm-grpo": "grpo"}

_EPS = 1e-12
# Smallest rise of the baseline's seed-mean accuracy over its start that counts as learning:
# about the standard error of a 3-seed mean difference on the demo's 1,440-sample eval.
MIN_GAIN = 0.01
# Accuracies at which the speedup is also read, as shares of the baseline's rise.
LEVELS = (0.25, 0.5, 0.75, 1.0)
HORIZONS = tuple(k / 8 for k in range(1, 8))
# Seed redraws behind the speedup's spread, the quantiles reported, and the speedup whose
# share of draws is reported (the low end of the 2-4x the GVM-RAFT paper reports).
BOOTSTRAP_DRAWS = 1000
BOOTSTRAP_QUANTILES = (0.1, 0.5, 0.9)
TARGET_SPEEDUP = 2.0


@dataclass(frozen=True)
class Curve:
    """Eval points of one run (or a seed mean): iterations, samples_total, accuracy; for a
    GVM run also its mean variance ratios (None for uniform runs and seed means)."""

    iterations: tuple[int, ...]
    samples: tuple[float, ...]
    accuracy: tuple[float, ...]
    variance_ratio: Optional[float] = None
    variance_ratio_best: Optional[float] = None

    def __post_init__(self) -> None:
        if not (len(self.iterations) == len(self.samples) == len(self.accuracy)):
            raise ValueError("a curve needs as many iterations, samples and accuracies")

    @property
    def final_accuracy(self) -> float:
        return self.accuracy[-1]

    def to_dict(self) -> dict:
        out = {"iteration": list(self.iterations), "samples_total": list(self.samples),
               "eval_accuracy": list(self.accuracy)}
        if self.variance_ratio is not None:
            out.update(variance_ratio_mean=self.variance_ratio,
                       variance_ratio_best_mean=self.variance_ratio_best)
        return out


def _number(value: object) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def curve_from_records(records: Sequence[Mapping], where: str = "metrics") -> Curve:
    """The eval points of a run's ``metrics.jsonl`` records (ValueError if it has none)."""
    its, xs, ys = [], [], []
    for record in records:
        acc, x = _number(record.get("eval_accuracy")), _number(record.get("samples_total"))
        if acc is None:
            continue
        if x is None:
            raise ValueError(f"{where}: iteration {record.get('iteration')} has eval_accuracy "
                             f"but no samples_total")
        its.append(int(record["iteration"]))
        xs.append(x)
        ys.append(acc)
    if not its:
        raise ValueError(f"{where}: no record with eval_accuracy")
    return Curve(tuple(its), tuple(xs), tuple(ys), *(_mean_of(records, key) for key in
                                                     ("variance_ratio", "variance_ratio_best")))


def _mean_of(records: Sequence[Mapping], key: str) -> Optional[float]:
    values = [v for v in (_number(r.get(key)) for r in records) if v is not None]
    return float(np.mean(values)) if values else None


def load_curve(metrics_path: str | Path) -> Curve:
    """:func:`curve_from_records` of a ``metrics.jsonl`` file (errors name the file/line)."""
    from gvm_mega.runlog import read_records

    return curve_from_records(read_records(metrics_path), str(metrics_path))


def mean_curve(curves: Sequence[Curve]) -> Curve:
    """Point-by-point seed mean over the eval iterations every curve has."""
    if not curves:
        raise ValueError("mean_curve needs at least one curve")
    shared = set(curves[0].iterations).intersection(*(c.iterations for c in curves[1:]))
    if not shared:
        raise ValueError("the seeds' curves share no eval iteration")
    its = sorted(shared)
    xs, ys = [], []
    for it in its:
        idx = [c.iterations.index(it) for c in curves]
        xs.append(float(np.mean([c.samples[i] for c, i in zip(curves, idx)])))
        ys.append(float(np.mean([c.accuracy[i] for c, i in zip(curves, idx)])))
    return Curve(tuple(its), tuple(xs), tuple(ys))


def samples_to_reach(curve: Curve, target: float) -> Optional[float]:
    """Samples at which ``curve`` first reaches ``target`` accuracy, linearly interpolated
    between the eval points around the crossing; None if it never does."""
    for i, (x, y) in enumerate(zip(curve.samples, curve.accuracy)):
        if y >= target - _EPS:
            if i == 0:
                return x
            x0, y0 = curve.samples[i - 1], curve.accuracy[i - 1]
            if y <= y0:  # only reachable through float tolerance: take this point
                return x
            return x0 + (target - y0) * (x - x0) / (y - y0)
    return None


@dataclass(frozen=True)
class Speedup:
    """A GVM variant against its uniform baseline, on seed-mean curves."""

    variant: str
    baseline: str
    target_accuracy: Optional[float]
    baseline_samples: Optional[float]
    variant_samples: Optional[float]
    speedup: Optional[float]
    reached: bool
    note: str
    by_level: tuple[dict, ...] = ()

    def to_dict(self) -> dict:
        return {**vars(self), "by_level": [dict(level) for level in self.by_level]}


def speedup_by_level(variant_curve: Curve, baseline_curve: Curve,
                     levels: Sequence[float] = LEVELS) -> tuple[dict, ...]:
    """Samples each curve first needs to reach accuracies part of the way up the baseline's
    rise (``level`` = share of the rise from its start to its final accuracy), and their
    ratio (None where the variant never reaches the level)."""
    start, final = baseline_curve.accuracy[0], baseline_curve.final_accuracy
    out = []
    for level in levels:
        target = start + level * (final - start)
        base_n = samples_to_reach(baseline_curve, target)
        var_n = samples_to_reach(variant_curve, target)
        ratio = base_n / var_n if base_n and var_n else None
        out.append({"level": level, "accuracy": target, "baseline_samples": base_n,
                    "variant_samples": var_n, "speedup": ratio})
    return tuple(out)


def speedup(variant: str, variant_curve: Curve, baseline: str, baseline_curve: Curve, *,
            min_gain: float = MIN_GAIN) -> Speedup:
    """Baseline samples to its own final accuracy / variant samples to that accuracy."""
    target = baseline_curve.final_accuracy
    gain = target - baseline_curve.accuracy[0]
    if gain < min_gain:
        reached = max(variant_curve.accuracy) >= target - _EPS
        return Speedup(variant, baseline, target, None, None, None, reached,
                       f"{baseline} ends at {target:.4f}, {gain:+.4f} from its start "
                       f"{baseline_curve.accuracy[0]:.4f} (less than the {min_gain} that counts "
                       f"as learning): no improvement to compare against, speedup undefined")
    base_n = samples_to_reach(baseline_curve, target)
    var_n = samples_to_reach(variant_curve, target)
    assert base_n is not None  # the final point always reaches the final accuracy
    if var_n is None:
        return Speedup(variant, baseline, target, base_n, None, None, False,
                       f"{variant} never reaches {baseline}'s final accuracy {target:.4f} "
                       f"(its best is {max(variant_curve.accuracy):.4f})",
                       speedup_by_level(variant_curve, baseline_curve))
    if base_n <= 0 or var_n <= 0:
        return Speedup(variant, baseline, target, base_n, var_n, None, True,
                       f"{baseline}'s final accuracy {target:.4f} is already reached before "
                       f"any RL sample (no improvement over the warm start): speedup undefined")
    return Speedup(variant, baseline, target, base_n, var_n, base_n / var_n, True,
                   f"{variant} reaches {target:.4f} after {var_n:.0f} samples, "
                   f"{baseline} after {base_n:.0f}",
                   speedup_by_level(variant_curve, baseline_curve))


def cut_curve(curve: Curve, iteration: int) -> Curve:
    """The curve's points up to and including ``iteration``."""
    keep = sum(1 for it in curve.iterations if it <= iteration)
    if not keep:
        raise ValueError(f"the curve has no eval point at or before iteration {iteration}")
    return Curve(curve.iterations[:keep], curve.samples[:keep], curve.accuracy[:keep])


def speedup_by_horizon(variant_runs: Sequence[Curve], baseline_runs: Sequence[Curve], *,
                       horizons: Sequence[float] = HORIZONS, min_gain: float = MIN_GAIN,
                       bootstrap: bool = True) -> list[dict]:
    """The headline speedup had both arms stopped at each share of the run: at the last eval
    iteration every seed of both arms shares at or before that share of the last one (each
    such iteration once)."""
    shared = sorted(set.intersection(*(set(c.iterations) for c in (*variant_runs,
                                                                    *baseline_runs))))
    out = []
    for share in horizons:
        earlier = [it for it in shared[1:] if it <= share * shared[-1]]
        if not earlier or (out and out[-1]["iteration"] == earlier[-1]):
            continue   # no eval point yet, or the same one as the share before
        stop = earlier[-1]
        v = [cut_curve(c, stop) for c in variant_runs]
        b = [cut_curve(c, stop) for c in baseline_runs]
        s = speedup("variant", mean_curve(v), "baseline", mean_curve(b), min_gain=min_gain)
        out.append({"share": share, "iteration": stop, "target_accuracy": s.target_accuracy,
                    "variant_accuracy": mean_curve(v).final_accuracy,
                    "baseline_samples": s.baseline_samples,
                    "variant_samples": s.variant_samples, "speedup": s.speedup,
                    "by_level": [dict(level) for level in s.by_level],
                    "seed_bootstrap": seed_bootstrap(v, b, min_gain=min_gain)
                    if bootstrap else None})
    return out


def seed_bootstrap(variant_runs: Sequence[Curve], baseline_runs: Sequence[Curve], *,
                   draws: int = BOOTSTRAP_DRAWS, min_gain: float = MIN_GAIN,
                   seed: int = 0) -> Optional[dict]:
    """The headline speedup over seed redraws: each draw picks every arm's seeds anew with
    replacement, averages them and reads the speedup as :func:`speedup` does.

    A draw where the variant never reaches the baseline's final accuracy counts as speedup 0
    (below any measured one) and is counted in ``never_reached``; a draw without a defined
    speedup (the redrawn baseline does not learn) is left out and counted in ``undefined``.
    None when either arm has a single seed: there is nothing to redraw. Seeded, so the same
    runs give the same numbers.
    """
    if len(variant_runs) < 2 or len(baseline_runs) < 2:
        return None
    rng = np.random.default_rng(seed)
    values: list[float] = []
    never = undefined = 0
    for _ in range(draws):
        picked = [[runs[i] for i in rng.integers(len(runs), size=len(runs))]
                  for runs in (variant_runs, baseline_runs)]
        s = speedup("variant", mean_curve(picked[0]), "baseline", mean_curve(picked[1]),
                    min_gain=min_gain)
        if s.speedup is not None:
            values.append(s.speedup)
        elif s.baseline_samples is not None and not s.reached:
            values.append(0.0)
            never += 1
        else:
            undefined += 1
    out = {"draws": draws, "never_reached": never, "undefined": undefined,
           "quantiles": None, "target_speedup": TARGET_SPEEDUP, "share_at_target": None}
    if values:
        qs = np.quantile(np.asarray(values), BOOTSTRAP_QUANTILES)
        out["quantiles"] = [{"q": q, "speedup": float(v)} for q, v in zip(BOOTSTRAP_QUANTILES, qs)]
        out["share_at_target"] = float(np.mean(np.asarray(values) >= TARGET_SPEEDUP))
    return out


def spread(values: Sequence[float]) -> dict:
    """Mean, population std, min and max of per-seed values."""
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()),
            "max": float(a.max()), "n": int(a.size)}


def summarise(curves: Mapping[str, Sequence[Curve]], *, min_gain: float = MIN_GAIN) -> dict:
    """The table: per algorithm final accuracy over seeds and its seed-mean curve; per GVM
    variant the samples to reach its baseline's final accuracy and the speedup.

    ``curves`` maps an algorithm to its finished seeds' curves (algorithms with none are
    listed with ``seeds: 0``). GVM variants whose baseline has no finished seed get a
    speedup entry that says so.
    """
    algorithms: dict[str, dict] = {}
    means: dict[str, Curve] = {}
    for name, runs in curves.items():
        if not runs:
            algorithms[name] = {"seeds": 0, "final_accuracy": None, "final_samples": None,
                                "mean_curve": None}
            continue
        means[name] = mean_curve(runs)
        algorithms[name] = {"seeds": len(runs),
                            "final_accuracy": spread([c.final_accuracy for c in runs]),
                            "final_samples": spread([c.samples[-1] for c in runs]),
                            "mean_curve": means[name].to_dict()}
        for key in ("variance_ratio", "variance_ratio_best"):
            values = [getattr(c, key) for c in runs if getattr(c, key) is not None]
            if values:
                algorithms[name][key] = spread(values)
    speedups: dict[str, dict] = {}
    for variant, base in BASELINES.items():
        if variant not in curves:
            continue
        if variant not in means or base not in means:
            missing = [a for a in (variant, base) if a not in means]
            speedups[variant] = Speedup(
                variant, base, None, None, None, None, False,
                f"no finished run of {' and '.join(missing)}: speedup not measured").to_dict()
            continue
        speedups[variant] = speedup(variant, means[variant], base, means[base],
                                    min_gain=min_gain).to_dict()
        speedups[variant]["seed_bootstrap"] = seed_bootstrap(curves[variant], curves[base],
                                                             min_gain=min_gain)
        speedups[variant]["by_horizon"] = speedup_by_horizon(curves[variant], curves[base],
                                                             min_gain=min_gain)
    return {"algorithms": algorithms, "speedups": speedups}


def _fmt(value: Optional[float], spec: str) -> str:
    return "—" if value is None else format(value, spec)


def table_markdown(summary: Mapping) -> str:
    """The summary as two markdown tables (accuracy per algorithm; speedup per variant)."""
    lines = ["| algorithm | seeds | final accuracy (mean ± std) | min – max | samples at end |",
             "|---|---:|---:|---:|---:|"]
    for name, row in summary["algorithms"].items():
        acc, n = row["final_accuracy"], row["final_samples"]
        if acc is None:
            lines.append(f"| {name} | 0 | — | — | — |")
            continue
        lines.append(f"| {name} | {row['seeds']} | {acc['mean']:.4f} ± {acc['std']:.4f} | "
                     f"{acc['min']:.4f} – {acc['max']:.4f} | {n['mean']:.0f} |")
    if summary["speedups"]:
        lines += ["", "| GVM variant | baseline | target accuracy | baseline samples | "
                      "GVM samples | speedup | variance ratio | best possible |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for name, s in summary["speedups"].items():
            var_n = _fmt(s["variant_samples"], ".0f")
            if s["target_accuracy"] is not None and not s["reached"]:
                var_n = "never reached"
            row = summary["algorithms"].get(name, {})
            ratios = [_fmt((row.get(key) or {}).get("mean"), ".2f")
                      for key in ("variance_ratio", "variance_ratio_best")]
            lines.append(f"| {name} | {s['baseline']} | {_fmt(s['target_accuracy'], '.4f')} | "
                         f"{_fmt(s['baseline_samples'], '.0f')} | {var_n} | "
                         f"{_fmt(s['speedup'], '.2f')}{'x' if s['speedup'] is not None else ''} | "
                         f"{ratios[0]} | {ratios[1]} |")
        notes = [f"- {name}: {s['note']}" for name, s in summary["speedups"].items()]
        notes += [f"- {name} along {s['baseline']}'s rise (share of the rise: accuracy, "
                  "speedup): " + ", ".join(
                      f"{level['level']:.0%}: {level['accuracy']:.4f}, "
                      + (f"{level['speedup']:.2f}x" if level["speedup"] is not None
                         else "never reached")
                      for level in s["by_level"])
                  for name, s in summary["speedups"].items() if s.get("by_level")]
        notes += [_bootstrap_line(name, s["seed_bootstrap"])
                  for name, s in summary["speedups"].items() if s.get("seed_bootstrap")]
        notes += [_horizon_line(name, s) for name, s in summary["speedups"].items()
                  if s.get("by_horizon")]
        if any(summary["algorithms"].get(name, {}).get("variance_ratio_best")
               for name in summary["speedups"]):
            notes.append("- variance ratio: the allocation's gradient-variance proxy over "
                         "uniform sampling's at the same budget, mean over iterations and "
                         "seeds; best possible: the same for the best allocation of each "
                         "iteration's budget. 1 / ratio is the allocation's worth in uniform "
                         "samples per iteration, and no allocation can do better than 1 / best.")
        lines += [""] + notes
    return "\n".join(lines) + "\n"


def _bootstrap_line(name: str, boot: Mapping) -> str:
    line = f"- {name} speedup over {boot['draws']} redraws of the seeds: "
    if boot["quantiles"] is None:
        return line + "undefined in every draw (the redrawn baseline does not learn)"
    line += ", ".join(f"{q['q']:.0%}: {q['speedup']:.2f}x" for q in boot["quantiles"])
    line += f"; at least {boot['target_speedup']:g}x in {boot['share_at_target']:.0%} of draws"
    if boot["never_reached"]:
        line += f"; never reached in {boot['never_reached']}"
    if boot["undefined"]:
        line += f"; undefined in {boot['undefined']}"
    return line


def _horizon_line(name: str, s: Mapping) -> str:
    parts = []
    for h in s["by_horizon"]:
        text = (f"iteration {h['iteration']}: {s['baseline']} {_fmt(h['target_accuracy'], '.4f')}"
                f", {name} {h['variant_accuracy']:.4f}, ")
        if h["speedup"] is not None:
            text += f"{h['speedup']:.2f}x"
        else:
            text += "never reached" if h["baseline_samples"] is not None else "undefined"
        boot = h.get("seed_bootstrap") or {}
        median = [q["speedup"] for q in boot.get("quantiles") or () if q["q"] == 0.5]
        if median:
            text += f" (redraw median {median[0]:.2f}x)"
        parts.append(text)
    return (f"- {name} had the runs stopped sooner (both arms' curves cut there): "
            + "; ".join(parts))
