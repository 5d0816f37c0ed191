"""Supervised warm start: SFT on the task's worked solutions before RL.

A tiny model starting from random weights never produces a verifiable answer, so RL has no
signal; a short SFT phase on (problem, worked solution) pairs gives it a starting accuracy
that RL then improves on. Runs on every rank; each DP rank takes its share of each batch.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Any, Callable, Sequence

from gvm_mega.data import Prompt
from gvm_mega.training import LossSpec, Policy, SampleBatch


def sft_pairs(prompts: Sequence[Prompt], template: Any, tokenizer: Any) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, solution ids + EOS) for every prompt that has a worked solution."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pairs = []
    for p in prompts:
        if p.solution:
            pairs.append((tokenizer.encode_prompt(template.render(p.problem)),
                          tokenizer.encode(p.solution) + eos))
    return pairs


def warm_start(cfg: Any, pairs: Sequence[tuple[list[int], list[int]]], *, dp_rank: int,
               dp_size: int, seed: int, on_step: Callable[[int, float], None] | None = None) -> Policy:
    """A policy trained with SFT for ``train.warmup_steps`` steps at ``train.warmup_lr``."""
    if not pairs:
        raise ValueError("the warm start needs prompts with worked solutions "
                         "(set train.warmup_steps=0 for data without them)")
    optim = dataclasses.replace(cfg.optim, lr=cfg.train.warmup_lr, min_lr=0.0, warmup_steps=0,
                                schedule="cosine")
    policy = Policy(cfg.model, optim=optim, loss=LossSpec(kind="sft", uses_group_advantages=False),
                    micro_batch_tokens=cfg.parallel.micro_batch_tokens,
                    total_steps=cfg.train.warmup_steps)
    rng = random.Random(seed)
    order: list[int] = []
    size = cfg.train.warmup_batch_size
    for step in range(cfg.train.warmup_steps):
        while len(order) < size:
            epoch = list(range(len(pairs)))
            rng.shuffle(epoch)
            order.extend(epoch)
        batch, order = order[:size], order[size:]
        mine = [pairs[i] for i in batch[dp_rank::dp_size]]
        report = policy.train_step(SampleBatch(
            sequences=[p + r for p, r in mine], prompt_lengths=[len(p) for p, _ in mine],
            advantages=[1.0] * len(mine)))
        if on_step is not None:
            on_step(step, report.loss)
    return policy
