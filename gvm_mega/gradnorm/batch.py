"""Prompt + response token sequences packed into right-padded batches for the estimator."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class SequenceBatch:
    """``B`` sequences ``prompt + response`` as next-token prediction, right-padded to ``T``.

    ``input_ids[b, t]`` predicts ``targets[b, t]``; ``loss_mask`` is 1 where that target is
    a response token (the log-probs we differentiate), ``token_mask`` is 1 on real tokens.
    """

    input_ids: torch.Tensor    # (B, T) long
    targets: torch.Tensor      # (B, T) long
    loss_mask: torch.Tensor    # (B, T) float
    token_mask: torch.Tensor   # (B, T) float
    lengths: torch.Tensor      # (B,) long: real tokens per row

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def position_ids(self) -> torch.Tensor:
        B, T = self.input_ids.shape
        return torch.arange(T, device=self.input_ids.device)[None, :].expand(B, T)

    def select(self, rows: Sequence[int]) -> "SequenceBatch":
        """The given rows, trimmed to their longest real length."""
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        T = int(self.lengths[idx].max())
        return SequenceBatch(self.input_ids[idx, :T], self.targets[idx, :T],
                             self.loss_mask[idx, :T], self.token_mask[idx, :T], self.lengths[idx])

    def to(self, device: torch.device | str) -> "SequenceBatch":
        return SequenceBatch(*(t.to(device) for t in (self.input_ids, self.targets,
                                                       self.loss_mask, self.token_mask,
                                                       self.lengths)))


def make_batch(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
               pad_id: int = 0) -> SequenceBatch:
    """Pack token-id lists; the response log-probs are ``log p(response | prompt)``."""
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        raise ValueError("make_batch needs at least one sequence")
    seqs = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if len(p) == 0:
            raise ValueError(f"sequence {i}: empty prompt (the first response token needs a context)")
        if len(r) == 0:
            raise ValueError(f"sequence {i}: empty response")
        seqs.append((list(p), list(r)))
    T = max(len(p) + len(r) - 1 for p, r in seqs)
    B = len(seqs)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(B, T)
    token_mask = torch.zeros(B, T)
    lengths = torch.zeros(B, dtype=torch.long)
    for b, (p, r) in enumerate(seqs):
        full = torch.tensor(p + r, dtype=torch.long)
        n = full.numel() - 1
        input_ids[b, :n] = full[:-1]
        targets[b, :n] = full[1:]
        loss_mask[b, len(p) - 1:n] = 1.0
        token_mask[b, :n] = 1.0
        lengths[b] = n
    return SequenceBatch(input_ids, targets, loss_mask, token_mask, lengths)


def micro_batches(lengths: torch.Tensor, max_tokens: int) -> list[list[int]]:
    """Row groups of similar length whose padded size ``rows * longest`` fits ``max_tokens``.

    Rows are sorted by length (longest first) so padding stays small; a row longer than the
    budget gets a group of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: -int(lengths[i]))
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * int(lengths[groups[-1][0]]) <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups
