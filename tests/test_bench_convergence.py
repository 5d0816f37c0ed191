"""The convergence benchmark: curve analysis and speedup on hand-made metrics, failure
reporting of a training process, and one ``--quick`` end-to-end run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gvm_mega.convergence import (Curve, curve_from_records, load_curve, mean_curve,
                                  samples_to_reach, seed_bootstrap, summarise, table_markdown,
                                  write_outputs)
from gvm_mega.convergence.arms import echo_line, run_training

REPO = Path(__file__).resolve().parents[1]


def _write_metrics(path: Path, points: list[tuple[int, int, float | None]]) -> Path:
    """A metrics.jsonl with (iteration, samples_total, eval_accuracy or None) records."""
    path.mkdir(parents=True, exist_ok=True)
    rows = []
    for it, samples, acc in points:
        row = {"iteration": it, "samples_total": samples, "loss": 0.1}
        if acc is not None:
            row["eval_accuracy"] = acc
        rows.append(json.dumps(row))
    (path / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    return path / "metrics.jsonl"


def _curve(xs: list[float], ys: list[float]) -> Curve:
    return Curve(tuple(range(len(xs))), tuple(float(x) for x in xs), tuple(ys))


# ---------------------------------------------------------------------- analysis
def test_speedup_had_the_runs_stopped_sooner():
    """by_horizon reads the headline with both arms cut at each eighth of the run: the
    baseline's accuracy there is the target."""
    from gvm_mega.convergence.analysis import cut_curve, speedup_by_horizon

    xs = [0, 100, 200, 300, 400]
    def at(ys):
        return Curve((0, 10, 20, 30, 40), tuple(map(float, xs)), tuple(ys))
    curves = {"raft++": [at([0.1, 0.2, 0.3, 0.4, 0.5])] * 2,
              "gvm-raft++": [at([0.1, 0.25, 0.5, 0.55, 0.6])] * 2}
    s = summarise(curves)["speedups"]["gvm-raft++"]
    assert s["speedup"] == pytest.approx(2.0)   # the whole run: 0.5 at 400 against 200
    horizons = s["by_horizon"]
    # eighths of 40 at evals every 10: 5 has none after the start, 15 -> 10 (again), ...
    assert [h["iteration"] for h in horizons] == [10, 20, 30]
    assert [h["target_accuracy"] for h in horizons] == pytest.approx([0.2, 0.3, 0.4])
    assert [h["variant_accuracy"] for h in horizons] == pytest.approx([0.25, 0.5, 0.55])
    # GVM crosses 0.2 at 66.7, 0.3 at 120, 0.4 at 160 (interpolated on its cut curve)
    assert [h["speedup"] for h in horizons] == pytest.approx([1.5, 200 / 120, 300 / 160])
    # along the cut baseline's rise too: at 20, 0.1 -> 0.3, so its 50% is 0.2 (at 100; GVM 66.7)
    assert horizons[1]["by_level"][1]["accuracy"] == pytest.approx(0.2)
    assert horizons[1]["by_level"][1]["speedup"] == pytest.approx(1.5)
    # identical seeds: every redraw reads the same ratio
    assert horizons[1]["seed_bootstrap"]["quantiles"][1]["speedup"] == pytest.approx(200 / 120)
    md = table_markdown(summarise(curves))
    assert ("- gvm-raft++ had the runs stopped sooner (both arms' curves cut there): "
            "iteration 10: raft++ 0.2000, gvm-raft++ 0.2500, 1.50x (redraw median 1.50x); "
            "iteration 20: raft++ 0.3000, gvm-raft++ 0.5000, 1.67x") in md

    # a share between eval points takes the last eval at or before it, shared by every seed
    twelve = Curve((0, 12, 24, 36, 48, 60), (0., 1., 2., 3., 4., 5.),
                   (0.1, 0.2, 0.3, 0.4, 0.5, 0.6))
    gappy = Curve((0, 12, 36, 48, 60), (0., 1., 3., 4., 5.), (0.1, 0.3, 0.5, 0.6, 0.7))
    found = speedup_by_horizon([gappy], [twelve], horizons=(0.25, 0.5, 0.75), bootstrap=False)
    assert [h["iteration"] for h in found] == [12, 36]   # 15 -> 12, 30 -> 12 again, 45 -> 36
    assert found[0]["seed_bootstrap"] is None
    assert cut_curve(twelve, 30).iterations == (0, 12, 24)
    with pytest.raises(ValueError, match="no eval point at or before iteration -1"):
        cut_curve(twelve, -1)


def test_curve_keeps_only_eval_records(tmp_path):
    path = _write_metrics(tmp_path / "run", [(0, 0, 0.1), (1, 100, None), (2, 200, 0.3),
                                             (3, 300, None), (4, 400, 0.35)])
    c = load_curve(path)
    assert c.variance_ratio is None and c.variance_ratio_best is None  # a uniform run
    assert c.iterations == (0, 2, 4)
    assert c.samples == (0.0, 200.0, 400.0)
    assert c.accuracy == (0.1, 0.3, 0.35)
    assert c.final_accuracy == 0.35
    gvm = curve_from_records([
        {"iteration": 0, "samples_total": 0, "eval_accuracy": 0.1},
        {"iteration": 1, "samples_total": 8, "variance_ratio": 0.8, "variance_ratio_best": 0.5},
        {"iteration": 2, "samples_total": 16, "variance_ratio": 0.6, "variance_ratio_best": 0.4,
         "eval_accuracy": 0.2}])
    assert gvm.variance_ratio == pytest.approx(0.7)
    assert gvm.variance_ratio_best == pytest.approx(0.45)
    assert gvm.to_dict()["variance_ratio_best_mean"] == pytest.approx(0.45)
    with pytest.raises(ValueError, match="no record with eval_accuracy"):
        curve_from_records([{"iteration": 1, "samples_total": 3}], "m.jsonl")
    with pytest.raises(ValueError, match="iteration 2 has eval_accuracy but no samples_total"):
        curve_from_records([{"iteration": 2, "eval_accuracy": 0.5}], "m.jsonl")


