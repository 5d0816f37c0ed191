"""Fit the Beta prior of the acceptance rates to the prompt pool (empirical Bayes).

A fixed Beta(a, b) prior encodes a guess at the task's acceptance rates: Beta(3, 1) suits a
policy that solves three prompts in four, and is wrong for one that solves one in ten. The
pool itself says what the rates look like: each prompt's latest ``k`` accepted of ``n``
drawn is one beta-binomial draw, so the prior that best explains the pool maximises

    sum_i  log B(k_i + a, n_i - k_i + b) - log B(a, b).

The search is a grid over the prior's mean ``a / (a + b)`` and its strength ``a + b`` (log
spaced), refined once around the best point: two parameters, a bounded answer and no
convergence to babysit. When the pool shows no more spread than binomial noise the
likelihood keeps rising with the strength, and the fit stops at ``max_strength``: every
prompt is then estimated near the pool's mean, which is the right reading of such data.
"""
from __future__ import annotations

import numpy as np
import torch

MIN_STRENGTH = 0.1
MAX_STRENGTH = 1000.0
MEAN_RANGE = (0.0025, 0.9975)


def fit_beta_prior(num_samples, num_accepted, *, max_strength: float = MAX_STRENGTH,
                   strength_if_unknown: float | None = None) -> tuple[float, float]:
    """Maximum marginal likelihood ``(a, b)`` for ``num_accepted[i]`` of ``num_samples[i]``.

    Prompts with no samples carry no information and are ignored; at least one prompt must
    have some. With a single draw per prompt the pool shows its mean but not its spread (the
    likelihood is flat in the strength): then the prior keeps ``strength_if_unknown`` and
    only its mean is fitted (a ValueError if it is None).
    """
    n = np.asarray(num_samples, dtype=np.int64).ravel()
    k = np.asarray(num_accepted, dtype=np.int64).ravel()
    if n.shape != k.shape:
        raise ValueError(f"num_samples has {n.size} entries, num_accepted {k.size}")
    if (n < 0).any() or (k < 0).any() or (k > n).any():
        raise ValueError("counts must satisfy 0 <= num_accepted <= num_samples")
    if not max_strength > MIN_STRENGTH:
        raise ValueError(f"max_strength must exceed {MIN_STRENGTH}, got {max_strength}")
    drawn = n > 0
    if not drawn.any():
        raise ValueError("no prompt has any samples to fit a prior to")
    if not (n >= 2).any():
        if strength_if_unknown is None:
            raise ValueError("one draw per prompt shows no spread to fit a prior's strength to")
        mean = float(np.clip(k.sum() / n.sum(), MEAN_RANGE[0], MEAN_RANGE[1]))
        return mean * strength_if_unknown, (1 - mean) * strength_if_unknown
    # The likelihood depends on (n, k) only: one term per distinct pair, weighted by its count.
    pairs, weight = np.unique(np.stack([n[drawn], k[drawn]]), axis=1, return_counts=True)
    n_t, k_t = (torch.as_tensor(pairs[j], dtype=torch.float64) for j in (0, 1))
    w_t = torch.as_tensor(weight, dtype=torch.float64)

    def best(means: torch.Tensor, strengths: torch.Tensor) -> tuple[float, float]:
        m, s = torch.meshgrid(means, strengths, indexing="ij")
        a, b = (m * s)[..., None], ((1 - m) * s)[..., None]
        ll = (_log_beta(k_t + a, n_t - k_t + b) - _log_beta(a, b)) @ w_t
        i = int(torch.argmax(ll))
        return float(m.flatten()[i]), float(s.flatten()[i])

    log_lo, log_hi = np.log(MIN_STRENGTH), np.log(max_strength)
    mean, strength = best(torch.linspace(*MEAN_RANGE, 200, dtype=torch.float64),
                          torch.linspace(log_lo, log_hi, 81, dtype=torch.float64).exp())
    mean_step, log_step = (MEAN_RANGE[1] - MEAN_RANGE[0]) / 199, (log_hi - log_lo) / 80
    mean, strength = best(
        torch.linspace(max(mean - mean_step, 1e-4), min(mean + mean_step, 1 - 1e-4), 41,
                       dtype=torch.float64),
        torch.linspace(max(np.log(strength) - log_step, log_lo),
                       min(np.log(strength) + log_step, log_hi), 41, dtype=torch.float64).exp())
    return mean * strength, (1 - mean) * strength


def _log_beta(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.lgamma(x) + torch.lgamma(y) - torch.lgamma(x + y)
