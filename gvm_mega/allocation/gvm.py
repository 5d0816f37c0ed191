"""The GVM sample allocator: per-prompt statistics in, per-prompt sample counts out.

The rule (see DESIGN.md) gives prompt i a share of the budget N proportional to

    w_i = G_i / sqrt(p_i + alpha / p_i^(beta - 1))

which for ``alpha = 0`` minimises the gradient-variance proxy ``sum_i G_i^2 / (n_i p_i)``
subject to ``sum_i n_i = N``. Everything here is vectorised numpy so that a million prompts
take a few tens of milliseconds.

Order of the rules:

1. Prompts with ``p_i = 0`` or ``G_i = 0`` get nothing, as do prompts with
   ``p_i > filter_threshold``.
2. The budget is spread over the remaining prompts in proportion to ``w_i``, clipped to
   ``[min_samples, max_samples]`` by water-filling: a capped prompt's excess goes to the
   others in proportion to their weights, so the total stays N.
3. Prompts whose expected accepted count ``p_i * n_i`` (continuous ``n_i`` from step 2) is
   below ``filter_insufficient`` are dropped and step 2 is repeated on the rest. One pass
   suffices: removing prompts can only raise the survivors' shares, so no survivor falls
   below the bar afterwards.
4. Largest-remainder rounding turns the continuous shares into integers with the exact
   total, never crossing the floor or the cap; ties go to the lower index.

With ``drawn > 0`` (stage-1 samples that are also trained on) each prompt's gradient comes
from ``drawn + n_i`` samples, so the rule sets those totals instead: minimising
``sum_i G_i^2 / ((drawn + n_i) p_i)`` gives ``drawn + n_i = max(drawn, lam * w_i)``, and a
prompt whose pre-samples already exceed its share gets no more. It is step 2's water-filling
on the totals, floored at ``drawn + min_samples``; budgets, caps and filters still speak of
the new samples ``n_i``. ``drawn`` may also be given per prompt (a prompt whose estimates come
from earlier visits alone has no pre-samples this time).

Caps that cannot be met (more budget than ``max_samples`` times the number of eligible
prompts, or less than ``min_samples`` times it) raise :class:`InfeasibleAllocationError`
rather than silently returning a different total. No eligible prompt at all, or a budget of
0, is not an error: the result is all zeros.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

# Why a prompt got no samples. KEPT prompts are eligible (they may still round to 0 when
# min_samples is 0 and their share is below one sample).
KEPT = 0
ZERO_ACCEPT = 1
ZERO_GRAD = 2
FILTER_THRESHOLD = 3
FILTER_INSUFFICIENT = 4
DROP_REASONS = {
    ZERO_ACCEPT: "zero_accept_rate",
    ZERO_GRAD: "zero_grad_norm",
    FILTER_THRESHOLD: "filter_threshold",
    FILTER_INSUFFICIENT: "filter_insufficient",
}


class InfeasibleAllocationError(ValueError):
    """The budget cannot be met within ``[min_samples, max_samples]`` per eligible prompt."""


@dataclass(frozen=True)
class AllocationResult:
    """An allocation with the information diagnostics need."""

    samples: np.ndarray        # int64, sums to the budget when any prompt is eligible
    reasons: np.ndarray        # int8 per prompt: KEPT or one of the DROP_REASONS codes
    continuous: np.ndarray     # float64 shares before rounding (0 for dropped prompts)

    def dropped_counts(self) -> dict[str, int]:
        counts = np.bincount(self.reasons.astype(np.int64), minlength=len(DROP_REASONS) + 1)
        return {name: int(counts[code]) for code, name in DROP_REASONS.items()}


def allocate(grad_norms, accept_rates, budget: int, *, alpha: float = 1e-3, beta: float = 2.0,
             filter_threshold: float | None = None, filter_insufficient: float | None = None,
             min_samples: int = 0, max_samples: int | None = None,
             drawn: int | np.ndarray = 0) -> np.ndarray:
    """Per-prompt sample counts (int64) summing to ``budget``; see the module docstring."""
    return allocate_detailed(
        grad_norms, accept_rates, budget, alpha=alpha, beta=beta,
        filter_threshold=filter_threshold, filter_insufficient=filter_insufficient,
        min_samples=min_samples, max_samples=max_samples, drawn=drawn).samples


def allocate_detailed(grad_norms, accept_rates, budget: int, *, alpha: float = 1e-3,
                      beta: float = 2.0, filter_threshold: float | None = None,
                      filter_insufficient: float | None = None, min_samples: int = 0,
                      max_samples: int | None = None,
                      drawn: int | np.ndarray = 0) -> AllocationResult:
    """:func:`allocate`, also returning why each prompt was dropped and the continuous shares."""
    g, p = validate_stats(grad_norms, accept_rates)
    budget = _check_int("budget", budget, minimum=0)
    min_samples = _check_int("min_samples", min_samples, minimum=0)
    drawn = _check_drawn(drawn, g.shape[0])
    if max_samples is not None:
        max_samples = _check_int("max_samples", max_samples, minimum=1)
        if max_samples < min_samples:
            raise ValueError(f"max_samples ({max_samples}) is below min_samples ({min_samples})")
    alpha = _check_float("alpha", alpha, minimum=0.0)
    beta = _check_float("beta", beta)
    if filter_threshold is not None:
        filter_threshold = _check_float("filter_threshold", filter_threshold, minimum=0.0)
        if filter_threshold > 1:
            raise ValueError(f"filter_threshold must be in [0, 1], got {filter_threshold}")
    if filter_insufficient is not None:
        filter_insufficient = _check_float("filter_insufficient", filter_insufficient,
                                           minimum=0.0)

    m = g.shape[0]
    reasons = np.zeros(m, dtype=np.int8)
    reasons[g == 0] = ZERO_GRAD
    reasons[p == 0] = ZERO_ACCEPT
    if filter_threshold is not None:
        reasons[(reasons == KEPT) & (p > filter_threshold)] = FILTER_THRESHOLD
    samples = np.zeros(m, dtype=np.int64)
    continuous = np.zeros(m, dtype=np.float64)
    eligible = np.flatnonzero(reasons == KEPT)
    if eligible.size == 0 or budget == 0:
        return AllocationResult(samples, reasons, continuous)

    weights = gvm_weights(g[eligible], p[eligible], alpha=alpha, beta=beta)
    hi = math.inf if max_samples is None else float(max_samples)
    _check_feasible(eligible.size, budget, min_samples, max_samples, after="")
    shares = _new_shares(weights, budget, float(min_samples), hi, _at(drawn, eligible))

    if filter_insufficient is not None and filter_insufficient > 0:
        short = p[eligible] * shares < filter_insufficient
        if short.any():
            reasons[eligible[short]] = FILTER_INSUFFICIENT
            eligible, weights = eligible[~short], weights[~short]
            if eligible.size == 0:
                return AllocationResult(samples, reasons, continuous)
            _check_feasible(eligible.size, budget, min_samples, max_samples,
                            after=" left after filter_insufficient")
            shares = _new_shares(weights, budget, float(min_samples), hi, _at(drawn, eligible))

    samples[eligible] = round_preserving_total(shares, budget, min_samples, max_samples)
    continuous[eligible] = shares
    return AllocationResult(samples, reasons, continuous)


def _new_shares(weights: np.ndarray, budget: int, lo: float, hi: float,
                drawn) -> np.ndarray:
    """Continuous new samples per prompt: the rule applied to ``drawn + n_i``."""
    if not np.any(drawn):
        return water_fill(weights, budget, lo, hi)
    extra = float(np.sum(np.broadcast_to(drawn, weights.shape)))
    totals = water_fill(weights, budget + extra, lo + drawn, hi + drawn)
    return np.clip(totals - drawn, lo, hi)


def _check_drawn(drawn, m: int):
    """``drawn`` as a non-negative int, or a per-prompt int64 array of length ``m``."""
    if np.ndim(drawn) == 0:
        return _check_int("drawn", drawn, minimum=0)
    arr = np.asarray(drawn)
    if arr.shape != (m,) or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"drawn must be an integer or {m} integers (one per prompt), "
                         f"got shape {arr.shape} and dtype {arr.dtype}")
    if (arr < 0).any():
        raise ValueError(f"drawn must be >= 0, got {int(arr.min())} for prompt "
                         f"{int(np.argmin(arr))}")
    return arr.astype(np.int64)


def _at(drawn, rows: np.ndarray):
    """The pre-sample counts of the prompts in ``rows``."""
    return drawn if np.ndim(drawn) == 0 else drawn[rows]


def gvm_weights(grad_norms: np.ndarray, accept_rates: np.ndarray, *, alpha: float,
                beta: float) -> np.ndarray:
    """``G / sqrt(p + alpha / p^(beta-1))`` for positive G and p, scaled so the largest is 1.

    Computed in log space (the allocation only needs ratios), so huge norms or tiny rates do
    not overflow; weights are floored at 1e-250 so that every eligible prompt keeps a
    positive, if negligible, weight.
    """
    log_p = np.log(accept_rates)
    if alpha:
        log_denom = np.logaddexp(log_p, math.log(alpha) + (1.0 - beta) * log_p)
    else:
        log_denom = log_p
    log_w = np.log(grad_norms) - 0.5 * log_denom
    return np.maximum(np.exp(log_w - log_w.max()), 1e-250)


def water_fill(weights: np.ndarray, total: float, lo, hi) -> np.ndarray:
    """Shares ``x_i = clip(lam * w_i, lo_i, hi_i)`` with ``sum x_i = total``.

    ``lo`` and ``hi`` are numbers or per-prompt arrays (``hi`` may be infinite). The sum is
    nondecreasing and piecewise linear in ``lam``, with breakpoints where a prompt leaves its
    floor (``lo_i / w_i``) or reaches its cap (``hi_i / w_i``); prefix sums over the sorted
    breakpoints give its value at every one of them, which finds the linear piece holding
    ``total``, then solved exactly. Requires ``sum lo <= total <= sum hi``; a zero weight
    keeps its prompt at its floor.
    """
    w = np.asarray(weights, dtype=np.float64)
    k = w.shape[0]
    lo_v = np.broadcast_to(np.asarray(lo, dtype=np.float64), (k,))
    hi_v = np.broadcast_to(np.asarray(hi, dtype=np.float64), (k,))
    floor_sum = float(lo_v.sum())
    if not (lo_v.any() or np.isfinite(hi_v).any()) and w.sum() > 0:
        return w * (total / w.sum())
    if total <= floor_sum:
        return lo_v.copy()
    if total >= hi_v.sum():
        return hi_v.copy()
    moving = w > 0
    wm, lm, hm = w[moving], lo_v[moving], hi_v[moving]
    leave, reach = lm / wm, hm / wm                    # lam where each leaves lo, reaches hi
    ia, ib = np.argsort(leave, kind="stable"), np.argsort(reach, kind="stable")
    leave_s, reach_s = leave[ia], reach[ib]
    zero = np.zeros(1)
    w_left = np.concatenate((zero, np.cumsum(wm[ia])))   # weight of prompts off their floor
    lo_left = np.concatenate((zero, np.cumsum(lm[ia])))  # and the floors they left
    finite = np.isfinite(reach_s)
    w_cap = np.concatenate((zero, np.cumsum(np.where(finite, wm[ib], 0.0))))
    hi_cap = np.concatenate((zero, np.cumsum(np.where(finite, hm[ib], 0.0))))

    def piece(lam: np.ndarray):
        """(fixed part, slope) of the sum on the piece holding each ``lam``."""
        off = np.searchsorted(leave_s, lam, side="right")   # lam * w >= lo
        cap = np.searchsorted(reach_s, lam, side="left")    # lam * w >= hi (strictly past)
        fixed = floor_sum - lo_left[off] + hi_cap[cap]
        return fixed, w_left[off] - w_cap[cap]

    lams = np.unique(np.concatenate((leave_s, reach_s[finite])))
    fixed, slope = piece(lams)
    values = np.maximum.accumulate(fixed + lams * slope)  # monotone despite rounding
    j = int(np.searchsorted(values, total, side="left"))  # first breakpoint with value >= total
    if j < lams.size and values[j] == total:
        lam = lams[j]
    else:
        left = lams[j - 1] if j > 0 else 0.0
        right = lams[j] if j < lams.size else math.inf
        inside = (left + right) / 2 if math.isfinite(right) else 2 * left + 1.0
        f1, s1 = (a[0] for a in piece(np.array([inside])))
        lam = (total - f1) / s1 if s1 > 0 else right
    shares = np.clip(lam * w, lo_v, hi_v)
    if abs(shares.sum() - total) <= 1e-9 * max(total, 1.0):
        return shares
    # Weights many orders of magnitude apart (a prompt with p near 0 next to ordinary ones)
    # make the prefix-sum differences cancel: find lam on the exact sum instead.
    return _bisect_fill(w, total, lo_v, hi_v)


def _bisect_fill(w: np.ndarray, total: float, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``water_fill`` by bisection on ``lam`` (geometric midpoints: lam may span 1e-300 to
    1e300); slower than the breakpoint solve but free of cancellation."""
    def filled(lam: float) -> float:
        return float(np.clip(lam * w, lo, hi).sum())

    low, high = 0.0, 1.0
    while filled(high) < total and high < 1e300:
        high *= 1e4
    for _ in range(2000):
        if low > 0:  # the root of each: low * high itself overflows past 1e308
            mid = math.sqrt(low) * math.sqrt(high)
        else:
            mid = high / 1e4 if high > 1e-290 else high / 2
        if not low < mid < high:
            break
        if filled(mid) < total:
            low = mid
        else:
            high = mid
    return np.clip(high * w, lo, hi)


