"""The GVM allocation rule, uniform allocation, strategy selection and diagnostics."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from _allocation_helpers import positive_stats, prompt_stats
from gvm_mega.allocation import (
    DROP_REASONS,
    GVMAllocator,
    InfeasibleAllocationError,
    UniformAllocator,
    allocate,
    allocate_detailed,
    best_variance_proxy,
    diagnose,
    gini,
    make_allocator,
    uniform_allocate,
    variance_proxy,
)
from gvm_mega.allocation.gvm import (
    FILTER_INSUFFICIENT,
    FILTER_THRESHOLD,
    KEPT,
    ZERO_ACCEPT,
    ZERO_GRAD,
    gvm_weights,
    round_preserving_total,
    water_fill,
)
from gvm_mega.config import load_config

PROPS = settings(max_examples=60, deadline=None)
budgets = st.integers(0, 3000)


def _weights(g, p, alpha, beta=2.0):
    """The rule written out per prompt for beta = 2: G / sqrt(p) without the regulariser,
    else G sqrt(p) / sqrt(p^2 + alpha), which is G / sqrt(p + alpha / p) without overflow."""
    assert beta == 2.0

    def one(gi, pi):
        if gi == 0 or pi == 0:
            return 0.0
        if alpha == 0:
            return gi / math.sqrt(pi)
        return gi * math.sqrt(pi) / math.sqrt(pi * pi + alpha)
    return np.array([one(gi, pi) for gi, pi in zip(g, p)])


# --- exact budget and zeros ---------------------------------------------------------------

@PROPS
@given(prompt_stats(), budgets, st.sampled_from([0.0, 1e-3, 0.1]))
def test_total_is_exactly_the_budget_and_zeros_where_required(stats, budget, alpha):
    g, p = stats
    n = allocate(g, p, budget, alpha=alpha)
    assert n.dtype == np.int64 and n.shape == g.shape and (n >= 0).all()
    eligible = (g > 0) & (p > 0)
    assert n.sum() == (budget if eligible.any() else 0)
    assert (n[~eligible] == 0).all()
    # each count is within one sample of the proportional share
    if eligible.any():
        w = _weights(g, p, alpha, 2.0)
        share = budget * w / w.sum()
        assert np.all(np.abs(n - share) < 1 + 1e-9)


@PROPS
@given(prompt_stats(), budgets, st.floats(0.0, 1.0), st.floats(0.0, 5.0))
def test_filters_drop_exactly_the_prompts_the_rules_name(stats, budget, threshold, insufficient):
    g, p = stats
    res = allocate_detailed(g, p, budget, filter_threshold=threshold,
                            filter_insufficient=insufficient)
    n, why = res.samples, res.reasons
    assert (n[(p > threshold) | (p == 0) | (g == 0)] == 0).all()
    assert ((why == ZERO_ACCEPT) == (p == 0)).all()
    assert ((why == ZERO_GRAD) == ((g == 0) & (p > 0))).all()
    assert ((why == FILTER_THRESHOLD) == ((g > 0) & (p > threshold))).all()
    # filter_insufficient, re-derived: proportional shares over the prompts left by the
    # other rules; those with p * share below the bar go.
    first = (g > 0) & (p > 0) & (p <= threshold)
    if budget > 0 and first.any():
        w = _weights(g, p, 1e-3, 2.0) * first
        share = budget * w / w.sum()
        short = first & (p * share < insufficient)
        assert ((why == FILTER_INSUFFICIENT) == short).all()
        kept = first & ~short
        assert ((why == KEPT) == kept).all()
        assert n.sum() == (budget if kept.any() else 0)
        assert (n[~kept] == 0).all()
    assert sum(res.dropped_counts().values()) == int((why != KEPT).sum())


def test_filter_insufficient_needs_a_single_pass():
    # Dropping prompt 2 raises the others' shares, so nothing else falls below the bar.
    g = np.array([1.0, 1.0, 1.0])
    p = np.array([0.5, 0.5, 0.01])
    res = allocate_detailed(g, p, 30, alpha=0.0, filter_insufficient=1.0)
    assert res.samples.tolist() == [15, 15, 0]
    assert res.dropped_counts()["filter_insufficient"] == 1


def test_no_eligible_prompt_gives_all_zeros():
    assert allocate([0.0, 2.0], [0.5, 0.0], 10).tolist() == [0, 0]
    assert allocate([1.0, 2.0], [0.9, 1.0], 10, filter_threshold=0.5).tolist() == [0, 0]
    assert allocate([], [], 10).tolist() == []
    assert allocate([1.0, 2.0], [0.5, 0.5], 0).tolist() == [0, 0]


def test_worked_example():
    # alpha = 0: n ~ G / sqrt(p) = [2, 2, 4] / 8 * 16
    n = allocate([1.0, 1.0, 1.0], [0.25, 0.25, 1 / 16], 16, alpha=0.0)
    assert n.tolist() == [4, 4, 8]
    # paper defaults: w = G / sqrt(p + 1e-3 / p)
    n = allocate([1.0, 2.0], [0.5, 0.5], 9)
    assert n.tolist() == [3, 6]


# --- reused stage-1 samples counted (drawn > 0) ------------------------------------------

def test_drawn_samples_count_toward_the_rule():
    # alpha = 0, w ~ [4, 2, 1]; 8 pre-samples each and 8 new: the totals 8 + n_i follow
    # lam * w floored at 8, so lam = 4 gives [16, 8, 8] and every new sample goes to the first
    n = allocate([1.0, 1.0, 1.0], [1 / 16, 0.25, 1.0], 8, alpha=0.0, drawn=8)
    assert n.tolist() == [8, 0, 0]
    # without counting them the new samples alone follow w: [4.57, 2.29, 1.14]
    assert allocate([1.0, 1.0, 1.0], [1 / 16, 0.25, 1.0], 8, alpha=0.0).tolist() == [5, 2, 1]
    # a budget that lifts every total above the floor: totals 2 + n_i = 7 w = [28, 14, 7]
    res = allocate_detailed([1.0, 1.0, 1.0], [1 / 16, 0.25, 1.0], 43, alpha=0.0, drawn=2)
    assert res.samples.tolist() == [26, 12, 5]
    assert res.continuous == pytest.approx([26.0, 12.0, 5.0])


@PROPS
@given(positive_stats(), st.integers(0, 400), st.integers(1, 16), st.sampled_from([None, 20]))
def test_drawn_shares_minimise_the_variance_of_the_totals(stats, budget, drawn, cap):
    """KKT conditions of min sum G^2 / ((drawn + n) p) over n >= 0, n <= cap, sum n = budget:
    every prompt strictly inside its bounds has the same (drawn + n_i) / w_i = lam; one at 0
    has drawn / w_i >= lam, one at the cap has (drawn + cap) / w_i <= lam."""
    g, p = stats
    assume(cap is None or budget <= cap * g.size)
    res = allocate_detailed(g, p, budget, alpha=0.0, drawn=drawn, max_samples=cap)
    x = res.continuous
    assert res.samples.sum() == budget and (res.samples >= 0).all()
    assert x.sum() == pytest.approx(budget, abs=1e-6)
    assert (np.abs(res.samples - x) < 1).all()
    w = g / np.sqrt(p)
    ratio = (drawn + x) / w
    tol = 1e-7 * (1 + budget + drawn)
    inside = (x > tol) if cap is None else (x > tol) & (x < cap - tol)
    if inside.any():
        lam = ratio[inside].mean()
        assert ratio[inside] == pytest.approx(lam, rel=1e-6)
        assert (drawn / w[x <= tol] >= lam * (1 - 1e-6)).all()
        if cap is not None:
            assert ((drawn + cap) / w[x >= cap - tol] <= lam * (1 + 1e-6)).all()


@PROPS
@given(prompt_stats(), st.integers(0, 3000), st.integers(0, 8))
def test_drawn_keeps_the_budget_and_the_zeros(stats, budget, drawn):
    g, p = stats
    res = allocate_detailed(g, p, budget, drawn=drawn)
    n = res.samples
    eligible = (g > 0) & (p > 0)
    assert (n[~eligible] == 0).all()
    assert n.sum() == (budget if eligible.any() else 0)
    assert np.array_equal(allocate(g, p, budget, drawn=0), allocate(g, p, budget))


def test_count_stage1_config():
    cfg = load_config(None, ["gvm.reuse_stage1=true", "gvm.count_stage1=true",
                             "gvm.presample_n=6"])
    assert make_allocator(cfg).drawn == 6
    assert make_allocator(load_config(None, ["gvm.reuse_stage1=true"])).drawn == 0
    with pytest.raises(Exception, match="'gvm.count_stage1'.*needs 'gvm.reuse_stage1'"):
        load_config(None, ["gvm.count_stage1=true"])


# --- caps, floors and feasibility ---------------------------------------------------------

@PROPS
@given(prompt_stats(), st.integers(0, 3), st.integers(1, 60), st.integers(0, 3000))
def test_caps_are_respected_and_the_budget_still_met(stats, lo, hi, budget):
    g, p = stats
    assume(hi >= lo)
    k = int(((g > 0) & (p > 0)).sum())
    if k and budget and not k * lo <= budget <= k * hi:
        with pytest.raises(InfeasibleAllocationError):
            allocate(g, p, budget, min_samples=lo, max_samples=hi)
        return
    res = allocate_detailed(g, p, budget, min_samples=lo, max_samples=hi)
    n, kept = res.samples, res.reasons == KEPT
    assert n.sum() == (budget if k else 0)
    if budget and k:
        assert (n[kept] >= lo).all() and (n[kept] <= hi).all()
        # the continuous shares are a water-filling: clip(lam * w, lo, hi) for one lam
        x, w = res.continuous[kept], _weights(g, p, 1e-3, 2.0)[kept]
        assert abs(x.sum() - budget) < 1e-6 * budget
        assert np.all(np.abs(n[kept] - x) < 1 + 1e-9)
        free = (x > lo) & (x < hi)  # clipping sets floored and capped shares exactly
        if free.any():
            lam = np.median(x[free] / w[free])
            assert np.allclose(x[free] / w[free], lam, rtol=1e-6)
            assert np.all(lam * w[x == hi] >= hi * (1 - 1e-6))
            assert np.all(lam * w[x == lo] <= lo * (1 + 1e-6))


@pytest.mark.parametrize("p_tiny, hi, budget", [(1.4e-42, 7, 37), (4.6e-69, 7, 29),
                                                 (4.6e-69, 5, 21), (4.94e-324, 50, 251)])
def test_a_near_zero_rate_beside_capped_prompts_still_meets_the_budget(p_tiny, hi, budget):
    """Weights 1e20 apart used to cancel in the breakpoint solve: over-allocation (25 of 21)
    or a spurious InfeasibleAllocationError; weights 1e161 apart overflowed the fallback
    bisection's midpoint (1e160 x 1e164) and gave every prompt its cap."""
    g = np.array([1.0, 0.0, 1.0, 1.0, 1.0, 1.5, 1.0, 0.0, 0.0])
    p = np.array([0.125, 0.0, 0.125, 0.125, 0.125, 0.125, p_tiny, 0.0, 0.0])
    res = allocate_detailed(g, p, budget, max_samples=hi)
    kept = res.reasons == KEPT
    assert res.samples.sum() == budget and res.samples.max() <= hi
    assert abs(res.continuous[kept].sum() - budget) < 1e-6 * budget
    # the near-zero prompt gets only what the others' caps leave over
    assert res.samples[6] == max(budget - 5 * hi, 0)
    x = water_fill(np.array([1.0, 1.0, 1e-30]), 2.5, 0.0, 1.0)
    assert x.tolist() == pytest.approx([1.0, 1.0, 0.5])


