"""What an allocation buys: the variance proxy against uniform, what was dropped, how skewed.

The variance proxy ``sum_i G_i^2 / (n_i p_i)`` is the quantity GVM minimises; it is summed
over the prompts that contribute to the gradient (``n_i > 0``, ``p_i > 0``, ``G_i > 0``).
The uniform reference spreads the same total evenly over all prompts
(:func:`~gvm_mega.allocation.uniform.uniform_allocate`) and is summed the same way.
A ratio below 1 means the allocation is expected to give a less noisy gradient. With
``drawn`` (pre-samples trained on too) both proxies count ``drawn + n_i`` samples per prompt.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from gvm_mega.allocation.gvm import DROP_REASONS, validate_stats
from gvm_mega.allocation.uniform import uniform_allocate


@dataclass(frozen=True)
class AllocationDiagnostics:
    num_prompts: int
    total_samples: int
    num_allocated: int                   # prompts with n_i > 0
    dropped: dict[str, int]              # prompts dropped by each rule
    variance_proxy: float | None         # None when no prompt contributes
    uniform_variance_proxy: float | None
    variance_ratio: float | None         # variance_proxy / uniform_variance_proxy
    n_min: int
    n_max: int
    n_mean: float
    n_gini: float                        # 0: all equal; near 1: all samples on one prompt

    def to_dict(self) -> dict:
        return asdict(self)


def variance_proxy(samples, grad_norms, accept_rates) -> float | None:
    """``sum G^2 / (n p)`` over prompts with n, p and G all positive; None if there are none."""
    n = np.asarray(samples, dtype=np.float64)
    g, p = validate_stats(grad_norms, accept_rates)
    if n.shape != g.shape:
        raise ValueError(f"samples has {n.shape} entries but the statistics have {g.shape}")
    use = (n > 0) & (p > 0) & (g > 0)
    if not use.any():
        return None
    return float(np.sum(g[use] ** 2 / (n[use] * p[use])))


def gini(values) -> float:
    """Gini coefficient of non-negative values (0 for an empty or all-zero vector)."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    total = x.sum()
    if x.size == 0 or total <= 0:
        return 0.0
    ranks = np.arange(1, x.size + 1)
    return float(2.0 * np.sum(ranks * x) / (x.size * total) - (x.size + 1) / x.size)


def diagnose(samples, grad_norms, accept_rates, reasons=None, *,
             drawn: int = 0) -> AllocationDiagnostics:
    """Diagnostics of one allocation; ``reasons`` (per-prompt drop codes) fills ``dropped``."""
    n = np.asarray(samples, dtype=np.int64)
    total = int(n.sum())
    v = variance_proxy(n + drawn, grad_norms, accept_rates)
    u = variance_proxy(uniform_allocate(n.size, total) + drawn, grad_norms, accept_rates)
    if reasons is None:
        dropped = {name: 0 for name in DROP_REASONS.values()}
    else:
        codes = np.bincount(np.asarray(reasons, dtype=np.int64), minlength=len(DROP_REASONS) + 1)
        dropped = {name: int(codes[code]) for code, name in DROP_REASONS.items()}
    return AllocationDiagnostics(
        num_prompts=int(n.size),
        total_samples=total,
        num_allocated=int(np.count_nonzero(n)),
        dropped=dropped,
        variance_proxy=v,
        uniform_variance_proxy=u,
        variance_ratio=(v / u) if (v is not None and u) else None,
        n_min=int(n.min()) if n.size else 0,
        n_max=int(n.max()) if n.size else 0,
        n_mean=float(n.mean()) if n.size else 0.0,
        n_gini=gini(n),
    )
