"""Driver-side sampling: draw n_i responses per prompt, decode and verify them.

A :class:`Group` is one prompt with the responses drawn for it in one stage and their 0/1
rewards. Sampling seeds depend on the run seed, iteration, stage and prompt id only, so a
run samples the same responses whatever its parallel layout.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Sequence

from gvm_mega.data import Prompt, steps_hold
from gvm_mega.rollout import RolloutRequest, Sample, SamplingParams


@dataclass
class Group:
    prompt: Prompt
    prompt_ids: list[int]
    samples: list[Sample] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    unsound: int = 0  # right answers scored 0 because a worked step was false (check_steps)

    @property
    def num_accepted(self) -> int:
        return sum(r > 0.5 for r in self.rewards)

    @property
    def accepted_responses(self) -> list[list[int]]:
        return [s.output_ids for s, r in zip(self.samples, self.rewards) if r > 0.5]


def stage_seed(seed: int, iteration: int, stage: str, prompt_id: str) -> int:
    digest = hashlib.blake2b(f"{seed}:{iteration}:{stage}:{prompt_id}".encode(),
                             digest_size=8).digest()
    return int.from_bytes(digest, "big") % (2 ** 62)


def sample_and_score(engine: Any, scorer: Any, tokenizer: Any, prompts: Sequence[Prompt],
                     prompt_ids: Sequence[list[int]], counts: Sequence[int],
                     sampling: SamplingParams, *, seed: int, iteration: int,
                     stage: str, check_steps: bool = False) -> list[Group]:
    """``counts[i]`` verified responses for prompt i (a group may be empty); with
    ``check_steps`` a right answer reached through a false worked step scores 0."""
    requests = [RolloutRequest(ids, n=int(n), sampling=sampling.replace(
                    sampling_seed=stage_seed(seed, iteration, stage, p.id)))
                for p, ids, n in zip(prompts, prompt_ids, counts)]
    outputs = engine.generate(requests)
    groups = [Group(p, list(ids), list(out)) for p, ids, out in zip(prompts, prompt_ids, outputs)]
    texts, golds, owners = [], [], []
    for g in groups:
        for s in g.samples:
            texts.append(s.text if s.text is not None else tokenizer.decode(s.output_ids))
            golds.append(g.prompt.answer)
            owners.append(g)
    rewards = scorer.score(texts, golds) if texts else []
    for g, r, text in zip(owners, rewards, texts):
        if check_steps and r > 0.5 and not steps_hold(text):
            g.unsound += 1
            r = 0.0
        g.rewards.append(float(r))
    return groups
