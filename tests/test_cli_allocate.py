"""``gvm-mega allocate`` and ``gvm-mega bench allocation`` through a real subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _allocation_helpers import write_jsonl

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "stats.jsonl"


def gvm_mega(*args, cwd=REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "gvm_mega", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def allocate_in_process(*args) -> int:
    """The allocate subcommand's own parser and handler, without the other subcommands."""
    import argparse

    from gvm_mega.cli import CLIError
    from gvm_mega.cli import allocate as allocate_cmd

    parser = argparse.ArgumentParser(prog="gvm-mega")
    allocate_cmd.register(parser.add_subparsers(dest="command"))
    parsed = parser.parse_args(["allocate", *map(str, args)])
    try:
        return parsed.func(parsed)
    except CLIError as exc:
        raise SystemExit(f"error: {exc}") from None


def _example_rows() -> list[dict]:
    return [json.loads(line) for line in EXAMPLE.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_readme_command_on_the_example(tmp_path):
    out = tmp_path / "alloc.json"
    res = gvm_mega("allocate", "--stats", "examples/stats.jsonl", "--budget", 64, "--out", out)
    assert res.returncode == 0, res.stderr
    assert "allocated 64 samples" in res.stdout
    doc = json.loads(out.read_text())
    rows = _example_rows()
    assert list(doc["samples"]) == [r["prompt_id"] for r in rows]
    assert sum(doc["samples"].values()) == 64 == doc["total_samples"]
    for r in rows:
        if r["num_accepted"] == 0:
            assert doc["samples"][r["prompt_id"]] == 0
    # the hard prompt with a large norm gets more than the solved one with a small norm
    assert doc["samples"]["math-0007"] > doc["samples"]["math-0001"]
    assert doc["dropped"]["zero_accept_rate"] == 2
    assert 0 < doc["variance_ratio"] < 1
    assert doc["variance_ratio"] == pytest.approx(
        doc["variance_proxy"] / doc["uniform_variance_proxy"])
    assert doc["params"]["alpha"] == 1e-3 and doc["strategy"] == "gvm"
    assert doc["estimates"]["math-0003"] == {"p": 5 / 8, "grad_norm": 1.12}


@pytest.mark.slow
def test_options_filters_caps_and_dp_split(tmp_path):
    out = tmp_path / "alloc.json"
    res = gvm_mega("allocate", "--stats", EXAMPLE, "--budget", 64, "--out", out, "--alpha", 0,
                   "--filter-threshold", 0.9, "--max-samples", 10, "--min-samples", 2,
                   "--dp", 3)
    assert res.returncode == 0, res.stderr
    doc = json.loads(out.read_text())
    n = doc["samples"]
    assert sum(n.values()) == 64
    assert n["math-0001"] == n["math-0011"] == 0            # p = 1 > 0.9
    assert doc["dropped"]["filter_threshold"] == 2
    kept = [v for k, v in n.items() if k not in ("math-0001", "math-0011", "math-0009",
                                                 "math-0012")]
    assert max(kept) <= 10 and min(kept) >= 2
    split = doc["dp_split"]
    assert len(split["ranks"]) == 3
    per_prompt: dict[str, int] = {}
    for rank in split["ranks"]:
        for pid, c in rank["samples"].items():
            per_prompt[pid] = per_prompt.get(pid, 0) + c
    assert per_prompt == {k: v for k, v in n.items() if v}
    assert split["imbalance"] < 1.05


def test_drawn_counts_the_pre_samples(tmp_path):
    """--drawn K: the rule sets K + n_i, so the counts are the library's with drawn=K and
    differ from the plain rule's (a solved prompt's pre-samples already cover its share)."""
    from gvm_mega.allocation import allocate

    docs = {}
    for drawn in (0, 8):
        out = tmp_path / f"alloc{drawn}.json"
        assert allocate_in_process("--stats", EXAMPLE, "--budget", 32, "--out", out,
                                   "--drawn", drawn) == 0
        docs[drawn] = json.loads(out.read_text())
        est = docs[drawn]["estimates"].values()
        g, p = [e["grad_norm"] for e in est], [e["p"] for e in est]
        assert list(docs[drawn]["samples"].values()) == allocate(g, p, 32, drawn=drawn).tolist()
        assert docs[drawn]["params"]["drawn"] == drawn
    assert docs[8]["samples"] != docs[0]["samples"]
    assert docs[8]["samples"]["math-0001"] == 0 < docs[0]["samples"]["math-0001"]
    with pytest.raises(SystemExit, match="--drawn must be non-negative"):
        allocate_in_process("--stats", EXAMPLE, "--budget", 32, "--out", tmp_path / "x.json",
                            "--drawn", -1)


def test_fitted_prior(tmp_path):
    """--prior fitted: the estimates use the prior fitted to the file's own counts."""
    from gvm_mega.allocation.beta_prior import fit_beta_prior

    rng = np.random.default_rng(2)
    accepted = rng.binomial(8, rng.beta(1.0, 5.0, 40))
    stats = write_jsonl(tmp_path / "stats.jsonl", [
        {"prompt_id": f"p{i}", "num_samples": 8, "num_accepted": int(k),
         "grad_norm": 1.0 + i if k else None} for i, k in enumerate(accepted)])
    out = tmp_path / "alloc.json"
    assert allocate_in_process("--stats", stats, "--budget", 160, "--out", out,
                               "--estimator", "posterior", "--prior", "fitted") == 0
    doc = json.loads(out.read_text())
    a, b = fit_beta_prior([8] * 40, accepted)
    assert doc["prior_used"] == [a, b] and doc["params"]["prior"] == "fitted"
    assert doc["estimates"]["p0"]["p"] == pytest.approx((a + accepted[0]) / (a + b + 8))
    assert allocate_in_process("--stats", stats, "--budget", 160, "--out", out,
                               "--estimator", "posterior") == 0
    assert json.loads(out.read_text())["prior_used"] == [1.0, 1.0]
    with pytest.raises(SystemExit, match="'gvm.prior' .* only applies to 'gvm.estimator' = "
                                         "posterior"):
        allocate_in_process("--stats", stats, "--budget", 160, "--out", out, "--prior", "fitted")


def test_posterior_uniform_and_config_defaults(tmp_path):
    out = tmp_path / "alloc.json"
    assert allocate_in_process("--stats", EXAMPLE, "--budget", 64, "--out", out,
                               "--estimator", "posterior", "--prior-a", 1, "--prior-b", 1) == 0
    doc = json.loads(out.read_text())
    assert doc["samples"]["math-0009"] > 0 and doc["estimates"]["math-0009"]["p"] == 0.1

    assert allocate_in_process("--stats", EXAMPLE, "--budget", 64, "--out", out,
                               "--uniform") == 0
    doc = json.loads(out.read_text())
    assert sorted(set(doc["samples"].values())) == [5, 6] and doc["strategy"] == "uniform"
    assert doc["variance_ratio"] == pytest.approx(1.0)

    cfg = tmp_path / "gvm.yaml"
    cfg.write_text("gvm:\n  max_samples: 7\n  alpha: 0.0\n")
    assert allocate_in_process("--stats", EXAMPLE, "--budget", 64, "--out", out,
                               "--config", cfg) == 0
    doc = json.loads(out.read_text())
    assert max(doc["samples"].values()) == 7 and doc["params"]["alpha"] == 0.0
    assert allocate_in_process("--stats", EXAMPLE, "--budget", 64, "--out", out,
                               "--config", cfg, "--max-samples", 9) == 0
    assert json.loads(out.read_text())["params"]["max_samples"] == 9


def test_grad_norm_pooling_options(tmp_path):
    out = tmp_path / "alloc.json"
    base = ("--stats", EXAMPLE, "--budget", 64, "--out", out, "--estimator", "posterior")
    assert allocate_in_process(*base, "--grad-norm-shrink", 1) == 0
    shrunk = json.loads(out.read_text())["estimates"]
    assert allocate_in_process(*base) == 0
    plain = json.loads(out.read_text())["estimates"]
    known = [k for k, e in plain.items() if e["grad_norm"] > 0]
    spread = lambda est: np.std([np.log(est[k]["grad_norm"]) for k in known])
    assert spread(shrunk) == pytest.approx(spread(plain) / 2)  # half-way in log space
    # the example has too few prompts for 16 neighbours: similar-p runs and means the pool
    assert allocate_in_process(*base, "--grad-norm-fallback", "similar-p") == 0
    assert json.loads(out.read_text())["estimates"] == plain
    with pytest.raises(SystemExit, match="--grad-norm-shrink:.*must be"):
        allocate_in_process(*base, "--grad-norm-shrink", -2)


def test_weighting_follows_the_config_and_the_option(tmp_path):
    """The proxy matches the loss's prompt weights; the GVM rule at alpha=0 is the
    per-prompt optimum (up to rounding), so it is at its bound there and not per draw."""
    out = tmp_path / "alloc.json"
    args = ("--stats", EXAMPLE, "--budget", 64, "--out", out, "--alpha", 0)
    assert allocate_in_process(*args) == 0
    doc = json.loads(out.read_text())
    assert doc["weighting"] == "per-prompt"
    assert doc["best_variance_ratio"] <= doc["variance_ratio"] < 1
    assert doc["variance_ratio"] == pytest.approx(doc["best_variance_ratio"], rel=0.05)

    cfg = tmp_path / "per_draw.yaml"
    cfg.write_text("algorithm:\n  name: gvm-raft++\n  prompt_weight: per-draw\n")
    assert allocate_in_process(*args, "--config", cfg) == 0
    per_draw = json.loads(out.read_text())
    assert per_draw["weighting"] == "per-draw"
    assert per_draw["samples"] == doc["samples"]  # the same allocation, judged differently
    assert per_draw["best_variance_ratio"] < per_draw["variance_ratio"]
    assert per_draw["variance_ratio"] > doc["variance_ratio"]
    assert allocate_in_process(*args, "--config", cfg, "--weighting", "per-prompt") == 0
    assert json.loads(out.read_text())["variance_ratio"] == pytest.approx(doc["variance_ratio"])


ROW = {"prompt_id": "p1", "num_samples": 8, "num_accepted": 2, "grad_norm": 1.0}


@pytest.mark.slow
@pytest.mark.parametrize("bad, problem", [
    ({"prompt_id": "p2", "num_samples": 8, "grad_norm": 1.0}, "missing field 'num_accepted'"),
    ({**ROW, "prompt_id": "p2", "num_samples": -8}, "num_samples must be non-negative"),
    ({**ROW, "prompt_id": "p2", "num_accepted": -1}, "num_accepted must be non-negative"),
    ({**ROW, "prompt_id": "p2", "num_samples": 8.5}, "num_samples must be an integer, got 8.5"),
    ({**ROW, "prompt_id": "p2", "num_accepted": 2.5}, "num_accepted must be an integer"),
    ({**ROW, "prompt_id": "p2", "num_accepted": 9}, "num_accepted (9) exceeds num_samples (8)"),
    ('{"prompt_id": "p2", "num_samples": 8, "num_accepted": 2, "grad_norm": NaN}',
     "grad_norm must be finite, got nan"),
    ('{"prompt_id": "p2", "num_samples": 8, "num_accepted": 2, "grad_norm": -Infinity}',
     "grad_norm must be finite, got -inf"),
    ({**ROW}, "duplicate prompt_id 'p1' (first seen on line 1)"),
    ('{"prompt_id": "p2", "num_samples": 8 "num_accepted": 2}', "broken JSON"),
])
def test_bad_rows_name_the_line_and_write_nothing(tmp_path, bad, problem):
    stats = write_jsonl(tmp_path / "stats.jsonl", [ROW, bad])
    out = tmp_path / "alloc.json"
    res = gvm_mega("allocate", "--stats", stats, "--budget", 16, "--out", out)
    assert res.returncode == 2, res.stderr
    assert f"stats.jsonl:2: {problem}" in res.stderr
    assert "Traceback" not in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.jsonl"]


@pytest.mark.slow
def test_infeasible_caps_fail_cleanly_and_keep_the_old_output(tmp_path):
    stats = write_jsonl(tmp_path / "stats.jsonl", [ROW])
    out = tmp_path / "alloc.json"
    out.write_text("previous result\n")
    res = gvm_mega("allocate", "--stats", stats, "--budget", 16, "--out", out,
                   "--max-samples", 1)
    assert res.returncode == 2, res.stdout
    assert "budget 16 exceeds max_samples=1 x 1 eligible prompts" in res.stderr
    assert "Traceback" not in res.stderr
    assert out.read_text() == "previous result\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alloc.json", "stats.jsonl"]
    res = gvm_mega("allocate", "--stats", tmp_path / "nope.jsonl", "--budget", 4, "--out", out)
    assert res.returncode == 2 and "nope.jsonl: cannot read" in res.stderr