def test_samples_to_reach_interpolates_between_eval_points():
    c = _curve([0, 400, 800], [0.1, 0.3, 0.5])
    assert samples_to_reach(c, 0.5) == pytest.approx(800.0)
    assert samples_to_reach(c, 0.4) == pytest.approx(600.0)   # halfway 0.3 -> 0.5
    assert samples_to_reach(c, 0.15) == pytest.approx(100.0)  # a quarter of 0.1 -> 0.3
    assert samples_to_reach(c, 0.05) == 0.0                   # already there at the start
    assert samples_to_reach(c, 0.51) is None
    # the first crossing counts, not a later one after a dip
    bumpy = _curve([0, 100, 200, 300], [0.2, 0.6, 0.3, 0.6])
    assert samples_to_reach(bumpy, 0.4) == pytest.approx(50.0)


def test_mean_curve_averages_seeds_at_shared_eval_iterations():
    a = Curve((0, 2, 4), (0.0, 200.0, 400.0), (0.1, 0.3, 0.5))
    b = Curve((0, 2, 4), (0.0, 220.0, 380.0), (0.1, 0.5, 0.7))
    c = Curve((0, 1, 2, 4), (0.0, 90.0, 240.0, 420.0), (0.1, 0.2, 0.4, 0.6))
    m = mean_curve([a, b, c])
    assert m.iterations == (0, 2, 4)
    assert m.samples == pytest.approx((0.0, 220.0, 400.0))
    assert m.accuracy == pytest.approx((0.1, 0.4, 0.6))
    with pytest.raises(ValueError, match="share no eval iteration"):
        mean_curve([Curve((1,), (1.0,), (0.1,)), Curve((2,), (2.0,), (0.2,))])


def test_speedup_two_x_never_reached_and_spread():
    curves = {
        # baseline: seeds end at 0.4 and 0.6 -> mean final accuracy 0.5, reached at 800
        "raft++": [_curve([0, 400, 800], [0.1, 0.2, 0.4]), _curve([0, 400, 800], [0.1, 0.4, 0.6])],
        # GVM: mean (0.1, 0.5, 0.6) over (0, 400, 800) -> reaches 0.5 at 400
        "gvm-raft++": [_curve([0, 400, 800], [0.1, 0.5, 0.6])],
        # grpo's mean final accuracy 0.45 is reached at 600 (interpolated 0.3 -> 0.6 on 400..800)
        "grpo": [_curve([0, 400, 800], [0.1, 0.3, 0.45])],
        # gvm-grpo never gets to 0.45
        "gvm-grpo": [_curve([0, 500, 1000], [0.1, 0.3, 0.44])],
    }
    s = summarise(curves)
    acc = s["algorithms"]["raft++"]["final_accuracy"]
    assert acc["mean"] == pytest.approx(0.5) and acc["std"] == pytest.approx(0.1)
    assert (acc["min"], acc["max"], acc["n"]) == (0.4, 0.6, 2)
    assert s["algorithms"]["raft++"]["mean_curve"]["eval_accuracy"] == pytest.approx([0.1, 0.3, 0.5])

    raft = s["speedups"]["gvm-raft++"]
    assert raft["baseline"] == "raft++" and raft["reached"] is True
    assert raft["target_accuracy"] == pytest.approx(0.5)
    assert raft["baseline_samples"] == pytest.approx(800.0)
    assert raft["variant_samples"] == pytest.approx(400.0)
    assert raft["speedup"] == pytest.approx(2.0)

    grpo = s["speedups"]["gvm-grpo"]
    assert grpo["baseline"] == "grpo" and grpo["reached"] is False
    assert grpo["speedup"] is None and grpo["variant_samples"] is None
    assert grpo["baseline_samples"] == pytest.approx(800.0)  # first reaches 0.45 at the end
    assert "never reaches" in grpo["note"] and "0.4400" in grpo["note"]

    # along raft++'s mean rise 0.1 -> 0.5 (0.1, 0.3, 0.5 at 0, 400, 800); GVM: 0.1, 0.5, 0.6
    levels = raft["by_level"]
    assert [lv["level"] for lv in levels] == [0.25, 0.5, 0.75, 1.0]
    assert [lv["accuracy"] for lv in levels] == pytest.approx([0.2, 0.3, 0.4, 0.5])
    assert [lv["baseline_samples"] for lv in levels] == pytest.approx([200, 400, 600, 800])
    assert [lv["variant_samples"] for lv in levels] == pytest.approx([100, 200, 300, 400])
    assert [lv["speedup"] for lv in levels] == pytest.approx([2.0, 2.0, 2.0, 2.0])
    # a variant that never reaches the final accuracy still has the levels it does reach
    # (grpo's mean rise 0.1 -> 0.45: 0.1875 at 233.3, 0.275 at 350, 0.3625 at 483.3)
    assert [lv["accuracy"] for lv in grpo["by_level"]] == pytest.approx([0.1875, 0.275, 0.3625, 0.45])
    assert [lv["speedup"] for lv in grpo["by_level"][:2]] == pytest.approx(
        [233.3333 / 291.6667, 350 / 437.5], rel=1e-4)
    assert grpo["by_level"][3]["variant_samples"] is None and grpo["by_level"][3]["speedup"] is None

    md = table_markdown(s)
    assert "| gvm-raft++ | raft++ | 0.5000 | 800 | 400 | 2.00x |" in md
    assert ("- gvm-raft++ along raft++'s rise (share of the rise: accuracy, speedup): "
            "25%: 0.2000, 2.00x, 50%: 0.3000, 2.00x, 75%: 0.4000, 2.00x, 100%: 0.5000, 2.00x") in md
    assert "75%: 0.3625, 0.78x, 100%: 0.4500, never reached" in md  # 566.7 / 723.2
    assert "| gvm-grpo | grpo | 0.4500 | 800 | never reached | — |" in md
    assert "| raft++ | 2 | 0.5000 ± 0.1000 | 0.4000 – 0.6000 | 800 |" in md


