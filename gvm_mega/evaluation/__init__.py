"""Held-out evaluation: k samples per problem, graded, reported as mean@k and pass@k.

``evaluate(engine, tokenizer, prompts, template, *, samples, sampling, scorer) -> EvalResult``
is used by the training loop (``eval_metrics`` turns results into ``metrics.jsonl`` keys) and
by ``gvm-mega eval``; ``format_table`` prints results.
"""
from gvm_mega.evaluation.evaluate import (GROUP_KEYS, EvalResult, GroupResult, ProblemResult,
                                          eval_metrics, evaluate, format_table, prompt_seed,
                                          summarise)
from gvm_mega.evaluation.metrics import default_ks, mean_at_k, mean_pass_at_k, pass_at_k

__all__ = ["GROUP_KEYS", "EvalResult", "GroupResult", "ProblemResult", "default_ks",
           "eval_metrics", "evaluate", "format_table", "mean_at_k", "mean_pass_at_k", "pass_at_k",
           "prompt_seed", "summarise"]
