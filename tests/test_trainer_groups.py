"""Driver-side group bookkeeping: merging stage-1 and stage-2 samples, distinct responses."""
from __future__ import annotations

from gvm_mega.data import Prompt
from gvm_mega.rollout import Sample
from gvm_mega.trainer.loop import accepted_distinct_fraction, merge_groups
from gvm_mega.trainer.sampling import Group


def _group(pid: str, responses: list[list[int]], rewards: list[float]) -> Group:
    samples = [Sample(ids, [0.0] * len(ids), "stop", "v0") for ids in responses]
    return Group(Prompt(pid, "q", 1), [1, 2], samples, list(rewards))


def test_merge_keeps_stage_order_per_prompt():
    first = [_group("a", [[5]], [1.0]), _group("b", [[6]], [0.0])]
    second = [_group("a", [[7], [8]], [0.0, 1.0]), _group("b", [], [])]
    merged = merge_groups(first, second)
    assert [s.output_ids for s in merged[0].samples] == [[5], [7], [8]]
    assert merged[0].rewards == [1.0, 0.0, 1.0] and merged[0].num_accepted == 2
    assert merged[1].rewards == [0.0] and merged[1].prompt.id == "b"


def test_accepted_distinct_fraction_counts_repeats_within_a_prompt():
    groups = [
        # 3 accepted, 2 of them the same response; the rejected repeat does not count
        _group("a", [[1, 2], [1, 2], [3], [1, 2]], [1.0, 1.0, 1.0, 0.0]),
        # the same response under another prompt is distinct there
        _group("b", [[1, 2]], [1.0]),
        _group("c", [[9]], [0.0]),
    ]
    assert accepted_distinct_fraction(groups) == 3 / 4
    assert accepted_distinct_fraction([groups[2]]) is None
    assert accepted_distinct_fraction([]) is None
