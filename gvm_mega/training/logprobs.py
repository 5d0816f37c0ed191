"""Per-token log-probs and entropy of given target tokens from vocab-parallel logits.

Under tensor parallelism each rank of the TP group holds a contiguous shard of the vocabulary
(megatron's layout: rank r owns ``[r * V_local, (r + 1) * V_local)``). The full-vocabulary
``log_softmax`` is never materialised: the running max, the sum of exponentials, the target
logit and the entropy's ``sum p * z`` are reduced over the group (two all-reduces of
``[tokens]``-sized tensors per call). The result equals ``log_softmax(logits / T)`` of the
gathered logits, which is also what SGLang reports as behaviour log-probs.

Memory: the autograd function keeps one fp32 tensor the size of the local logits (the
log-probs); the backward pass needs no communication, because the loss is computed identically
on every rank of the TP group and so the incoming gradients are already replicated.

Megatron's ``vocab_parallel_cross_entropy`` is not used: it edits fp32 logits in place and
gives no entropy.
"""
from __future__ import annotations

import sys
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

__all__ = ["TokenLogProbs", "vocab_parallel_logprobs", "tensor_parallel_group"]


class TokenLogProbs(NamedTuple):
    """Log-probability of each target token and the entropy of the distribution it came from."""

    logprobs: torch.Tensor
    entropy: torch.Tensor


def tensor_parallel_group() -> Optional[dist.ProcessGroup]:
    """Megatron's tensor-parallel group when its parallel state is set up, else ``None``.

    Megatron is not imported here: if nothing has imported it, no parallel state can exist.
    """
    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is None or not dist.is_available() or not dist.is_initialized():
        return None
    if not ps.model_parallel_is_initialized():
        return None
    return ps.get_tensor_model_parallel_group()


def _group_info(group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class _VocabParallelLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, temperature, vocab_size, group):
        rank, world = _group_info(group)
        local_v = logits.shape[-1]
        start = rank * local_v
        # Columns at or past the true vocabulary size are padding: they are left out entirely.
        n_valid = max(0, min(local_v, vocab_size - start))

        x = logits[..., :n_valid].to(torch.float32, copy=True)
        if temperature != 1.0:
            x.div_(temperature)
        if n_valid > 0:
            m = x.max(dim=-1).values
        else:
            m = torch.full(target.shape, float("-inf"), dtype=torch.float32, device=x.device)
        if world > 1:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        z = x.sub_(m.unsqueeze(-1))  # z <= 0, the global max is 0

        local_t = target - start
        owned = (local_t >= 0) & (local_t < n_valid)
        if n_valid > 0:
            idx = local_t.clamp(0, n_valid - 1).unsqueeze(-1)
            z_t = z.gather(-1, idx).squeeze(-1) * owned
            e = z.exp()
            sum_e = e.sum(dim=-1)
            sum_ez = e.mul_(z).sum(dim=-1)
            del e
        else:
            z_t = sum_e = sum_ez = torch.zeros(target.shape, dtype=torch.float32, device=x.device)
        stats = torch.stack([sum_e, sum_ez, z_t])
        if world > 1:
            dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
        sum_e, sum_ez, z_t = stats.unbind(0)

        log_z = sum_e.log()
        logprobs = z_t - log_z
        entropy = log_z - sum_ez / sum_e
        lp = z.sub_(log_z.unsqueeze(-1))  # local log-probs, kept for the backward pass
        ctx.save_for_backward(lp, entropy, local_t, owned)
        ctx.temperature = temperature
        ctx.local_v = local_v
        ctx.logits_dtype = logits.dtype
        return logprobs, entropy

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        lp, entropy, local_t, owned = ctx.saved_tensors
        # d logp_t / dz_j = 1[j = t] - p_j ;  d H / dz_j = -p_j (log p_j + H)
        g_lp = g_lp.float()
        g_ent = g_ent.float()
        grad = lp + entropy.unsqueeze(-1)
        grad.mul_(g_ent.unsqueeze(-1)).add_(g_lp.unsqueeze(-1)).mul_(lp.exp()).neg_()
        n_valid = lp.shape[-1]
        if n_valid > 0:
            idx = local_t.clamp(0, n_valid - 1).unsqueeze(-1)
            grad.scatter_add_(-1, idx, (g_lp * owned).unsqueeze(-1))
        if ctx.temperature != 1.0:
            grad.div_(ctx.temperature)
        if n_valid < ctx.local_v:
            grad = torch.nn.functional.pad(grad, (0, ctx.local_v - n_valid))
        return grad.to(ctx.logits_dtype), None, None, None, None


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_size: Optional[int] = None,
    group: Optional[dist.ProcessGroup] | str = "auto",
) -> TokenLogProbs:
    """Log-prob and entropy of ``target`` under ``softmax(logits / temperature)``.

    Args:
        logits: ``[..., V_local]``, this rank's vocabulary shard (any float dtype; the
            arithmetic is fp32). Not modified.
        target: ``[...]`` token ids in the global vocabulary, ``0 <= id < vocab_size``.
        temperature: sampling temperature; the result is ``log_softmax(logits / T)``.
        vocab_size: the true vocabulary size when the output layer is padded past it (the
            padding columns are excluded from the softmax); default ``V_local * tp``.
        group: the tensor-parallel process group; ``"auto"`` takes megatron's when its
            parallel state is initialised, ``None`` means the logits hold the full vocabulary.

    Returns:
        ``TokenLogProbs(logprobs, entropy)``, both fp32 ``[...]``, identical on every rank of
        the group and differentiable with respect to ``logits``.
    """
    if group == "auto":
        group = tensor_parallel_group()
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"logits shape {tuple(logits.shape)} does not match target shape "
                         f"{tuple(target.shape)} (expected target.shape + (vocab_shard,))")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must hold integer token ids, got {target.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _, world = _group_info(group)
    padded_vocab = logits.shape[-1] * world
    if vocab_size is None:
        vocab_size = padded_vocab
    if not 0 < vocab_size <= padded_vocab:
        raise ValueError(f"vocab_size {vocab_size} must be in [1, {padded_vocab}] "
                         f"(vocab shard {logits.shape[-1]} x tensor-parallel size {world})")
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= vocab_size):
        raise ValueError(f"target ids must be in [0, {vocab_size}); got range "
                         f"[{int(target.min())}, {int(target.max())}]")
    lp, ent = _VocabParallelLogProbs.apply(logits, target.long(), float(temperature),
                                          int(vocab_size), group)
    return TokenLogProbs(lp, ent)
