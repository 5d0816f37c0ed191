"""``gvm-mega bench ceiling``: the scoring against reference statistics, and one tiny run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gvm_mega.convergence.ceiling import score, to_markdown

REPO = Path(__file__).resolve().parents[1]


def _record(samples, p, g):
    ids = [f"q{i}" for i in range(len(samples))]
    return {"samples": dict(zip(ids, samples)), "accept_rate": dict(zip(ids, p)),
            "grad_norm": dict(zip(ids, g))}


def test_estimates_equal_to_the_truth_score_as_they_claim():
    p, g = [0.9, 0.5, 0.2, 0.6], [1.0, 4.0, 2.0, 3.0]
    c = np.array(p) * np.array(g) ** 2
    n = [0, 3, 1, 4]  # stage-2 counts on top of 2 reused pre-samples: 16 in all
    r = score(_record([8] * 4, p, g), _record(n, p, g), drawn=2, weighting="per-draw")
    expected = np.sum(c / (np.array(n) + 2)) / np.sum(c / 4)
    assert r["prompts"] == 4 and r["samples_per_prompt"] == 4
    assert r["rule_ratio"] == pytest.approx(expected)
    assert r["rule_ratio_claimed"] == pytest.approx(expected)
    # without a floor the optimum is n_i ~ sqrt(c_i): (mean sqrt c)^2 / mean c
    assert r["best_ratio"] == pytest.approx(np.mean(np.sqrt(c)) ** 2 / np.mean(c))
    assert r["best_ratio"] <= r["best_ratio_with_floor"] <= r["rule_ratio"] + 1e-12
    assert r["coefficient_correlation"] == pytest.approx(1.0)


def test_noisy_estimates_claim_more_than_they_deliver():
    # every prompt is the same in truth, so no allocation beats uniform; the estimates see a
    # spread that is not there and the rule's uneven allocation does worse than uniform
    truth = _record([8] * 4, [0.5] * 4, [2.0] * 4)
    noisy = _record([4, 0, 4, 0], [0.75, 0.25, 0.75, 0.25], [3.0, 1.0, 3.0, 1.0])
    r = score(truth, noisy, drawn=2, weighting="per-draw")
    assert r["best_ratio"] == pytest.approx(1.0) and r["best_ratio_with_floor"] == pytest.approx(1.0)
    assert r["rule_ratio"] == pytest.approx((2 / 6 + 2 / 2) / (4 / 4))  # 1.33: worse
    assert r["rule_ratio_claimed"] < 1.0  # what the run would have reported
    assert r["coefficient_correlation"] is None  # the truth has no spread to correlate with
    md = to_markdown(r)
    assert "| the GVM rule on its N'-draw estimates | 1.333 | 0.75x |" in md


def test_prompts_missing_from_the_reference_are_refused():
    with pytest.raises(ValueError, match="different prompts"):
        score(_record([8, 8], [0.5, 0.5], [1, 1]), _record([1, 1, 1], [0.5] * 3, [1] * 3),
              drawn=0, weighting="per-prompt")


def test_quick_probe_end_to_end(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    from gvm_mega.convergence.bench import COMMON, QUICK_SIZE

    warm = tmp_path / "warm"
    train = subprocess.run([sys.executable, "-m", "gvm_mega", "train", str(REPO / "configs" /
                            "demo_cpu.yaml"), "--run-dir", str(warm), *COMMON, *QUICK_SIZE,
                            "train.iterations=0"], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=120)
    assert train.returncode == 0, train.stderr[-3000:]
    checkpoint = warm / "checkpoints" / (warm / "checkpoints" / "latest").read_text().strip()
    out = tmp_path / "probe"
    cmd = [sys.executable, "-m", "gvm_mega", "bench", "ceiling", "--quick",
           "rollout.max_new_tokens=6",  # an override before options is taken too
           "--checkpoint", str(checkpoint), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "ceiling.json").read_text())
    assert result["prompts"] == 4 and result["draws"] == 4 and result["drawn"] == 2
    assert result["samples_per_prompt"] <= 4  # N' = 2 reused + a stage-2 budget of 2 per prompt
    for name, presample in (("reference", 4), ("estimate", 2)):
        cfg = (out / name / "config.yaml").read_text()
        assert f"presample_n: {presample}" in cfg and str(checkpoint) in cfg
    # both runs drew the same prompts; the tiny model solves none of them, so the ratios are
    # undefined and the table says so
    assert result["reference_accept_rate"]["unsolved_share"] == 1.0
    assert result["best_ratio"] is None and "| n/a |" in (out / "ceiling.md").read_text()

    other = subprocess.run([*cmd, "--draws", "6"], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=60)
    assert other.returncode == 2 and "other settings" in other.stderr
    bad = subprocess.run([*cmd[:-2], "--out", str(tmp_path / "p2"), "--draws", "2"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--draws 2: must exceed gvm.presample_n = 2" in bad.stderr
