"""The prompt record and the bookkeeping of what a reader kept, skipped and dropped."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence


class DataError(ValueError):
    """A dataset problem, worded for the user: which file, which line, what is wrong."""


@dataclass(frozen=True)
class Prompt:
    """One training or evaluation prompt.

    ``answer`` is the gold answer exactly as the dataset stores it (any JSON type; the reward
    normalises it). ``solution`` is a worked solution when the dataset has one;
    ``other_solutions`` are further correct ones (the warm start draws among all of them, so a
    problem with several solution paths teaches several).
    """

    id: str
    problem: str
    answer: Any
    solution: Optional[str] = None
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    other_solutions: tuple[str, ...] = ()


def content_id(problem: str) -> str:
    """A stable id from the problem text alone (whitespace-insensitive)."""
    canonical = " ".join(problem.split())
    return "h" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


@dataclass
class ReadStats:
    """What happened to the rows of one source; nothing is dropped without being counted."""

    source: str
    rows: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_examples: list[str] = field(default_factory=list)
    duplicates: int = 0
    too_long: int = 0

    def skip(self, reason: str, message: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.skipped_examples) < 10:
            self.skipped_examples.append(message)

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        parts = [f"{self.source}: {self.kept} prompts kept of {self.rows} rows"]
        if self.skipped:
            detail = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
            parts.append(f"{self.skipped_total} malformed skipped ({detail})")
        if self.duplicates:
            parts.append(f"{self.duplicates} duplicates dropped")
        if self.too_long:
            parts.append(f"{self.too_long} over max_prompt_length dropped")
        return "; ".join(parts)


@dataclass
class PromptSet:
    """Prompts from one source plus the counts of how they were obtained."""

    prompts: list[Prompt]
    stats: ReadStats

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self) -> Iterator[Prompt]:
        return iter(self.prompts)

    def __getitem__(self, i: int) -> Prompt:
        return self.prompts[i]

    @property
    def ids(self) -> Sequence[str]:
        return [p.id for p in self.prompts]
