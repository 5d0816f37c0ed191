"""``gvm-mega train`` end to end on CPU: run directory and metrics, the same first iteration
at TP2xDP2 and PP2xDP2 as in one process (GVM-RAFT++), kill-and-resume, GRPO/RAFT++ baselines, and the
failure modes that must stop early with a clear message."""
from __future__ import annotations

import math
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest

from _train_e2e_helpers import (allocations, latest_checkpoint, metrics, popen, run_in_process,
                                run_subprocess, run_torchrun, run_world, warm_start_checkpoint,
                                without_timing, write_config)

SPEC_KEYS = ("iteration", "samples_total", "tokens_generated", "accept_rate_mean",
             "grad_norm_mean", "alloc_min", "alloc_max", "variance_ratio", "loss", "kl",
             "entropy", "lr")
PHASES = ("time_stage1_s", "time_grad_norm_s", "time_allocate_s", "time_stage2_s",
          "time_train_s", "time_sync_s")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny config and a warm-started checkpoint every run below starts from."""
    import torch

    torch.set_num_threads(1)  # as in the subprocess runs (OMP_NUM_THREADS=1): same float sums
    root = tmp_path_factory.mktemp("e2e")
    config = write_config(root)
    return root, config, warm_start_checkpoint(root, config)


@pytest.fixture(scope="module")
def gvm_run(tiny):
    """Two GVM-RAFT++ iterations in this process (the reference for the other layouts)."""
    root, config, warm = tiny
    run_dir = root / "gvm-1proc"
    assert run_in_process(config, run_dir, [f"checkpoint.load={warm}"]) == 0
    return run_dir


def test_single_process_run_dir_and_metrics(gvm_run):
    names = {p.name for p in gvm_run.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "allocations.jsonl", "train.log", "tensorboard",
            "checkpoints"} <= names
    assert any((gvm_run / "tensorboard").rglob("events.out.tfevents*"))
    assert (gvm_run / "checkpoints" / "iter_0000002").is_dir()
    rows = metrics(gvm_run)
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert rows[0]["samples_total"] == 0 and 0 <= rows[0]["eval_accuracy"] <= 1
    assert 0 <= rows[-1]["eval_accuracy"] <= 1
    assert "eval_accuracy" not in rows[1]  # only first and last with eval_every=0
    prev = 0
    for row in rows[1:]:
        for key in SPEC_KEYS + PHASES:
            assert key in row, (key, row)
            if key != "kl":  # no reference policy without a KL penalty: nothing to measure
                assert row[key] is not None, (key, row)
        for key in PHASES:
            assert row[key] >= 0
        # stage 1 (4 prompts x N'=4) counts towards samples_total, then stage 2 adds n_i
        assert row["samples_total"] >= prev + 16
        assert row["samples_total"] - prev == 16 + sum(allocations(gvm_run)[row["iteration"] - 1]
                                                         ["samples"].values())
        prev = row["samples_total"]
        assert row["tokens_generated"] >= row["samples_total"]
        assert 0 <= row["alloc_min"] <= row["alloc_max"] <= 16
        assert 0 <= row["accept_rate_mean"] <= 1 and row["grad_norm_mean"] > 0
        assert row["variance_ratio"] > 0 and math.isfinite(row["loss"])
        assert 0 < row["variance_ratio_best"] <= 1.0 + 1e-9  # uniform is one allocation
        assert row["entropy"] > 0 and row["lr"] > 0 and row["kl"] is None
        assert 0 < row["accepted_distinct_frac"] <= 1
        assert row["unsound_frac"] is None  # reward.check_steps is off
    cfg_text = (gvm_run / "config.yaml").read_text()
    assert "gvm-raft++" in cfg_text and "presample_n: 4" in cfg_text


TOKENIZER_PROBE = "Compute 3 + 4 - 2.\nStep 1: 3 + 4 = 7\nThe answer is \\boxed{5}."


@pytest.fixture(scope="module")
def converted_hf(gvm_run, tmp_path_factory):
    """``gvm-mega convert mcore-to-hf`` of the reference run's last checkpoint."""
    import os
    import subprocess
    import sys

    from _mcore_helpers import ROOT

    out = tmp_path_factory.mktemp("converted") / "hf"
    proc = subprocess.run([sys.executable, "-m", "gvm_mega", "convert", "mcore-to-hf",
                           "--mcore", str(gvm_run / "checkpoints" / "iter_0000002"),
                           "--out", str(out)], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    return out


def test_checkpoint_converts_to_hf_with_its_tokenizer(gvm_run, converted_hf):
    """A training checkpoint carries its tokenizer, so ``convert mcore-to-hf`` gives a directory
    that loads as a whole (weights, config.json, tokenizer)."""
    from gvm_mega.tokenizer import load_tokenizer

    from _mcore_helpers import read_safetensors_dir

    expected = load_tokenizer("builtin").encode(TOKENIZER_PROBE)
    ckpt = gvm_run / "checkpoints" / "iter_0000002"
    assert load_tokenizer(ckpt / "hf").encode(TOKENIZER_PROBE) == expected
    assert (converted_hf / "config.json").is_file() and read_safetensors_dir(converted_hf)
    assert load_tokenizer(converted_hf).encode(TOKENIZER_PROBE) == expected


def test_training_from_an_hf_directory_equals_its_source_checkpoint(tiny, gvm_run, converted_hf):
    """``model.hf_path`` (architecture from config.json, weights, tokenizer) starts training
    exactly where ``checkpoint.load`` of the checkpoint it was converted from does, and the
    run's own checkpoints keep the HF side files."""
    from gvm_mega.tokenizer import load_tokenizer

    root, config, _ = tiny
    from_ckpt, from_hf = root / "from-ckpt", root / "from-hf"
    ckpt = gvm_run / "checkpoints" / "iter_0000002"
    assert run_in_process(config, from_ckpt, [f"checkpoint.load={ckpt}", "train.iterations=1"]) == 0
    assert run_in_process(config, from_hf, [f"model.hf_path={converted_hf}",
                                            "train.iterations=1"]) == 0
    ref_row, ref_alloc = _first_iteration(from_ckpt)
    row, alloc = _first_iteration(from_hf)
    assert alloc["samples"] == ref_alloc["samples"] and alloc["accept_rate"] == ref_alloc["accept_rate"]
    for pid, g in ref_alloc["grad_norm"].items():
        assert alloc["grad_norm"][pid] == pytest.approx(g, rel=1e-5, abs=1e-6)
    assert row["tokens_generated"] == ref_row["tokens_generated"]
    assert row["loss"] == pytest.approx(ref_row["loss"], rel=1e-4, abs=1e-6)
    side = from_hf / "checkpoints" / "iter_0000001" / "hf"
    assert (side / "config.json").is_file()
    assert load_tokenizer(side).encode(TOKENIZER_PROBE) == load_tokenizer("builtin").encode(TOKENIZER_PROBE)


def _first_iteration(run_dir: Path) -> tuple[dict, dict]:
    return metrics(run_dir)[1], allocations(run_dir)[0]


def test_tp2_dp2_first_iteration_equals_one_process(tiny, gvm_run):
    root, config, warm = tiny
    run_dir = root / "gvm-tp2dp2"
    run_world(config, run_dir, [f"checkpoint.load={warm}", "parallel.tp=2", "parallel.dp=2",
                                "train.iterations=1"])
    ref_row, ref_alloc = _first_iteration(gvm_run)
    row, alloc = _first_iteration(run_dir)
    # same samples drawn and verified; G_i from TP-sharded sums agree to float precision
    assert alloc["samples"] == ref_alloc["samples"]
    assert alloc["accept_rate"] == ref_alloc["accept_rate"]
    for pid, g in ref_alloc["grad_norm"].items():
        assert alloc["grad_norm"][pid] == pytest.approx(g, rel=1e-5, abs=1e-6)
    for key in ("samples_total", "tokens_generated", "alloc_min", "alloc_max",
                "accept_rate_mean"):
        assert row[key] == ref_row[key], key
    assert row["loss"] == pytest.approx(ref_row["loss"], abs=1e-5)
    assert row["grad_norm_mean"] == pytest.approx(ref_row["grad_norm_mean"], rel=1e-4)
    assert metrics(run_dir)[0]["eval_accuracy"] == metrics(gvm_run)[0]["eval_accuracy"]
    for key in PHASES:
        assert row[key] is not None


def test_pp2_dp2_first_iteration_equals_one_process(tiny, gvm_run):
    """GVM under pipeline parallelism: G_i from the stages' partial norms, the step on PP2."""
    root, config, warm = tiny
    run_dir = root / "gvm-pp2dp2"
    run_world(config, run_dir, [f"checkpoint.load={warm}", "parallel.pp=2", "parallel.dp=2",
                                "train.iterations=1"])
    ref_row, ref_alloc = _first_iteration(gvm_run)
    row, alloc = _first_iteration(run_dir)
    assert alloc["samples"] == ref_alloc["samples"]
    assert alloc["accept_rate"] == ref_alloc["accept_rate"]
    for pid, g in ref_alloc["grad_norm"].items():
        assert alloc["grad_norm"][pid] == pytest.approx(g, rel=1e-5, abs=1e-6)
    for key in ("samples_total", "tokens_generated", "alloc_min", "alloc_max",
                "accept_rate_mean"):
        assert row[key] == ref_row[key], key
    assert row["loss"] == pytest.approx(ref_row["loss"], abs=1e-5)
    assert metrics(run_dir)[0]["eval_accuracy"] == metrics(gvm_run)[0]["eval_accuracy"]


def test_own_warm_start_first_iteration_equals_one_process(tmp_path):
    """No shared checkpoint: each run trains its own warm start (in a one-process child), and
    TP2xDP2 under torchrun still draws exactly the one-process samples in its first iteration.
    (With the warm start trained under each layout, 300 steps are enough to change the
    samples.)"""
    config = write_config(tmp_path)
    common = ["train.warmup_steps=300", "train.warmup_lr=5e-3", "train.warmup_batch_size=16",
              "train.iterations=1"]
    one = tmp_path / "one"
    done = run_subprocess(config, one, common)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    four = tmp_path / "four"
    run_torchrun(config, four, common + ["parallel.tp=2", "parallel.dp=2"])
    for run in (one, four):
        assert (run / "warm_start" / "COMPLETE").is_file()
        assert "warm start: 300 SFT steps in one process" in (run / "train.log").read_text()
    ref_row, ref_alloc = _first_iteration(one)
    row, alloc = _first_iteration(four)
    assert alloc["samples"] == ref_alloc["samples"]
    assert alloc["accept_rate"] == ref_alloc["accept_rate"]
    assert row["tokens_generated"] == ref_row["tokens_generated"]
    assert row["loss"] == pytest.approx(ref_row["loss"], abs=1e-5)
    assert metrics(four)[0]["eval_accuracy"] == metrics(one)[0]["eval_accuracy"]


@pytest.fixture(scope="module")
def three_iterations(tiny):
    """An uninterrupted three-iteration run: what a resumed or extended run must equal."""
    root, config, warm = tiny
    whole = root / "whole"
    assert run_in_process(config, whole, [f"checkpoint.load={warm}", "train.iterations=3"]) == 0
    return whole


def test_kill_and_resume_equals_uninterrupted(tiny, three_iterations):
    root, config, warm = tiny
    overrides = [f"checkpoint.load={warm}", "train.iterations=3"]
    whole = three_iterations

    killed = root / "killed"
    proc = popen(config, killed, overrides)
    deadline = time.monotonic() + 120
    while (latest_checkpoint(killed) or 0) < 1:
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "no checkpoint past iteration 1"
        time.sleep(0.05)
    still_running = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert still_running, "the run finished before it could be killed"
    assert len(metrics(killed)) < 4
    done = run_subprocess(config, killed, overrides)
    assert done.returncode == 0, done.stdout + done.stderr
    assert without_timing(metrics(killed)) == without_timing(metrics(whole))
    assert allocations(killed) == allocations(whole)


def test_extending_a_finished_run_equals_the_longer_run(tiny, gvm_run, three_iterations):
    """A finished two-iteration run resumed with ``train.iterations=3`` continues (the lr
    schedule takes the new length) and matches the run that was three iterations long."""
    root, config, warm = tiny
    extended = root / "extended"
    shutil.copytree(gvm_run, extended)
    assert run_in_process(config, extended, [f"checkpoint.load={warm}",
                                             "train.iterations=3"]) == 0
    rows, whole = without_timing(metrics(extended)), without_timing(metrics(three_iterations))
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]
    # the only difference: the shorter run evaluated at its last iteration
    assert rows[2].pop("eval_accuracy") is not None and whole[2].pop("eval_accuracy", None) is None
    assert rows == whole
    assert allocations(extended) == allocations(three_iterations)


def test_count_stage1_allocates_the_totals(tiny):
    """With gvm.count_stage1 the loop's stage-2 counts are the rule applied to N' + n_i for the
    p_i and G_i it measured, and stage 2 draws exactly those."""
    from gvm_mega.allocation import allocate

    root, config, warm = tiny
    run_dir = root / "count-stage1"
    assert run_in_process(config, run_dir, [f"checkpoint.load={warm}", "gvm.count_stage1=true",
                                            "train.iterations=1"]) == 0
    row, alloc = metrics(run_dir)[1], allocations(run_dir)[0]
    ids = list(alloc["samples"])
    p = [alloc["accept_rate"][i] for i in ids]
    g = [alloc["grad_norm"][i] for i in ids]
    expected = allocate(g, p, 16, alpha=1e-3, drawn=4).tolist()
    assert [alloc["samples"][i] for i in ids] == expected
    assert row["samples_total"] == 16 + 16 and row["variance_ratio"] > 0


def test_shuffle_allocation_gives_the_rules_counts_to_prompts_in_a_seeded_order(tiny):
    """gvm.shuffle_allocation (the control run): stage 2 draws the counts the rule set for the
    measured p_i and G_i, permuted over the batch as shuffled() does for this seed and batch."""
    import numpy as np

    from gvm_mega.allocation import AllocationResult, allocate
    from gvm_mega.trainer.loop import shuffled

    root, config, warm = tiny
    run_dir = root / "shuffled"
    assert run_in_process(config, run_dir, [f"checkpoint.load={warm}", "gvm.count_stage1=true",
                                            "gvm.shuffle_allocation=true", "run.seed=7",
                                            "train.iterations=1"]) == 0
    alloc = allocations(run_dir)[0]
    ids = list(alloc["samples"])
    p = [alloc["accept_rate"][i] for i in ids]
    g = [alloc["grad_norm"][i] for i in ids]
    rule = allocate(g, p, 16, alpha=1e-3, drawn=4)
    zeros = np.zeros(len(ids))
    expected = shuffled(AllocationResult(rule, zeros.astype(np.int8), zeros), ids, 7).samples
    assert [alloc["samples"][i] for i in ids] == expected.tolist()
    assert sorted(expected.tolist()) == sorted(rule.tolist())
    assert metrics(run_dir)[1]["samples_total"] == 16 + 16


