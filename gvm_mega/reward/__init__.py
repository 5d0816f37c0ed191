"""Math reward: final-answer extraction and Math-Verify in killable worker processes.

``score(responses, golds, *, timeout=5.0) -> list[float]`` is the entry point used by the
trainer and by evaluation; :class:`RewardScorer` is the same with explicit settings.
"""
from gvm_mega.reward.extract import FALLBACKS, extract_answer, last_boxed, last_number
from gvm_mega.reward.gold import normalize_gold
from gvm_mega.reward.pool import JobResult, VerifierPool
from gvm_mega.reward.scorer import RewardScorer, RewardStats, default_scorer, score

__all__ = ["FALLBACKS", "JobResult", "RewardScorer", "RewardStats", "VerifierPool",
           "default_scorer", "extract_answer", "last_boxed", "last_number", "normalize_gold",
           "score"]
