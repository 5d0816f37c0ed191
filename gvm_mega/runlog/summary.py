"""Metric names and the one-line-per-iteration summary printed by the training loop.

The standard ``metrics.jsonl`` keys (others may be added freely):

- ``iteration``: 0 is the evaluation before the first policy update, then 1, 2, ...
- ``samples_total``: every response generated so far, stage 1 included
- ``tokens_generated``: response tokens generated so far
- ``accept_rate_mean``: mean over the batch's prompts of the accepted fraction (train reward)
- ``grad_norm_mean``: mean G_i over prompts with accepted samples
- ``alloc_min`` / ``alloc_max``: smallest / largest stage-2 sample count n_i
- ``variance_ratio``: the allocation's gradient-variance proxy over uniform n's (sum G_i^2/(n_i p_i),
  or sum p_i G_i^2/n_i with ``algorithm.prompt_weight=per-draw``)
- ``variance_ratio_best``: the same for the best allocation of the budget (its lower bound)
- ``loss``, ``kl``, ``entropy``, ``lr``: from the policy step(s)
- ``time_<phase>_s``: seconds spent in a phase (``PHASES`` lists the usual ones)
- ``eval_accuracy``: mean accuracy on the held-out sets, on iterations where eval ran
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

METRIC_KEYS = ("iteration", "samples_total", "tokens_generated", "accept_rate_mean",
               "grad_norm_mean", "alloc_min", "alloc_max", "variance_ratio", "loss", "kl",
               "entropy", "lr", "eval_accuracy")
PHASES = ("stage1", "gradnorm", "allocate", "stage2", "logprobs", "train", "sync", "eval",
          "checkpoint")


def phase_key(phase: str) -> str:
    """The metrics key of a phase's seconds: ``time_<phase>_s``."""
    return f"time_{phase}_s"


def _count(x: float) -> str:
    x = float(x)
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.1f}{unit}"
    return f"{x:.0f}"


def _num(x: float) -> str:
    x = float(x)
    if x == 0:
        return "0"
    if abs(x) >= 1e4 or abs(x) < 1e-3:
        return f"{x:.2e}"
    return f"{x:.4g}"


def format_summary(record: Mapping[str, Any], *, iterations: Optional[int] = None) -> str:
    """One line such as ``it 3/10 | samples 1.2k | acc 0.42 | n 0..17 | loss 0.123 | ...``.

    Keys that are missing or null are left out; phase times are listed largest first.
    """
    def has(key: str) -> bool:
        v = record.get(key)
        return v is not None and not (isinstance(v, float) and not math.isfinite(v))

    it = record.get("iteration", "?")
    parts = [f"it {it}/{iterations}" if iterations is not None else f"it {it}"]
    if has("samples_total"):
        parts.append(f"samples {_count(record['samples_total'])}")
    if has("tokens_generated"):
        parts.append(f"tokens {_count(record['tokens_generated'])}")
    if has("accept_rate_mean"):
        parts.append(f"reward {record['accept_rate_mean']:.3f}")
    if has("grad_norm_mean"):
        parts.append(f"G {_num(record['grad_norm_mean'])}")
    if has("alloc_min") and has("alloc_max"):
        parts.append(f"n {int(record['alloc_min'])}..{int(record['alloc_max'])}")
    if has("variance_ratio"):
        best = f"/{record['variance_ratio_best']:.2f}" if has("variance_ratio_best") else ""
        parts.append(f"var {record['variance_ratio']:.3f}{best}")
    for key, label in (("loss", "loss"), ("kl", "kl"), ("entropy", "ent"), ("lr", "lr")):
        if has(key):
            parts.append(f"{label} {_num(record[key])}")
    if has("eval_accuracy"):
        parts.append(f"eval {record['eval_accuracy']:.3f}")
    times = sorted(((k[5:-2], float(v)) for k, v in record.items()
                    if k.startswith("time_") and k.endswith("_s") and has(k)),
                   key=lambda kv: -kv[1])
    if times:
        total = sum(t for _, t in times)
        detail = " ".join(f"{name} {t:.1f}" for name, t in times[:4])
        parts.append(f"{total:.1f}s ({detail})")
    return " | ".join(parts)