ROUNDS = ["gvm.count_stage1=true", "gvm.estimator=posterior", "train.iterations=1",
          "gvm.rates_from_stage2=true", "gvm.stage2_rounds=2"]


@pytest.fixture(scope="module")
def rounds_run(tiny):
    """One GVM-RAFT++ iteration with stage 2 drawn in two rounds, in this process."""
    root, config, warm = tiny
    run_dir = root / "rounds"
    assert run_in_process(config, run_dir, [f"checkpoint.load={warm}", *ROUNDS]) == 0
    return run_dir


def test_stage2_rounds_reallocate_what_is_left_from_refined_estimates(rounds_run):
    """gvm.stage2_rounds=2: round 1 draws half the budget as a share of the rule's counts;
    round 2 draws the rule's counts for the rest from the estimates round 1 refined (the
    logged ones: p_i counts round 1's verdicts), everything drawn so far counted as drawn.
    The budget is spent exactly and the statistics hold every draw once."""
    import numpy as np
    import torch

    from gvm_mega.allocation import allocate

    run_dir = rounds_run
    alloc = allocations(run_dir)[0]
    ids = list(alloc["samples"])
    first = np.array([alloc["rounds"][i][0] for i in ids])
    second = [alloc["rounds"][i][1] for i in ids]
    assert first.sum() == 8 and sum(second) == 8          # a budget of 4 prompts x 4, halved
    assert [alloc["samples"][i] for i in ids] == (first + second).tolist()
    p = np.array([alloc["accept_rate"][i] for i in ids])
    g = [alloc["grad_norm"][i] for i in ids]
    # Beta(1, 1) posterior over the 4 pre-samples and round 1: an integer count of accepts
    accepts = p * (2 + 4 + first) - 1
    assert np.allclose(accepts, np.round(accepts)) and (accepts <= 4 + first).all()
    assert second == allocate(g, p, 8, alpha=1e-3, drawn=4 + first).tolist()
    assert metrics(run_dir)[1]["samples_total"] == 16 + 16
    stats = torch.load(run_dir / "checkpoints" / "iter_0000001" / "extra.pt",
                       weights_only=False)["stats"]
    totals = dict(zip(stats["ids"], stats["total_samples"]))
    assert totals == {k: 4 + n for k, n in alloc["samples"].items()}


