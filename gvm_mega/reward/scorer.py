"""Batch scoring of responses against gold answers: extraction, cache, verifier pool.

A response scores 1.0 when its final answer (see :mod:`gvm_mega.reward.extract`) verifies as
equal to the gold, else 0.0 — including no answer, an over-long answer, a verifier timeout or
a crash. Verdicts are cached by (answer, gold), so repeated answers (common within a GVM
group) cost one verification.
"""
from __future__ import annotations

import atexit
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from gvm_mega.reward.extract import Fallback, extract_answer
from gvm_mega.reward.gold import normalize_gold
from gvm_mega.reward.pool import JobResult, VerifierPool


@dataclass
class RewardStats:
    """Counters since the scorer was created (``last_batch`` holds the latest batch's)."""

    scored: int = 0
    correct: int = 0
    no_answer: int = 0
    cache_hits: int = 0
    verified: int = 0
    timeouts: int = 0
    crashes: int = 0
    errors: int = 0
    verify_seconds: float = 0.0
    last_batch: list[JobResult] = field(default_factory=list, repr=False)


class RewardScorer:
    """Scores batches with a pool of Math-Verify workers; safe to share between threads."""

    def __init__(self, *, workers: int = 2, fallback: Fallback = "none",
                 cache_size: int = 100_000, max_answer_chars: int = 1000,
                 memory_mb: int = 4096):
        extract_answer("", fallback=fallback)  # validates the fallback name early
        self.fallback = fallback
        self.max_answer_chars = max_answer_chars
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, tuple[str, ...]], bool] = OrderedDict()
        self._pool = VerifierPool(workers, memory_mb=memory_mb)
        self._lock = threading.Lock()
        self.stats = RewardStats()

    @classmethod
    def from_config(cls, reward_cfg: Any) -> "RewardScorer":
        """A scorer from the ``reward`` config section."""
        return cls(workers=reward_cfg.workers, fallback=reward_cfg.fallback,
                   cache_size=reward_cfg.cache_size, max_answer_chars=reward_cfg.max_answer_chars,
                   memory_mb=reward_cfg.memory_mb)

    def __enter__(self) -> "RewardScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._pool.close()

    @property
    def worker_pids(self) -> list[int]:
        return self._pool.pids

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    def score(self, responses: Sequence[str], golds: Sequence[Any], *,
              timeout: float = 5.0) -> list[float]:
        """1.0 / 0.0 per response, in input order; ``timeout`` is the hard limit per item."""
        if len(responses) != len(golds):
            raise ValueError(f"score() got {len(responses)} responses but {len(golds)} golds")
        keys: list[Optional[tuple[str, tuple[str, ...]]]] = []
        for i, (response, gold) in enumerate(zip(responses, golds)):
            norm_gold = normalize_gold(gold, where=f"gold #{i}")
            answer = extract_answer(response, fallback=self.fallback,
                                    max_chars=self.max_answer_chars)
            keys.append(None if answer is None else (answer, norm_gold))
        with self._lock:
            verdicts: dict[tuple[str, tuple[str, ...]], bool] = {}
            todo: list[tuple[str, tuple[str, ...]]] = []
            for key in keys:
                if key is None or key in verdicts:
                    continue
                if key in self._cache:
                    self._cache.move_to_end(key)
                    verdicts[key] = self._cache[key]
                    self.stats.cache_hits += 1
                else:
                    verdicts[key] = False
                    todo.append(key)
            start = time.monotonic()
            results = self._pool.run(todo, timeout) if todo else []
            self.stats.verify_seconds += time.monotonic() - start
            self.stats.last_batch = results
            for key, result in zip(todo, results):
                verdicts[key] = result.correct
                self.stats.verified += 1
                self.stats.timeouts += result.status == "timeout"
                self.stats.crashes += result.status == "crash"
                self.stats.errors += result.status == "error"
                if result.status != "crash":  # a crash may be transient; try again next time
                    self._cache[key] = result.correct
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            scores = [0.0 if key is None else float(verdicts[key]) for key in keys]
            self.stats.scored += len(scores)
            self.stats.no_answer += sum(key is None for key in keys)
            self.stats.correct += int(sum(scores))
        return scores


_default: Optional[RewardScorer] = None
_default_lock = threading.Lock()


def default_scorer() -> RewardScorer:
    """The process-wide scorer behind :func:`score` (2 workers, no fallback), started lazily."""
    global _default
    with _default_lock:
        if _default is None:
            _default = RewardScorer()
            atexit.register(_default.close)
        return _default


def score(responses: Sequence[str], golds: Sequence[Any], *, timeout: float = 5.0) -> list[float]:
    """Score ``responses`` against ``golds`` (any JSON type): 1.0 correct, 0.0 otherwise."""
    return default_scorer().score(responses, golds, timeout=timeout)
