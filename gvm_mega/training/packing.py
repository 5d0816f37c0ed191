"""Variable-length samples packed into micro-batches under a token budget.

A micro-batch is a right-padded ``[rows, length]`` tensor with one sample per row, so its cost
is ``rows * longest`` tokens, and that padded size is what the budget
(``parallel.micro_batch_tokens``) bounds. Right padding under causal attention leaves the real
tokens untouched, so no attention mask is needed. Shapes differ between micro-batches: under
pipeline parallelism set megatron's ``variable_seq_lengths=True`` (or pass ``pad_to_length``).

Planning is deterministic (it depends only on the lengths and the budget):

1. sort samples by length, longest first (ties by index), and cut the sorted list into
   consecutive runs as long as the budget allows; this gives the fewest micro-batches;
2. every data-parallel rank must run the same number of micro-batches (the pipeline
   schedules step through them in lockstep), so the count is the maximum over ranks and a
   rank with fewer splits its costliest micro-batch in two until it has enough, and only
   then adds empty ones (collated as a single padding token with no loss).

A sample longer than the budget on its own gets a micro-batch of its own instead of being
dropped or failing the step: the budget is a memory target, and the rollout length limit is
what bounds a sample.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from gvm_mega.training._comm import all_reduce_host

__all__ = ["MicroBatch", "collate_micro_batch", "input_lengths", "min_micro_batches",
           "padded_cost", "plan_for_ranks", "plan_micro_batches"]


def _as_int(value, what: str) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer >= 1, got {value!r}") from None
    if number < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {value!r}")
    return number


def _check(lengths: Sequence[int], budget: int) -> list[int]:
    _as_int(budget, "micro-batch token budget")
    return [_as_int(n, f"length of sample {i}") for i, n in enumerate(lengths)]


def _sorted_order(lengths: list[int]) -> list[int]:
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


def _greedy_runs(sorted_lengths: list[int], budget: int) -> list[tuple[int, int]]:
    """Fewest consecutive runs of a longest-first list with ``rows * longest <= budget``."""
    runs, start = [], 0
    while start < len(sorted_lengths):
        rows = max(1, budget // sorted_lengths[start])
        end = min(len(sorted_lengths), start + rows)
        runs.append((start, end))
        start = end
    return runs


def padded_cost(lengths: Sequence[int], indices: Sequence[int]) -> int:
    """Tokens of the padded tensor for the samples ``indices``: rows times the longest."""
    return len(indices) * max((lengths[i] for i in indices), default=0)


def min_micro_batches(lengths: Sequence[int], budget: int) -> int:
    """The fewest micro-batches that hold ``lengths`` within ``budget``."""
    lengths = _check(lengths, budget)
    return len(_greedy_runs(sorted(lengths, reverse=True), budget))


def plan_micro_batches(
    lengths: Sequence[int],
    budget: int,
    *,
    num_micro_batches: Optional[int] = None,
    group: Optional[dist.ProcessGroup] = None,
) -> list[list[int]]:
    """Sample indices of each micro-batch of this rank.

    Args:
        lengths: model input length of each sample (see :func:`input_lengths`).
        budget: most padded tokens (``rows * longest``) per micro-batch.
        num_micro_batches: exact count wanted (at least the minimum); default the minimum.
        group: the data-parallel group; the count becomes the maximum of every rank's
            minimum (one all-reduce), so that all ranks return the same number.
    """
    lengths = _check(lengths, budget)
    order = _sorted_order(lengths)
    sorted_lengths = [lengths[i] for i in order]
    runs = _greedy_runs(sorted_lengths, budget)
    target = len(runs) if num_micro_batches is None else num_micro_batches
    if group is not None and dist.get_world_size(group) > 1:
        count = torch.tensor([target], dtype=torch.int64)
        count = all_reduce_host(count, dist.ReduceOp.MAX, group)
        target = int(count)
    if target < len(runs):
        raise ValueError(f"{len(lengths)} samples need at least {len(runs)} micro-batches of "
                         f"{budget} tokens, {target} requested")

    def cost(run: tuple[int, int]) -> int:
        return (run[1] - run[0]) * sorted_lengths[run[0]]

    while len(runs) < target:
        splittable = [r for r in runs if r[1] - r[0] >= 2]
        if not splittable:
            break
        start, end = max(splittable, key=lambda r: (cost(r), -r[0]))
        cut = min(range(start + 1, end),
                  key=lambda c: (max(cost((start, c)), cost((c, end))), c))
        runs.remove((start, end))
        runs.extend([(start, cut), (cut, end)])
        runs.sort()
    plan = [order[s:e] for s, e in runs]
    plan.extend([] for _ in range(target - len(plan)))
    return plan


def plan_for_ranks(lengths_per_rank: Sequence[Sequence[int]], budget: int) -> list[list[list[int]]]:
    """Plans of every data-parallel rank at once (rank-local indices), all of equal length.

    The same result each rank gets from :func:`plan_micro_batches` with the data-parallel
    group, computed in one place (for a driver that knows every rank's samples, and tests).
    """
    target = max((min_micro_batches(ls, budget) for ls in lengths_per_rank), default=0)
    return [plan_micro_batches(ls, budget, num_micro_batches=target) for ls in lengths_per_rank]


def input_lengths(sequences: Sequence[Sequence[int]]) -> list[int]:
    """Model input length of each sample: its tokens but the last (which is only a target)."""
    return [len(s) - 1 for s in sequences]


@dataclass
class MicroBatch:
    """Padded tensors of one micro-batch; row r holds sample ``indices[r]``.

    ``targets[r, t]`` is the token after ``tokens[r, t]``; ``loss_mask`` is 1 where that
    target is a response token. ``token_values`` are per-response-token values (behaviour
    log-probs, ...) placed at their target positions; ``sample_values`` are per row.
    """

    indices: tuple[int, ...]
    tokens: torch.Tensor
    targets: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    token_values: dict[str, torch.Tensor] = field(default_factory=dict)
    sample_values: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())


def collate_micro_batch(
    sequences: Sequence[Sequence[int]],
    prompt_lengths: Sequence[int],
    indices: Sequence[int],
    *,
    pad_id: int = 0,
    response_values: Optional[Mapping[str, Sequence[Sequence[float]]]] = None,
    sample_values: Optional[Mapping[str, Sequence[float]]] = None,
    pad_to_length: Optional[int] = None,
) -> MicroBatch:
    """Right-padded tensors for the samples ``indices`` of ``sequences`` (prompt + response).

    An empty ``indices`` (a padding micro-batch) gives one row of one padding token with no
    loss, so that every rank can run the same number of forward/backward passes.
    """
    response_values = dict(response_values or {})
    sample_values = dict(sample_values or {})
    rows = list(indices)
    for i in rows:
        if not 0 <= i < len(sequences):
            raise IndexError(f"sample index {i} out of range for {len(sequences)} samples")
        seq, plen = sequences[i], prompt_lengths[i]
        if len(seq) < 2:
            raise ValueError(f"sample {i}: needs at least 2 tokens, has {len(seq)}")
        if not 1 <= plen <= len(seq):
            raise ValueError(f"sample {i}: prompt length {plen} not in [1, {len(seq)}]")
        for name, values in response_values.items():
            if len(values[i]) != len(seq) - plen:
                raise ValueError(f"sample {i}: {name} has {len(values[i])} values for "
                                 f"{len(seq) - plen} response tokens")
    longest = max((len(sequences[i]) - 1 for i in rows), default=1)
    width = longest if pad_to_length is None else pad_to_length
    if width < longest:
        raise ValueError(f"pad_to_length {pad_to_length} is shorter than the longest sample "
                         f"in the micro-batch ({longest} input tokens)")
    n = max(len(rows), 1)
    tokens = torch.full((n, width), pad_id, dtype=torch.long)
    targets = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.float32)
    tv = {name: torch.zeros((n, width), dtype=torch.float32) for name in response_values}
    for r, i in enumerate(rows):
        seq = torch.as_tensor(list(sequences[i]), dtype=torch.long)
        k = len(seq) - 1
        plen = prompt_lengths[i]
        tokens[r, :k] = seq[:-1]
        targets[r, :k] = seq[1:]
        mask[r, plen - 1:k] = 1.0
        for name, values in response_values.items():
            tv[name][r, plen - 1:k] = torch.as_tensor(list(values[i]), dtype=torch.float32)
    sv = {name: torch.as_tensor([float(v[i]) for i in rows] or [0.0], dtype=torch.float32)
          for name, v in sample_values.items()}
    positions = torch.arange(width, dtype=torch.long).unsqueeze(0).expand(n, width).contiguous()
    return MicroBatch(tuple(rows), tokens, targets, mask, positions, tv, sv)