def test_stage2_rounds_under_tp2_dp2_equal_one_process(tiny, rounds_run):
    """The rounds' gradient-norm passes are collective: a TP2xDP2 world draws and refines
    exactly as one process does."""
    root, config, warm = tiny
    run_dir = root / "rounds-tp2dp2"
    run_world(config, run_dir, [f"checkpoint.load={warm}", "parallel.tp=2", "parallel.dp=2",
                                *ROUNDS])
    ref_row, ref_alloc = _first_iteration(rounds_run)
    row, alloc = _first_iteration(run_dir)
    assert alloc["rounds"] == ref_alloc["rounds"] and alloc["samples"] == ref_alloc["samples"]
    assert alloc["accept_rate"] == ref_alloc["accept_rate"]
    for pid, g in ref_alloc["grad_norm"].items():
        assert alloc["grad_norm"][pid] == pytest.approx(g, rel=1e-5, abs=1e-6)
    assert row["samples_total"] == ref_row["samples_total"]
    assert row["loss"] == pytest.approx(ref_row["loss"], abs=1e-5)


def test_stage2_rounds_part_and_config_checks():
    import numpy as np

    from gvm_mega.config import ConfigError, load_config
    from gvm_mega.trainer.loop import part_of

    counts = np.array([5, 0, 3, 1, 7], dtype=np.int64)
    half = part_of(counts, 8)
    assert half.sum() == 8 and (np.abs(half - counts * 8 / 16) < 1).all()
    assert (half <= counts).all() and half[1] == 0
    assert part_of(counts, 20).tolist() == counts.tolist()
    assert part_of(np.zeros(3, dtype=np.int64), 4).tolist() == [0, 0, 0]
    posterior = ["gvm.estimator=posterior", "gvm.stage2_rounds=2"]
    with pytest.raises(ConfigError, match="'gvm.stage2_rounds' \\(2\\).*'gvm.rates_from_stage2'"):
        load_config(None, posterior)
    with pytest.raises(ConfigError, match="'gvm.stage2_rounds'.*'gvm.estimator' = posterior"):
        load_config(None, ["gvm.stage2_rounds=2"])
    for key in ("gvm.presample_until=4", "gvm.shuffle_allocation=true"):
        with pytest.raises(ConfigError, match=f"cannot be combined with '{key.split('=')[0]}'"):
            load_config(None, posterior + ["gvm.rates_from_stage2=true", key])
    with pytest.raises(ConfigError, match="stage2_rounds"):
        load_config(None, posterior + ["gvm.rates_from_stage2=true", "gvm.stage2_rounds=0"])


