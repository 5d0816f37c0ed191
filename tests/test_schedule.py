"""Learning-rate schedule from the optim config, through megatron's OptimizerParamScheduler."""
from __future__ import annotations

import math

import pytest
import torch

from gvm_mega.config.schema import AlgorithmConfig, OptimConfig, TrainConfig
from gvm_mega.training import (build_lr_scheduler, planned_optimizer_steps, restore_scheduler,
                               scheduler_kwargs)


def _optimizer():
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=123.0)


def _lrs(optim: OptimConfig, total: int, updates: int) -> tuple[list[float], object]:
    opt = _optimizer()
    sched = build_lr_scheduler(opt, optim, total)
    lrs = []
    for _ in range(updates):
        lrs.append(opt.param_groups[0]["lr"])  # the lr the next update runs at
        sched.step(1)
    return lrs, (opt, sched)


def test_cosine_with_warmup_hand_computed():
    optim = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=2, schedule="cosine",
                        weight_decay=0.01)
    lrs, (opt, _) = _lrs(optim, total=6, updates=8)
    # warmup: 1e-3 * k / 2 for k = 0, 1, 2 ; then 1e-4 + 9e-4 * (1 + cos(pi * (k - 2) / 4)) / 2
    #   k=3: 1e-4 + 9e-4 * 0.853553 = 8.68198e-4 ; k=4: 1e-4 + 9e-4 * 0.5 = 5.5e-4
    #   k=5: 1e-4 + 9e-4 * 0.146447 = 2.31802e-4 ; k=6 and after: min_lr
    c = math.cos(math.pi / 4)
    expect = [0.0, 5e-4, 1e-3, 1e-4 + 9e-4 * (1 + c) / 2, 5.5e-4, 1e-4 + 9e-4 * (1 - c) / 2,
              1e-4, 1e-4]
    assert lrs == pytest.approx(expect, rel=1e-12, abs=1e-15)
    assert opt.param_groups[0]["weight_decay"] == 0.01


def test_constant_with_and_without_warmup():
    lrs, _ = _lrs(OptimConfig(lr=3e-4), total=5, updates=4)
    assert lrs == [3e-4] * 4
    lrs, _ = _lrs(OptimConfig(lr=3e-4, warmup_steps=3, min_lr=1e-5), total=2, updates=6)
    # 3e-4 * k / 3, then flat (min_lr plays no part in a constant schedule)
    assert lrs == pytest.approx([0.0, 1e-4, 2e-4, 3e-4, 3e-4, 3e-4])


def test_state_round_trip_and_config_mismatch():
    optim = OptimConfig(lr=1e-3, min_lr=0.0, warmup_steps=1, schedule="cosine")
    _, (_, sched) = _lrs(optim, total=10, updates=4)
    state = sched.state_dict()
    opt2 = _optimizer()
    resumed = build_lr_scheduler(opt2, optim, 10)
    resumed.load_state_dict(state)
    assert resumed.num_steps == 4
    assert opt2.param_groups[0]["lr"] == pytest.approx(sched.get_lr(opt2.param_groups[0]))
    # 1e-3 * (1 + cos(pi * 3 / 9)) / 2 = 1e-3 * 0.75
    assert opt2.param_groups[0]["lr"] == pytest.approx(7.5e-4)
    changed = build_lr_scheduler(_optimizer(), OptimConfig(lr=2e-3, warmup_steps=1,
                                                           schedule="cosine"), 10)
    with pytest.raises(AssertionError, match="learning rate"):
        restore_scheduler(changed, state)


def test_resume_into_a_longer_run_takes_the_new_span():
    """Extending a finished run (a larger train.iterations on resume) keeps the step count;
    megatron's plain load refuses the changed total."""
    _, (_, const) = _lrs(OptimConfig(lr=3e-4), total=10, updates=10)
    opt = _optimizer()
    longer = build_lr_scheduler(opt, OptimConfig(lr=3e-4), 20)
    with pytest.raises(AssertionError, match="total number of iterations"):
        build_lr_scheduler(_optimizer(), OptimConfig(lr=3e-4), 20).load_state_dict(
            const.state_dict())
    restore_scheduler(longer, const.state_dict())
    assert longer.num_steps == 10 and longer.lr_decay_steps == 20
    assert opt.param_groups[0]["lr"] == 3e-4

    cosine = OptimConfig(lr=1e-3, min_lr=0.0, warmup_steps=1, schedule="cosine")
    _, (_, sched) = _lrs(cosine, total=10, updates=4)
    opt = _optimizer()
    restore_scheduler(build_lr_scheduler(opt, cosine, 19), sched.state_dict())
    # from step 4 the decay now runs to step 19: 1e-3 * (1 + cos(pi * 3 / 18)) / 2
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * (1 + math.cos(math.pi / 6)) / 2)
    with pytest.raises(AssertionError, match="warmup"):
        restore_scheduler(build_lr_scheduler(_optimizer(), OptimConfig(
            lr=1e-3, min_lr=0.0, warmup_steps=2, schedule="cosine"), 19), sched.state_dict())


def test_kwargs_and_errors():
    kw = scheduler_kwargs(OptimConfig(lr=1e-3, warmup_steps=4, schedule="constant"), 2)
    assert kw["lr_decay_steps"] == 5 and kw["lr_decay_style"] == "constant"
    assert kw["init_lr"] == 0.0 and kw["max_lr"] == 1e-3
    with pytest.raises(ValueError, match="optim.warmup_steps"):
        scheduler_kwargs(OptimConfig(warmup_steps=5, schedule="cosine"), 5)
    with pytest.raises(ValueError, match="optim.min_lr"):
        scheduler_kwargs(OptimConfig(lr=1e-4, min_lr=1e-3), 5)
    assert planned_optimizer_steps(TrainConfig(iterations=10),
                                   AlgorithmConfig(ppo_epochs=2, mini_batches=3)) == 60
