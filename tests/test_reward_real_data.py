"""The reward and the readers against the real evaluation sets in ../shared/data/eval.

MATH500 reference solutions must verify against their own answers (>= 99%) and fail against
another problem's answer at the same rate; AIME24 and AMC23 golds written as ``\\boxed{}``
verify against themselves; adversarial responses finish within the timeout and score 0; and
corrupted copies of the real files give the promised reader errors.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from gvm_mega.data import DataError, read_prompts
from gvm_mega.reward import RewardScorer

EVAL_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "eval"
pytestmark = pytest.mark.skipif(
    not (EVAL_DIR / "math500.jsonl").is_file(),
    reason=f"evaluation data not found at {EVAL_DIR} (expected ../shared/data/eval beside the repo)")


def rows(name: str) -> list[dict]:
    with open(EVAL_DIR / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def scorer():
    with RewardScorer(workers=2) as s:
        yield s


def test_math500_self_agreement_and_cross_disagreement(scorer):
    data = rows("math500.jsonl")
    assert len(data) == 500
    own = scorer.score([r["solution"] for r in data], [r["answer"] for r in data])
    agreement = sum(own) / len(own)
    # pair each solution with the next problem whose answer is written differently
    others = []
    for i in range(len(data)):
        j = (i + 1) % len(data)
        while data[j]["answer"].replace(" ", "") == data[i]["answer"].replace(" ", ""):
            j = (j + 1) % len(data)
        others.append(data[j]["answer"])
    cross = scorer.score([r["solution"] for r in data], others)
    disagreement = 1 - sum(cross) / len(cross)
    print(f"MATH500: self-agreement {agreement:.3f}, cross-answer disagreement {disagreement:.3f}")
    assert agreement >= 0.99, [r["unique_id"] for r, s in zip(data, own) if not s]
    assert disagreement >= 0.99, [(r["answer"], o) for r, o, s in zip(data, others, cross) if s]


@pytest.mark.parametrize("name", ["aime24.jsonl", "amc23.jsonl"])
def test_golds_verify_against_themselves(scorer, name):
    data = rows(name)
    golds = [r["answer"] for r in data]
    if name == "amc23.jsonl":
        assert all(isinstance(g, float) for g in golds)  # stored as 27.0 and the like
        written = [f"\\boxed{{{int(g) if g.is_integer() else g}}}" for g in golds]
        assert scorer.score(written, golds) == [1.0] * len(golds)
    raw = [f"The answer is \\boxed{{{g}}}." for g in golds]
    assert scorer.score(raw, golds) == [1.0] * len(golds)
    wrong = [f"\\boxed{{{float(g) + 1:g}}}" for g in golds]
    assert scorer.score(wrong, golds) == [0.0] * len(golds)
    # the readers accept the real files as they are
    ps = read_prompts(EVAL_DIR / name)
    assert len(ps) == len(data) and ps.stats.skipped_total == 0


def test_adversarial_responses_finish_in_time_and_score_zero(scorer):
    from gvm_mega.reward.bench import adversarial_responses

    timeout = 1.5
    adversarial = adversarial_responses() + [bytes(range(256)).decode("latin-1") * 4096]
    gold = rows("amc23.jsonl")[0]["answer"]
    scorer.clear_cache()
    for response in adversarial:
        start = time.monotonic()
        assert scorer.score([response], [gold], timeout=timeout) == [0.0]
        spent = sum(r.seconds for r in scorer.stats.last_batch)
        assert spent <= timeout + 0.5, (response[:60], spent)
        # waiting for a replacement worker to start is the only time beyond the item's limit
        assert time.monotonic() - start < timeout + 5.0
    assert scorer.score(["\\boxed{27}"], [gold]) == [1.0]


def _corrupt(tmp_path: Path, name: str, line_no: int, replacement: bytes) -> Path:
    lines = (EVAL_DIR / name).read_bytes().splitlines()
    lines[line_no - 1] = replacement
    out = tmp_path / name
    out.write_bytes(b"\n".join(lines) + b"\n")
    return out


def test_malformed_copies_of_real_files(tmp_path):
    original = (EVAL_DIR / "math500.jsonl").read_bytes().splitlines()
    cases = [
        (original[6][: len(original[6]) // 2], "broken JSON"),
        (original[6].replace(b'"answer"', b'"answr"'), "missing field 'answer'"),
        (original[6].replace(b'"problem": "', b'"problem": "\xff\xfe'), "not valid UTF-8"),
    ]
    for replacement, message in cases:
        path = _corrupt(tmp_path, "math500.jsonl", 7, replacement)
        with pytest.raises(DataError, match=f"math500.jsonl:7: .*{message}"):
            read_prompts(path)
        ps = read_prompts(path, on_bad_row="skip")
        assert len(ps) == 499 and ps.stats.skipped_total == 1
    amc = json.loads((EVAL_DIR / "amc23.jsonl").read_text().splitlines()[3])
    amc["answer"] = None
    path = _corrupt(tmp_path, "amc23.jsonl", 4, json.dumps(amc).encode())
    with pytest.raises(DataError, match="amc23.jsonl:4: field 'answer' is empty"):
        read_prompts(path)