def test_shuffled_is_a_seeded_permutation():
    import numpy as np

    from gvm_mega.allocation import AllocationResult
    from gvm_mega.trainer.loop import shuffled

    ids = [f"p{i}" for i in range(12)]
    counts = np.arange(12, dtype=np.int64)
    base = AllocationResult(counts, np.arange(12, dtype=np.int8), counts.astype(float) / 2)
    a, b = shuffled(base, ids, 1), shuffled(base, ids, 1)
    assert a.samples.tolist() == b.samples.tolist()
    assert sorted(a.samples.tolist()) == counts.tolist() and a.samples.tolist() != counts.tolist()
    # counts, drop reasons and shares move together
    assert a.reasons.tolist() == a.samples.tolist() and np.allclose(a.continuous, a.samples / 2)
    assert shuffled(base, ids, 2).samples.tolist() != a.samples.tolist()
    assert shuffled(base, ids[::-1], 1).samples.tolist() != a.samples.tolist()
    from gvm_mega.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="'gvm.shuffle_allocation'.*'gvm.presample_until'"):
        load_config(None, ["gvm.shuffle_allocation=true", "gvm.estimator=posterior",
                           "gvm.presample_until=4"])


def test_skip_solved_passes_over_prompts_the_statistics_call_solved(tiny):
    """With gvm.skip_solved_above=0 every prompt seen before counts as solved. Six prompts, four
    per batch: the second batch takes the two never seen, passes over seen ones up to the cap
    (4 per slot), then takes seen ones as they come; the metrics count the passes."""
    from gvm_mega.trainer.loop import MAX_SKIPS

    root, config, warm = tiny
    run_dir = root / "skip-solved"
    assert run_in_process(config, run_dir, [f"checkpoint.load={warm}", "train.iterations=2",
                                            "data.arithmetic_train_size=6",
                                            "gvm.estimator=posterior",
                                            "gvm.skip_solved_above=0"]) == 0
    first, second = (set(a["samples"]) for a in allocations(run_dir))
    assert len(first) == len(second) == 4 and len(first | second) == 6
    assert [r["prompts_skipped"] for r in metrics(run_dir)[1:]] == [0, MAX_SKIPS * 4]