def test_cap_excess_is_redistributed_in_proportion():
    # uncapped: [60, 20, 20]; cap 30 moves 30 to the others in proportion 1:1
    n = allocate([3.0, 1.0, 1.0], [1.0, 1.0, 1.0], 100, alpha=0.0, max_samples=40)
    assert n.tolist() == [40, 30, 30]
    n = allocate([3.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], 100, alpha=0.0, min_samples=25)
    assert n.tolist() == [50, 25, 25, 0]


def test_infeasible_caps_raise_with_the_numbers():
    with pytest.raises(InfeasibleAllocationError, match=r"max_samples=3 x 2 eligible.*= 6"):
        allocate([1.0, 1.0, 1.0], [0.5, 0.5, 0.0], 10, max_samples=3)
    with pytest.raises(InfeasibleAllocationError, match=r"min_samples=4 x 3 eligible"):
        allocate([1.0, 1.0, 1.0], [0.5, 0.5, 0.5], 10, min_samples=4)
    with pytest.raises(InfeasibleAllocationError, match="left after filter_insufficient"):
        allocate([1.0, 1.0, 1.0], [0.5, 0.5, 0.01], 30, alpha=0.0, filter_insufficient=1.0,
                 max_samples=10)
    # exactly at the bound is fine
    assert allocate([1.0, 5.0], [0.5, 0.5], 6, max_samples=3).tolist() == [3, 3]


