"""Per-prompt statistics across iterations, and the estimates of p_i and G_i fed to allocation.

Two estimators:

``per-iteration``
    The paper's rule: ``p_i`` = accepted / samples and ``G_i`` = the gradient norm from the
    prompt's latest observation only. A prompt seen with 0/8 accepted gets ``p_i = 0`` and is
    never sampled again until it is re-measured.
``posterior``
    ``p_i`` is the Beta(a, b) posterior mean over every observation,
    ``(a + accepted) / (a + b + samples)``, so 0/8 gives a small positive rate instead of
    zero. The prior is ``prior_a``/``prior_b`` as given (``prior="fixed"``) or, with
    ``prior="fitted"``, fitted to every prompt's latest observation (empirical Bayes, see
    :mod:`.beta_prior`) once ``MIN_FIT_PROMPTS`` prompts are known: the pool's own rates
    replace a guess that is right for one task and policy only (with one pre-sample per
    prompt only the mean is fitted, at the strength ``prior_a + prior_b``); ``G_i`` is an exponential moving average of the observed norms (``ema`` is the
    weight of the old value). A prompt that never had an accepted response, and so never had
    a gradient norm, gets a pooled ``G`` (1.0 if no prompt has one yet):

    - ``mean``: the mean over every prompt with a norm;
    - ``similar-p``: the mean over the ``SIMILAR_P_NEIGHBOURS`` prompts with a norm whose
      estimated ``p`` is nearest (ties included). A prompt with no accepted response is a hard
      one, and the rare responses a hard prompt gets accepted have large norms: on the
      built-in task such prompts' norms run at 3-4x the pool's mean, so the plain mean starves
      exactly the prompts the rule should sample most.

    ``grad_norm_shrink`` (pseudo-observations, 0 = off) also pulls an observed ``G`` toward
    that pooled value: ``log G = (m log G_obs + s log G_pool) / (m + s)`` after ``m`` observed
    norms. A norm measured on one or two accepted responses is noisy (a factor of ~1.5-2 on
    the built-in task), and the allocation follows the noise without it.

Both estimators read the same accumulated counts, so a resumed run may switch between them.
Prompt ids are strings or integers and are stored as strings.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Literal, Optional

import numpy as np

from .beta_prior import fit_beta_prior

Estimator = Literal["per-iteration", "posterior"]
ESTIMATORS = ("per-iteration", "posterior")
GradNormFallback = Literal["mean", "similar-p"]
GRAD_NORM_FALLBACKS = ("mean", "similar-p")
Prior = Literal["fixed", "fitted"]
PRIORS = ("fixed", "fitted")
MIN_FIT_PROMPTS = 16
SIMILAR_P_NEIGHBOURS = 16
_FORMAT = "gvm_mega.PromptStatsStore/1"
_INT_FIELDS = ("total_samples", "total_accepted", "last_samples", "last_accepted",
               "grad_observations", "observations")
_FLOAT_FIELDS = ("last_grad_norm", "ema_grad_norm")


@dataclass(frozen=True)
class PromptStats:
    """Everything the store knows about one prompt."""

    prompt_id: str
    total_samples: int
    total_accepted: int
    last_samples: int
    last_accepted: int
    last_grad_norm: float      # NaN until a response of this prompt was accepted
    ema_grad_norm: float       # NaN until a response of this prompt was accepted
    grad_observations: int
    observations: int


class PromptStatsStore:
    """Sample/accept counts and gradient norms keyed by prompt id; checkpointable."""

    def __init__(self, estimator: Estimator = "per-iteration", *, prior_a: float = 1.0,
                 prior_b: float = 1.0, grad_norm_ema: float = 0.5,
                 grad_norm_fallback: GradNormFallback = "mean",
                 grad_norm_shrink: float = 0.0, prior: Prior = "fixed") -> None:
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if prior not in PRIORS:
            raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")
        if grad_norm_fallback not in GRAD_NORM_FALLBACKS:
            raise ValueError(f"grad_norm_fallback must be one of {GRAD_NORM_FALLBACKS}, "
                             f"got {grad_norm_fallback!r}")
        if not (grad_norm_shrink >= 0 and math.isfinite(grad_norm_shrink)):
            raise ValueError(f"grad_norm_shrink must be a non-negative number, "
                             f"got {grad_norm_shrink}")
        if not (prior_a > 0 and prior_b > 0 and math.isfinite(prior_a + prior_b)):
            raise ValueError(f"prior_a and prior_b must be positive, got {prior_a}, {prior_b}")
        if not 0 <= grad_norm_ema < 1:
            raise ValueError(f"grad_norm_ema must be in [0, 1), got {grad_norm_ema}")
        self.estimator = estimator
        self.prior_a, self.prior_b, self.grad_norm_ema = float(prior_a), float(prior_b), float(
            grad_norm_ema)
        self.grad_norm_fallback = grad_norm_fallback
        self.grad_norm_shrink = float(grad_norm_shrink)
        self.prior_kind = prior
        self._fitted: Optional[tuple[float, float]] = None   # cache, cleared by update()
        self._ema_before: dict[int, float] = {}   # row -> EMA before the latest update()
        self._index: dict[str, int] = {}
        self._ids: list[str] = []
        self._cols: dict[str, np.ndarray] = {}
        self._allocate_columns(0)

    @classmethod
    def from_config(cls, gvm_cfg) -> "PromptStatsStore":
        """A store set up from the ``gvm`` config section."""
        return cls(gvm_cfg.estimator, prior_a=gvm_cfg.prior_a, prior_b=gvm_cfg.prior_b,
                   grad_norm_ema=gvm_cfg.grad_norm_ema,
                   grad_norm_fallback=gvm_cfg.grad_norm_fallback,
                   grad_norm_shrink=gvm_cfg.grad_norm_shrink, prior=gvm_cfg.prior)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, prompt_id) -> bool:
        return _key(prompt_id) in self._index

    def update(self, prompt_ids: Iterable, num_samples, num_accepted,
               grad_norms=None) -> None:
        """Record one iteration's observation of each listed prompt.

        ``grad_norms[i]`` is the mean gradient norm over prompt i's accepted responses; it is
        ignored (and may be NaN) where ``num_accepted[i]`` is 0. ``None``: no norms were
        measured (a uniform algorithm's draws), so only the counts change.
        """
        keys = _keys(prompt_ids)
        n = _int_vector("num_samples", num_samples, len(keys))
        a = _int_vector("num_accepted", num_accepted, len(keys))
        measured = grad_norms is not None
        g = np.asarray(grad_norms if measured else np.full(len(keys), np.nan), dtype=np.float64)
        if g.shape != (len(keys),):
            raise ValueError(f"grad_norms has shape {g.shape}, expected ({len(keys)},)")
        _reject(keys, n < 1, "num_samples", n, "must be >= 1")
        _reject(keys, a < 0, "num_accepted", a, "must be >= 0")
        _reject(keys, a > n, "num_accepted", a, "exceeds num_samples")
        seen = (a > 0) & measured
        _reject(keys, seen & ~(np.isfinite(g) & (g >= 0)), "grad_norm", g,
                "must be a finite non-negative number when responses were accepted")
        if len(set(keys)) != len(keys):
            dup = next(k for i, k in enumerate(keys) if k in keys[:i])
            raise ValueError(f"prompt id {dup!r} appears more than once in one update")

        rows = self._rows_for(keys)
        c = self._cols
        self._ema_before = dict(zip(rows.tolist(), c["ema_grad_norm"][rows].tolist()))
        c["total_samples"][rows] += n
        c["total_accepted"][rows] += a
        c["last_samples"][rows] = n
        c["last_accepted"][rows] = a
        c["observations"][rows] += 1
        c["last_grad_norm"][rows] = np.where(seen, g, np.nan)
        r, gs = rows[seen], g[seen]
        old = c["ema_grad_norm"][r]
        c["ema_grad_norm"][r] = np.where(np.isnan(old), gs,
                                         self.grad_norm_ema * old + (1 - self.grad_norm_ema) * gs)
        c["grad_observations"][r] += 1
        self._fitted = None

    def revise_grad_norms(self, prompt_ids: Iterable, grad_norms) -> None:
        """Replace the gradient norm of the latest :meth:`update` of each listed prompt.

        Stage 2 drawn in rounds measures more of a prompt's accepted responses within the
        same visit; the visit's norm over all of them replaces the one from its pre-samples
        alone and still enters the EMA once. NaN leaves a prompt as it is.
        """
        keys = _keys(prompt_ids)
        g = np.asarray(grad_norms, dtype=np.float64)
        if g.shape != (len(keys),):
            raise ValueError(f"grad_norms has shape {g.shape}, expected ({len(keys)},)")
        _reject(keys, ~np.isnan(g) & ~(np.isfinite(g) & (g >= 0)), "grad_norm", g,
                "must be a finite non-negative number (or NaN: not measured)")
        rows = [self._index.get(k, -1) for k in keys]
        stale = [k for k, r in zip(keys, rows) if r not in self._ema_before]
        if stale:
            raise KeyError(f"prompt id {stale[0]!r} was not in the latest update(): "
                           f"revise_grad_norms revises that observation only")
        c, w = self._cols, self.grad_norm_ema
        for row, value in zip(rows, g.tolist()):
            if math.isnan(value):
                continue
            if math.isnan(c["last_grad_norm"][row]):
                c["grad_observations"][row] += 1
            before = self._ema_before[row]
            c["last_grad_norm"][row] = value
            c["ema_grad_norm"][row] = value if math.isnan(before) else w * before + (1 - w) * value

    def add_counts(self, prompt_ids: Iterable, num_samples, num_accepted) -> None:
        """Add verified draws of already-observed prompts to their totals (the posterior's
        ``p``) without counting an observation: stage 2's samples are verified anyway, so
        their outcomes sharpen ``p`` at no extra cost. Prompts with 0 samples are skipped;
        ``last_*`` and the gradient norms stay as the last observation left them."""
        keys = _keys(prompt_ids)
        n = _int_vector("num_samples", num_samples, len(keys))
        a = _int_vector("num_accepted", num_accepted, len(keys))
        _reject(keys, n < 0, "num_samples", n, "must be >= 0")
        _reject(keys, a < 0, "num_accepted", a, "must be >= 0")
        _reject(keys, a > n, "num_accepted", a, "exceeds num_samples")
        unknown = [k for k in keys if k not in self._index]
        if unknown:
            raise KeyError(f"no statistics for prompt id {unknown[0]!r}: add_counts extends an "
                           f"observation made by update()")
        rows = np.fromiter((self._index[k] for k in keys), dtype=np.int64, count=len(keys))
        np.add.at(self._cols["total_samples"], rows, n)
        np.add.at(self._cols["total_accepted"], rows, a)

    def estimates(self, prompt_ids: Iterable) -> tuple[np.ndarray, np.ndarray]:
        """``(grad_norms, accept_rates)`` for the listed prompts under the store's estimator."""
        keys = _keys(prompt_ids)
        get = self._index.get
        rows = np.fromiter((get(k, -1) for k in keys), dtype=np.int64, count=len(keys))
        if (rows < 0).any():
            missing = [k for k, r in zip(keys, rows) if r < 0]
            raise KeyError(f"no statistics for prompt id {missing[0]!r}"
                           f" ({len(missing)} unknown ids in all)")
        c = self._cols
        if self.estimator == "per-iteration":
            p = c["last_accepted"][rows] / c["last_samples"][rows]
            g = np.nan_to_num(c["last_grad_norm"][rows], nan=0.0)
            return g, p
        p = self._posterior_p(rows)
        ema = c["ema_grad_norm"][rows]
        pooled = self._pooled_grad_norm(p)
        g = np.where(np.isnan(ema), pooled, ema)
        if self.grad_norm_shrink > 0:
            m = c["grad_observations"][rows]
            seen = m > 0
            s = self.grad_norm_shrink
            # log space: a norm is a scale, and a zero norm stays zero
            with np.errstate(divide="ignore"):
                mixed = np.exp((m * np.log(ema) + s * np.log(pooled)) / (m + s))
            g = np.where(seen & (ema > 0) & (pooled > 0), mixed, g)
        return g, p

    def prior(self) -> tuple[float, float]:
        """The Beta prior ``(a, b)`` the posterior estimates use now."""
        k = len(self)
        if self.prior_kind == "fixed" or k < MIN_FIT_PROMPTS:
            return self.prior_a, self.prior_b
        if self._fitted is None:
            c = self._cols
            self._fitted = fit_beta_prior(c["last_samples"][:k], c["last_accepted"][:k],
                                          strength_if_unknown=self.prior_a + self.prior_b)
        return self._fitted

    def _posterior_p(self, rows: np.ndarray) -> np.ndarray:
        c = self._cols
        a, b = self.prior()
        return (a + c["total_accepted"][rows]) / (a + b + c["total_samples"][rows])

    def _pooled_grad_norm(self, p: np.ndarray) -> np.ndarray:
        """The pooled G for prompts with estimated rates ``p`` (see the module docstring)."""
        everyone = np.arange(len(self))
        known = ~np.isnan(self._cols["ema_grad_norm"][everyone])
        norms = self._cols["ema_grad_norm"][everyone][known]
        if not norms.size:
            return np.ones_like(p)
        if self.grad_norm_fallback == "mean" or norms.size <= SIMILAR_P_NEIGHBOURS:
            return np.full_like(p, norms.mean())
        rates = self._posterior_p(everyone)[known]
        out = np.empty_like(p)
        for value in np.unique(p):
            distance = np.abs(rates - value)
            radius = np.partition(distance, SIMILAR_P_NEIGHBOURS - 1)[SIMILAR_P_NEIGHBOURS - 1]
            out[p == value] = norms[distance <= radius].mean()
        return out

    def accept_rate(self, prompt_id) -> Optional[float]:
        """The estimated ``p`` of one prompt, or None if it was never observed."""
        row = self._index.get(_key(prompt_id))
        if row is None:
            return None
        c = self._cols
        if self.estimator == "per-iteration":
            return float(c["last_accepted"][row] / c["last_samples"][row])
        return float(self._posterior_p(np.array([row]))[0])

    def draws(self, prompt_id) -> int:
        """How many verified draws of the prompt the statistics hold (0 if never seen)."""
        row = self._index.get(_key(prompt_id))
        return 0 if row is None else int(self._cols["total_samples"][row])

    def get(self, prompt_id) -> PromptStats:
        """The record of one prompt (KeyError if it was never observed)."""
        key = _key(prompt_id)
        if key not in self._index:
            raise KeyError(f"no statistics for prompt id {key!r}")
        row = self._index[key]
        values = {f: int(self._cols[f][row]) for f in _INT_FIELDS}
        values.update({f: float(self._cols[f][row]) for f in _FLOAT_FIELDS})
        return PromptStats(prompt_id=key, **values)

    def state_dict(self) -> dict:
        """Plain Python lists and numbers (safe for ``torch.load(weights_only=True)`` and JSON)."""
        k = len(self)
        state = {"format": _FORMAT, "ids": list(self._ids),
                 "settings": {"estimator": self.estimator, "prior_a": self.prior_a,
                              "prior_b": self.prior_b, "grad_norm_ema": self.grad_norm_ema,
                              "grad_norm_fallback": self.grad_norm_fallback,
                              "grad_norm_shrink": self.grad_norm_shrink,
                              "prior": self.prior_kind}}
        for f in _INT_FIELDS + _FLOAT_FIELDS:
            state[f] = self._cols[f][:k].tolist()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Replace the contents with a saved state. Estimator settings stay as configured."""
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            got = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not a PromptStatsStore state (format {got!r}, "
                             f"expected {_FORMAT!r})")
        missing = [f for f in ("ids",) + _INT_FIELDS + _FLOAT_FIELDS if f not in state]
        if missing:
            raise ValueError(f"PromptStatsStore state lacks {', '.join(missing)}")
        ids = [_key(x) for x in state["ids"]]
        if len(set(ids)) != len(ids):
            raise ValueError("PromptStatsStore state has duplicate prompt ids")
        for f in _INT_FIELDS + _FLOAT_FIELDS:
            if len(state[f]) != len(ids):
                raise ValueError(f"PromptStatsStore state: '{f}' has {len(state[f])} entries "
                                 f"for {len(ids)} prompt ids")
        self._ids = ids
        self._fitted = None
        self._ema_before = {}
        self._index = {k: i for i, k in enumerate(ids)}
        self._allocate_columns(len(ids))
        for f in _INT_FIELDS:
            self._cols[f][: len(ids)] = np.asarray(state[f], dtype=np.int64)
        for f in _FLOAT_FIELDS:
            self._cols[f][: len(ids)] = np.asarray(state[f], dtype=np.float64)

    # -- storage -----------------------------------------------------------------------
    def _allocate_columns(self, capacity: int) -> None:
        old, k = self._cols, len(self._ids)
        cap = max(capacity, 16)
        self._cols = {f: np.zeros(cap, dtype=np.int64) for f in _INT_FIELDS}
        self._cols.update({f: np.full(cap, np.nan) for f in _FLOAT_FIELDS})
        for f, col in old.items():
            n = min(k, col.shape[0])
            self._cols[f][:n] = col[:n]

    def _rows_for(self, keys: list[str]) -> np.ndarray:
        index = self._index
        new = [k for k in keys if k not in index]
        if new:
            need = len(self._ids) + len(new)
            if need > self._cols["observations"].shape[0]:
                self._allocate_columns(max(need, 2 * self._cols["observations"].shape[0]))
            for k in new:
                self._index[k] = len(self._ids)
                self._ids.append(k)
        return np.fromiter((self._index[k] for k in keys), dtype=np.int64, count=len(keys))


def _keys(prompt_ids: Iterable) -> list[str]:
    return [x if type(x) is str else _key(x) for x in prompt_ids]


def _key(prompt_id) -> str:
    if isinstance(prompt_id, bool) or not isinstance(prompt_id, (str, int, np.integer)):
        raise TypeError(f"prompt ids must be strings or integers, got {prompt_id!r}")
    return str(prompt_id)


def _int_vector(name: str, values, length: int) -> np.ndarray:
    arr = np.asarray(values)
    if arr.shape != (length,):
        raise ValueError(f"{name} has shape {arr.shape}, expected ({length},)")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def _reject(keys: list[str], bad: np.ndarray, name: str, values: np.ndarray, problem: str):
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"prompt {keys[i]!r}: {name} = {values[i]} {problem}")
