"""mean@k and pass@k over problems with n graded samples each.

pass@k uses the unbiased estimator of Chen et al. (2021): with n samples of which c are
correct, ``1 - C(n - c, k) / C(n, k)``, the probability that k samples drawn without
replacement from the n include a correct one. For k = n it is the plain "any correct" rate.
"""
from __future__ import annotations

from typing import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with ``n`` samples, ``c`` of them correct."""
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: correct count {c} outside [0, {n}]")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: k={k} must be in [1, n={n}]")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i), a product of terms in [0, 1).
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def default_ks(n: int) -> list[int]:
    """1, 2, 4, ... up to ``n``, and ``n`` itself."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """Mean pass@k over problems given as ``(n, c)`` pairs."""
    if not counts:
        raise ValueError("pass@k of no problems")
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)


def mean_at_k(counts: Sequence[tuple[int, int]]) -> float:
    """Mean accuracy over problems (each problem's correct fraction, averaged)."""
    if not counts:
        raise ValueError("mean@k of no problems")
    return sum(c / n for n, c in counts) / len(counts)