def test_speedup_interpolated_and_undefined_cases():
    s = summarise({"raft++": [_curve([0, 300, 600, 900], [0.2, 0.3, 0.35, 0.4])],
                   "gvm-raft++": [_curve([0, 240, 480], [0.2, 0.3, 0.5])]})
    # GVM crosses 0.4 halfway between 240 (0.3) and 480 (0.5): 360 -> 900 / 360 = 2.5
    assert s["speedups"]["gvm-raft++"]["variant_samples"] == pytest.approx(360.0)
    assert s["speedups"]["gvm-raft++"]["speedup"] == pytest.approx(2.5)
    # a baseline that never improves on the warm start has no speedup to measure
    flat = summarise({"grpo": [_curve([0, 100], [0.3, 0.2])],
                      "gvm-grpo": [_curve([0, 100], [0.3, 0.4])]})
    assert flat["speedups"]["gvm-grpo"]["speedup"] is None
    assert "no improvement to compare against" in flat["speedups"]["gvm-grpo"]["note"]
    # nor one that ends within evaluation noise of its start (0.636 -> 0.637), even though a
    # dip in between makes "samples to reach the final accuracy" a positive number
    noisy = {"grpo": [_curve([0, 100, 200, 300], [0.636, 0.628, 0.632, 0.637])],
             "gvm-grpo": [_curve([0, 100, 200, 300], [0.636, 0.623, 0.638, 0.632])]}
    s = summarise(noisy)["speedups"]["gvm-grpo"]
    assert s["speedup"] is None and s["baseline_samples"] is None
    assert "+0.0010 from its start 0.6360" in s["note"]
    assert summarise(noisy, min_gain=0.0)["speedups"]["gvm-grpo"]["speedup"] == pytest.approx(
        (200 + 100 * (0.637 - 0.632) / (0.637 - 0.632)) / (100 + 100 * (0.637 - 0.623) / (0.638 - 0.623)))
    # a missing baseline is said, not dropped
    alone = summarise({"gvm-grpo": [_curve([0, 100], [0.1, 0.4])], "grpo": []})
    assert alone["algorithms"]["grpo"]["seeds"] == 0
    assert alone["speedups"]["gvm-grpo"]["speedup"] is None
    assert "no finished run of grpo" in alone["speedups"]["gvm-grpo"]["note"]


def test_seed_bootstrap_spreads_the_speedup_over_redrawn_seeds():
    base = [_curve([0, 400, 800], [0.1, 0.3, 0.5])] * 2
    # identical seeds: every draw is the headline 2x
    boot = seed_bootstrap([_curve([0, 400, 800], [0.1, 0.5, 0.6])] * 2, base)
    assert [q["speedup"] for q in boot["quantiles"]] == pytest.approx([2.0, 2.0, 2.0])
    assert boot["share_at_target"] == 1.0 and boot["never_reached"] == boot["undefined"] == 0
    # one variant seed reaches 0.5 at 400 (2x), the other never does: a draw of the second
    # twice (1 in 4) never reaches it and counts as 0x; a mixed draw (0.1, 0.45, 0.525)
    # reaches 0.5 at 666.7: 1.2x
    fast, stuck = _curve([0, 400, 800], [0.1, 0.5, 0.6]), _curve([0, 400, 800], [0.1, 0.4, 0.45])
    boot = seed_bootstrap([fast, stuck], base, draws=2000)
    assert boot["never_reached"] == pytest.approx(500, abs=80)
    assert boot["share_at_target"] == pytest.approx(0.25, abs=0.04)
    assert [q["speedup"] for q in boot["quantiles"]] == pytest.approx([0.0, 1.2, 2.0])
    assert boot == seed_bootstrap([fast, stuck], base, draws=2000)  # seeded
    # a redrawn baseline that does not learn leaves its draws out
    flat = _curve([0, 400, 800], [0.1, 0.1, 0.1])
    boot = seed_bootstrap([fast, fast], [base[0], flat], draws=2000)
    assert boot["undefined"] == pytest.approx(500, abs=80)
    # of the rest a third are the learning seed twice (2x) and two thirds mixed: baseline
    # (0.1, 0.2, 0.3) reaches 0.3 at 800, GVM at 200 (4x)
    assert [q["speedup"] for q in boot["quantiles"]] == pytest.approx([2.0, 4.0, 4.0])
    # a single seed has nothing to redraw
    assert seed_bootstrap([fast], base) is None

    s = summarise({"raft++": base, "gvm-raft++": [fast, stuck]})
    assert s["speedups"]["gvm-raft++"]["seed_bootstrap"]["draws"] == 1000
    assert ("- gvm-raft++ speedup over 1000 redraws of the seeds: 10%: 0.00x, 50%: 1.20x, "
            "90%: 2.00x; at least 2x in 2") in table_markdown(s)
    assert "never reached in 2" in table_markdown(s)
    single = summarise({"raft++": base[:1], "gvm-raft++": [fast]})
    assert single["speedups"]["gvm-raft++"]["seed_bootstrap"] is None
    assert "redraws" not in table_markdown(single)


