"""Policy losses of RAFT, RAFT++ and GRPO, with KL penalty, entropy bonus and aggregation.

All losses take per-token tensors shaped ``[sequences, tokens]`` (one sample per row, as built
by :mod:`gvm_mega.training.packing`) and a 0/1 ``loss_mask`` marking the response tokens.

Aggregation and micro-batching. A global batch is split into micro-batches and over
data-parallel ranks, and each piece must contribute its exact share of the whole-batch loss.
So the normaliser is the *global* count (:class:`Normaliser`, built once per optimizer step
from every micro-batch's mask and summed over the data-parallel group), never a local one:

- ``token-mean``: ``sum over all loss tokens of l_t / N_tokens``;
- ``seq-mean``: ``sum over sequences of (mean of l_t over the sequence) / N_sequences``,
  counting only sequences with at least one loss token.

With it, the losses of all micro-batches on all ranks *sum* to the whole-batch loss, and so do
their gradients. Megatron's pipeline schedules divide each micro-batch loss by the number of
micro-batches and its DDP averages gradients over the data-parallel group; multiply the loss
by :func:`megatron_loss_scale` to undo both.

Metrics are returned the same way: each is this piece's share of a global value, so
:func:`reduce_metrics` sums them (``ratio_max``/``ratio_min`` take max/min).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Literal, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from gvm_mega.training._comm import all_reduce_host

if TYPE_CHECKING:
    from gvm_mega.config.schema import AlgorithmConfig

__all__ = [
    "Aggregation", "LossOutput", "LossSpec", "Normaliser", "accepted", "aggregate",
    "compute_loss", "grpo_advantages", "grpo_loss", "k3_kl", "megatron_loss_scale",
    "ppo_clip_loss", "raft_loss", "raft_plus_plus_loss", "reduce_metrics", "sample_advantages",
]

Aggregation = Literal["token-mean", "seq-mean"]
_AGGREGATIONS = ("token-mean", "seq-mean")
LOG_RATIO_LIMIT = 20.0  # log-ratios are clamped to +-20 before exp so that exp stays finite
METRIC_REDUCTIONS = {"ratio_max": "max", "ratio_min": "min"}  # every other metric sums


@dataclass(frozen=True)
class Normaliser:
    """Global counts that turn sums into means: loss tokens, and sequences with any."""

    tokens: float
    sequences: float

    @classmethod
    def from_masks(cls, masks: Iterable[torch.Tensor],
                   group: Optional[dist.ProcessGroup] = None) -> "Normaliser":
        """Counts over the given ``[sequences, tokens]`` masks, summed over ``group`` if given.

        Pass the masks of every micro-batch of this rank and the data-parallel group.
        """
        counts = torch.zeros(2, dtype=torch.float64)
        for mask in masks:
            if mask.dim() != 2:
                raise ValueError(f"loss_mask must be [sequences, tokens], got shape "
                                 f"{tuple(mask.shape)}")
            m = mask.detach().to("cpu", torch.float64)
            counts[0] += m.sum()
            counts[1] += (m.sum(dim=-1) > 0).sum()
        if group is not None:
            counts = all_reduce_host(counts, dist.ReduceOp.SUM, group)
        return cls(tokens=float(counts[0]), sequences=float(counts[1]))

    def for_aggregation(self, agg: Aggregation) -> float:
        return self.tokens if agg == "token-mean" else self.sequences


@dataclass
class LossOutput:
    """This piece's share of the global loss, and detached metrics (see the module doc)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


def _check_agg(agg: str) -> None:
    if agg not in _AGGREGATIONS:
        raise ValueError(f"loss aggregation must be one of {_AGGREGATIONS}, got {agg!r}")


def aggregate(values: torch.Tensor, loss_mask: torch.Tensor, agg: Aggregation,
              normaliser: Normaliser) -> torch.Tensor:
    """Masked ``token-mean`` or ``seq-mean`` of per-token ``values`` with global counts."""
    _check_agg(agg)
    mask = loss_mask.to(values.dtype)
    if agg == "token-mean":
        return (values * mask).sum() / max(normaliser.tokens, 1.0)
    per_seq = (values * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1.0)
    return per_seq.sum() / max(normaliser.sequences, 1.0)


