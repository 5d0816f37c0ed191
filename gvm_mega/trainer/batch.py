"""From verified groups to each data-parallel rank's training samples.

Advantages are computed on the driver over whole groups (GRPO normalises within a prompt's
n_i responses), then the kept samples are dealt to DP ranks with the allocation's balanced
split, so each rank trains on a similar number of tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from gvm_mega.allocation import split_across_ranks
from gvm_mega.trainer.sampling import Group
from gvm_mega.training import LossSpec, sample_advantages


@dataclass
class RankSamples:
    """One DP rank's share: prompt + response token ids, prompt lengths, advantages, and once
    measured, the behaviour (and reference) policy's per-response-token log-probs."""

    sequences: list[list[int]]
    prompt_lengths: list[int]
    advantages: list[float]
    old_logprobs: Optional[list[list[float]]] = None
    ref_logprobs: Optional[list[list[float]]] = None

    def __len__(self) -> int:
        return len(self.sequences)


def training_samples(groups: Sequence[Group], spec: LossSpec, dp: int) -> tuple[list[RankSamples], float]:
    """Per-rank samples and the split's token imbalance (max / mean)."""
    rewards = [r for g in groups for r in g.rewards]
    group_ids = [i for i, g in enumerate(groups) for _ in g.rewards]
    if not rewards:
        return [RankSamples([], [], []) for _ in range(dp)], 1.0
    keep, adv = sample_advantages(spec, rewards, group_ids)
    keep = keep.tolist()
    adv_iter = iter(adv.tolist())
    kept: list[list[tuple[list[int], int, float]]] = [[] for _ in groups]
    flat = 0
    for gi, g in enumerate(groups):
        for s in g.samples:
            if keep[flat]:
                kept[gi].append((g.prompt_ids + list(s.output_ids), len(g.prompt_ids),
                                 next(adv_iter)))
            flat += 1
    counts = np.array([len(k) for k in kept], dtype=np.int64)
    lengths = np.array([np.mean([len(seq) for seq, _, _ in k]) if k else 1.0 for k in kept])
    split = split_across_ranks(counts, dp, expected_lengths=lengths)
    cursor = [0] * len(groups)
    shares = []
    for share in split.ranks:
        rows = []
        for gi, n in zip(share.prompt_indices.tolist(), share.counts.tolist()):
            rows.extend(kept[gi][cursor[gi]:cursor[gi] + n])
            cursor[gi] += n
        shares.append(RankSamples([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]))
    return shares, float(split.imbalance)


def mini_batches(samples: RankSamples, count: int) -> list[RankSamples]:
    """``count`` interleaved slices (every rank makes the same number, some may be empty)."""
    def part(values: Optional[list], k: int) -> Optional[list]:
        return None if values is None else values[k::count]

    return [RankSamples(samples.sequences[k::count], samples.prompt_lengths[k::count],
                        samples.advantages[k::count], part(samples.old_logprobs, k),
                        part(samples.ref_logprobs, k)) for k in range(count)]
