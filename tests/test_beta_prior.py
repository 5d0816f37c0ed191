"""The empirical-Bayes fit of the acceptance-rate prior."""
from __future__ import annotations

import math

import numpy as np
import pytest

from gvm_mega.allocation.beta_prior import MAX_STRENGTH, fit_beta_prior


def _log_marginal(a: float, b: float, n, k) -> float:
    """Beta-binomial log likelihood (without the binomial coefficients), in plain math."""
    def log_beta(x, y):
        return math.lgamma(x) + math.lgamma(y) - math.lgamma(x + y)
    return sum(log_beta(ki + a, ni - ki + b) - log_beta(a, b) for ni, ki in zip(n, k))


@pytest.mark.parametrize("true_a, true_b, draws", [(3.0, 1.0, 8), (0.5, 4.0, 6), (2.0, 2.0, 2)])
def test_recovers_the_prior_that_generated_the_pool(true_a, true_b, draws):
    rng = np.random.default_rng(7)
    p = rng.beta(true_a, true_b, 20000)
    n = np.full(p.size, draws)
    a, b = fit_beta_prior(n, rng.binomial(n, p))
    assert a / (a + b) == pytest.approx(true_a / (true_a + true_b), abs=0.02)
    assert a + b == pytest.approx(true_a + true_b, rel=0.3)


def test_the_fit_is_at_least_as_likely_as_its_neighbours_and_the_truth():
    rng = np.random.default_rng(3)
    n = rng.integers(1, 9, 300)
    k = rng.binomial(n, rng.beta(3.0, 1.0, n.size))
    a, b = fit_beta_prior(n, k)
    best = _log_marginal(a, b, n, k)
    for other in [(3.0, 1.0), (a * 1.2, b), (a, b * 1.2), (a / 1.2, b), (a, b / 1.2), (1.0, 1.0)]:
        assert best >= _log_marginal(*other, n, k) - 1e-6


def test_no_spread_beyond_binomial_noise_gives_the_strongest_prior_at_the_pool_mean():
    rng = np.random.default_rng(0)
    n = np.full(4000, 4)
    a, b = fit_beta_prior(n, rng.binomial(n, 0.3))
    assert a + b == pytest.approx(MAX_STRENGTH, rel=0.05)
    assert a / (a + b) == pytest.approx(0.3, abs=0.02)
    a, b = fit_beta_prior(n, rng.binomial(n, 0.3), max_strength=50.0)
    assert a + b == pytest.approx(50.0, rel=0.05)


def test_prompts_without_samples_are_ignored_and_bad_counts_refused():
    n, k = np.array([4, 4, 0, 4, 2]), np.array([1, 4, 0, 0, 2])
    assert fit_beta_prior(n, k) == fit_beta_prior(n[n > 0], k[n > 0])
    with pytest.raises(ValueError, match="no prompt has any samples"):
        fit_beta_prior([0, 0], [0, 0])
    with pytest.raises(ValueError, match="0 <= num_accepted <= num_samples"):
        fit_beta_prior([2, 2], [3, 1])
    with pytest.raises(ValueError, match="num_samples has 2 entries, num_accepted 1"):
        fit_beta_prior([2, 2], [1])
    with pytest.raises(ValueError, match="max_strength must exceed"):
        fit_beta_prior([2], [1], max_strength=0.05)


def test_one_draw_per_prompt_fits_the_mean_at_the_given_strength():
    rng = np.random.default_rng(1)
    n = np.ones(800, dtype=int)
    k = rng.binomial(n, 0.3)
    a, b = fit_beta_prior(n, k, strength_if_unknown=4.0)
    assert a + b == pytest.approx(4.0) and a / (a + b) == pytest.approx(k.mean())
    with pytest.raises(ValueError, match="one draw per prompt shows no spread"):
        fit_beta_prior(n, k)
    # all accepted: the mean stays inside (0, 1), so the prior stays proper
    a, b = fit_beta_prior(n, n, strength_if_unknown=2.0)
    assert 0 < b < a and a + b == pytest.approx(2.0)
    # one prompt drawn twice makes the spread identifiable: the given strength is not used
    n2, k2 = np.append(n, 2), np.append(k, 1)
    assert fit_beta_prior(n2, k2) == fit_beta_prior(n2, k2, strength_if_unknown=4.0)