def test_water_fill_with_per_prompt_floors_and_caps():
    """Per-prompt bounds (what pre-samples drawn for some prompts only need): the shares sum to
    the total, stay within each prompt's bounds, and every prompt strictly inside its bounds
    has the same share per unit weight, which no clipped prompt would exceed (floored) or
    fall short of (capped)."""
    x = water_fill(np.array([1.0, 2.0, 3.0, 4.0]), 14.0, np.array([0.0, 2.0, 0.0, 2.0]), np.inf)
    assert np.allclose(x, [1.4, 2.8, 4.2, 5.6])
    x = water_fill(np.array([1.0, 1.0, 1.0]), 7.0, np.array([0.0, 4.0, 0.0]), np.inf)
    assert np.allclose(x, [1.5, 4.0, 1.5])  # the floored prompt keeps its pre-samples
    rng = np.random.default_rng(0)
    for _ in range(300):
        k = int(rng.integers(1, 12))
        w = rng.uniform(0.01, 1.0, k) * rng.choice([1.0, 1e-6], k, p=[0.8, 0.2])
        lo = rng.choice([0.0, 2.0, 3.0], k)
        hi = np.where(rng.random(k) < 0.3, np.inf, lo + rng.integers(1, 8, k))
        top = hi.sum() if np.isfinite(hi).all() else lo.sum() + 50
        total = float(rng.uniform(lo.sum(), top))
        x = water_fill(w, total, lo, hi)
        assert x.sum() == pytest.approx(total, rel=1e-7)
        assert (x >= lo - 1e-9).all() and (x <= hi + 1e-9).all()
        ratio = x / w
        free = (x > lo + 1e-7) & (x < hi - 1e-7)
        if free.any():
            lam = ratio[free].mean()
            assert np.allclose(ratio[free], lam, rtol=1e-6)
            assert (ratio[np.isclose(x, lo) & ~free] >= lam * (1 - 1e-6)).all()
            assert (ratio[np.isclose(x, hi) & ~free] <= lam * (1 + 1e-6)).all()


