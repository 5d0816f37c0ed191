"""Splitting an allocation across data-parallel ranks."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gvm_mega.allocation import allocate, split_across_ranks


@st.composite
def work(draw):
    m = draw(st.integers(0, 60))
    n = np.array(draw(st.lists(st.integers(0, 40), min_size=m, max_size=m)), dtype=np.int64)
    lengths = None
    if draw(st.booleans()):
        lengths = np.array(draw(st.lists(st.floats(1.0, 2000.0), min_size=m, max_size=m)))
    return n, lengths, draw(st.integers(1, 9))


@settings(max_examples=150, deadline=None)
@given(work())
def test_split_keeps_every_sample_and_balances_tokens(case):
    n, lengths, d = case
    split = split_across_ranks(n, d, expected_lengths=lengths)
    length = np.ones(n.size) if lengths is None else lengths
    counts = split.counts_by_prompt(n.size)
    assert len(split.ranks) == d
    assert np.array_equal(counts.sum(axis=0), n)          # every sample placed exactly once
    for share in split.ranks:
        assert (share.counts > 0).all()
        assert (np.diff(share.prompt_indices) > 0).all()
        expected = float(np.sum(share.counts * length[share.prompt_indices]))
        assert share.tokens == pytest.approx(expected)
        assert share.sample_prompt_indices().size == share.counts.sum()
    total = float(np.sum(n * length))
    assert split.tokens_per_rank.sum() == pytest.approx(total)
    if total == 0:
        assert split.imbalance == 1.0
        return
    # each rank is within one sample length of the mean (see the module docstring)
    longest = float(length[n > 0].max())
    assert np.all(np.abs(split.tokens_per_rank - total / d) <= longest * (1 + 1e-9))
    assert split.imbalance == pytest.approx(split.tokens_per_rank.max() / (total / d))
    assert split.imbalance <= 1 + d * longest / total + 1e-9
    # only the prompts a cut falls into are split: at most d - 1 of them
    assert int(((counts > 0).sum(axis=0) > 1).sum()) <= d - 1
    # deterministic
    again = split_across_ranks(n.copy(), d, expected_lengths=lengths)
    assert np.array_equal(again.counts_by_prompt(n.size), counts)


def test_equal_lengths_divide_evenly():
    split = split_across_ranks(np.array([5, 3, 0, 4]), 4)
    assert split.tokens_per_rank.tolist() == [3.0, 3.0, 3.0, 3.0]
    assert split.imbalance == 1.0
    assert split.counts_by_prompt(4).tolist() == [[3, 0, 0, 0], [2, 1, 0, 0], [0, 2, 0, 1],
                                                  [0, 0, 0, 3]]


def test_long_prompts_get_fewer_samples_per_rank():
    # prompt 0: 4 samples of 100 tokens; prompt 1: 40 samples of 10 tokens; 800 tokens in all
    split = split_across_ranks(np.array([4, 40]), 2, expected_lengths=[100.0, 10.0])
    assert split.counts_by_prompt(2).tolist() == [[4, 0], [0, 40]]
    assert split.imbalance == 1.0
    to_dict = split.to_dict(["long", "short"])
    assert to_dict["ranks"] == [{"samples": {"long": 4}}, {"samples": {"short": 40}}]


def test_fewer_samples_than_ranks_and_one_rank():
    split = split_across_ranks(np.array([1, 0, 1]), 4)
    assert split.counts_by_prompt(3).sum() == 2
    assert sorted(split.tokens_per_rank.tolist()) == [0.0, 0.0, 1.0, 1.0]
    assert split.imbalance == 2.0
    single = split_across_ranks(np.array([3, 2]), 1)
    assert single.ranks[0].sample_prompt_indices().tolist() == [0, 0, 0, 1, 1]
    assert single.imbalance == 1.0
    empty = split_across_ranks(np.array([], dtype=np.int64), 3)
    assert empty.imbalance == 1.0 and all(r.counts.size == 0 for r in empty.ranks)


def test_a_realistic_allocation_balances_within_a_percent():
    rng = np.random.default_rng(1)
    m = 4096
    n = allocate(rng.lognormal(size=m), rng.integers(0, 9, size=m) / 8, 8 * m)
    split = split_across_ranks(n, 16, expected_lengths=rng.uniform(50, 1500, size=m))
    assert split.counts_by_prompt(m).sum(axis=0).tolist() == n.tolist()
    assert split.imbalance < 1.01


@pytest.mark.parametrize("samples, d, lengths, match", [
    (np.array([1, -2]), 2, None, r"samples\[1\] = -2 is negative"),
    (np.array([1.5, 2.0]), 2, None, "1-D integer array"),
    (np.array([[1, 2]]), 2, None, "1-D integer array"),
    (np.array([1, 2]), 0, None, "world_size must be a positive integer"),
    (np.array([1, 2]), 2, [1.0], "expected_lengths has shape"),
    (np.array([1, 2]), 2, [1.0, 0.0], r"expected_lengths\[1\] = 0.0 must be positive"),
    (np.array([1, 2]), 2, [float("nan"), 1.0], r"expected_lengths\[0\] = nan must be"),
])
def test_bad_inputs(samples, d, lengths, match):
    with pytest.raises(ValueError, match=match):
        split_across_ranks(samples, d, expected_lengths=lengths)
