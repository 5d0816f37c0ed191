"""A deterministic, shuffled, resumable stream of prompts.

Epoch ``e`` visits every prompt once in an order fixed by ``(seed, e)``. A batch that spans
two epochs never repeats a prompt (when the batch is no larger than the prompt set): the
prompts it already holds are deferred in the new epoch's order to just after the batch's
end, so every epoch still visits every prompt once. Per-prompt statistics (GVM's acceptance
rates and gradient norms) need one observation of a prompt per iteration. The cursor
(epoch, position, and the deferral that shaped the current epoch) is all the state there is,
so a run that saves :meth:`PromptStream.state_dict` with its checkpoint continues with
exactly the prompts it would have seen. A fingerprint of the prompt ids guards against
resuming on a different dataset.
"""
from __future__ import annotations

import hashlib
import random
from typing import Any, Callable, Optional, Sequence

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
        self._deferred: list[int] = []  # prompts moved back in this epoch's order
        self._slots = 0  # ... past its first `_slots` positions
        self._order = self._epoch_order(0)
        self.last_skipped = 0

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        if self.shuffle:
            random.Random(f"prompt-stream:{self.seed}:{epoch}").shuffle(order)
        if self._deferred:  # keep the first `_slots` positions free of the deferred prompts
            deferred, head, rest = set(self._deferred), [], []
            for i in order:
                (head if len(head) < self._slots and i not in deferred else rest).append(i)
            order = head + rest
        return order

    def _start_epoch(self, epoch: int, deferred: Sequence[int] = (), slots: int = 0) -> None:
        self.epoch, self.position = epoch, 0
        self._deferred, self._slots = list(deferred), slots
        self._order = self._epoch_order(epoch)

    def _next_index(self, in_batch: Sequence[int] = (), size: int = 1) -> int:
        if self.position >= len(self._order):
            self._start_epoch(self.epoch + 1, in_batch, size - len(in_batch))
        index = self._order[self.position]
        self.position += 1
        return index

    def __iter__(self) -> "PromptStream":
        return self

    def __next__(self) -> Prompt:
        return self.prompts[self._next_index()]

    def next_batch(self, size: int, *, skip: Optional[Callable[[Prompt], bool]] = None,
                   max_skips: int = 0) -> list[Prompt]:
        """The next ``size`` prompts: distinct when ``size`` <= the number of prompts (a batch
        may span two epochs).

        ``skip`` passes over the prompts it returns True for, at most ``max_skips`` of them
        (after that prompts are taken as they come, so a set that is all skippable still
        yields batches); ``last_skipped`` says how many were passed over.
        """
        if size < 1:
            raise ValueError(f"batch size must be >= 1, got {size}")
        batch: list[int] = []
        self.last_skipped = 0
        while len(batch) < size:
            index = self._next_index(batch, size)
            if skip is not None:
                if index in batch:  # skips ran past a new epoch's deferred slots
                    continue
                if self.last_skipped < max_skips and skip(self.prompts[index]):
                    self.last_skipped += 1
                    continue
            batch.append(index)
        return [self.prompts[i] for i in batch]

    def state_dict(self) -> dict[str, Any]:
        """The cursor, JSON-serialisable; pass it to :meth:`load_state_dict` to resume."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "shuffle": self.shuffle, "size": len(self.prompts),
                "fingerprint": self.fingerprint, "deferred": list(self._deferred),
                "slots": self._slots}

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
        deferred = [int(i) for i in state.get("deferred", [])]  # absent in older checkpoints
        if any(not 0 <= i < len(self.prompts) for i in deferred):
            raise DataError(f"prompt stream state defers a prompt index out of range: {state}")
        self.seed = int(state["seed"])
        self.shuffle = bool(state.get("shuffle", True))
        self._start_epoch(int(state["epoch"]), deferred, int(state.get("slots", 0)))
        self.position = int(state["position"])
