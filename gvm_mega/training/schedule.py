"""Learning-rate schedule: linear warmup, then constant or cosine decay to ``min_lr``.

Megatron's ``OptimizerParamScheduler`` does this and checkpoints its own state, and it only
touches ``optimizer.param_groups``, so it drives a megatron optimizer and a plain torch one
alike (on CPU too). This module turns the ``optim`` config section into its arguments.

Megatron's convention, kept here: the scheduler counts *completed* updates; call
``scheduler.step(1)`` after each successful ``optimizer.step()``. Update ``k`` (from 0) runs
at ``lr * k / warmup_steps`` during warmup (so with warmup the first update runs at lr 0),
at ``lr`` from ``warmup_steps`` on (constant), or at
``min_lr + (lr - min_lr) * (1 + cos(pi * (k - w) / (total - w))) / 2`` (cosine), reaching
``min_lr`` at ``k = total_steps``. Weight decay stays at ``optim.weight_decay``.

Resuming with a different ``train.iterations`` (extending a finished run) keeps the
checkpoint's step count and lets the new run length set the span: a constant schedule goes on
unchanged, a cosine one decays to ``min_lr`` at the new end from where the run stands.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from gvm_mega.config.schema import AlgorithmConfig, OptimConfig, TrainConfig

__all__ = ["build_lr_scheduler", "planned_optimizer_steps", "restore_scheduler",
           "scheduler_kwargs"]


def planned_optimizer_steps(train: "TrainConfig", algorithm: "AlgorithmConfig") -> int:
    """Optimizer updates in a run: iterations x PPO epochs x mini-batches per epoch."""
    return train.iterations * algorithm.ppo_epochs * algorithm.mini_batches


def scheduler_kwargs(optim: "OptimConfig", total_steps: int) -> dict[str, Any]:
    """Keyword arguments of megatron's ``OptimizerParamScheduler`` (all but ``optimizer``).

    ``total_steps`` is the number of optimizer updates the cosine decay spans (see
    :func:`planned_optimizer_steps`); it must exceed ``optim.warmup_steps`` for cosine.
    """
    if optim.min_lr > optim.lr:
        raise ValueError(f"optim.min_lr ({optim.min_lr}) must not exceed optim.lr ({optim.lr})")
    warmup = optim.warmup_steps
    if optim.schedule == "cosine":
        if total_steps <= warmup:
            raise ValueError(f"a cosine schedule needs more optimizer steps ({total_steps}) than "
                             f"optim.warmup_steps ({warmup})")
        decay_steps, style = total_steps, "cosine"
    elif optim.schedule == "constant":
        # Megatron requires decay_steps > warmup even when nothing decays.
        decay_steps, style = max(total_steps, warmup + 1), "constant"
    else:
        raise ValueError(f"optim.schedule must be 'constant' or 'cosine', got {optim.schedule!r}")
    return dict(
        init_lr=0.0 if warmup > 0 else optim.lr,
        max_lr=optim.lr,
        min_lr=optim.min_lr if style == "cosine" else optim.lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=decay_steps,
        lr_decay_style=style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=False,
    )


def build_lr_scheduler(optimizer: Any, optim: "OptimConfig",
                       total_steps: int) -> "OptimizerParamScheduler":
    """Megatron's scheduler over ``optimizer`` (anything with ``param_groups``); sets lr now.

    Loading a checkpointed scheduler state (:func:`restore_scheduler`) checks it against the
    config: a changed lr, warmup or schedule is an error rather than a silent override.
    """
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(optimizer, **scheduler_kwargs(optim, total_steps))


# Entries of megatron's scheduler state that follow the run's length, not the schedule's shape.
_SPAN_KEYS = ("lr_decay_steps", "wd_incr_steps")


def restore_scheduler(scheduler: "OptimizerParamScheduler", state: dict[str, Any]) -> None:
    """Load a checkpointed scheduler ``state`` into ``scheduler`` built for this run.

    The span (decay steps) is taken from ``scheduler``, i.e. from the run's current
    ``train.iterations``, which may grow on resume; megatron's own check still refuses any
    other difference (lr, min_lr, warmup, style) between the checkpoint and the config.
    """
    scheduler.load_state_dict({**state, **{k: getattr(scheduler, k) for k in _SPAN_KEYS}})