def test_outputs_from_hand_made_runs(tmp_path):
    curves = {"raft++": [_curve([0, 400, 800], [0.1, 0.3, 0.5])],
              "gvm-raft++": [Curve((0, 1, 2), (0.0, 400.0, 800.0), (0.1, 0.5, 0.6), 0.6, 0.4),
                             Curve((0, 1, 2), (0.0, 420.0, 820.0), (0.1, 0.4, 0.5), 0.8, 0.5)]}
    paths = write_outputs(tmp_path, summarise(curves), curves, {"benchmark": "convergence"})
    results = json.loads(paths["results"].read_text())
    # GVM seed mean: samples (0, 410, 810), accuracy (0.1, 0.45, 0.55): 0.5 at 610
    assert results["speedups"]["gvm-raft++"]["variant_samples"] == pytest.approx(610.0)
    assert results["speedups"]["gvm-raft++"]["speedup"] == pytest.approx(800 / 610)
    assert results["algorithms"]["gvm-raft++"]["final_accuracy"]["mean"] == pytest.approx(0.55)
    table = json.loads(paths["table_json"].read_text())
    assert [r["algorithm"] for r in table["algorithms"]] == ["raft++", "gvm-raft++"]
    assert table["gvm_variants"][0]["baseline"] == "raft++"
    assert table["gvm_variants"][0]["variance_ratio_mean"] == pytest.approx(0.7)
    assert table["gvm_variants"][0]["variance_ratio_best_mean"] == pytest.approx(0.45)
    by_level = table["gvm_variants"][0]["speedup_by_level"]
    assert [lv["level"] for lv in by_level] == [0.25, 0.5, 0.75, 1.0]
    assert by_level[-1]["speedup"] == pytest.approx(800 / 610)
    assert results["algorithms"]["gvm-raft++"]["variance_ratio_best"]["max"] == 0.5
    assert "variance_ratio" not in results["algorithms"]["raft++"]
    assert "| 1.31x | 0.70 | 0.45 |" in paths["table_md"].read_text()
    assert table["gvm_variants"][0]["speedup_seed_bootstrap"] is None  # one baseline seed
    assert paths["curves"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------- processes
def test_failed_training_process_is_reported_with_its_log(tmp_path):
    echoed: list[str] = []
    result = run_training("broken", str(tmp_path / "missing.yaml"), tmp_path / "run", [], 1,
                          tmp_path / "logs", echo=echoed.append)
    assert result.status == "failed" and not result.ok
    assert result.returncode == 2
    assert "missing.yaml" in result.log_tail
    assert result.to_dict()["log_tail"] == result.log_tail
    assert any("FAILED" in line for line in echoed)


class _SlowStream:
    """A stdout whose every write yields the CPU, as a busy terminal or pipe can."""

    def __init__(self) -> None:
        self.chunks: list[str] = []

    def write(self, text: str) -> int:
        time.sleep(0.001)
        self.chunks.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_echo_from_parallel_arms_keeps_lines_whole(monkeypatch):
    stream = _SlowStream()
    monkeypatch.setattr(sys, "stdout", stream)
    lines = [f"[arm{t}] line {k}" for t in range(4) for k in range(20)]
    threads = [threading.Thread(target=lambda t=t: [echo_line(f"[arm{t}] line {k}")
                                                   for k in range(20)]) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted("".join(stream.chunks).splitlines()) == sorted(lines)


def test_quick_benchmark_end_to_end(tmp_path):
    out = tmp_path / "bench"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "gvm_mega", "bench", "convergence", "--quick", "--out", str(out),
           "data.arithmetic_test_size=3", "rollout.max_new_tokens=6"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["failures"] == []
    assert results["command"]["algorithms"] == ["raft++", "gvm-raft++"]
    assert results["budget"]["presample_n"] == 2 and results["budget"]["budget_per_prompt"] == 2
    assert results["budget"]["uniform_n"] == 4  # the same rollout budget: N' + budget
    assert results["baselines"] == {"gvm-raft++": "raft++"}
    assert set(results["speedups"]) == {"gvm-raft++"}
    assert results["speedups"]["gvm-raft++"]["baseline"] == "raft++"
    for name in ("raft++", "gvm-raft++"):
        (run,) = results["runs_per_algorithm"][name]
        assert run["iteration"] == [0, 1, 2]  # eval after the warm start and every iteration
        # every arm starts from the shared warm start: same iteration-0 accuracy
        assert run["eval_accuracy"][0] == results["warm_start"]["eval_accuracy"]
    uniform = results["runs_per_algorithm"]["raft++"][0]["samples_total"]
    assert uniform == [0, 8, 16]  # 2 prompts x uniform_n=4 per iteration
    gvm = results["runs_per_algorithm"]["gvm-raft++"][0]["samples_total"]
    # N'=2 pre-samples x 2 prompts count in samples_total, plus at most the stage-2 budget 4
    assert 4 <= gvm[1] <= 8 and 4 <= gvm[2] - gvm[1] <= 8
    arm_cfg = (out / "runs" / "gvm-raft++" / "seed1234" / "config.yaml").read_text()
    assert "warmup_steps: 0" in arm_cfg and str(out / "warm_start" / "weights") in arm_cfg
    table = (out / "table.md").read_text()
    assert "| raft++ | 1 |" in table and "| gvm-raft++ | raft++ |" in table
    # the tiny model accepts nothing, so the ratios are logged as undefined (no contributing
    # prompt) and the table says so rather than inventing a number
    gvm_records = [json.loads(line) for line in (out / "runs" / "gvm-raft++" / "seed1234" /
                                                  "metrics.jsonl").read_text().splitlines()]
    assert all("variance_ratio_best" in r for r in gvm_records[1:])
    assert "variance ratio | best possible |" in table
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "table.json").read_text())["gvm_variants"][0]["variant"] == "gvm-raft++"

    # same --out again: every run is reused, nothing retrains
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished earlier: reusing") == 3
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["status"] for r in runs] == ["reused"] * 3
    assert runs[1]["seed"] == 1234 and runs[1]["curve"]["samples_total"] == [0, 8, 16]

    # ... but not with other settings: those runs would not be comparable
    other = subprocess.run([*cmd, "optim.lr=0.5"], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=60)
    assert other.returncode == 2
    assert "optim.lr=0.5" in other.stderr and "different settings" in other.stderr

    # a longer run extends every arm from its last checkpoint, and the GVM arm comes out the
    # run a 3-iteration benchmark trains from the start
    longer = subprocess.run([*cmd, "train.iterations=3"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert longer.returncode == 0, longer.stdout[-3000:] + longer.stderr[-3000:]
    assert "extending the runs" in longer.stdout
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["status"] for r in runs] == ["reused", "done", "done"]
    assert runs[2]["curve"]["iteration"] == [0, 1, 2, 3]
    from gvm_mega.convergence import bench
    plan = bench.plan(_parse("--quick", "--out", str(out), "data.arithmetic_test_size=3",
                             "rollout.max_new_tokens=6", "train.iterations=3"))
    fresh = tmp_path / "fresh"
    overrides = bench.arm_overrides(plan, "gvm-raft++", 1234, out / "warm_start" / "weights")
    proc = subprocess.run([sys.executable, "-m", "gvm_mega", "train", plan.config, "--run-dir",
                           str(fresh), *overrides], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    def records(run_dir: Path, name: str) -> list[dict]:
        return [{k: v for k, v in json.loads(line).items() if not k.startswith("time_")}
                for line in (run_dir / name).read_text().splitlines()]

    extended = out / "runs" / "gvm-raft++" / "seed1234"
    for name in ("metrics.jsonl", "allocations.jsonl"):
        assert records(extended, name) == records(fresh, name)


def test_failed_arm_is_reported_not_dropped(tmp_path, monkeypatch, capsys):
    """One arm's process fails: the others still count, results.json carries its log tail,
    the speedup says why it is missing, and the command exits non-zero."""
    from gvm_mega.convergence import bench
    from gvm_mega.convergence.arms import ArmResult

    def fake_run(name, config, run_dir, overrides, iterations, log_dir, **_):
        if name.startswith("gvm-raft++"):
            return ArmResult(name, run_dir, log_dir / f"{name}.log", "failed", returncode=1,
                             log_tail="Traceback ...\nRuntimeError: out of memory")
        acc = 0.2 if name == "warm_start" else 0.4
        _write_metrics(run_dir, [(0, 0, 0.2)] + [(it, 10 * it, acc) for it in
                                                  range(1, iterations + 1)])
        return ArmResult(name, run_dir, log_dir / f"{name}.log", "done")

    monkeypatch.setattr(bench, "run_training", fake_run)
    monkeypatch.setattr(bench, "export_weights", lambda run_dir, dest: dest)
    parser = __import__("argparse").ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["train.iterations=3", "--out", str(tmp_path), "--seeds", "2",
                              "--algorithms", "raft++,gvm-raft++", "train.eval_every=1"])
    assert args.overrides == ["train.iterations=3", "train.eval_every=1"]
    assert bench.main(args) == 1
    results = json.loads((tmp_path / "results.json").read_text())
    assert [f["name"] for f in results["failures"]] == ["gvm-raft++-seed1234",
                                                        "gvm-raft++-seed1235"]
    assert "RuntimeError: out of memory" in results["failures"][0]["log_tail"]
    assert results["algorithms"]["raft++"]["seeds"] == 2
    assert results["algorithms"]["gvm-raft++"]["seeds"] == 0
    assert "no finished run of gvm-raft++" in results["speedups"]["gvm-raft++"]["note"]
    assert "2 run(s) failed" in capsys.readouterr().out


def _parse(*argv: str):
    from gvm_mega.convergence import bench

    parser = __import__("argparse").ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_per_algorithm_overrides_reach_only_their_arms(tmp_path, monkeypatch):
    """``grpo:optim.lr=3e-5`` changes the GRPO arms' config and nothing else (after the
    default size's own GRPO learning rate); it is recorded in settings.json, so resuming
    with a different value is refused."""
    from gvm_mega.convergence import bench

    seen: dict[str, list[str]] = {}

    def fake_run(name, config, run_dir, overrides, iterations, log_dir, **_):
        seen[name] = list(overrides)
        _write_metrics(run_dir, [(0, 0, 0.2)] + [(it, 10 * it, 0.3) for it in
                                                  range(1, iterations + 1)])
        return bench.ArmResult(name, run_dir, log_dir / f"{name}.log", "done")

    monkeypatch.setattr(bench, "run_training", fake_run)
    monkeypatch.setattr(bench, "export_weights", lambda run_dir, dest: dest)
    args = _parse("--out", str(tmp_path), "--seeds", "1", "--algorithms", "raft++,grpo",
                  "grpo:optim.lr=3e-5", "train.iterations=2", "train.eval_every=1")
    assert bench.main(args) == 0
    assert [o for o in seen["raft++-seed1234"] if o.startswith("optim.lr")] == ["optim.lr=2e-4"]
    assert not any(o.startswith("optim.lr") for o in seen["warm_start"])
    grpo = seen["grpo-seed1234"]
    # after the shared overrides and the default GRPO rate, before what the benchmark sets
    assert grpo.index("optim.lr=3e-5") > grpo.index("train.eval_every=1")
    assert grpo.index("optim.lr=3e-5") > grpo.index("optim.lr=5e-5")
    assert grpo.index("optim.lr=3e-5") < grpo.index("algorithm.name=grpo")
    results = json.loads((tmp_path / "results.json").read_text())
    expected = {"raft++": ["optim.lr=2e-4"], "grpo": ["optim.lr=5e-5", "optim.lr=3e-5"]}
    assert results["command"]["per_algorithm"] == expected
    settings = json.loads((tmp_path / "settings.json").read_text())
    assert settings["per_algorithm"] == expected

    other = _parse("--out", str(tmp_path), "--seeds", "1", "--algorithms", "raft++,grpo",
                   "grpo:optim.lr=2e-5", "train.iterations=2", "train.eval_every=1")
    with pytest.raises(Exception, match=r"new: grpo:optim.lr=2e-5; no longer: grpo:optim.lr=3e-5"):
        bench.main(other)


@pytest.mark.parametrize("override, message", [
    ("gvm-grpo:optim.lr=1e-5", "'gvm-grpo' is not one of the benchmarked algorithms"),
    ("grpo:train.iterations=5", "train.iterations must be the same for every arm"),
    ("grpo:gvm.budget_per_prompt=4", "gvm.budget_per_prompt must be the same for every arm"),
    ("grpo:algorithm.name=raft", "algorithm.name is set by the benchmark"),
    ("grpo:optim.lr=fast", "optim.lr"),
])
def test_bad_per_algorithm_overrides_are_refused(tmp_path, override, message):
    from gvm_mega.cli import CLIError
    from gvm_mega.config import ConfigError
    from gvm_mega.convergence import bench

    args = _parse("--out", str(tmp_path), "--algorithms", "raft++,grpo", override)
    with pytest.raises((CLIError, ConfigError), match=message):
        bench.plan(args)


def test_default_size_is_the_four_samples_per_prompt_setting(tmp_path):
    """The default size: any-order task, N' = 2 + 2 per prompt, RAFT++ at 2e-4 and GRPO at
    5e-5, the GVM arms with per-draw weights, the paper's small alpha, counted pre-samples and posterior
    estimates; a key given for every arm replaces the per-algorithm defaults."""
    from gvm_mega.config import load_config
    from gvm_mega.convergence import bench

    p = bench.plan(_parse("--out", str(tmp_path)))
    assert p.algorithms == ["raft++", "gvm-raft++", "grpo", "gvm-grpo"]
    assert (p.cfg.train.iterations, p.cfg.train.warmup_steps, p.cfg.gvm.presample_n,
            p.cfg.gvm.budget_per_prompt, p.uniform_n, p.cfg.data.arithmetic_solutions) == (
        120, 2400, 2, 2, 4, "any-order")
    cfgs = {a: load_config(p.config, bench.arm_overrides(p, a, 1, tmp_path))
            for a in p.algorithms}
    assert {a: c.optim.lr for a, c in cfgs.items()} == {
        "raft++": 2e-4, "gvm-raft++": 2e-4, "grpo": 5e-5, "gvm-grpo": 5e-5}
    for a in ("gvm-raft++", "gvm-grpo"):
        c = cfgs[a]
        assert (c.algorithm.prompt_weight, c.gvm.alpha, c.gvm.count_stage1, c.gvm.estimator,
                c.gvm.prior_a, c.gvm.prior_b, c.gvm.grad_norm_average, c.gvm.skip_solved_above,
                c.gvm.rates_from_stage2) == ("per-draw", 1e-3, True, "posterior", 3, 1, "rms", 0.85,
                                             True)
    demo = load_config(p.config, [])
    for a in ("raft++", "grpo"):  # the uniform arms keep the config's GVM settings
        assert (cfgs[a].algorithm.prompt_weight, cfgs[a].gvm.estimator) == (
            demo.algorithm.prompt_weight, demo.gvm.estimator)
    assert bench.plan(_parse("--quick", "--out", str(tmp_path))).per_algorithm == {}
    # a key given for every arm is not overridden by a per-algorithm default
    p = bench.plan(_parse("--out", str(tmp_path), "optim.lr=3e-4", "gvm.alpha=1"))
    assert load_config(p.config, bench.arm_overrides(p, "grpo", 1, tmp_path)).optim.lr == 3e-4
    gvm = load_config(p.config, bench.arm_overrides(p, "gvm-raft++", 1, tmp_path))
    assert (gvm.optim.lr, gvm.gvm.alpha, gvm.gvm.estimator) == (3e-4, 1, "posterior")
    assert "raft++" not in p.per_algorithm
    # BENCHMARKS' runs from the 1,200-step warm start, from before stage 2 counted toward p,
    # before RMS norms and skipping, and before the Beta(3, 1) prior: the prefixes it gives
    # bring those back on both GVM arms and change nothing else
    p = bench.plan(_parse("--out", str(tmp_path), "train.warmup_steps=1200"))
    assert p.cfg.train.warmup_steps == 1200
    assert all(load_config(p.config, bench.arm_overrides(p, a, 1, tmp_path)).gvm == cfgs[a].gvm
               for a in p.algorithms)
    before_stage2 = ("gvm.rates_from_stage2=false",)
    before_rms = (*before_stage2, "gvm.grad_norm_average=mean", "gvm.skip_solved_above=null")
    for prefix, prior, average, skip in (
            (before_stage2, (3, 1), "rms", 0.85), (before_rms, (3, 1), "mean", None),
            (("gvm.prior_a=1", "gvm.prior_b=1", *before_rms), (1, 1), "mean", None)):
        p = bench.plan(_parse("--out", str(tmp_path), *prefix))
        for a in p.algorithms:
            c = load_config(p.config, bench.arm_overrides(p, a, 1, tmp_path))
            assert not c.gvm.rates_from_stage2
            if a.startswith("gvm-"):
                assert (c.gvm.prior_a, c.gvm.prior_b, c.gvm.grad_norm_average,
                        c.gvm.skip_solved_above) == (*prior, average, skip)
            else:  # the uniform arms keep the config's GVM section
                assert c.gvm == cfgs[a].gvm
            assert c.optim.lr == cfgs[a].optim.lr and c.gvm.alpha == cfgs[a].gvm.alpha


def test_min_gain_option_is_checked_and_recorded(tmp_path):
    from gvm_mega.cli import CLIError
    from gvm_mega.convergence import bench

    with pytest.raises(CLIError, match="--min-gain -0.1"):
        bench.plan(_parse("--out", str(tmp_path), "--min-gain", "-0.1"))
    assert bench.plan(_parse("--out", str(tmp_path), "--min-gain", "0.02")).min_gain == 0.02


def test_jobs_train_arms_at_once_on_fixed_threads(tmp_path, monkeypatch):
    """``--jobs 2`` runs two arms at a time; every arm gets ``--threads``; the results keep
    (algorithm, seed) order whichever arm finishes first; another --threads is refused."""
    import threading
    import time

    from gvm_mega.cli import CLIError
    from gvm_mega.convergence import bench

    lock = threading.Lock()
    running, peak, threads_seen = [0], [0], {}

    def fake_run(name, config, run_dir, overrides, iterations, log_dir, *, threads=None, **_):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            threads_seen[name] = threads
        # the first arm finishes last
        time.sleep(0.3 if name == "raft++-seed1234" else 0.05)
        _write_metrics(run_dir, [(0, 0, 0.2)] + [(it, 10 * it, 0.3) for it in
                                                  range(1, iterations + 1)])
        with lock:
            running[0] -= 1
        return bench.ArmResult(name, run_dir, log_dir / f"{name}.log", "done")

    monkeypatch.setattr(bench, "run_training", fake_run)
    monkeypatch.setattr(bench, "export_weights", lambda run_dir, dest: dest)
    args = _parse("--out", str(tmp_path), "--seeds", "2", "--algorithms", "raft++,gvm-raft++",
                  "--jobs", "2", "--threads", "1", "train.iterations=2", "train.eval_every=1")
    assert bench.main(args) == 0
    assert peak[0] == 2
    assert set(threads_seen.values()) == {1}
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["name"] for r in results["runs"]] == [
        "warm_start", "raft++-seed1234", "raft++-seed1235", "gvm-raft++-seed1234",
        "gvm-raft++-seed1235"]
    assert results["command"]["jobs"] == 2 and results["command"]["threads"] == 1

    with pytest.raises(CLIError, match=r"--threads 1 -> 2"):
        bench.main(_parse("--out", str(tmp_path), "--seeds", "2", "--algorithms",
                          "raft++,gvm-raft++", "--threads", "2", "train.iterations=2",
                          "train.eval_every=1"))
    for bad in ("--jobs", "--threads"):
        with pytest.raises(CLIError, match=f"{bad} 0: must be >= 1"):
            bench.plan(_parse("--out", str(tmp_path), bad, "0"))
    # without --jobs: as many arms at once as the CPUs this process may use hold --threads
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4})
    assert bench.plan(_parse("--out", str(tmp_path), "--threads", "2")).jobs == 2
    assert bench.plan(_parse("--out", str(tmp_path), "--threads", "8")).jobs == 1


