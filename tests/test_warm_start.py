"""The supervised warm start's data: every worked solution of a problem is trained on, one
drawn per visit, and problems with a single solution see the same batches as before."""
from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest

from gvm_mega.data import Prompt, arithmetic_prompts
from gvm_mega.data.templates import PlainTemplate
from gvm_mega.tokenizer import builtin_tokenizer
from gvm_mega.trainer import warm_start as ws


class RecordingPolicy:
    """Stands in for the megatron policy: keeps every SFT batch it is given."""

    batches: list = []

    def __init__(self, *args, **kwargs):
        RecordingPolicy.batches = []

    def train_step(self, batch):
        RecordingPolicy.batches.append([tuple(s[n:]) for s, n in zip(batch.sequences,
                                                                     batch.prompt_lengths)])
        return SimpleNamespace(loss=0.0)


def _cfg(steps: int, batch: int) -> SimpleNamespace:
    from gvm_mega.config.schema import Config

    cfg = Config()
    cfg.train.warmup_steps, cfg.train.warmup_batch_size = steps, batch
    return cfg


def test_every_solution_path_is_drawn_and_single_ones_keep_their_batches(tmp_path, monkeypatch):
    tok = builtin_tokenizer(tmp_path / "cache")
    template = PlainTemplate()
    one = [Prompt(id=f"p{i}", problem=f"Compute {i} + 1.", answer=i + 1,
                  solution=f"Step 1: {i} + 1 = {i + 1}\nThe answer is \\boxed{{{i + 1}}}.")
           for i in range(1, 6)]
    many = Prompt(id="m", problem="Compute 3 + 5 - 2.", answer=6,
                  solution="Step 1: 3 + 5 = 8\nStep 2: 8 - 2 = 6\nThe answer is \\boxed{6}.",
                  other_solutions=("Step 1: 5 - 2 = 3\nStep 2: 3 + 3 = 6\nThe answer is \\boxed{6}.",
                                   "Step 1: 3 - 2 = 1\nStep 2: 1 + 5 = 6\nThe answer is \\boxed{6}."))
    pairs = ws.sft_pairs(one + [many, Prompt(id="x", problem="No solution.", answer=0)],
                         template, tok)
    assert [len(solutions) for _, solutions in pairs] == [1] * 5 + [3]  # no solution: no pair
    eos = tok.eos_token_id
    assert pairs[-1][1][1] == tok.encode(many.other_solutions[0]) + [eos]

    monkeypatch.setattr(ws, "Policy", RecordingPolicy)
    ws.warm_start(_cfg(60, 6), pairs, dp_rank=0, dp_size=1, seed=5)
    seen = Counter(b for batch in RecordingPolicy.batches for b in batch)
    drawn = [seen[tuple(s)] for s in pairs[-1][1]]
    assert sum(drawn) == 60 and min(drawn) >= 8  # each of the 3 paths, about 20 times each
    with_many = [[b for b in batch if b not in map(tuple, pairs[-1][1])]
                 for batch in RecordingPolicy.batches]

    # the same prompts with the extra paths dropped: identical batch order for everything else
    single = pairs[:-1] + [(pairs[-1][0], pairs[-1][1][:1])]
    ws.warm_start(_cfg(60, 6), single, dp_rank=0, dp_size=1, seed=5)
    assert with_many == [[b for b in batch if b != tuple(single[-1][1][0])]
                         for batch in RecordingPolicy.batches]


def test_any_order_task_feeds_every_path_to_the_warm_start(tmp_path):
    tok = builtin_tokenizer(tmp_path / "cache")
    prompts = arithmetic_prompts(50, seed=3, levels=[1, 2], solutions="any-order")
    pairs = ws.sft_pairs(prompts, PlainTemplate(), tok)
    assert [len(s) for _, s in pairs] == [1 + len(p.other_solutions) for p in prompts]
    assert max(len(s) for _, s in pairs) > 1
    with pytest.raises(ValueError, match="needs prompts with worked solutions"):
        ws.warm_start(_cfg(1, 1), [], dp_rank=0, dp_size=1, seed=0)