def test_per_prompt_drawn_counts_only_the_pre_samples_each_prompt_has():
    """A prompt allocated from earlier visits (drawn 0) is topped up from zero, the others from
    their N' = 2; equal counts per prompt give what one number gives; bad counts are named."""
    g, p = [1.0, 1.0, 1.0, 1.0], [0.5] * 4
    r = allocate_detailed(g, p, 8, alpha=0.0, drawn=np.array([2, 2, 0, 0]))
    assert r.samples.tolist() == [1, 1, 3, 3]  # totals 3 each: the budget evens them out
    g = [1.0, 2.0, 3.0, 4.0]
    same = allocate_detailed(g, p, 10, alpha=0.0, max_samples=4, drawn=np.array([2] * 4))
    one = allocate_detailed(g, p, 10, alpha=0.0, max_samples=4, drawn=2)
    assert same.samples.tolist() == one.samples.tolist()
    assert np.allclose(same.continuous, one.continuous)
    with pytest.raises(ValueError, match="drawn must be an integer or 4 integers"):
        allocate(g, p, 10, drawn=np.array([2, 2]))
    with pytest.raises(ValueError, match="drawn must be >= 0, got -1 for prompt 1"):
        allocate(g, p, 10, drawn=np.array([2, -1, 2, 2]))
    diag = diagnose(same.samples, g, p, drawn=np.array([2] * 4))
    assert diag.variance_ratio == pytest.approx(diagnose(same.samples, g, p, drawn=2).variance_ratio)


