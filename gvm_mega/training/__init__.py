"""Turning scored samples into policy-gradient losses: log-probs, losses, packing, lr schedule.

- :func:`vocab_parallel_logprobs`: per-token log-probs and entropy from vocab-parallel logits.
- :func:`compute_loss` and the named losses (RAFT, RAFT++, GRPO, PPO clip) with KL penalty,
  entropy bonus and globally normalised aggregation; :func:`grpo_advantages`.
- :func:`plan_micro_batches` / :func:`collate_micro_batch`: token-budget micro-batches, the
  same count on every data-parallel rank.
- :func:`build_lr_scheduler`: warmup + constant or cosine, via megatron's scheduler.
- :class:`SampleBatch` and :func:`forward_logprobs`: response-token log-probs and entropy
  through megatron's pipeline schedule, forward only (behaviour and reference log-probs).
- :class:`Policy`: model + megatron DDP + optimizer + lr schedule; ``logprobs(batch)`` and
  ``train_step(batch) -> StepReport`` (non-finite updates are skipped and reported).
- :class:`CheckpointManager`: dist-checkpointing saves (model, optimizer, schedule, RNG,
  caller state), atomic with a ``latest`` pointer and keep-last-k; loads at any layout.
"""
from gvm_mega.training.checkpoint import CheckpointManager, LoadedCheckpoint, checkpoint_name
from gvm_mega.training.forward import (
    ResponseLogProbs,
    SampleBatch,
    forward_logprobs,
    pack_batch,
    run_schedule,
)
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
from gvm_mega.training.schedule import (build_lr_scheduler, planned_optimizer_steps,
                                         restore_scheduler, scheduler_kwargs)
from gvm_mega.training.step import Policy, StepReport, optimizer_config

__all__ = [
    "CheckpointManager", "LoadedCheckpoint", "Policy", "ResponseLogProbs", "SampleBatch",
    "StepReport", "checkpoint_name", "forward_logprobs", "optimizer_config", "pack_batch",
    "run_schedule",
    "LossOutput", "LossSpec", "MicroBatch", "Normaliser", "TokenLogProbs", "accepted",
    "aggregate", "build_lr_scheduler", "collate_micro_batch", "compute_loss", "grpo_advantages",
    "grpo_loss", "input_lengths", "k3_kl", "megatron_loss_scale", "min_micro_batches",
    "padded_cost", "plan_for_ranks", "plan_micro_batches", "planned_optimizer_steps",
    "ppo_clip_loss", "raft_loss", "raft_plus_plus_loss", "reduce_metrics", "restore_scheduler",
    "sample_advantages",
    "scheduler_kwargs", "tensor_parallel_group", "vocab_parallel_logprobs",
]
