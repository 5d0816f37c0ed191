"""Convergence benchmark: GVM variants against uniform baselines, accuracy per sample spent.

``gvm-mega bench convergence`` (:mod:`gvm_mega.convergence.bench`) trains one shared warm
start, then every (algorithm, seed) arm in its own process, and writes ``results.json``,
``table.json``, ``table.md`` and ``curves.png``. The analysis functions work on any runs'
``metrics.jsonl`` files. ``gvm-mega bench ceiling`` (:mod:`gvm_mega.convergence.ceiling`)
measures, at one checkpoint, how much of the best allocation's variance reduction the GVM rule
gets from its few pre-samples.
"""
from gvm_mega.convergence.analysis import (BASELINES, Curve, Speedup, curve_from_records,
                                           load_curve, mean_curve, samples_to_reach,
                                           seed_bootstrap, speedup, summarise, table_markdown)
from gvm_mega.convergence.report import draw_curves, table_rows, write_outputs

__all__ = ["BASELINES", "Curve", "Speedup", "curve_from_records", "draw_curves", "load_curve",
           "mean_curve", "samples_to_reach", "seed_bootstrap", "speedup", "summarise",
           "table_markdown", "table_rows", "write_outputs"]
