"""Turning scored samples into policy-gradient losses: log-probs, losses, packing, lr schedule.

- :func:`vocab_parallel_logprobs`: per-token log-probs and entropy from vocab-parallel logits.
- :func:`compute_loss` and the named losses (RAFT, RAFT++, GRPO, PPO clip) with KL penalty,
  entropy bonus and globally normalised aggregation; :func:`grpo_advantages`.
- :func:`plan_micro_batches` / :func:`collate_micro_batch`: token-budget micro-batches, the
  same count on every data-parallel rank.
- :func:`build_lr_scheduler`: warmup + constant or cosine, via megatron's scheduler.
"""
from gvm_mega.training.logprobs import TokenLogProbs, tensor_parallel_group, vocab_parallel_logprobs
from gvm_mega.training.losses import (
    LossOutput,
    LossSpec,
    Normaliser,
    accepted,
    aggregate,
    compute_loss,
    grpo_advantages,
    grpo_loss,
    k3_kl,
    megatron_loss_scale,
    ppo_clip_loss,
    raft_loss,
    raft_plus_plus_loss,
    reduce_metrics,
    sample_advantages,
)
from gvm_mega.training.packing import (
    MicroBatch,
    collate_micro_batch,
    input_lengths,
    min_micro_batches,
    padded_cost,
    plan_for_ranks,
    plan_micro_batches,
)
from gvm_mega.training.schedule import build_lr_scheduler, planned_optimizer_steps, scheduler_kwargs

__all__ = [
    "LossOutput", "LossSpec", "MicroBatch", "Normaliser", "TokenLogProbs", "accepted",
    "aggregate", "build_lr_scheduler", "collate_micro_batch", "compute_loss", "grpo_advantages",
    "grpo_loss", "input_lengths", "k3_kl", "megatron_loss_scale", "min_micro_batches",
    "padded_cost", "plan_for_ranks", "plan_micro_batches", "planned_optimizer_steps",
    "ppo_clip_loss", "raft_loss", "raft_plus_plus_loss", "reduce_metrics", "sample_advantages",
    "scheduler_kwargs", "tensor_parallel_group", "vocab_parallel_logprobs",
]
