"""Token-budget micro-batches: coverage, budget, equal counts across ranks, determinism."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gvm_mega.training import (
    collate_micro_batch,
    input_lengths,
    min_micro_batches,
    padded_cost,
    plan_for_ranks,
    plan_micro_batches,
)

lengths_st = st.lists(st.integers(min_value=1, max_value=300), max_size=40)
budget_st = st.integers(min_value=1, max_value=1024)


def check_plan(lengths, budget, plan):
    flat = [i for mb in plan for i in mb]
    assert sorted(flat) == list(range(len(lengths)))  # every sample exactly once
    for mb in plan:
        # within budget, unless a lone sample is longer than the budget by itself
        assert padded_cost(lengths, mb) <= budget or (len(mb) == 1 and lengths[mb[0]] > budget)


@settings(max_examples=150, deadline=None)
@given(lengths_st, budget_st)
def test_plan_covers_every_sample_once_within_budget(lengths, budget):
    plan = plan_micro_batches(lengths, budget)
    check_plan(lengths, budget, plan)
    assert len(plan) == min_micro_batches(lengths, budget)
    assert all(plan)  # the minimal plan has no empty micro-batch
    assert plan == plan_micro_batches(list(lengths), budget)  # deterministic


@settings(max_examples=150, deadline=None)
@given(st.lists(lengths_st, min_size=1, max_size=4), budget_st)
def test_ranks_get_equal_counts(lengths_per_rank, budget):
    plans = plan_for_ranks(lengths_per_rank, budget)
    counts = {len(p) for p in plans}
    assert len(counts) == 1
    count = counts.pop()
    assert count == max(min_micro_batches(ls, budget) for ls in lengths_per_rank)
    for ls, plan in zip(lengths_per_rank, plans):
        check_plan(ls, budget, plan)
        # a rank pads with empty micro-batches only once it cannot split any further
        if any(len(mb) == 0 for mb in plan):
            assert all(len(mb) <= 1 for mb in plan)
    assert plans == plan_for_ranks([list(ls) for ls in lengths_per_rank], budget)


@settings(max_examples=100, deadline=None)
@given(lengths_st, budget_st, st.integers(min_value=0, max_value=8))
def test_extra_micro_batches_split_before_padding(lengths, budget, extra):
    need = min_micro_batches(lengths, budget)
    plan = plan_micro_batches(lengths, budget, num_micro_batches=need + extra)
    assert len(plan) == need + extra
    check_plan(lengths, budget, plan)
    # extra micro-batches come from splitting; empty ones only once every sample is alone
    assert sum(1 for mb in plan if mb) == min(need + extra, len(lengths))


def test_worked_example():
    # budget 12: sorted longest first 6(1) 5(3) 4(0) 3(4) 2(2) -> [1,3] costs 2*6=12,
    # [0,4,2] costs 3*4=12
    lengths = [4, 6, 2, 5, 3]
    assert plan_micro_batches(lengths, 12) == [[1, 3], [0, 4, 2]]
    # an oversized sample gets a micro-batch of its own
    assert plan_micro_batches([3, 20, 2], 8) == [[1], [0, 2]]
    # a third micro-batch splits the costliest one ([1,3] and [0,4,2] both cost 12; the
    # first goes): [1] [3] [0,4,2]
    assert plan_micro_batches(lengths, 12, num_micro_batches=3) == [[1], [3], [0, 4, 2]]
    # a rank with one sample against a rank needing three: it pads with empties
    assert plan_for_ranks([[5], [5, 5, 5]], 5) == [[[0], [], []], [[0], [1], [2]]]
    with pytest.raises(ValueError, match="at least 2 micro-batches"):
        plan_micro_batches(lengths, 12, num_micro_batches=1)
    with pytest.raises(ValueError, match="length of sample 1"):
        plan_micro_batches([3, 0], 12)
    with pytest.raises(ValueError, match="budget"):
        plan_micro_batches([3], 0)


def test_collate_aligns_targets_mask_and_values():
    seqs = [[10, 11, 12, 13, 14], [20, 21, 22]]
    prompts = [2, 1]  # responses: [12, 13, 14] and [21, 22]
    logps = [[-0.1, -0.2, -0.3], [-0.4, -0.5]]
    mb = collate_micro_batch(seqs, prompts, [1, 0], pad_id=0,
                             response_values={"old_logprobs": logps},
                             sample_values={"advantage": [0.5, -1.0]})
    assert mb.indices == (1, 0)
    assert mb.tokens.tolist() == [[20, 21, 0, 0], [10, 11, 12, 13]]
    assert mb.targets.tolist() == [[21, 22, 0, 0], [11, 12, 13, 14]]
    assert mb.loss_mask.tolist() == [[1, 1, 0, 0], [0, 1, 1, 1]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3]] * 2
    old = mb.token_values["old_logprobs"]
    assert torch.allclose(old, torch.tensor([[-0.4, -0.5, 0, 0], [0, -0.1, -0.2, -0.3]]))
    assert mb.sample_values["advantage"].tolist() == [-1.0, 0.5]
    assert mb.num_loss_tokens == 5
    assert input_lengths(seqs) == [4, 2]

    padded = collate_micro_batch(seqs, prompts, [1], pad_to_length=6)
    assert padded.tokens.shape == (1, 6)
    empty = collate_micro_batch(seqs, prompts, [], response_values={"old_logprobs": logps})
    assert empty.tokens.shape == (1, 1) and empty.num_loss_tokens == 0
    assert empty.token_values["old_logprobs"].shape == (1, 1)

    with pytest.raises(ValueError, match="sample 0: old_logprobs has 2 values for 3"):
        collate_micro_batch(seqs, prompts, [0], response_values={"old_logprobs": [[0, 0], []]})
    with pytest.raises(ValueError, match="prompt length 0"):
        collate_micro_batch(seqs, [0, 1], [0])
    with pytest.raises(ValueError, match="shorter than the longest"):
        collate_micro_batch(seqs, prompts, [0], pad_to_length=3)
    with pytest.raises(IndexError):
        collate_micro_batch(seqs, prompts, [2])