def round_preserving_total(shares: np.ndarray, total: int, lo: int = 0,
                           hi: int | None = None) -> np.ndarray:
    """Largest-remainder rounding of ``shares`` to integers in ``[lo, hi]`` summing to ``total``.

    Each prompt gets ``floor(share)`` plus one for the ``total - sum(floor)`` largest
    fractional parts (ties: lower index first), so every count is within one of its share.
    """
    hi_v = np.iinfo(np.int64).max if hi is None else hi
    base = np.clip(np.floor(shares), lo, hi_v).astype(np.int64)
    rest = total - int(base.sum())
    frac = shares - base
    if rest > 0:
        room = np.flatnonzero(base < hi_v)
        if rest > room.size:
            raise InfeasibleAllocationError(f"cannot place {total} samples under the cap {hi}")
        base[room[top_k(frac[room], rest)]] += 1
    elif rest < 0:
        room = np.flatnonzero(base > lo)
        if -rest > room.size:
            raise InfeasibleAllocationError(f"cannot fit {total} samples above the floor {lo}")
        base[room[top_k(-frac[room], -rest)]] -= 1
    return base


def top_k(keys: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest keys, ties broken by lower index; O(n), deterministic."""
    n = keys.shape[0]
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    if k >= n:
        return np.arange(n)
    kth = np.partition(keys, n - k)[n - k]
    above = np.flatnonzero(keys > kth)
    tied = np.flatnonzero(keys == kth)[: k - above.size]
    return np.concatenate((above, tied))


def validate_stats(grad_norms, accept_rates) -> tuple[np.ndarray, np.ndarray]:
    """Both as 1-D float64 arrays of equal length; ValueError naming the first bad entry."""
    g = _as_vector("grad_norms", grad_norms)
    p = _as_vector("accept_rates", accept_rates)
    if g.shape != p.shape:
        raise ValueError(f"grad_norms has {g.shape[0]} entries but accept_rates has "
                         f"{p.shape[0]}")
    _first_bad("grad_norms", g, g < 0, "is negative")
    _first_bad("accept_rates", p, (p < 0) | (p > 1), "is outside [0, 1]")
    return g, p


def _as_vector(name: str, values) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be numbers: {exc}") from None
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    _first_bad(name, arr, ~np.isfinite(arr), "is not finite")
    return arr


def _first_bad(name: str, arr: np.ndarray, bad: np.ndarray, problem: str) -> None:
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{name}[{i}] = {float(arr[i])} {problem} "
                         f"({int(bad.sum())} bad entries in all)")


def _check_int(name: str, value, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_float(name: str, value, *, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return float(value)


def _check_feasible(k: int, budget: int, lo: int, hi: int | None, *, after: str) -> None:
    if hi is not None and budget > k * hi:
        raise InfeasibleAllocationError(
            f"budget {budget} exceeds max_samples={hi} x {k} eligible prompts{after} "
            f"= {k * hi}; raise max_samples or lower the budget")
    if budget < k * lo:
        raise InfeasibleAllocationError(
            f"budget {budget} is below min_samples={lo} x {k} eligible prompts{after} "
            f"= {k * lo}; lower min_samples or raise the budget")