def test_curve_styles_give_every_algorithm_its_own_colour():
    from gvm_mega.convergence.report import curve_styles

    palette = ["c0", "c1", "c2"]
    styles = curve_styles(["raft++", "gvm-raft++", "grpo", "gvm-grpo"], palette)
    assert styles["raft++"] == ("c0", "-")
    assert styles["gvm-raft++"] == ("c1", "--")
    # more algorithms than colours: the palette wraps, the dash still tells GVM apart
    assert styles["gvm-grpo"] == ("c0", "--")
    assert styles["raft++"][0] != styles["gvm-raft++"][0]


def test_earlier_default_size_is_reproducible_with_overrides(tmp_path):
    """BENCHMARKS.md's older commands ran on the earlier default size (in-order task, 16 per
    prompt, 60 iterations, the config's GVM settings, GRPO at 1e-5); the overrides it gives
    must still bring every arm back to it."""
    from gvm_mega.config import load_config
    from gvm_mega.convergence import bench

    earlier = ("data.arithmetic_solutions=in-order train.warmup_steps=600 train.iterations=60 "
               "gvm.presample_n=8 gvm.budget_per_prompt=8 algorithm.prompt_weight=pooled "
               "gvm.alpha=1e-3 gvm.count_stage1=false gvm.estimator=per-iteration "
               "gvm.prior_a=1 gvm.prior_b=1 gvm.grad_norm_average=mean gvm.skip_solved_above=null "
               "gvm.rates_from_stage2=false "
               "optim.lr=1e-4 grpo:optim.lr=1e-5 gvm-grpo:optim.lr=1e-5").split()
    p = bench.plan(_parse("--out", str(tmp_path), *earlier))
    demo = load_config(p.config, [])
    assert p.uniform_n == 16
    assert load_config(p.config, p.shared).train.warmup_steps == demo.train.warmup_steps
    for a in p.algorithms:
        c = load_config(p.config, bench.arm_overrides(p, a, 1, tmp_path))
        assert (c.train.iterations, c.data.arithmetic_solutions) == (60, "in-order")
        assert (c.gvm.presample_n, c.gvm.budget_per_prompt, c.gvm.alpha, c.gvm.estimator,
                c.gvm.count_stage1, c.algorithm.prompt_weight) == (
            demo.gvm.presample_n, demo.gvm.budget_per_prompt, demo.gvm.alpha,
            demo.gvm.estimator, demo.gvm.count_stage1, demo.algorithm.prompt_weight)
        assert (c.gvm.prior_a, c.gvm.prior_b) == (demo.gvm.prior_a, demo.gvm.prior_b)
        assert (c.gvm.grad_norm_average, c.gvm.skip_solved_above, c.gvm.rates_from_stage2) == (
            demo.gvm.grad_norm_average, demo.gvm.skip_solved_above, demo.gvm.rates_from_stage2)
        assert c.optim.lr == (1e-5 if a.endswith("grpo") else demo.optim.lr)


