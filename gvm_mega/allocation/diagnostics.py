"""What an allocation buys: the variance proxy against uniform, what was dropped, how skewed.

The variance proxy is ``sum_i c_i / n_i``, summed over the prompts that contribute to the
gradient (``n_i > 0``, ``p_i > 0``, ``G_i > 0``), with ``c_i`` set by how the loss weighs a
prompt's accepted samples (``algorithm.prompt_weight``):

- ``per-prompt`` (pooled or prompt-mean weights, the paper's): ``c_i = G_i^2 / p_i``. The
  mean over a prompt's accepted samples estimates the gradient of ``log p_i`` and its
  variance is ``G_i^2 / (n_i p_i)``; GVM's rule with ``alpha = 0`` minimises this proxy.
- ``per-draw`` (each sample weighs ``1/n_i``): ``c_i = p_i G_i^2``. The estimate of the
  gradient of ``p_i`` averages all ``n_i`` draws, of which a fraction ``p_i`` is non-zero;
  minimised by ``n_i ~ G_i sqrt(p_i)``, which the rule approaches for a large ``alpha`` at
  ``beta = 2``.

The uniform reference spreads the same total evenly over all prompts
(:func:`~gvm_mega.allocation.uniform.uniform_allocate`) and is summed the same way; a ratio
below 1 means the allocation is expected to give a less noisy gradient. The best ratio is
that of the continuous optimum over allocations of the same total that give every
contributing prompt a sample: no allocation rule can lower the variance further, so
``1 / best_variance_ratio`` is the most "effective samples per sample" that allocation can
buy on these statistics. With ``drawn`` (pre-samples trained on too) every proxy counts
``drawn + n_i`` samples per prompt.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

from gvm_mega.allocation.gvm import DROP_REASONS, validate_stats, water_fill
from gvm_mega.allocation.uniform import uniform_allocate

Weighting = Literal["per-prompt", "per-draw"]
WEIGHTINGS: tuple[str, ...] = ("per-prompt", "per-draw")


@dataclass(frozen=True)
class AllocationDiagnostics:
    num_prompts: int
    total_samples: int
    num_allocated: int                   # prompts with n_i > 0
    dropped: dict[str, int]              # prompts dropped by each rule
    variance_proxy: float | None         # None when no prompt contributes
    uniform_variance_proxy: float | None
    variance_ratio: float | None         # variance_proxy / uniform_variance_proxy
    best_variance_proxy: float | None    # the continuous optimum for the same total
    best_variance_ratio: float | None    # best_variance_proxy / uniform_variance_proxy
    weighting: str
    n_min: int
    n_max: int
    n_mean: float
    n_gini: float                        # 0: all equal; near 1: all samples on one prompt

    def to_dict(self) -> dict:
        return asdict(self)


def weighting_of(prompt_weight: str) -> Weighting:
    """The proxy that matches ``algorithm.prompt_weight``."""
    return "per-draw" if prompt_weight == "per-draw" else "per-prompt"


def _coefficients(grad_norms, accept_rates, weighting: str) -> np.ndarray:
    """``c_i`` of the proxy ``sum c_i / n_i``; 0 for prompts that do not contribute."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting {weighting!r}: expected one of {', '.join(WEIGHTINGS)}")
    g, p = validate_stats(grad_norms, accept_rates)
    use = (p > 0) & (g > 0)
    c = np.zeros_like(g)
    c[use] = g[use] ** 2 * (p[use] if weighting == "per-draw" else 1.0 / p[use])
    return c


def _proxy(n: np.ndarray, c: np.ndarray) -> float | None:
    use = (n > 0) & (c > 0)
    return float(np.sum(c[use] / n[use])) if use.any() else None


def variance_proxy(samples, grad_norms, accept_rates, *,
                   weighting: Weighting = "per-prompt") -> float | None:
    """``sum c_i / n_i`` over prompts with n, p and G all positive; None if there are none."""
    n = np.asarray(samples, dtype=np.float64)
    c = _coefficients(grad_norms, accept_rates, weighting)
    if n.shape != c.shape:
        raise ValueError(f"samples has {n.shape} entries but the statistics have {c.shape}")
    return _proxy(n, c)


def best_variance_proxy(total: float, grad_norms, accept_rates, *,
                        drawn: int | np.ndarray = 0,
                        weighting: Weighting = "per-prompt") -> float | None:
    """The lowest ``sum c_i / (drawn + n_i)`` over continuous ``n_i >= 0`` with
    ``sum n_i = total`` that give every contributing prompt a sample: ``drawn + n_i =
    max(drawn, lam sqrt(c_i))`` (water-filling). None when no prompt contributes, or when
    there are neither pre-samples nor new samples to spend."""
    c = _coefficients(grad_norms, accept_rates, weighting)
    use = c > 0
    d = np.broadcast_to(np.asarray(drawn, dtype=np.float64), c.shape)[use]
    if not use.any() or (total <= 0 and not d.any()):
        return None
    root = np.sqrt(c[use])
    totals = water_fill(root / root.max(), total + d.sum(), d, np.inf)
    return float(np.sum(c[use] / totals))


def gini(values) -> float:
    """Gini coefficient of non-negative values (0 for an empty or all-zero vector)."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    total = x.sum()
    if x.size == 0 or total <= 0:
        return 0.0
    ranks = np.arange(1, x.size + 1)
    return float(2.0 * np.sum(ranks * x) / (x.size * total) - (x.size + 1) / x.size)


def diagnose(samples, grad_norms, accept_rates, reasons=None, *,
             drawn: int | np.ndarray = 0,
             weighting: Weighting = "per-prompt") -> AllocationDiagnostics:
    """Diagnostics of one allocation; ``reasons`` (per-prompt drop codes) fills ``dropped``.
    ``drawn``: pre-samples trained on too, one number for every prompt or one per prompt;
    uniform sampling is compared at the same total, pre-samples included."""
    n = np.asarray(samples, dtype=np.int64)
    total = int(n.sum())
    d = np.broadcast_to(np.asarray(drawn, dtype=np.int64), n.shape)
    v = variance_proxy(n + d, grad_norms, accept_rates, weighting=weighting)
    u = variance_proxy(uniform_allocate(n.size, total + int(d.sum())), grad_norms,
                       accept_rates, weighting=weighting)
    best = best_variance_proxy(total, grad_norms, accept_rates, drawn=drawn,
                               weighting=weighting)
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
        best_variance_proxy=best,
        best_variance_ratio=(best / u) if (best is not None and u) else None,
        weighting=weighting,
        n_min=int(n.min()) if n.size else 0,
        n_max=int(n.max()) if n.size else 0,
        n_mean=float(n.mean()) if n.size else 0.0,
        n_gini=gini(n),
    )