def test_water_fill_and_rounding_directly():
    x = water_fill(np.array([1.0, 2.0, 7.0]), 20.0, 3.0, 8.0)
    assert np.allclose(x, [4.0, 8.0, 8.0])  # lam = 4: 1 * 4 free, 2 * 4 and 7 * 4 capped
    x = water_fill(np.array([1.0, 2.0, 7.0]), 16.0, 3.0, 8.0)
    assert np.allclose(x, [3.0, 5.0, 8.0])  # lam = 2.5: floored, free, capped
    n = round_preserving_total(np.array([0.5, 0.5, 0.5, 1.5]), 3)
    assert n.tolist() == [1, 1, 0, 1]  # ties go to the lower index
    n = round_preserving_total(np.array([2.0, 1.9999999, 1.0000001]), 5, lo=1, hi=2)
    assert n.tolist() == [2, 2, 1]


# --- monotonicity, determinism, optimality ------------------------------------------------

@PROPS
@given(positive_stats(min_size=2), st.integers(1, 2000), st.data(),
       st.floats(1.01, 10.0), st.sampled_from([None, 40]))
def test_monotone_in_grad_norm(stats, budget, data, factor, cap):
    g, p = stats
    assume(cap is None or budget <= cap * g.size)
    i = data.draw(st.integers(0, g.size - 1))
    g2 = g.copy()
    g2[i] *= factor
    a = allocate(g, p, budget, max_samples=cap)
    b = allocate(g2, p, budget, max_samples=cap)
    assert b[i] >= a[i]


@PROPS
@given(positive_stats(min_size=2, p_min=0.05), st.integers(1, 2000), st.data(),
       st.sampled_from([0.0, 1e-3]))
def test_monotone_in_accept_rate_for_small_alpha(stats, budget, data, alpha):
    # With beta = 2 the weight G / sqrt(p + alpha / p) falls with p for p > sqrt(alpha)
    # (0.032 for the paper's alpha), so more accepted means fewer samples.
    g, p = stats
    i = data.draw(st.integers(0, g.size - 1))
    p2 = p.copy()
    p2[i] = data.draw(st.floats(p[i], 1.0))
    assert allocate(g, p2, budget, alpha=alpha)[i] <= allocate(g, p, budget, alpha=alpha)[i]


@PROPS
@given(prompt_stats(), budgets, st.sampled_from([None, 50]))
def test_deterministic_and_inputs_untouched(stats, budget, cap):
    g, p = stats
    k = int(((g > 0) & (p > 0)).sum())
    assume(cap is None or budget <= cap * k)
    g0, p0 = g.copy(), p.copy()
    a = allocate(g, p, budget, max_samples=cap)
    b = allocate(list(g), list(p), budget, max_samples=cap)
    assert np.array_equal(a, b)
    assert np.array_equal(g, g0) and np.array_equal(p, p0)


