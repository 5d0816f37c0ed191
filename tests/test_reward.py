"""Reward: answer extraction, gold normalisation, the killable verifier pool, cache, order."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from gvm_mega.config.schema import RewardConfig
from gvm_mega.reward import (
    RewardScorer,
    VerifierPool,
    extract_answer,
    last_boxed,
    normalize_gold,
    score,
)

TOWER = "9^{9^{9^{9^9}}}"


@pytest.mark.parametrize("text, expected", [
    ("so \\boxed{42}.", "42"),
    ("first \\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),              # escaped braces do not nest
    ("\\fbox{7}", "7"),
    ("\\boxed {x^{2}}", "x^{2}"),
    ("answer: \\boxed 5$", "5"),
    ("\\boxed{1} and later \\boxed{2", None),           # last box never closed: no answer
    ("\\boxed{}", None),
    ("\\boxedx{3}", None),
    ("no box, the answer is 12", None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_extract_answer_fallback_and_limits():
    assert extract_answer("so it is 1,234.5 apples") is None
    assert extract_answer("so it is 1,234.5 apples", fallback="last-number") == "1234.5"
    assert extract_answer("x -3/4 y", fallback="last-number") == "-3/4"
    assert extract_answer("\\boxed{7} 9", fallback="last-number") == "7"  # the box wins
    assert extract_answer("\\boxed{" + "1" * 2000 + "}") is None
    assert extract_answer("\\boxed{" + "1" * 2000 + "}", max_chars=None) == "1" * 2000
    with pytest.raises(ValueError, match="unknown answer fallback 'first'"):
        extract_answer("x", fallback="first")


def test_normalize_gold_any_json_type():
    assert normalize_gold(27.0) == ("27",)
    assert normalize_gold(-1.0) == ("-1",)
    assert normalize_gold(0.5) == ("0.5",)
    assert normalize_gold(7) == ("7",)
    assert normalize_gold(" 033 ") == ("033",)
    assert normalize_gold("\\boxed{\\frac{1}{2}}") == ("\\frac{1}{2}",)
    assert normalize_gold("$x+1$") == ("x+1",)
    assert normalize_gold([1, "2"]) == ("1", "2")
    for bad in (None, True, "", [], {"a": 1}):
        with pytest.raises(ValueError, match="gold"):
            normalize_gold(bad)


@pytest.fixture(scope="module")
def scorer():
    with RewardScorer(workers=2) as s:
        yield s


def test_batch_scores_keep_order_and_types(scorer):
    responses = ["\\boxed{27}", "\\boxed{28}", "no answer", "\\boxed{\\frac{2}{4}}", "\\boxed{27}",
                 "\\boxed{0.5}", "\\boxed{3}", "\\boxed{(3, \\pi/2)}", "\\boxed{033}", "\\boxed{x}"]
    golds = [27.0, 27.0, 27.0, "\\frac{1}{2}", 27, [1, 2, 3], [1, 2], "\\left( 3, \\frac{\\pi}{2} \\right)",
             33, "y"]
    expected = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    assert scorer.score(responses, golds) == expected
    # reversed input gives reversed output: results follow the input, not completion order
    assert scorer.score(responses[::-1], golds[::-1]) == expected[::-1]
    assert scorer.score([], []) == []
    with pytest.raises(ValueError, match="2 responses but 1 golds"):
        scorer.score(["a", "b"], [1])
    with pytest.raises(ValueError, match="gold #1"):
        scorer.score(["\\boxed{1}", "\\boxed{1}"], [1, None])


def test_cache_by_answer_and_gold(scorer):
    scorer.clear_cache()
    before = scorer.stats.verified
    responses = [f"work {i} \\boxed{{{i % 3}}}" for i in range(30)]
    golds = [1] * 30
    first = scorer.score(responses, golds)
    assert first == [float(i % 3 == 1) for i in range(30)]
    assert scorer.stats.verified - before == 3     # three distinct (answer, gold) keys
    hits = scorer.stats.cache_hits
    assert scorer.score(responses, golds) == first
    assert scorer.stats.verified - before == 3 and scorer.stats.cache_hits - hits == 3
    scorer.score(["\\boxed{1}"], [2])               # same answer, another gold: verified anew
    assert scorer.stats.verified - before == 4


def test_stuck_worker_is_killed_and_replaced(scorer):
    scorer.clear_cache()
    old_pids = set(scorer.worker_pids)
    timeout = 0.8  # below Math-Verify's own 1 s alarm, so only the hard kill can stop a tower
    responses = [f"\\boxed{{{TOWER}}}", "\\boxed{2}", f"\\boxed{{{TOWER} + 1}}", "\\boxed{3}"]
    start = time.monotonic()
    scores = scorer.score(responses, [3, 2, 3, 3], timeout=timeout)
    elapsed = time.monotonic() - start
    assert scores == [0.0, 1.0, 0.0, 1.0]
    batch = scorer.stats.last_batch
    assert [r.status for r in batch] == ["timeout", "ok", "timeout", "ok"]
    assert all(r.seconds < timeout + 0.5 for r in batch)
    assert elapsed < 2 * timeout + 3.0
    assert not old_pids & set(scorer.worker_pids)   # both stuck workers were replaced
    for pid in old_pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert scorer.score(["\\boxed{5}"], [5]) == [1.0]  # the pool keeps working


def test_crashed_worker_scores_zero_and_pool_recovers():
    with VerifierPool(workers=1) as pool:
        assert [r.correct for r in pool.run([("1", ("1",))], 5.0)] == [True]
        victim = pool.pids[0]
        threading.Timer(0.3, os.kill, (victim, signal.SIGKILL)).start()
        results = pool.run([(TOWER, ("3",)), ("4", ("4",))], 30.0)
        assert [r.status for r in results] == ["crash", "ok"]
        assert [r.correct for r in results] == [False, True]
        assert pool.crashes == 1 and victim not in pool.pids
        with pytest.raises(ValueError, match="timeout must be > 0"):
            pool.run([("1", ("1",))], 0)


def test_module_level_score_and_config():
    assert score(["The answer is \\boxed{27}.", "\\boxed{26}"], [27.0, 27.0]) == [1.0, 0.0]
    cfg = RewardConfig(workers=1, fallback="last-number")
    with RewardScorer.from_config(cfg) as s:
        assert s.score(["so 27", "so 26"], [27.0, 27.0]) == [1.0, 0.0]
        assert len(s.worker_pids) == 1