def test_skip_recheck_every_epoch_visits_solved_prompts_anyway(tiny):
    """gvm.skip_recheck_every=1 rechecks every prompt called solved in every epoch: the same
    run as above passes over nothing."""
    root, config, warm = tiny
    run_dir = root / "skip-recheck"
    assert run_in_process(config, run_dir, [f"checkpoint.load={warm}", "train.iterations=2",
                                            "data.arithmetic_train_size=6",
                                            "gvm.estimator=posterior",
                                            "gvm.skip_solved_above=0",
                                            "gvm.skip_recheck_every=1"]) == 0
    first, second = (set(a["samples"]) for a in allocations(run_dir))
    assert len(first) == len(second) == 4 and len(first | second) == 6
    assert [r["prompts_skipped"] for r in metrics(run_dir)[1:]] == [0, 0]


def test_rechecks_come_once_every_so_many_epochs_staggered_by_prompt():
    from gvm_mega.trainer.loop import rechecked

    ids = [f"arith-{i}" for i in range(60)]
    assert not any(rechecked(i, e, None) for i in ids for e in range(5))
    assert all(rechecked(i, e, 1) for i in ids for e in range(5))
    for every in (2, 3, 5):
        epochs = [[e for e in range(3 * every) if rechecked(i, e, every)] for i in ids]
        assert all(len(es) == 3 and es[1] - es[0] == es[2] - es[1] == every for es in epochs)
        assert {es[0] for es in epochs} == set(range(every))   # spread over the epochs
    from gvm_mega.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="'gvm.skip_recheck_every' .* needs "
                                          "'gvm.skip_solved_above'"):
        load_config(None, ["gvm.skip_recheck_every=4"])