def test_resume_compares_resolved_settings(tmp_path, monkeypatch):
    """Resuming an ``--out`` compares what the runs resolve to, not how the overrides were
    written: another order or a default spelled out resumes (the recorded spelling stays),
    a different value for any run, the warm start's included, is refused."""
    from gvm_mega.convergence import bench

    trained: list[str] = []

    def fake_run(name, config, run_dir, overrides, iterations, log_dir, **_):
        trained.append(name)
        _write_metrics(run_dir, [(0, 0, 0.2)] + [(it, 10 * it, 0.3) for it in
                                                  range(1, iterations + 1)])
        return bench.ArmResult(name, run_dir, log_dir / f"{name}.log", "done")

    monkeypatch.setattr(bench, "run_training", fake_run)
    monkeypatch.setattr(bench, "export_weights", lambda run_dir, dest: dest)
    common = ("--out", str(tmp_path), "--seeds", "1", "--algorithms", "raft++,gvm-raft++")
    assert bench.main(_parse(*common, "train.iterations=2", "train.eval_every=1")) == 0
    recorded = (tmp_path / "settings.json").read_text()
    assert len(trained) == 3

    # reordered, the default size's warm start and RAFT++'s step written out: same runs
    same = _parse(*common, "train.eval_every=1", "train.warmup_steps=2400",
                  "raft++:optim.lr=2e-4", "train.iterations=2")
    assert bench.main(same) == 0
    assert (tmp_path / "settings.json").read_text() == recorded
    assert len(trained) == 6

    # a step that changes the arms, or a warm-start setting only the shared run reads
    for changed in ("optim.lr=3e-4", "train.warmup_lr=1e-3", "gvm-raft++:gvm.alpha=1"):
        with pytest.raises(Exception, match="different settings") as err:
            bench.main(_parse(*common, "train.iterations=2", "train.eval_every=1", changed))
        assert changed in str(err.value)
    # a shared optim.lr=2e-4 leaves both arms as they were but not the warm start's config
    with pytest.raises(Exception, match="different settings"):
        bench.main(_parse(*common, "train.iterations=2", "train.eval_every=1", "optim.lr=2e-4"))
    assert len(trained) == 6