def _token_mean(values: torch.Tensor, mask: torch.Tensor, normaliser: Normaliser) -> torch.Tensor:
    return (values.detach() * mask).sum() / max(normaliser.tokens, 1.0)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || reference): ``exp(d) - d - 1``, ``d = ref - logp``.

    Unbiased for samples drawn from the policy, always >= 0, and of lower variance than the
    plain ``logp - ref`` (Schulman, "Approximating KL divergence").
    """
    d = (ref_logprobs - logprobs).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    return torch.expm1(d) - d


def _penalties(loss: torch.Tensor, metrics: dict, logprobs, mask, agg, norm, *,
               ref_logprobs, kl_coef, entropy, entropy_coef) -> torch.Tensor:
    if kl_coef and ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs (log-probs of the reference policy)")
    if entropy_coef and entropy is None:
        raise ValueError("entropy_coef != 0 needs the per-token entropy of the policy")
    if ref_logprobs is not None:
        kl = k3_kl(logprobs, ref_logprobs)
        if kl_coef:
            loss = loss + kl_coef * aggregate(kl, mask, agg, norm)
        metrics["kl"] = _token_mean(kl, mask, norm)
    if entropy is not None:
        if entropy_coef:
            loss = loss - entropy_coef * aggregate(entropy, mask, agg, norm)
        metrics["entropy"] = _token_mean(entropy, mask, norm)
    return loss


def _prepare(logprobs, loss_mask, agg, normaliser, **others):
    _check_agg(agg)
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [sequences, tokens], got shape {tuple(logprobs.shape)}")
    if loss_mask.shape != logprobs.shape:
        raise ValueError(f"loss_mask shape {tuple(loss_mask.shape)} != logprobs shape "
                         f"{tuple(logprobs.shape)}")
    for name, value in others.items():
        if value is not None and value.shape != logprobs.shape:
            raise ValueError(f"{name} shape {tuple(value.shape)} != logprobs shape "
                             f"{tuple(logprobs.shape)}")
    if normaliser is None:
        normaliser = Normaliser.from_masks([loss_mask])
    return loss_mask.to(logprobs.dtype), normaliser


def raft_loss(
    logprobs: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    agg: Aggregation = "token-mean",
    normaliser: Optional[Normaliser] = None,
    ref_logprobs: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    entropy: Optional[torch.Tensor] = None,
    entropy_coef: float = 0.0,
) -> LossOutput:
    """RAFT: supervised fine-tuning (negative log-likelihood) on accepted responses only.

    The caller passes accepted samples only (see :func:`accepted`); rejected ones must not
    enter the batch, or they would dilute the normaliser.
    """
    mask, norm = _prepare(logprobs, loss_mask, agg, normaliser, ref_logprobs=ref_logprobs,
                          entropy=entropy)
    nll = aggregate(-logprobs, mask, agg, norm)
    metrics = {"pg_loss": nll.detach().clone()}
    loss = _penalties(nll, metrics, logprobs, mask, agg, norm, ref_logprobs=ref_logprobs,
                      kl_coef=kl_coef, entropy=entropy, entropy_coef=entropy_coef)
    metrics["loss"] = loss.detach().clone()  # schedules edit the loss in place
    return LossOutput(loss, metrics)


def ppo_clip_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    agg: Aggregation = "token-mean",
    normaliser: Optional[Normaliser] = None,
    ref_logprobs: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    entropy: Optional[torch.Tensor] = None,
    entropy_coef: float = 0.0,
) -> LossOutput:
    """PPO clipped surrogate with importance ratio ``r = exp(logp - old_logp)``.

    Per token ``l = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))``; ``advantages`` is
    ``[sequences]`` (broadcast over tokens) or ``[sequences, tokens]``. ``clip_fraction`` is
    the share of loss tokens where the clipped term is the larger (the clip is active).
    """
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip_low and clip_high must be >= 0, got {clip_low}, {clip_high}")
    mask, norm = _prepare(logprobs, loss_mask, agg, normaliser, old_logprobs=old_logprobs,
                          ref_logprobs=ref_logprobs, entropy=entropy)
    adv = advantages.to(logprobs.dtype)
    if adv.dim() == 1:
        if adv.shape[0] != logprobs.shape[0]:
            raise ValueError(f"advantages has {adv.shape[0]} entries for "
                             f"{logprobs.shape[0]} sequences")
        adv = adv.unsqueeze(-1)
    elif adv.shape != logprobs.shape:
        raise ValueError(f"advantages shape {tuple(adv.shape)} must be [sequences] or "
                         f"{tuple(logprobs.shape)}")
    log_ratio = (logprobs - old_logprobs.to(logprobs.dtype)).clamp(-LOG_RATIO_LIMIT,
                                                                   LOG_RATIO_LIMIT)
    ratio = log_ratio.exp()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    pg = aggregate(per_token, mask, agg, norm)

    r = ratio.detach()
    on = mask > 0
    metrics = {
        "pg_loss": pg.detach().clone(),
        "clip_fraction": _token_mean((clipped > unclipped).to(r.dtype), mask, norm),
        "ratio_mean": _token_mean(r, mask, norm),
        "ratio_max": r[on].max() if on.any() else r.new_tensor(float("-inf")),
        "ratio_min": r[on].min() if on.any() else r.new_tensor(float("inf")),
    }
    loss = _penalties(pg, metrics, logprobs, mask, agg, norm, ref_logprobs=ref_logprobs,
                      kl_coef=kl_coef, entropy=entropy, entropy_coef=entropy_coef)
    metrics["loss"] = loss.detach().clone()  # schedules edit the loss in place
    return LossOutput(loss, metrics)


def raft_plus_plus_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                        loss_mask: torch.Tensor, **kwargs) -> LossOutput:
    """RAFT++: RAFT with an importance ratio to the behaviour policy and PPO clipping.

    Equal to :func:`ppo_clip_loss` with advantage 1 on every (accepted) sample, so only the
    upper clip ``1 + clip_high`` can bind. Keyword arguments as for :func:`ppo_clip_loss`.
    """
    ones = torch.ones(logprobs.shape[0], dtype=logprobs.dtype, device=logprobs.device)
    return ppo_clip_loss(logprobs, old_logprobs, ones, loss_mask, **kwargs)


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
              loss_mask: torch.Tensor, **kwargs) -> LossOutput:
    """GRPO: PPO clip loss with group-normalised advantages from :func:`grpo_advantages`."""
    return ppo_clip_loss(logprobs, old_logprobs, advantages, loss_mask, **kwargs)


def grpo_advantages(rewards: torch.Tensor | Sequence[float],
                    group_ids: torch.Tensor | Sequence[int], *,
                    std_norm: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Per-sample advantages ``(r - mean_g) / (std_g + eps)`` over each prompt's group.

    Groups may differ in size (GVM gives prompt i its own n_i). ``std_g`` is the sample
    standard deviation (Bessel-corrected, as in TRL and verl); a group of one sample gets
    advantage 0. ``std_norm=False`` is Dr.GRPO: ``r - mean_g`` without the division.
    """
    r = torch.as_tensor(rewards, dtype=torch.float64).flatten()
    g = torch.as_tensor(group_ids).flatten()
    if r.shape != g.shape:
        raise ValueError(f"{r.numel()} rewards but {g.numel()} group ids")
    if r.numel() == 0:
        return torch.zeros(0, dtype=torch.float32)
    if not torch.isfinite(r).all():
        raise ValueError("rewards must be finite")
    _, inv = torch.unique(g, return_inverse=True)
    n_groups = int(inv.max()) + 1
    count = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inv, torch.ones_like(r))
    mean = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inv, r) / count
    centred = r - mean[inv]
    if std_norm:
        sq = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inv, centred ** 2)
        std = (sq / (count - 1).clamp(min=1)).sqrt()
        centred = centred / (std[inv] + eps)
    return centred.to(torch.float32)