def test_uniform_raft_plus_plus_skips_solved_prompts_too(tiny):
    """RAFT++ keeps its verdicts when gvm.skip_solved_above is set, so the stream passes over
    solved prompts without any allocation: the same batches and skips as the GVM run above."""
    import torch

    from gvm_mega.trainer.loop import MAX_SKIPS

    root, config, warm = tiny
    run_dir = root / "skip-solved-raft"
    assert run_in_process(config, run_dir, [f"checkpoint.load={warm}", "train.iterations=2",
                                            "algorithm.name=raft++",
                                            "data.arithmetic_train_size=6",
                                            "gvm.estimator=posterior",
                                            "gvm.skip_solved_above=0"]) == 0
    first, second = (set(a["samples"]) for a in allocations(run_dir))
    assert len(first) == len(second) == 4 and len(first | second) == 6
    assert [r["prompts_skipped"] for r in metrics(run_dir)[1:]] == [0, MAX_SKIPS * 4]
    stats = torch.load(run_dir / "checkpoints" / "iter_0000002" / "extra.pt",
                       weights_only=False)["stats"]
    draws = dict(zip(stats["ids"], stats["total_samples"]))
    assert draws == {k: 4 * ((k in first) + (k in second)) for k in first | second}


def test_rates_from_stage2_add_every_verified_draw_to_the_statistics(tiny):
    """With gvm.rates_from_stage2 a prompt's totals after its first visit are its N' = 4
    pre-samples plus its stage-2 n_i, and the accepted fraction of those draws is what the
    iteration's train reward averages."""
    import torch

    root, config, warm = tiny
    run_dir = root / "rates-stage2"
    assert run_in_process(config, run_dir, [f"checkpoint.load={warm}", "train.iterations=1",
                                            "gvm.estimator=posterior",
                                            "gvm.rates_from_stage2=true"]) == 0
    extra = torch.load(run_dir / "checkpoints" / "iter_0000001" / "extra.pt",
                       weights_only=False)["stats"]
    allocated = allocations(run_dir)[0]["samples"]
    totals = dict(zip(extra["ids"], extra["total_samples"]))
    accepted = dict(zip(extra["ids"], extra["total_accepted"]))
    assert totals == {k: 4 + n for k, n in allocated.items()} and sum(allocated.values()) > 0
    rates = [accepted[k] / totals[k] for k in allocated]
    assert metrics(run_dir)[1]["accept_rate_mean"] == pytest.approx(sum(rates) / len(rates))
    # the posterior's prior is logged (the configured Beta(1, 1): too few prompts to fit)
    assert (metrics(run_dir)[1]["prior_a"], metrics(run_dir)[1]["prior_b"]) == (1.0, 1.0)


def test_presample_until_spends_a_known_prompts_pre_samples_in_stage_2(tiny):
    """With gvm.presample_until=1 a prompt seen before is not pre-sampled: the second batch
    (two new prompts of six, two seen) draws 2 x N' = 8 pre-samples, and stage 2 gets the
    other 8 on top of its budget of 16, so every iteration still draws 32 samples."""
    root, config, warm = tiny
    run_dir = root / "presample-until"
    assert run_in_process(config, run_dir, [f"checkpoint.load={warm}", "train.iterations=2",
                                            "data.arithmetic_train_size=6",
                                            "gvm.estimator=posterior", "gvm.count_stage1=true",
                                            "gvm.presample_until=1"]) == 0
    rows = metrics(run_dir)[1:]
    assert [r["prompts_presampled"] for r in rows] == [4, 2]
    assert [r["samples_total"] for r in rows] == [32, 64]
    first, second = allocations(run_dir)
    assert sum(first["samples"].values()) == 16 and sum(second["samples"].values()) == 24
    seen = set(second["samples"]) & set(first["samples"])
    assert len(seen) == 2


