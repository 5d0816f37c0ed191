"""Driver-side group bookkeeping: merging stage-1 and stage-2 samples, distinct responses,
and the worked-step check on the built-in task's rewards (real Math-Verify scoring)."""
from __future__ import annotations

from gvm_mega.data import Prompt
from gvm_mega.rollout import Sample
from gvm_mega.reward import RewardScorer
from gvm_mega.rollout import SamplingParams
from gvm_mega.trainer.loop import accepted_distinct_fraction, merge_groups, unsound_fraction
from gvm_mega.trainer.sampling import Group, sample_and_score


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


class _CannedEngine:
    """Returns fixed response texts (the scoring path is what is under test)."""

    def __init__(self, texts: list[str]):
        self.texts = texts

    def generate(self, requests):
        return [[Sample([1], [0.0], "stop", "v0", text=t) for t in self.texts[:r.n]]
                for r in requests]


def test_check_steps_refuses_right_answers_after_false_steps():
    texts = ["Step 1: 8 - 4 = 4\nThe answer is \\boxed{4}.",  # right
             "Step 1: 8 - 5 = 4\nThe answer is \\boxed{4}.",  # right answer, false step
             "Step 1: 8 - 1 = 7\nThe answer is \\boxed{7}."]  # wrong answer
    prompts = [Prompt("p", "Compute 8 - 4.", 4)]
    with RewardScorer(workers=1) as scorer:
        def run(check: bool) -> list[Group]:
            return sample_and_score(_CannedEngine(texts), scorer, None, prompts, [[1, 2]], [3],
                                    SamplingParams(), seed=0, iteration=1, stage="stage2",
                                    check_steps=check)
        plain, checked = run(False), run(True)
    assert plain[0].rewards == [1.0, 1.0, 0.0] and plain[0].unsound == 0
    assert checked[0].rewards == [1.0, 0.0, 0.0] and checked[0].unsound == 1
    assert unsound_fraction(checked) == 1 / 2 and unsound_fraction(plain) == 0.0
    merged = merge_groups(checked, checked)
    assert merged[0].unsound == 2 and unsound_fraction(merged) == 1 / 2