@PROPS
@given(positive_stats(), st.integers(0, 500))
def test_variance_proxy_within_rounding_of_the_continuous_optimum(stats, extra):
    """Integer allocation vs the continuous minimiser of V(n) = sum G^2 / (n p), sum n = N.

    The optimum is x_i = N s_i / S with s_i = G_i / sqrt(p_i), S = sum s, V* = S^2 / N.
    Writing n_i = x_i + d_i (sum d = 0), and using c_i / x_i^2 = V* / N for c_i = G_i^2 / p_i,
        V(n) - V* = sum c_i (1/n_i - 1/x_i) = sum c_i d_i^2 / (x_i^2 n_i) = (V*/N) sum d_i^2/n_i
    exactly (the first-order term is -(V*/N) sum d_i = 0). Largest-remainder rounding keeps
    |d_i| < 1, so 0 <= V(n) / V* - 1 < (1/N) sum 1/n_i. N is chosen so that every x_i >= 1,
    hence every n_i >= 1 and V(n) is finite.
    """
    g, p = stats
    s = g / np.sqrt(p)
    budget = int(math.ceil(s.sum() / s.min())) + extra
    n = allocate(g, p, budget, alpha=0.0)
    assert (n >= 1).all()
    v = float(np.sum(g ** 2 / (n * p)))
    v_star = s.sum() ** 2 / budget
    bound = float(np.sum(1.0 / n)) / budget
    assert v >= v_star * (1 - 1e-9)
    assert v / v_star - 1 <= bound + 1e-9
    d = n - budget * s / s.sum()
    assert v == pytest.approx(v_star * (1 + np.sum(d ** 2 / n) / budget), rel=1e-9)
    assert variance_proxy(n, g, p) == pytest.approx(v)


# --- validation ---------------------------------------------------------------------------

@pytest.mark.parametrize("g, p, budget, kwargs, match", [
    ([1.0, 2.0], [0.5], 4, {}, "grad_norms has 2 entries but accept_rates has 1"),
    ([[1.0]], [[0.5]], 4, {}, "one-dimensional"),
    ([1.0, float("nan")], [0.5, 0.5], 4, {}, r"grad_norms\[1\] = nan is not finite"),
    ([1.0, 1.0], [0.5, float("inf")], 4, {}, r"accept_rates\[1\] = inf is not finite"),
    ([1.0, -2.0], [0.5, 0.5], 4, {}, r"grad_norms\[1\] = -2.0 is negative"),
    ([1.0, 1.0], [1.5, 0.5], 4, {}, r"accept_rates\[0\] = 1.5 is outside \[0, 1\]"),
    ([1.0, 1.0], [-0.1, 0.5], 4, {}, r"accept_rates\[0\] = -0.1 is outside"),
    (["a"], [0.5], 4, {}, "grad_norms must be numbers"),
    ([1.0], [0.5], -1, {}, "budget must be >= 0"),
    ([1.0], [0.5], 2.5, {}, "budget must be an integer"),
    ([1.0], [0.5], True, {}, "budget must be an integer"),
    ([1.0], [0.5], 4, {"alpha": -1.0}, "alpha must be >= 0"),
    ([1.0], [0.5], 4, {"beta": float("nan")}, "beta must be a finite number"),
    ([1.0], [0.5], 4, {"filter_threshold": 1.5}, r"filter_threshold must be in \[0, 1\]"),
    ([1.0], [0.5], 4, {"filter_insufficient": -1.0}, "filter_insufficient must be >= 0"),
    ([1.0], [0.5], 4, {"min_samples": 3, "max_samples": 2}, "max_samples .2. is below"),
    ([1.0], [0.5], 4, {"max_samples": 0}, "max_samples must be >= 1"),
    ([1.0], [0.5], 4, {"min_samples": 1.5}, "min_samples must be an integer"),
])
def test_bad_inputs_raise_clear_errors(g, p, budget, kwargs, match):
    with pytest.raises(ValueError, match=match):
        allocate(g, p, budget, **kwargs)