def test_a_longer_run_extends_the_out_in_place(tmp_path, monkeypatch, capsys):
    """A larger ``train.iterations`` and nothing else resumes every arm to the new length and
    records the new settings; a shorter one, a cosine schedule, or a longer run with another
    change as well is refused."""
    from gvm_mega.convergence import bench

    trained: list[tuple[str, int]] = []

    def fake_run(name, config, run_dir, overrides, iterations, log_dir, **_):
        trained.append((name, iterations))
        _write_metrics(run_dir, [(0, 0, 0.2)] + [(it, 10 * it, 0.3) for it in
                                                  range(1, iterations + 1)])
        return bench.ArmResult(name, run_dir, log_dir / f"{name}.log", "done")

    monkeypatch.setattr(bench, "run_training", fake_run)
    monkeypatch.setattr(bench, "export_weights", lambda run_dir, dest: dest)
    common = ("--out", str(tmp_path), "--seeds", "1", "--algorithms", "raft++,gvm-raft++",
              "train.eval_every=1")
    assert bench.main(_parse(*common, "train.iterations=2")) == 0
    trained.clear()
    assert bench.main(_parse(*common, "train.iterations=4")) == 0
    assert "extending the runs in" in capsys.readouterr().out
    assert ("raft++-seed1234", 4) in trained and ("gvm-raft++-seed1234", 4) in trained
    settings = json.loads((tmp_path / "settings.json").read_text())
    assert settings["overrides"][-1] == "train.iterations=4"
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["runs_per_algorithm"]["raft++"][0]["iteration"] == [0, 1, 2, 3, 4]

    with pytest.raises(Exception, match="holds runs of 4 iterations.*train.iterations >= 4"):
        bench.main(_parse(*common, "train.iterations=3"))
    with pytest.raises(Exception, match="different settings") as err:
        bench.main(_parse(*common, "train.iterations=6", "gvm-raft++:gvm.alpha=1"))
    assert "gvm.alpha=1" in str(err.value)
    assert json.loads((tmp_path / "settings.json").read_text()) == settings

    # a cosine decay spans the run length: a longer run would not be the one it extends
    cosine = ("--out", str(tmp_path / "cosine"), *common[2:], "raft++:optim.schedule=cosine")
    assert bench.main(_parse(*cosine, "train.iterations=2")) == 0
    with pytest.raises(Exception, match="learning rate of raft\\+\\+ decays.*cosine"):
        bench.main(_parse(*cosine, "train.iterations=4"))


