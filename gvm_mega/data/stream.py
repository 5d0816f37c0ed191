"""A deterministic, shuffled, resumable stream of prompts.

Epoch ``e`` visits every prompt once in an order fixed by ``(seed, e)``. The cursor (epoch,
position) is all the state there is, so a run that saves :meth:`PromptStream.state_dict` with
its checkpoint continues with exactly the prompts it would have seen. A fingerprint of the
prompt ids guards against resuming on a different dataset.
"""
from __future__ import annotations

import hashlib
import random
from typing import Any, Sequence

from gvm_mega.data.records import DataError, Prompt


def _fingerprint(prompts: Sequence[Prompt]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(p.id.encode("utf-8") + b"\x00")
    return h.hexdigest()[:16]


class PromptStream:
    """Endless batches of prompts: shuffled per epoch, reproducible from the seed."""

    def __init__(self, prompts: Sequence[Prompt], *, seed: int = 0, shuffle: bool = True):
        if len(prompts) == 0:
            raise DataError("cannot stream an empty prompt set")
        self.prompts = list(prompts)
        self.seed = seed
        self.shuffle = shuffle
        self.fingerprint = _fingerprint(self.prompts)
        self.epoch = 0
        self.position = 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        if self.shuffle:
            random.Random(f"prompt-stream:{self.seed}:{epoch}").shuffle(order)
        return order

    def __iter__(self) -> "PromptStream":
        return self

    def __next__(self) -> Prompt:
        if self.position >= len(self._order):
            self.epoch += 1
            self.position = 0
            self._order = self._epoch_order(self.epoch)
        prompt = self.prompts[self._order[self.position]]
        self.position += 1
        return prompt

    def next_batch(self, size: int) -> list[Prompt]:
        """The next ``size`` prompts (a batch may span two epochs)."""
        if size < 1:
            raise ValueError(f"batch size must be >= 1, got {size}")
        return [next(self) for _ in range(size)]

    def state_dict(self) -> dict[str, Any]:
        """The cursor, JSON-serialisable; pass it to :meth:`load_state_dict` to resume."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "shuffle": self.shuffle, "size": len(self.prompts),
                "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("epoch", "position", "seed", "fingerprint"):
            if key not in state:
                raise DataError(f"prompt stream state lacks {key!r}: {state}")
        if state["fingerprint"] != self.fingerprint or state.get("size", len(self.prompts)) != len(self.prompts):
            raise DataError(
                f"prompt stream state was saved for a different prompt set "
                f"({state.get('size')} prompts, fingerprint {state['fingerprint']}) than this one "
                f"({len(self.prompts)} prompts, fingerprint {self.fingerprint})")
        if not 0 <= int(state["position"]) <= len(self.prompts) or int(state["epoch"]) < 0:
            raise DataError(f"prompt stream state has an invalid cursor: {state}")
        self.seed = int(state["seed"])
        self.shuffle = bool(state.get("shuffle", True))
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = self._epoch_order(self.epoch)
