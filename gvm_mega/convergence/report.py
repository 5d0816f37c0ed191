"""The benchmark's outputs: ``results.json``, ``table.json``, ``table.md`` and ``curves.png``."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Optional, Sequence

from gvm_mega.convergence.analysis import Curve, table_markdown

RESULTS_FILE = "results.json"
TABLE_JSON = "table.json"
TABLE_MD = "table.md"
CURVES_PNG = "curves.png"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def table_rows(summary: Mapping) -> dict:
    """The table as JSON: one row per algorithm, one per GVM variant."""
    algorithms = [{"algorithm": name, "seeds": row["seeds"],
                   "final_accuracy_mean": row["final_accuracy"] and row["final_accuracy"]["mean"],
                   "final_accuracy_std": row["final_accuracy"] and row["final_accuracy"]["std"],
                   "final_accuracy_min": row["final_accuracy"] and row["final_accuracy"]["min"],
                   "final_accuracy_max": row["final_accuracy"] and row["final_accuracy"]["max"],
                   "final_samples_mean": row["final_samples"] and row["final_samples"]["mean"]}
                  for name, row in summary["algorithms"].items()]
    variants = [{"variant": name, "baseline": s["baseline"],
                 "target_accuracy": s["target_accuracy"],
                 "baseline_samples": s["baseline_samples"],
                 "variant_samples": s["variant_samples"], "reached": s["reached"],
                 "speedup": s["speedup"],
                 "speedup_by_level": [{k: level[k] for k in ("level", "accuracy", "speedup")}
                                      for level in s.get("by_level", [])],
                 "speedup_seed_bootstrap": s.get("seed_bootstrap"),
                 "speedup_by_horizon": [{k: h[k] for k in ("iteration", "target_accuracy",
                                                          "variant_accuracy", "speedup")}
                                        for h in s.get("by_horizon", [])],
                 **{f"{key}_mean": (summary["algorithms"].get(name, {}).get(key) or {}).get("mean")
                    for key in ("variance_ratio", "variance_ratio_best")}}
                for name, s in summary["speedups"].items()]
    return {"algorithms": algorithms, "gvm_variants": variants}


def write_outputs(out: Path, summary: Mapping, curves: Mapping[str, Sequence[Curve]],
                  meta: Mapping) -> dict[str, Path]:
    """Write every output file under ``out``; returns their paths by name."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": out / RESULTS_FILE, "table_json": out / TABLE_JSON,
             "table_md": out / TABLE_MD, "curves": out / CURVES_PNG}
    results = {**meta, "speedups": summary["speedups"], "algorithms": summary["algorithms"],
               "runs_per_algorithm": {name: [c.to_dict() for c in runs]
                                      for name, runs in curves.items()}}
    _write_atomic(paths["results"], json.dumps(results, indent=2) + "\n")
    _write_atomic(paths["table_json"], json.dumps(table_rows(summary), indent=2) + "\n")
    _write_atomic(paths["table_md"], table_markdown(summary))
    draw_curves(curves, paths["curves"], title=meta.get("title"))
    return paths


def curve_styles(names: Sequence[str], palette: Sequence[str]) -> dict[str, tuple[str, str]]:
    """``name -> (colour, line style)``: every algorithm its own colour, so overlapping seed
    bands stay apart; GVM variants dashed, uniform baselines solid."""
    return {name: (palette[i % len(palette)], "--" if name.startswith("gvm-") else "-")
            for i, name in enumerate(dict.fromkeys(names))}


def draw_curves(curves: Mapping[str, Sequence[Curve]], out: Path, *,
                title: Optional[str] = None) -> Path:
    """Eval accuracy against samples_total: per algorithm the seed-mean line and the
    min-max band over seeds (matplotlib off-screen)."""
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    from matplotlib.figure import Figure

    from gvm_mega.convergence.analysis import mean_curve

    fig = Figure(figsize=(7.5, 4.8), dpi=100, layout="constrained")
    ax = fig.subplots()
    styles = curve_styles(list(curves), matplotlib.rcParams["axes.prop_cycle"].by_key()["color"])
    drawn = 0
    for name, runs in curves.items():
        if not runs:
            continue
        mean = mean_curve(runs)
        rows = [[c.accuracy[c.iterations.index(it)] for it in mean.iterations] for c in runs]
        acc = np.asarray(rows)
        color, style = styles[name]
        ax.plot(mean.samples, mean.accuracy, style, marker="o", markersize=3, color=color,
                label=f"{name} ({len(runs)} seed{'s' if len(runs) != 1 else ''})")
        if len(runs) > 1:
            ax.fill_between(mean.samples, acc.min(axis=0), acc.max(axis=0),
                            color=color, alpha=0.15, linewidth=0)
        drawn += 1
    if not drawn:
        ax.text(0.5, 0.5, "no finished runs", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(fontsize="small")
    ax.set_xlabel("samples generated (samples_total, stage-1 pre-samples included)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(title or "held-out accuracy vs samples (mean over seeds, band: min-max)")
    ax.grid(alpha=0.3)
    fig.savefig(out, format="png")
    return out
