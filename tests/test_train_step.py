"""Policy train step and forward log-probs under TP/PP/DP layouts (4 gloo ranks, one spawn).

The same initial weights are trained for three steps at TP1 (DP4), TP2 (DP2), PP2 (DP2) and
TP2xPP2 (DP1): losses, gradient norms and metrics agree to 1e-5, forward log-probs agree
across layouts and with a plain full-vocabulary log_softmax, and a NaN in one data-parallel
rank's batch makes every rank skip the update without touching weights or optimizer state.
"""
from __future__ import annotations

import pytest

from _train_worker import run_world

TOL = 1e-5


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    out = tmp_path_factory.mktemp("layouts")
    return run_world("layouts", 4, {"out": str(out)})["layouts"]


def _max_gap(a, b):
    return max(abs(x - y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b))


def test_every_layout_ran(layouts):
    assert [(e["tp"], e["pp"], e["dp"]) for e in layouts] == \
        [(1, 1, 4), (2, 1, 2), (1, 2, 2), (2, 2, 1)]


def test_forward_logprobs_match_full_vocab_and_across_layouts(layouts):
    base = layouts[0]
    assert base["vs_full_vocab"] <= TOL
    lengths = [len(row) for row in base["logprobs"]]
    assert len(lengths) == 11 and min(lengths) >= 1
    assert all(v <= 0 for row in base["logprobs"] for v in row)
    for entry in layouts[1:]:
        assert [len(r) for r in entry["logprobs"]] == lengths
        assert _max_gap(entry["logprobs"], base["logprobs"]) <= TOL, entry["tp"]
        assert _max_gap(entry["entropy"], base["entropy"]) <= TOL, entry["tp"]


@pytest.mark.parametrize("key", ["loss", "grad_norm", "lr", "kl", "entropy", "clip_fraction",
                                 "pg_loss", "ratio_max", "num_loss_tokens", "num_samples"])
def test_same_training_under_every_layout(layouts, key):
    base = [s[key] for s in layouts[0]["steps"]]
    for entry in layouts[1:]:
        got = [s[key] for s in entry["steps"]]
        assert max(abs(a - b) for a, b in zip(got, base)) <= TOL * max(1.0, abs(max(base))), \
            (entry["tp"], entry["pp"], key, got, base)


def test_steps_really_train(layouts):
    steps = layouts[0]["steps"]
    assert not any(s["skipped"] for s in steps)
    assert [s["update"] for s in steps] == [1, 2, 3]
    assert len({round(s["loss"], 6) for s in steps}) == 3
    assert all(s["grad_norm"] > 0 and s["kl"] > 0 and s["entropy"] > 0 for s in steps)
    assert any(s["clip_fraction"] > 0 for s in steps)
    assert any(s["grad_norm"] > 1.0 for s in steps)  # the clip (1.0) is exercised
    assert steps[1]["lr"] < steps[0]["lr"]  # cosine decay
    # packing: a small token budget gives several micro-batches, the same on every DP rank
    assert max(e["steps"][0]["num_micro_batches"] for e in layouts) >= 2


def test_nan_is_skipped_and_reported(layouts):
    nan = next(e for e in layouts if (e["tp"], e["pp"]) == (1, 2))["nan"]
    assert nan["skipped"]["skipped"] is True
    assert "non-finite" in nan["skipped"]["reason"]
    assert nan["skipped"]["update"] == 3  # no update counted
    assert nan["weights_unchanged"] is True
    assert nan["clean"]["skipped"] is False and nan["clean"]["update"] == 4


def test_mismatch_and_missing_inputs_are_named(layouts):
    errors = layouts[0]["errors"]
    assert any("old_logprobs" in e for e in errors)
    assert any("advantages" in e for e in errors)
    assert any("ref_logprobs" in e for e in errors)


def test_frozen_reference_policy_logprobs(layouts):
    assert layouts[-1]["frozen_gap"] <= TOL


def test_sample_batch_validation():
    from gvm_mega.training import SampleBatch

    ok = SampleBatch([[1, 2, 3, 4], [5, 6, 7]], [2, 1], advantages=[0.5, -0.5],
                     old_logprobs=[[-1.0, -2.0], [-0.5, -0.1]])
    assert ok.response_lengths == [2, 2]
    assert ok.select([1]).sequences == [[5, 6, 7]] and ok.select([1]).advantages == [-0.5]
    with pytest.raises(ValueError, match="sample 0 has prompt length 3"):
        SampleBatch([[1, 2, 3]], [3])
    with pytest.raises(ValueError, match="2 prompt lengths"):
        SampleBatch([[1, 2, 3]], [1, 1])
    with pytest.raises(ValueError, match=r"old_logprobs\[1\] has 1 values for 2"):
        SampleBatch([[1, 2, 3, 4], [5, 6, 7]], [2, 1], old_logprobs=[[-1.0, -2.0], [-0.5]])
    with pytest.raises(ValueError, match="3 advantages for 2 samples"):
        SampleBatch([[1, 2, 3, 4], [5, 6, 7]], [2, 1], advantages=[1, 2, 3])
    with pytest.raises(ValueError, match="no field"):
        ok.with_values(rewards=[1, 0])


def test_gradients_are_clipped_to_the_global_norm(layouts):
    for entry in layouts:
        reported = [s["grad_norm"] for s in entry["steps"]]
        applied = entry["applied_grad_norms"][:3]
        for before, after in zip(reported, applied):
            assert abs(after - min(before, 1.0)) <= 1e-5 * max(1.0, before), (before, after)


def test_empty_batch_is_skipped(layouts):
    empty = next(e for e in layouts if (e["tp"], e["pp"]) == (1, 2))["nan"]["empty"]
    assert empty["skipped"] is True and empty["num_loss_tokens"] == 0
    assert empty["update"] == 3
