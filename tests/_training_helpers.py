"""Two-process gloo checks of the training building blocks (run under torch.multiprocessing).

One spawn runs every check that needs real process groups: vocab-parallel log-probs at TP=2
against the full vocabulary, then, at TP=1 x DP=2, the data-parallel reductions of the loss
normaliser, the metrics and the micro-batch plan.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

VOCAB = 16


def _full_reference(full: torch.Tensor, target: torch.Tensor, temperature: float, vocab: int):
    x = full.detach().clone().requires_grad_()
    logp_all = torch.log_softmax(x[..., :vocab].float() / temperature, dim=-1)
    lp = logp_all.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return x, lp, ent


def _check_tensor_parallel_logprobs(rank: int) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from gvm_mega.training import tensor_parallel_group, vocab_parallel_logprobs

    ps.initialize_model_parallel(tensor_model_parallel_size=2, pipeline_model_parallel_size=1)
    assert tensor_parallel_group() is ps.get_tensor_model_parallel_group()
    shard_v = VOCAB // 2
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(3, 5, VOCAB, generator=gen) * 3
    w_lp = torch.randn(3, 5, generator=gen)
    w_ent = torch.randn(3, 5, generator=gen)
    # vocab 7: rank 1's shard (ids 8..15) is all padding, the empty-shard path
    for temperature in (1.0, 0.6):
        for vocab in (VOCAB, 13, 7):
            target = torch.randint(0, vocab, (3, 5), generator=gen)
            shard = full[..., rank * shard_v:(rank + 1) * shard_v].clone().requires_grad_()
            before = shard.detach().clone()
            lp, ent = vocab_parallel_logprobs(shard, target, temperature=temperature,
                                              vocab_size=vocab)
            assert torch.equal(shard.detach(), before), "logits were modified in place"
            (g_shard,) = torch.autograd.grad((lp * w_lp + ent * w_ent).sum(), shard)

            x, ref_lp, ref_ent = _full_reference(full, target, temperature, vocab)
            (g_full,) = torch.autograd.grad((ref_lp * w_lp + ref_ent * w_ent).sum(), x)
            tag = f"rank {rank} T={temperature} vocab={vocab}"
            assert (lp - ref_lp).abs().max() <= 1e-6, tag
            assert (ent - ref_ent).abs().max() <= 1e-6, tag
            g_ref = g_full[..., rank * shard_v:(rank + 1) * shard_v]
            assert (g_shard - g_ref).abs().max() <= 1e-6, tag

            # TP=2 equals TP=1 (the same function over the whole vocabulary, no group)
            lp1, ent1 = vocab_parallel_logprobs(full, target, temperature=temperature,
                                                vocab_size=vocab, group=None)
            assert (lp - lp1).abs().max() <= 1e-6 and (ent - ent1).abs().max() <= 1e-6, tag

    # megatron's own vocab-parallel cross entropy agrees (it edits its input: a clone)
    target = torch.randint(0, VOCAB, (3, 5), generator=gen)
    shard = full[..., rank * shard_v:(rank + 1) * shard_v]
    lp, _ = vocab_parallel_logprobs(shard, target)
    ce = tensor_parallel.vocab_parallel_cross_entropy(shard.clone(), target)
    assert (lp + ce).abs().max() <= 1e-6

    # bf16 logits: computed in fp32 from the bf16 values; the gradient comes back as bf16
    half = shard.to(torch.bfloat16).requires_grad_()
    lp_h, _ = vocab_parallel_logprobs(half, target)
    _, ref_h, _ = _full_reference(full.to(torch.bfloat16), target, 1.0, VOCAB)
    assert (lp_h - ref_h).abs().max() <= 1e-5
    (g_h,) = torch.autograd.grad(lp_h.sum(), half)
    assert g_h.dtype == torch.bfloat16
    ps.destroy_model_parallel()


def _check_data_parallel_reductions(rank: int) -> None:
    from megatron.core import parallel_state as ps

    from gvm_mega.training import Normaliser, plan_for_ranks, plan_micro_batches, reduce_metrics

    ps.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    dp = ps.get_data_parallel_group()
    assert dist.get_world_size(dp) == 2
    masks = [torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])]
    local = masks[:1] if rank == 0 else masks  # rank 0: 2 tokens 1 seq; rank 1: 3 tokens 2 seqs
    norm = Normaliser.from_masks(local, group=dp)
    assert (norm.tokens, norm.sequences) == (5.0, 3.0)

    parts = [{"loss": torch.tensor(1.0 + rank), "ratio_max": torch.tensor(2.0 + rank),
              "ratio_min": torch.tensor(0.5 + rank)}]
    merged = reduce_metrics(parts, group=dp)
    assert merged == {"loss": 3.0, "ratio_max": 3.0, "ratio_min": 0.5}

    lengths = [[5], [5, 5, 5]]
    plan = plan_micro_batches(lengths[rank], 5, group=dp)
    assert plan == plan_for_ranks(lengths, 5)[rank]
    assert len(plan) == 3
    ps.destroy_model_parallel()


def two_rank_worker(rank: int, port: int) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        from gvm_mega.parallel import cpu_compat

        cpu_compat.enable()
        _check_tensor_parallel_logprobs(rank)
        _check_data_parallel_reductions(rank)
    finally:
        dist.destroy_process_group()
