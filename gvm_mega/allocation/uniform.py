"""Uniform allocation (vanilla RAFT / GRPO): every prompt gets the same number of samples."""
from __future__ import annotations

import numpy as np


def uniform_allocate(num_prompts: int, budget: int) -> np.ndarray:
    """``budget // num_prompts`` samples each; the remainder goes one each to the first prompts.

    With ``budget = n * num_prompts`` this is exactly ``n`` for every prompt.
    """
    if isinstance(num_prompts, bool) or int(num_prompts) != num_prompts or num_prompts < 0:
        raise ValueError(f"num_prompts must be a non-negative integer, got {num_prompts!r}")
    if isinstance(budget, bool) or int(budget) != budget or budget < 0:
        raise ValueError(f"budget must be a non-negative integer, got {budget!r}")
    num_prompts, budget = int(num_prompts), int(budget)
    if num_prompts == 0:
        return np.zeros(0, dtype=np.int64)
    samples = np.full(num_prompts, budget // num_prompts, dtype=np.int64)
    samples[: budget % num_prompts] += 1
    return samples