@pytest.mark.parametrize("name", ["raft++", "grpo"])
def test_every_epoch_and_mini_batch_takes_its_ratio_to_the_drawing_policy(tiny, monkeypatch, name):
    """Behaviour log-probs are measured once per iteration, before the first update, under the
    weights that drew the samples: a later epoch or mini-batch trains with a ratio other than 1
    (so the clip can bind), its old log-probs the rows of that one measurement."""
    import torch

    from gvm_mega.trainer.setup import RunSetup
    from gvm_mega.training import SampleBatch
    from gvm_mega.training.step import Policy

    root, config, warm = tiny
    measured, steps = [], []
    behaviour, train_step = RunSetup.behaviour_logprobs, Policy.train_step

    def spy_behaviour(self, samples):
        out = behaviour(self, samples)
        measured.append(out)
        return out

    def spy_step(self, batch):  # what the update is given, against the weights it updates
        now = self.logprobs(SampleBatch(batch.sequences, batch.prompt_lengths)).as_lists()
        steps.append((len(measured), batch, now))
        return train_step(self, batch)

    monkeypatch.setattr(RunSetup, "behaviour_logprobs", spy_behaviour)
    monkeypatch.setattr(Policy, "train_step", spy_step)
    run_dir = root / f"{name}-epochs"
    assert run_in_process(config, run_dir, [
        f"checkpoint.load={warm}", f"algorithm.name={name}", "algorithm.ppo_epochs=2",
        "algorithm.mini_batches=2", "optim.lr=1e-2", "train.iterations=3"]) == 0
    assert measured and len(steps) >= 3 * len(measured)  # 2 epochs x (1 or 2 mini-batches)
    for k, (visit, part, now) in enumerate(steps):
        whole = measured[visit - 1]
        rows = {tuple(seq): lp for seq, lp in zip(whole.sequences, whole.old_logprobs)}
        assert [rows[tuple(seq)] for seq in part.sequences] == part.old_logprobs
        gap = max(abs(a - b) for old, cur in zip(part.old_logprobs, now)
                  for a, b in zip(old, cur))
        if k == 0 or steps[k - 1][0] != visit:  # the iteration's first step: no update yet
            assert gap < 1e-4
        else:
            assert gap > 1e-3, f"step {k}: old log-probs follow the updated weights"
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in metrics(run_dir)[1:]
               if r["loss"] is not None)


@pytest.mark.parametrize("name", ["grpo", "raft++"])
def test_uniform_baselines_one_iteration(tiny, name):
    root, config, warm = tiny
    run_dir = root / f"{name}-kl"
    assert run_in_process(config, run_dir, [f"checkpoint.load={warm}", f"algorithm.name={name}",
                                            "algorithm.kl_coef=0.05", "train.iterations=1"]) == 0
    row = metrics(run_dir)[1]
    assert math.isfinite(row["loss"]) and row["kl"] is not None and math.isfinite(row["kl"])
    assert row["samples_total"] == 16 and (run_dir / "reference").is_dir()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["unknown-key", "missing-file", "no-valid-rows", "no-server",
                                  "batch-over-data"])
def test_failures_are_fast_and_clear(tmp_path, case):
    config = write_config(tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"question": "1+1"}\n\n')
    overrides, needle = {
        "unknown-key": (["train.iteratons=3"], "train.iteratons"),
        "missing-file": ([f"data.train_path={tmp_path / 'nope.jsonl'}"], "nope.jsonl"),
        "no-valid-rows": ([f"data.train_path={empty}", "data.on_bad_row=skip"], "no usable prompts"),
        "no-server": (["rollout.engine=sglang", f"rollout.urls=[http://127.0.0.1:{_free_port()}]",
                       "train.warmup_steps=500"], "unreachable"),
        "batch-over-data": (["data.arithmetic_train_size=3", "train.warmup_steps=500"],
                            "train.prompts_per_iteration (4) is more than the 3 prompts"),
    }[case]
    start = time.monotonic()
    done = run_subprocess(config, tmp_path / "run", overrides, timeout_s=60)
    elapsed = time.monotonic() - start
    assert done.returncode == 2, done.stdout + done.stderr
    assert needle in done.stderr and "gvm-mega: error:" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    # no warm start before failing: 500 steps would take far longer than this
    assert elapsed < 30, elapsed


def test_overrides_go_before_or_after_options():
    from gvm_mega.cli import build_parser

    args = build_parser().parse_args(["train", "c.yaml", "a.b=1", "--run-dir", "d", "c.d=2"])
    assert (args.config, args.run_dir, args.overrides) == ("c.yaml", "d", ["a.b=1", "c.d=2"])