@pytest.mark.parametrize("extra, problem", [
    (["--alpha", -1], "--alpha: "),
    (["--filter-threshold", 2], "--filter-threshold: "),
    (["--min-samples", 9, "--max-samples", 3],
     "'gvm.min_samples' (9) must not exceed 'gvm.max_samples' (3)"),
    (["--budget", -5], "--budget must be non-negative"),
    (["--dp", 0], "--dp must be at least 1"),
    (["--out", "missing-dir/a.json"], "does not exist"),
])
def test_bad_options_name_the_option_and_write_nothing(tmp_path, monkeypatch, extra, problem):
    monkeypatch.chdir(tmp_path)
    stats = write_jsonl(tmp_path / "stats.jsonl", [ROW])
    out = tmp_path / "alloc.json"
    out.write_text("previous result\n")
    with pytest.raises(SystemExit) as err:
        allocate_in_process("--stats", stats, "--budget", 16, "--out", out, *extra)
    assert problem in str(err.value)
    assert out.read_text() == "previous result\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alloc.json", "stats.jsonl"]


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit):
        allocate_in_process("--help")
    text = capsys.readouterr().out
    for flag in ("--stats", "--budget", "--out", "--alpha", "--beta", "--filter-threshold",
                 "--filter-insufficient", "--min-samples", "--max-samples", "--estimator",
                 "--uniform", "--dp", "--config"):
        assert flag in text


@pytest.mark.slow
def test_bench_allocation_reports_both_timings():
    res = gvm_mega("bench", "allocation", "--prompts", 20000, "--repeats", 2, "--json",
                   "--max-samples", 40)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["prompts"] == 20000 and doc["totals"] == [160000, 160000]
    assert doc["vectorised_s"] > 0 and doc["loop_s"] > 0
    assert doc["speedup"] == pytest.approx(doc["loop_s"] / doc["vectorised_s"])
    assert doc["prompts_differing"] == 0 and doc["capped_max"] <= 40


def test_bench_text_output(capsys):
    import argparse

    from gvm_mega.allocation import bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert bench.main(parser.parse_args(["--prompts", "1000", "--repeats", "1"])) == 0
    text = capsys.readouterr().out
    assert "vectorised numpy" in text and "per-prompt loop" in text and "speedup" in text