def test_source_digest_follows_every_python_file(tmp_path):
    """The digest changes with any .py file's bytes or name, and with nothing else."""
    from gvm_mega.convergence.code_version import source_digest

    (tmp_path / "sub").mkdir()
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "sub" / "b.py").write_text("y = 2\n")
    first = source_digest(tmp_path)
    assert source_digest(tmp_path) == first and len(first) == 16
    (tmp_path / "notes.txt").write_text("not code")
    assert source_digest(tmp_path) == first
    (tmp_path / "sub" / "b.py").write_text("y = 3\n")
    edited = source_digest(tmp_path)
    assert edited != first
    (tmp_path / "sub" / "b.py").rename(tmp_path / "sub" / "c.py")
    assert source_digest(tmp_path) not in (first, edited)


def test_runs_of_other_code_are_refused_unless_allowed(tmp_path, monkeypatch, capsys):
    """settings.json records the package source's digest; resuming with other code is refused
    (nothing trained), ``--allow-code-change`` resumes and keeps the old digest beside the new,
    and a record from before digests were kept resumes and stays without one."""
    from gvm_mega.convergence import bench

    trained: list[str] = []

    def fake_run(name, config, run_dir, overrides, iterations, log_dir, **_):
        trained.append(name)
        _write_metrics(run_dir, [(0, 0, 0.2)] + [(it, 10 * it, 0.3) for it in
                                                  range(1, iterations + 1)])
        return bench.ArmResult(name, run_dir, log_dir / f"{name}.log", "done")

    digest = {"now": "1111aaaa2222bbbb"}
    monkeypatch.setattr(bench, "run_training", fake_run)
    monkeypatch.setattr(bench, "export_weights", lambda run_dir, dest: dest)
    monkeypatch.setattr(bench, "source_digest", lambda: digest["now"])
    common = ("--out", str(tmp_path), "--seeds", "1", "--algorithms", "raft++,gvm-raft++",
              "train.iterations=2", "train.eval_every=1")
    settings_path = tmp_path / "settings.json"
    assert bench.main(_parse(*common)) == 0
    assert json.loads(settings_path.read_text())["code"] == "1111aaaa2222bbbb"
    trained.clear()

    digest["now"] = "3333cccc4444dddd"
    with pytest.raises(Exception, match="other code \\(package source 1111aaaa2222bbbb, now "
                                        "3333cccc4444dddd\\).*--allow-code-change"):
        bench.main(_parse(*common))
    assert trained == [] and json.loads(settings_path.read_text())["code"] == "1111aaaa2222bbbb"

    assert bench.main(_parse(*common, "--allow-code-change")) == 0
    assert "with other code (1111aaaa2222bbbb -> 3333cccc4444dddd)" in capsys.readouterr().out
    settings = json.loads(settings_path.read_text())
    assert (settings["code"], settings["earlier_code"]) == ("3333cccc4444dddd",
                                                            ["1111aaaa2222bbbb"])
    assert json.loads((tmp_path / "results.json").read_text())["code"] == "3333cccc4444dddd"
    assert bench.main(_parse(*common)) == 0  # the new digest is the recorded one now

    legacy = {k: v for k, v in settings.items() if k not in ("code", "earlier_code")}
    settings_path.write_text(json.dumps(legacy, indent=2) + "\n")
    assert bench.main(_parse(*common)) == 0
    assert json.loads(settings_path.read_text()) == legacy
