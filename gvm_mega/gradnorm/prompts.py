"""From per-response norms to the per-prompt ``G_i``, with the work split over DP ranks."""
from __future__ import annotations

from typing import Any, Literal, Optional, Sequence

import numpy as np
import torch

from gvm_mega.gradnorm.batch import SequenceBatch
from gvm_mega.gradnorm.estimator import GradNormEstimator


def prompt_grad_norms(norms: torch.Tensor, prompt_index: Sequence[int], num_prompts: int,
                      accepted: Optional[Sequence[bool]] = None,
                      average: Literal["mean", "rms"] = "mean") -> torch.Tensor:
    """``G_i`` over prompt ``i``'s accepted responses; 0 where none was accepted.

    ``average="mean"`` is the mean norm; ``"rms"`` the root mean square, the scale of the
    variance the responses add to a gradient estimate (a rare response with a large norm
    counts by its square, as it does there). ``norms[k]`` belongs to response ``k`` of
    prompt ``prompt_index[k]``.
    """
    if average not in ("mean", "rms"):
        raise ValueError(f"average must be 'mean' or 'rms', got {average!r}")
    idx = torch.as_tensor(list(prompt_index), dtype=torch.long)
    if idx.numel() != norms.numel():
        raise ValueError(f"{norms.numel()} norms but {idx.numel()} prompt indices")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_prompts):
        raise ValueError(f"prompt indices must lie in [0, {num_prompts})")
    keep = (torch.ones(idx.numel(), dtype=torch.bool) if accepted is None
            else torch.as_tensor(list(accepted), dtype=torch.bool))
    if keep.numel() != idx.numel():
        raise ValueError(f"{keep.numel()} accepted flags but {idx.numel()} responses")
    vals = norms.detach().double().cpu()[keep]
    if average == "rms":
        vals = vals.square()
    sums = torch.zeros(num_prompts, dtype=torch.float64).index_add_(0, idx[keep], vals)
    counts = torch.zeros(num_prompts, dtype=torch.float64).index_add_(
        0, idx[keep], torch.ones_like(vals))
    means = torch.where(counts > 0, sums / counts.clamp_min(1), torch.zeros_like(sums))
    return means.sqrt() if average == "rms" else means


def pool_prompt_grad_norms(first: np.ndarray, first_count: np.ndarray, second: np.ndarray,
                           second_count: np.ndarray,
                           average: Literal["mean", "rms"] = "mean") -> np.ndarray:
    """Two :func:`prompt_grad_norms` results over disjoint response sets (``*_count``
    accepted responses each) as one over their union, without recomputing any norm; NaN
    where neither set has a response."""
    if average not in ("mean", "rms"):
        raise ValueError(f"average must be 'mean' or 'rms', got {average!r}")
    k1, k2 = np.asarray(first_count, np.float64), np.asarray(second_count, np.float64)
    a, b = np.asarray(first, np.float64), np.asarray(second, np.float64)
    power = 2 if average == "rms" else 1
    total = np.where(k1 > 0, k1 * a ** power, 0.0) + np.where(k2 > 0, k2 * b ** power, 0.0)
    k = k1 + k2
    with np.errstate(invalid="ignore", divide="ignore"):
        pooled = np.where(k > 0, total / k, np.nan)
    return np.sqrt(pooled) if average == "rms" else pooled


def distributed_norms(estimator: GradNormEstimator, batch: SequenceBatch,
                      dp_group: Optional[Any] = None) -> torch.Tensor:
    """Per-response norms of the whole batch, each data-parallel rank computing a share.

    Rows are dealt out longest first, round robin, so ranks get similar token counts; every
    rank returns the full ``(B,)`` result (the driver reads it). All tensor-parallel ranks
    of one replica must call this with the same batch.
    """
    dist = torch.distributed
    if dp_group is None or not dist.is_initialized() or dist.get_world_size(dp_group) == 1:
        return estimator.norms(batch)
    rank, world = dist.get_rank(dp_group), dist.get_world_size(dp_group)
    order = sorted(range(batch.size), key=lambda i: -int(batch.lengths[i]))
    mine = order[rank::world]
    local = estimator.norms(batch.select(mine)).tolist() if mine else []
    gathered: list = [None] * world
    dist.all_gather_object(gathered, (mine, local), group=dp_group)
    out = torch.zeros(batch.size, dtype=torch.float64)
    for rows, vals in gathered:
        if rows:
            out[torch.as_tensor(rows)] = torch.as_tensor(vals, dtype=torch.float64)
    return out