def accepted(rewards: torch.Tensor | Sequence[float], threshold: float = 0.5) -> torch.Tensor:
    """Boolean mask of accepted samples (verifier reward >= threshold; rewards are 0 or 1)."""
    return torch.as_tensor(rewards, dtype=torch.float64) >= threshold


@dataclass(frozen=True)
class LossSpec:
    """Which loss an algorithm trains with, and its coefficients (from ``algorithm``)."""

    kind: Literal["sft", "ppo-clip"]
    uses_group_advantages: bool
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0
    entropy_coef: float = 0.0
    agg: Aggregation = "token-mean"
    std_norm: bool = True
    prompt_weight: Literal["pooled", "prompt-mean", "per-draw"] = "pooled"

    @classmethod
    def from_config(cls, algo: "AlgorithmConfig") -> "LossSpec":
        name = algo.name.removeprefix("gvm-")
        kinds = {"raft": ("sft", False), "raft++": ("ppo-clip", False),
                 "grpo": ("ppo-clip", True)}
        if name not in kinds:
            raise ValueError(f"algorithm.name {algo.name!r} has no loss; known: "
                             f"raft, raft++, grpo, gvm-raft++, gvm-grpo")
        kind, group_adv = kinds[name]
        return cls(kind=kind, uses_group_advantages=group_adv, clip_low=algo.clip_low,
                   clip_high=algo.clip_high, kl_coef=algo.kl_coef,
                   entropy_coef=algo.entropy_coef, agg=algo.loss_agg,
                   std_norm=algo.grpo_std_norm, prompt_weight=algo.prompt_weight)