def test_weights_survive_extreme_norms():
    w = gvm_weights(np.array([1e300, 1e-10]), np.array([1e-300, 1.0]), alpha=0.0, beta=2.0)
    assert np.isfinite(w).all() and w[0] > w[1] > 0
    w = gvm_weights(np.array([1.0, 1.0]), np.array([5e-324, 0.5]), alpha=1e-3, beta=2.0)
    assert np.isfinite(w).all() and w[1] > w[0] > 0
    n = allocate([1.0, 1.0, 1.0], [5e-324, 0.5, 0.5], 5, max_samples=3)
    assert n.tolist() == [0, 3, 2]
    n = allocate([1e300, 1e300], [0.25, 1.0], 3, alpha=0.0)
    assert n.tolist() == [2, 1]


def test_million_prompts_exact_budget_with_caps():
    rng = np.random.default_rng(0)
    m = 1_000_000
    g, p = rng.lognormal(size=m), rng.integers(0, 9, size=m) / 8
    n = allocate(g, p, 8 * m, max_samples=24)
    assert n.sum() == 8 * m and n.max() <= 24 and (n[p == 0] == 0).all()


# --- uniform, strategy, diagnostics -------------------------------------------------------

@PROPS
@given(st.integers(0, 50), st.integers(0, 500))
def test_uniform_allocation(m, budget):
    n = uniform_allocate(m, budget)
    assert n.shape == (m,)
    if m:
        assert n.sum() == budget and n.max() - n.min() <= 1
        assert (np.diff(n) <= 0).all()  # remainder to the first prompts
    assert (uniform_allocate(m, 4 * m) == 4).all()


def test_make_allocator_follows_the_algorithm():
    cfg = load_config(None, ["algorithm.name=gvm-grpo", "gvm.alpha=0", "gvm.max_samples=6",
                             "gvm.budget_per_prompt=4"])
    alloc = make_allocator(cfg)
    assert isinstance(alloc, GVMAllocator) and alloc.needs_statistics
    assert alloc.budget(5) == 20
    res = alloc.allocate(5, 20, [1.0, 1.0, 1.0, 1.0, 0.0], [0.25, 0.25, 1.0, 1.0, 1.0])
    assert res.samples.tolist() == [6, 6, 4, 4, 0]
    with pytest.raises(ValueError, match="needs grad_norms"):
        alloc.allocate(5, 20)
    with pytest.raises(ValueError, match="statistics for 2 prompts, expected 5"):
        alloc.allocate(5, 20, [1.0, 1.0], [0.5, 0.5])

    cfg = load_config(None, ["algorithm.name=raft", "algorithm.uniform_n=3"])
    alloc = make_allocator(cfg)
    assert isinstance(alloc, UniformAllocator) and not alloc.needs_statistics
    assert alloc.budget(4) == 12
    assert alloc.allocate(4, alloc.budget(4)).samples.tolist() == [3, 3, 3, 3]


def test_diagnostics_values():
    g = np.array([1.0, 2.0, 0.0, 1.0])
    p = np.array([0.5, 0.25, 0.5, 0.0])
    res = allocate_detailed(g, p, 12, alpha=0.0)
    assert res.samples.tolist() == [3, 9, 0, 0]  # G / sqrt(p) = 1.41 : 4
    d = diagnose(res.samples, g, p, res.reasons)
    assert d.variance_proxy == pytest.approx(1 / (3 * 0.5) + 4 / (9 * 0.25))
    assert d.uniform_variance_proxy == pytest.approx(1 / (3 * 0.5) + 4 / (3 * 0.25))
    assert d.variance_ratio == pytest.approx(d.variance_proxy / d.uniform_variance_proxy)
    assert d.variance_ratio < 1
    assert d.dropped == {"zero_accept_rate": 1, "zero_grad_norm": 1, "filter_threshold": 0,
                         "filter_insufficient": 0}
    assert set(d.dropped) == set(DROP_REASONS.values())
    assert (d.n_min, d.n_max, d.n_mean, d.num_allocated, d.total_samples) == (0, 9, 3.0, 2, 12)
    assert d.n_gini == pytest.approx(gini([3, 9, 0, 0]))
    empty = diagnose(np.zeros(2, dtype=np.int64), [0.0, 0.0], [0.5, 0.5])
    assert empty.variance_proxy is None and empty.variance_ratio is None


