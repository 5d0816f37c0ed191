"""``gvm-mega bench reward``: verifications per second on typical and adversarial answers.

Typical answers come from the built-in arithmetic task (integers) and a fixed set of LaTeX
forms (fractions, radicals, tuples, intervals); half are right and half wrong. Adversarial
answers are exponent towers, deep nesting, huge text, unbalanced braces and binary junk.
Typical jobs go straight to the worker pool (no cache), so every item is really verified.
"""
from __future__ import annotations

import argparse
import json
import time

DESCRIPTION = "reward verifier throughput (verifications/s) on typical and adversarial answers"

_LATEX_PAIRS = [
    ("\\frac{1}{2}", "0.5"), ("\\frac{3}{4}", "\\frac{6}{8}"), ("2\\sqrt{2}", "\\sqrt{8}"),
    ("\\left(3, \\frac{\\pi}{2}\\right)", "(3, \\pi/2)"), ("[1, 5)", "[1,5)"),
    ("x^2+2x+1", "(x+1)^2"), ("\\text{(C)}", "C"), ("10\\%", "10"), ("\\pi", "3.14"),
    ("-\\frac{7}{3}", "-7/3"),
]


def adversarial_responses() -> list[str]:
    """Responses built to make a verifier hang, blow up or crash."""
    return [
        "\\boxed{9^{9^{9^{9^9}}}}",
        "\\boxed{2^{2^{2^{2^{2^{2^{2^{2}}}}}}}}",
        "\\boxed{" + "(" * 400 + "1" + ")" * 400 + "}",
        "\\boxed{" + "\\frac{1}{" * 150 + "2" + "}" * 150 + "}",
        "\\boxed{" + "\\sqrt{" * 200 + "2" + "}" * 200 + "}",
        "x" * (1 << 20) + " \\boxed{3",
        "\\boxed{" + "1+" * 400 + "1}",
        "\\boxed{{{{{{}",
        "\\boxed{\x00\x01\x02\udcff\ufffe\x7f}",
        "\\boxed{10^{10^{10^{10}}} - 10^{10^{10^{10}}}}",
    ]


def typical_jobs(n: int, seed: int = 0) -> list[tuple[str, tuple[str, ...]]]:
    """``n`` (answer, golds) verifier jobs: arithmetic results (half wrong) and LaTeX forms."""
    from gvm_mega.data.arithmetic import generate_problems
    from gvm_mega.reward.extract import extract_answer
    from gvm_mega.reward.gold import normalize_gold

    jobs: list[tuple[str, tuple[str, ...]]] = []
    for k, p in enumerate(generate_problems(max(1, n // 4), seed=seed, split="train")):
        gold = normalize_gold(p.answer)
        jobs.append((extract_answer(p.solution), gold))
        jobs.append((str(p.answer + 1 + k % 3), gold))
    k = 0
    while len(jobs) < n:
        answer, gold = _LATEX_PAIRS[k % len(_LATEX_PAIRS)]
        jobs.append((answer, normalize_gold(gold)))
        k += 1
    return jobs[:n]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--items", type=int, default=400, help="typical responses to verify")
    parser.add_argument("--workers", type=int, default=2, help="verifier worker processes")
    parser.add_argument("--timeout", type=float, default=5.0, help="hard limit per item (s)")
    parser.add_argument("--adversarial-timeout", type=float, default=2.0,
                        help="hard limit per adversarial item (s)")


def main(args: argparse.Namespace) -> int:
    from gvm_mega.reward import RewardScorer

    jobs = typical_jobs(args.items)
    adversarial = adversarial_responses()
    report: dict = {"workers": args.workers}
    with RewardScorer(workers=args.workers) as scorer:
        start = time.monotonic()
        scorer.score(["\\boxed{1}"], [1])  # start the workers outside the measurement
        report["startup_s"] = round(time.monotonic() - start, 3)
        # The pool itself: no cache, no de-duplication, every job really verified.
        start = time.monotonic()
        results = scorer._pool.run(jobs, args.timeout)
        elapsed = time.monotonic() - start
        report["typical"] = {"items": len(jobs), "seconds": round(elapsed, 3),
                             "verifications_per_s": round(len(jobs) / elapsed, 1),
                             "accepted": sum(r.correct for r in results),
                             "mean_item_ms": round(1000 * sum(r.seconds for r in results)
                                                   / len(results), 2)}
        start = time.monotonic()
        scores = scorer.score(adversarial, [3] * len(adversarial),
                              timeout=args.adversarial_timeout)
        elapsed = time.monotonic() - start
        batch = scorer.stats.last_batch
        report["adversarial"] = {
            "items": len(adversarial), "seconds": round(elapsed, 3),
            "verifications_per_s": round(len(adversarial) / elapsed, 2),
            "all_zero": not any(scores),
            "timeouts": sum(r.status == "timeout" for r in batch),
            "max_item_s": round(max((r.seconds for r in batch), default=0.0), 3)}
    print(json.dumps(report, indent=2))
    return 0