def sample_advantages(spec: LossSpec, rewards: torch.Tensor | Sequence[float],
                      group_ids: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Which samples to train on, and their advantages: ``(keep [bool], advantages [kept])``.

    RAFT and RAFT++ keep the accepted samples with advantage 1; GRPO keeps every sample with
    its group-normalised advantage (a group whose rewards are all equal gets 0).

    With ``prompt_weight="prompt-mean"`` each kept sample's advantage is also scaled by
    ``(kept / prompts with any kept) / kept of its prompt``: every prompt then carries the
    same total weight whatever its sample count (the per-prompt normalisation of the
    estimator that GVM's variance formula describes), and the mean weight stays 1.

    With ``prompt_weight="per-draw"`` it is scaled by ``(samples / prompts) / samples of its
    prompt`` (drawn, kept or not): a prompt then weighs by its acceptance rate whatever its
    n_i, so in expectation the update is the one uniform sampling gives (for RAFT++ the
    gradient of mean accuracy) and an allocation changes only its variance.
    """
    r = torch.as_tensor(rewards, dtype=torch.float64).flatten()
    gid = torch.as_tensor(group_ids, dtype=torch.int64).flatten()
    if spec.uses_group_advantages:
        keep = torch.ones_like(r, dtype=torch.bool)
        adv = grpo_advantages(r, group_ids, std_norm=spec.std_norm)
    else:
        keep = accepted(r)
        adv = torch.ones(int(keep.sum()), dtype=torch.float32)
    if spec.prompt_weight == "prompt-mean" and adv.numel():
        kept_groups = gid[keep]
        _, inverse, counts = torch.unique(kept_groups, return_inverse=True, return_counts=True)
        scale = (kept_groups.numel() / counts.numel()) / counts[inverse].to(torch.float64)
        adv = (adv.to(torch.float64) * scale).to(adv.dtype)
    elif spec.prompt_weight == "per-draw" and adv.numel():
        _, inverse, counts = torch.unique(gid, return_inverse=True, return_counts=True)
        scale = (gid.numel() / counts.numel()) / counts[inverse].to(torch.float64)
        adv = (adv.to(torch.float64) * scale[keep]).to(adv.dtype)
    return keep, adv


def compute_loss(
    spec: LossSpec,
    *,
    logprobs: torch.Tensor,
    loss_mask: torch.Tensor,
    old_logprobs: Optional[torch.Tensor] = None,
    advantages: Optional[torch.Tensor] = None,
    ref_logprobs: Optional[torch.Tensor] = None,
    entropy: Optional[torch.Tensor] = None,
    normaliser: Optional[Normaliser] = None,
) -> LossOutput:
    """The loss ``spec`` names, for one micro-batch (``normaliser``: the global counts)."""
    common = dict(agg=spec.agg, normaliser=normaliser, ref_logprobs=ref_logprobs,
                  kl_coef=spec.kl_coef, entropy=entropy, entropy_coef=spec.entropy_coef)
    if spec.kind == "sft":
        return raft_loss(logprobs, loss_mask, **common)
    if old_logprobs is None:
        raise ValueError("the PPO clip loss needs old_logprobs (behaviour-policy log-probs)")
    if advantages is None:
        if spec.uses_group_advantages:
            raise ValueError("GRPO needs advantages (see grpo_advantages)")
        return raft_plus_plus_loss(logprobs, old_logprobs, loss_mask, clip_low=spec.clip_low,
                                   clip_high=spec.clip_high, **common)
    return ppo_clip_loss(logprobs, old_logprobs, advantages, loss_mask, clip_low=spec.clip_low,
                         clip_high=spec.clip_high, **common)


def megatron_loss_scale(num_microbatches: int, data_parallel_size: int) -> float:
    """Factor that undoes megatron's averaging of a globally-normalised loss.

    Megatron's schedules divide a two-output ``loss_func``'s loss by ``num_microbatches``, and
    its DDP scales gradients by ``1 / data_parallel_size`` (``calculate_per_token_loss`` off).
    """
    if num_microbatches < 1 or data_parallel_size < 1:
        raise ValueError(f"num_microbatches ({num_microbatches}) and data_parallel_size "
                         f"({data_parallel_size}) must be >= 1")
    return float(num_microbatches * data_parallel_size)


def reduce_metrics(parts: Sequence[Mapping[str, torch.Tensor]],
                   group: Optional[dist.ProcessGroup] = None) -> dict[str, float]:
    """Combine per-micro-batch metrics (and over ``group``, e.g. data-parallel) to globals.

    Every rank of ``group`` must pass the same metric names. Ratio extremes over no token at
    all come out as nan.
    """
    names = sorted({k for p in parts for k in p})
    combine = {"sum": lambda a, b: a + b, "max": max, "min": min}
    neutral = {"sum": 0.0, "max": float("-inf"), "min": float("inf")}
    red = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    out: dict[str, float] = {}
    for op in ("sum", "max", "min"):
        keys = [k for k in names if METRIC_REDUCTIONS.get(k, "sum") == op]
        if not keys:
            continue
        acc = []
        for k in keys:
            v = neutral[op]
            for p in parts:
                if k in p:
                    v = combine[op](v, float(p[k]))
            acc.append(v)
        vals = torch.tensor(acc, dtype=torch.float64)
        if group is not None:
            vals = all_reduce_host(vals, red[op], group)
        for k, v in zip(keys, vals.tolist()):
            out[k] = v if op == "sum" or abs(v) != float("inf") else float("nan")
    return out