def test_diagnostics_per_draw_proxy_and_the_best_allocation():
    """The per-draw proxy is sum p G^2 / n; the best ratio is the continuous optimum's."""
    g = np.array([1.0, 2.0, 1.0])
    p = np.array([1.0, 0.25, 0.0])
    n = np.array([4, 8, 0])
    d = diagnose(n, g, p, weighting="per-draw")
    assert d.weighting == "per-draw"
    assert d.variance_proxy == pytest.approx(1.0 * 1 / 4 + 0.25 * 4 / 8)
    assert d.uniform_variance_proxy == pytest.approx(1.0 * 1 / 4 + 0.25 * 4 / 4)  # n = 4 each
    # optimum n ~ G sqrt(p) = 1 : 1 over the two contributing prompts: 6 each
    assert d.best_variance_proxy == pytest.approx(1 / 6 + 1 / 6)
    assert d.best_variance_ratio == pytest.approx((1 / 3) / 0.5)
    assert d.best_variance_ratio <= d.variance_ratio
    # per-prompt: n ~ G / sqrt(p) = 1 : 4, so 2.4 and 9.6 of 12
    pp = diagnose(n, g, p)
    assert pp.weighting == "per-prompt"
    assert pp.best_variance_proxy == pytest.approx(1 / 2.4 + 16 / 9.6)
    # with reused pre-samples the optimum is floored at them: totals max(2, lam * sqrt(c))
    drawn = diagnose(np.array([0, 12, 0]), g, p, drawn=2, weighting="per-draw")
    # c = 1 and 1: equal totals of (12 + 2 * 2) / 2 = 8 each
    assert drawn.best_variance_proxy == pytest.approx(1 / 8 + 1 / 8)
    assert drawn.variance_proxy == pytest.approx(1 / 2 + 1 / 14)
    skew = diagnose(np.array([0, 1, 0]), np.array([10.0, 1.0, 1.0]), np.array([1.0, 1.0, 0.0]),
                    drawn=4, weighting="per-draw")
    # c = 100 and 1: prompt 1 stays at its 4 pre-samples, prompt 0 gets the new sample
    assert skew.best_variance_proxy == pytest.approx(100 / 5 + 1 / 4)
    with pytest.raises(ValueError, match="weighting 'per-token'"):
        diagnose(n, g, p, weighting="per-token")


@PROPS
@given(positive_stats(), st.integers(0, 40), st.integers(0, 6),
       st.sampled_from(["per-prompt", "per-draw"]))
def test_no_allocation_beats_the_best_variance_proxy(stats, budget, drawn, weighting):
    """The bound holds against the GVM rule, uniform and random allocations alike."""
    g, p = stats
    if budget == 0 and drawn == 0:
        return
    best = best_variance_proxy(budget, g, p, drawn=drawn, weighting=weighting)
    rng = np.random.default_rng(budget * 7 + drawn)
    candidates = [uniform_allocate(g.size, budget),
                  rng.multinomial(budget, np.full(g.size, 1.0 / g.size))]
    if drawn == 0 and budget >= g.size:
        candidates.append(allocate(g, p, budget, alpha=0.0, min_samples=1))
    for n in candidates:
        if drawn == 0 and (n == 0).any():
            continue  # the bound is over allocations that sample every contributing prompt
        v = variance_proxy(n + drawn, g, p, weighting=weighting)
        assert v >= best * (1 - 1e-9)


def test_gini():
    assert gini([4, 4, 4]) == 0.0
    assert gini([0, 0, 0, 8]) == pytest.approx(3 / 4)
    assert gini([]) == 0.0 and gini([0, 0]) == 0.0
    assert gini([1, 3]) == pytest.approx(0.25)
