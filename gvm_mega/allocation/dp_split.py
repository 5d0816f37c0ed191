"""Spread an allocation's samples over D data-parallel ranks with balanced expected tokens.

The samples are laid end to end in prompt order, each as long as its prompt's expected
length, and the line of ``T`` expected tokens is cut into D equal stretches; a sample goes
to the rank whose stretch holds its midpoint. Consequences:

* every rank's expected tokens are within one sample length of ``T / D`` (the covered
  stretch can miss or overhang by at most half a sample at each end);
* a prompt's samples are split across ranks only where a cut falls inside it, so at most
  D - 1 prompts are split and each rank holds a contiguous range of prompts;
* the result depends only on the input (no randomness, no hashing).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RankShare:
    """The work of one data-parallel rank: ``counts[j]`` samples of prompt ``prompt_indices[j]``."""

    prompt_indices: np.ndarray  # int64, ascending
    counts: np.ndarray          # int64, positive
    tokens: float               # expected tokens

    def sample_prompt_indices(self) -> np.ndarray:
        """One prompt index per sample, in order."""
        return np.repeat(self.prompt_indices, self.counts)


@dataclass(frozen=True)
class DPSplit:
    ranks: list[RankShare]
    tokens_per_rank: np.ndarray
    imbalance: float            # max / mean expected tokens per rank; 1.0 when all is empty

    def counts_by_prompt(self, num_prompts: int) -> np.ndarray:
        """(D, num_prompts) matrix of sample counts, for checks and small batches."""
        out = np.zeros((len(self.ranks), num_prompts), dtype=np.int64)
        for r, share in enumerate(self.ranks):
            out[r, share.prompt_indices] = share.counts
        return out

    def to_dict(self, prompt_ids=None) -> dict:
        """JSON-ready form; ``prompt_ids`` replaces prompt indices with ids."""
        def name(i):
            return prompt_ids[i] if prompt_ids is not None else int(i)
        return {
            "imbalance": self.imbalance,
            "tokens_per_rank": [float(t) for t in self.tokens_per_rank],
            "ranks": [{"samples": {str(name(i)): int(c)
                                   for i, c in zip(s.prompt_indices, s.counts)}}
                      for s in self.ranks],
        }


def split_across_ranks(samples, world_size: int, *, expected_lengths=None) -> DPSplit:
    """Split per-prompt sample counts over ``world_size`` ranks; see the module docstring."""
    n = np.asarray(samples)
    if n.ndim != 1 or (n.size and not np.issubdtype(n.dtype, np.integer)):
        raise ValueError(f"samples must be a 1-D integer array, got shape {n.shape} "
                         f"dtype {n.dtype}")
    n = n.astype(np.int64)
    if (n < 0).any():
        i = int(np.argmax(n < 0))
        raise ValueError(f"samples[{i}] = {n[i]} is negative")
    if isinstance(world_size, bool) or int(world_size) != world_size or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    d = int(world_size)
    if expected_lengths is None:
        length = np.ones(n.size)
    else:
        length = np.asarray(expected_lengths, dtype=np.float64)
        if length.shape != n.shape:
            raise ValueError(f"expected_lengths has shape {length.shape}, samples {n.shape}")
        bad = ~np.isfinite(length) | (length <= 0)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"expected_lengths[{i}] = {length[i]} must be positive and finite")

    tokens = n * length
    tok_end = np.cumsum(tokens)
    total = float(tok_end[-1]) if n.size else 0.0
    smp_end = np.cumsum(n)
    total_samples = int(smp_end[-1]) if n.size else 0
    if total_samples == 0:
        empty = [RankShare(np.empty(0, np.int64), np.empty(0, np.int64), 0.0) for _ in range(d)]
        return DPSplit(empty, np.zeros(d), 1.0)

    # cuts[r]: how many samples (in flattened prompt order) lie before rank r's stretch
    bounds = total * np.arange(1, d) / d
    holder = np.minimum(np.searchsorted(tok_end, bounds, side="right"), n.size - 1)
    start_tok = tok_end[holder] - tokens[holder]
    inside = np.clip(np.ceil((bounds - start_tok) / length[holder] - 0.5), 0, n[holder])
    before = smp_end[holder] - n[holder]
    cuts = np.concatenate(([0], before + inside.astype(np.int64), [total_samples]))
    cuts = np.maximum.accumulate(cuts)

    ranks = []
    smp_start = smp_end - n
    for r in range(d):
        lo, hi = int(cuts[r]), int(cuts[r + 1])
        if hi <= lo:
            ranks.append(RankShare(np.empty(0, np.int64), np.empty(0, np.int64), 0.0))
            continue
        first = int(np.searchsorted(smp_end, lo, side="right"))
        last = int(np.searchsorted(smp_end, hi - 1, side="right"))
        idx = np.arange(first, last + 1)
        counts = np.minimum(smp_end[idx], hi) - np.maximum(smp_start[idx], lo)
        keep = counts > 0
        idx, counts = idx[keep], counts[keep]
        ranks.append(RankShare(idx, counts, float(np.sum(counts * length[idx]))))
    per_rank = np.array([s.tokens for s in ranks])
    return DPSplit(ranks, per_rank, float(per_rank.max() / (total / d)))
