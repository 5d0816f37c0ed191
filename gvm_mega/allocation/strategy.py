"""One interface for GVM and uniform allocation, chosen by config.

The trainer asks its allocator for the iteration's budget and then for the per-prompt counts;
``algorithm.name`` decides which allocator it gets (``gvm-*`` names use GVM, the others are
vanilla RAFT / GRPO with the same ``algorithm.uniform_n`` for every prompt).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from gvm_mega.allocation.gvm import KEPT, AllocationResult, allocate_detailed
from gvm_mega.allocation.uniform import uniform_allocate


class Allocator(Protocol):
    name: str
    needs_statistics: bool  # whether stage 1 (p_i, G_i estimation) must run first
    drawn: int              # samples per prompt the rule counts as already drawn

    def budget(self, num_prompts: int) -> int: ...

    def allocate(self, num_prompts: int, budget: int, grad_norms=None,
                 accept_rates=None, drawn=None) -> AllocationResult: ...


@dataclass(frozen=True)
class GVMAllocator:
    """GVM allocation with the ``gvm`` config section's parameters."""

    budget_per_prompt: float = 8.0
    alpha: float = 1e-3
    beta: float = 2.0
    filter_threshold: float | None = None
    filter_insufficient: float | None = None
    min_samples: int = 0
    max_samples: int | None = None
    drawn: int = 0  # samples per prompt already trained on (reused stage 1), counted by the rule
    name: str = "gvm"
    needs_statistics: bool = True

    def budget(self, num_prompts: int) -> int:
        """N = round(budget_per_prompt * number of prompts)."""
        return int(round(self.budget_per_prompt * num_prompts))

    def allocate(self, num_prompts: int, budget: int, grad_norms=None,
                 accept_rates=None, drawn=None) -> AllocationResult:
        """``drawn`` (per prompt) replaces the configured pre-sample count where some prompts
        were not pre-sampled this iteration."""
        if grad_norms is None or accept_rates is None:
            raise ValueError("GVM allocation needs grad_norms and accept_rates")
        if len(grad_norms) != num_prompts:
            raise ValueError(f"got statistics for {len(grad_norms)} prompts, "
                             f"expected {num_prompts}")
        return allocate_detailed(
            grad_norms, accept_rates, budget, alpha=self.alpha, beta=self.beta,
            filter_threshold=self.filter_threshold, filter_insufficient=self.filter_insufficient,
            min_samples=self.min_samples, max_samples=self.max_samples,
            drawn=self.drawn if drawn is None else drawn)


@dataclass(frozen=True)
class UniformAllocator:
    """The same number of samples for every prompt, statistics unused."""

    samples_per_prompt: int = 8
    drawn: int = 0
    name: str = "uniform"
    needs_statistics: bool = False

    def budget(self, num_prompts: int) -> int:
        return self.samples_per_prompt * num_prompts

    def allocate(self, num_prompts: int, budget: int, grad_norms=None,
                 accept_rates=None, drawn=None) -> AllocationResult:
        samples = uniform_allocate(num_prompts, budget)
        return AllocationResult(samples=samples,
                                reasons=np.full(num_prompts, KEPT, dtype=np.int8),
                                continuous=np.full(num_prompts, budget / max(num_prompts, 1)))


def make_allocator(cfg) -> Allocator:
    """The allocator a :class:`~gvm_mega.config.schema.Config` asks for."""
    if cfg.algorithm.uses_gvm:
        g = cfg.gvm
        return GVMAllocator(budget_per_prompt=g.budget_per_prompt, alpha=g.alpha, beta=g.beta,
                            filter_threshold=g.filter_threshold,
                            filter_insufficient=g.filter_insufficient,
                            min_samples=g.min_samples, max_samples=g.max_samples,
                            drawn=g.presample_n if g.count_stage1 else 0)
    return UniformAllocator(samples_per_prompt=cfg.algorithm.uniform_n)
