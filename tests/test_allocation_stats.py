"""Per-prompt statistics across iterations and the statistics file reader."""
from __future__ import annotations

import json

import numpy as np
import pytest

from _allocation_helpers import write_jsonl
from gvm_mega.allocation import (
    PromptStatsStore,
    StatsFileError,
    allocate,
    read_stats_jsonl,
)
from gvm_mega.allocation.beta_prior import fit_beta_prior
from gvm_mega.config import ConfigError, load_config


def _two_iterations(store: PromptStatsStore) -> PromptStatsStore:
    store.update(["a", "b", "c"], [8, 8, 8], [4, 0, 8], [2.0, float("nan"), 1.0])
    store.update(["a", "b"], [8, 8], [2, 0], [4.0, 0.0])
    return store


def test_per_iteration_uses_the_latest_observation_only():
    store = _two_iterations(PromptStatsStore("per-iteration"))
    g, p = store.estimates(["a", "b", "c"])
    assert p.tolist() == [2 / 8, 0.0, 1.0]
    assert g.tolist() == [4.0, 0.0, 1.0]
    # the paper's rule: a prompt seen with 0/8 accepted gets nothing
    assert allocate(g, p, 10)[1] == 0


def test_posterior_keeps_hard_prompts_alive():
    store = _two_iterations(PromptStatsStore("posterior", prior_a=1.0, prior_b=2.0,
                                             grad_norm_ema=0.25))
    g, p = store.estimates(["a", "b", "c"])
    assert p.tolist() == pytest.approx([(1 + 6) / (3 + 16), 1 / (3 + 16), (1 + 8) / (3 + 8)])
    ema_a = 0.25 * 2.0 + 0.75 * 4.0
    assert g[0] == pytest.approx(ema_a) and g[2] == pytest.approx(1.0)
    # never accepted, so no norm of its own: the mean of the known ones
    assert g[1] == pytest.approx((ema_a + 1.0) / 2)
    assert allocate(g, p, 30)[1] > 0
    # with nothing known at all the fallback is 1.0
    lone = PromptStatsStore("posterior")
    lone.update(["x"], [4], [0], [float("nan")])
    assert lone.estimates(["x"])[0].tolist() == [1.0]


def _hard_and_easy(store: PromptStatsStore) -> PromptStatsStore:
    """20 hard prompts (1/8 accepted, G 10), 20 easy ones (8/8, G 1), one never accepted."""
    store.update([f"hard{i}" for i in range(20)], [8] * 20, [1] * 20, [10.0] * 20)
    store.update([f"easy{i}" for i in range(20)], [8] * 20, [8] * 20, [1.0] * 20)
    store.update(["none"], [8], [0], [float("nan")])
    return store


def test_similar_p_fallback_takes_the_norms_of_prompts_about_as_hard():
    mean = _hard_and_easy(PromptStatsStore("posterior")).estimates(["none"])[0]
    assert mean.tolist() == pytest.approx([5.5])
    near = _hard_and_easy(PromptStatsStore("posterior", grad_norm_fallback="similar-p"))
    g, _ = near.estimates(["none", "hard3", "easy3"])
    # the nearest 16 rates to 1/10 are all hard ones; observed norms are kept as they are
    assert g.tolist() == pytest.approx([10.0, 10.0, 1.0])
    # with 16 known prompts or fewer there are no neighbours to choose: the mean of all
    few = PromptStatsStore("posterior", grad_norm_fallback="similar-p")
    few.update([f"h{i}" for i in range(8)] + [f"e{i}" for i in range(8)], [8] * 16,
               [1] * 8 + [8] * 8, [10.0] * 8 + [1.0] * 8)
    few.update(["none"], [8], [0], [float("nan")])
    assert few.estimates(["none"])[0].tolist() == pytest.approx([5.5])


def test_similar_p_neighbours_include_every_tie():
    store = PromptStatsStore("posterior", grad_norm_fallback="similar-p")
    # 30 prompts at the same rate, half with G 2 and half with G 4: ties beyond the 16th count
    store.update([f"t{i}" for i in range(30)], [8] * 30, [2] * 30, [2.0, 4.0] * 15)
    store.update(["none"], [8], [0], [float("nan")])
    assert store.estimates(["none"])[0].tolist() == pytest.approx([3.0])


def test_shrink_pulls_an_observed_norm_toward_the_pool_in_log_space():
    store = PromptStatsStore("posterior", grad_norm_shrink=1.0, grad_norm_ema=0.0)
    store.update(["a", "b", "zero"], [8, 8, 8], [4, 4, 4], [1.0, 16.0, 0.0])
    pooled = 17 / 3
    g, _ = store.estimates(["a", "b", "zero"])
    # one observation against one pseudo-observation: the geometric mean of the two
    assert g[0] == pytest.approx((1.0 * pooled) ** 0.5)
    assert g[1] == pytest.approx((16.0 * pooled) ** 0.5)
    assert g[2] == 0.0  # a zero norm has nothing to scale
    store.update(["a"], [8], [4], [1.0])  # a second observation weighs 2 to 1
    pooled = 17 / 3
    assert store.estimates(["a"])[0][0] == pytest.approx(np.exp((2 * np.log(1.0)
                                                                 + np.log(pooled)) / 3))
    # shrink 0 is the plain estimate
    plain = PromptStatsStore("posterior", grad_norm_ema=0.0)
    plain.update(["a", "b"], [8, 8], [4, 4], [1.0, 16.0])
    assert plain.estimates(["a", "b"])[0].tolist() == [1.0, 16.0]


def test_update_without_norms_records_the_counts_only():
    store = PromptStatsStore("posterior", prior_a=3.0, prior_b=1.0)
    store.update(["a", "b"], [4, 4], [4, 1])
    store.update(["a"], [4], [2], [3.0])
    assert store.get("b").grad_observations == 0 and np.isnan(store.get("b").last_grad_norm)
    assert (store.get("a").grad_observations, store.get("a").total_samples) == (1, 8)
    g, p = store.estimates(["a", "b"])
    assert p.tolist() == pytest.approx([(3 + 6) / (4 + 8), (3 + 1) / (4 + 4)])
    assert g.tolist() == [3.0, 3.0]  # b has no norm of its own: the pooled one


def test_draws_of_one_prompt():
    store = _two_iterations(PromptStatsStore("posterior"))
    store.add_counts(["a"], [3], [1])
    assert (store.draws("a"), store.draws("c"), store.draws("never-seen")) == (19, 8, 0)


def test_accept_rate_of_one_prompt():
    post = _two_iterations(PromptStatsStore("posterior", prior_a=1.0, prior_b=2.0))
    assert post.accept_rate("a") == pytest.approx(post.estimates(["a"])[1][0])
    assert _two_iterations(PromptStatsStore()).accept_rate("a") == 2 / 8
    assert post.accept_rate("never-seen") is None


def test_add_counts_sharpens_the_posterior_rate_only():
    store = _two_iterations(PromptStatsStore("posterior", prior_a=3.0, prior_b=1.0))
    before = store.get("a")
    g_before = store.estimates(["a", "b", "c"])[0]
    store.add_counts(["a", "b", "c"], [6, 0, 2], [6, 0, 1])
    after = store.get("a")
    assert (after.total_samples, after.total_accepted) == (16 + 6, 6 + 6)
    # an extension of the last observation, not a new one: last_*, norms and counts of
    # observations stay, and so does the per-iteration estimate
    assert (after.last_samples, after.last_accepted, after.observations,
            after.grad_observations, after.last_grad_norm) == (
        before.last_samples, before.last_accepted, before.observations,
        before.grad_observations, before.last_grad_norm)
    g, p = store.estimates(["a", "b", "c"])
    assert p.tolist() == pytest.approx([(3 + 12) / (4 + 22), 3 / (4 + 16), (3 + 9) / (4 + 10)])
    assert g.tolist() == pytest.approx(g_before.tolist())
    assert store.accept_rate("a") == pytest.approx(p[0])


def test_revise_grad_norms_replaces_the_latest_observation_in_the_ema():
    """Stage 2 in rounds: the visit's norm over more accepted responses replaces the
    pre-samples' own, entering the EMA once; a first norm counts as an observation."""
    store = _two_iterations(PromptStatsStore("posterior", grad_norm_ema=0.5))
    # latest update: a (ema 2 before it, observed 4), b (none before, none observed)
    store.revise_grad_norms(["a", "b"], [6.0, 3.0])
    a, b = store.get("a"), store.get("b")
    assert (a.last_grad_norm, a.ema_grad_norm, a.grad_observations) == (6.0, 0.5 * 2 + 0.5 * 6, 2)
    assert (b.last_grad_norm, b.ema_grad_norm, b.grad_observations) == (3.0, 3.0, 1)
    store.revise_grad_norms(["a", "b"], [8.0, float("nan")])   # again: still one entry
    assert store.get("a").ema_grad_norm == 0.5 * 2 + 0.5 * 8 and store.get("b") == b
    assert store.get("a").grad_observations == 2
    assert store.estimates(["a"])[0].tolist() == [5.0]
    with pytest.raises(KeyError, match="'c' was not in the latest update"):
        store.revise_grad_norms(["c"], [1.0])
    with pytest.raises(ValueError, match="prompt 'b': grad_norm = -1.0 must be a finite"):
        store.revise_grad_norms(["a", "b"], [1.0, -1.0])
    assert store.get("a").ema_grad_norm == 5.0                     # nothing changed
    fresh = PromptStatsStore("posterior")
    fresh.load_state_dict(store.state_dict())                      # a checkpoint ends a visit
    with pytest.raises(KeyError, match="'a' was not in the latest update"):
        fresh.revise_grad_norms(["a"], [1.0])


@pytest.mark.parametrize("args, match", [
    ((["a"], [2], [3]), "prompt 'a': num_accepted = 3 exceeds"),
    ((["a"], [-1], [0]), "num_samples = -1 must be >= 0"),
    ((["a"], [2.0], [1]), "num_samples must hold integers"),
])
def test_add_counts_rejects_bad_counts_without_changing_anything(args, match):
    store = _two_iterations(PromptStatsStore("posterior"))
    with pytest.raises(ValueError, match=match):
        store.add_counts(*args)
    with pytest.raises(KeyError, match="'never': add_counts extends an observation"):
        store.add_counts(["a", "never"], [2, 2], [1, 1])
    assert store.get("a").total_samples == 16


def test_pooling_options_are_checked():
    with pytest.raises(ValueError, match="grad_norm_fallback must be one of"):
        PromptStatsStore("posterior", grad_norm_fallback="median")
    with pytest.raises(ValueError, match="grad_norm_shrink must be a non-negative number"):
        PromptStatsStore("posterior", grad_norm_shrink=-1.0)
    # uniform algorithms record their verdicts for it too
    assert load_config(None, ["algorithm.name=raft++",
                              "gvm.skip_solved_above=0.9"]).gvm.skip_solved_above == 0.9
    with pytest.raises(ConfigError, match="'gvm.grad_norm_shrink' must be"):
        load_config(None, ["gvm.estimator=posterior", "gvm.grad_norm_shrink=-1"])
    # the per-iteration estimator has no use for them: an error, not a silent no-op
    for key in ("prior_a=3", "prior_b=2", "prior=fitted", "grad_norm_ema=0.9",
                "grad_norm_fallback=similar-p", "grad_norm_shrink=1", "rates_from_stage2=true",
                "presample_until=4"):
        with pytest.raises(ConfigError, match=rf"'gvm.{key.split('=')[0]}' .* only applies to "
                                              r"'gvm.estimator' = posterior"):
            load_config(None, [f"gvm.{key}"])
        assert load_config(None, [f"gvm.{key}", "gvm.estimator=posterior"])
    assert load_config(None, ["gvm.prior_a=1.0", "gvm.presample_until=null"])  # defaults pass


def test_record_of_one_prompt():
    store = _two_iterations(PromptStatsStore())
    rec = store.get("a")
    assert (rec.total_samples, rec.total_accepted, rec.last_samples, rec.last_accepted) == (
        16, 6, 8, 2)
    assert (rec.observations, rec.grad_observations, rec.last_grad_norm) == (2, 2, 4.0)
    assert np.isnan(store.get("b").last_grad_norm)
    assert len(store) == 3 and "c" in store and "z" not in store


def test_integer_ids_are_stored_as_strings_and_storage_grows():
    store = PromptStatsStore()
    for start in range(0, 100, 25):
        ids = list(range(start, start + 25))
        store.update(ids, np.full(25, 4), np.arange(25) % 5, np.arange(25, dtype=float))
    assert len(store) == 100 and 99 in store and "99" in store
    g, p = store.estimates([3, "98"])
    assert p.tolist() == [3 / 4, 3 / 4] and g.tolist() == [3.0, 23.0]


@pytest.mark.parametrize("args, match", [
    ((["a", "b"], [8, 8], [9, 0], [1.0, 0.0]), "prompt 'a': num_accepted = 9 exceeds"),
    ((["a"], [0], [0], [0.0]), "num_samples = 0 must be >= 1"),
    ((["a"], [8], [-1], [0.0]), "num_accepted = -1 must be >= 0"),
    ((["a"], [8], [2], [float("nan")]), "grad_norm = nan must be a finite"),
    ((["a"], [8], [2], [-1.0]), "grad_norm = -1.0 must be a finite non-negative"),
    ((["a", "a"], [8, 8], [1, 1], [1.0, 1.0]), "'a' appears more than once"),
    ((["a"], [8.5], [1], [1.0]), "num_samples must hold integers"),
    ((["a", "b"], [8], [1], [1.0]), r"num_samples has shape \(1,\), expected \(2,\)"),
])
def test_update_rejects_bad_observations_without_changing_anything(args, match):
    store = PromptStatsStore()
    store.update(["z"], [8], [1], [1.0])
    with pytest.raises(ValueError, match=match):
        store.update(*args)
    assert len(store) == 1 and store.get("z").observations == 1


def test_bad_settings_and_unknown_ids():
    with pytest.raises(ValueError, match="estimator must be one of"):
        PromptStatsStore("bayes")
    with pytest.raises(ValueError, match="prior_a and prior_b must be positive"):
        PromptStatsStore("posterior", prior_a=0.0)
    with pytest.raises(ValueError, match="grad_norm_ema must be in"):
        PromptStatsStore(grad_norm_ema=1.0)
    with pytest.raises(TypeError, match="strings or integers"):
        PromptStatsStore().update([1.5], [8], [1], [1.0])
    store = _two_iterations(PromptStatsStore())
    with pytest.raises(KeyError, match="no statistics for prompt id 'q' .2 unknown"):
        store.estimates(["a", "q", "r"])


def test_state_dict_round_trips_through_json_and_torch(tmp_path):
    import torch

    store = _two_iterations(PromptStatsStore("posterior"))
    state = store.state_dict()
    via_json = json.loads(json.dumps(state))
    torch.save(state, tmp_path / "stats.pt")
    via_torch = torch.load(tmp_path / "stats.pt", weights_only=True)
    for saved in (via_json, via_torch):
        restored = PromptStatsStore("posterior")
        restored.load_state_dict(saved)
        for a, b in zip(restored.estimates(["a", "b", "c"]), store.estimates(["a", "b", "c"])):
            assert np.array_equal(a, b)
        # a restored store keeps accumulating where the old one left off
        restored.update(["a"], [8], [8], [1.0])
        assert restored.get("a").total_samples == 24
    # the estimator comes from the config, the counts from the checkpoint
    switched = PromptStatsStore("per-iteration")
    switched.load_state_dict(state)
    assert switched.estimates(["a"])[1].tolist() == [0.25]


def test_load_state_dict_rejects_broken_states():
    store = PromptStatsStore()
    with pytest.raises(ValueError, match="not a PromptStatsStore state"):
        store.load_state_dict({"format": "other"})
    state = _two_iterations(PromptStatsStore()).state_dict()
    del state["ema_grad_norm"]
    with pytest.raises(ValueError, match="lacks ema_grad_norm"):
        store.load_state_dict(state)
    state = _two_iterations(PromptStatsStore()).state_dict()
    state["total_samples"] = state["total_samples"][:2]
    with pytest.raises(ValueError, match="'total_samples' has 2 entries for 3 prompt ids"):
        store.load_state_dict(state)


def test_fitted_prior_follows_the_pool_once_it_is_large_enough():
    store = PromptStatsStore("posterior", prior_a=3.0, prior_b=1.0, prior="fitted")
    rng = np.random.default_rng(5)
    ids = [f"p{i}" for i in range(15)]
    store.update(ids, [2] * 15, [0] * 15, [1.0] * 15)
    assert store.prior() == (3.0, 1.0)        # too few prompts: the configured prior
    assert store.accept_rate("p0") == pytest.approx(3 / 6)
    # a pool that mostly fails: the fitted prior's mean drops well below Beta(3, 1)'s 0.75
    more = [f"q{i}" for i in range(200)]
    counts = rng.binomial(4, rng.beta(1.0, 6.0, 200))
    store.update(more, [4] * 200, counts, [1.0] * 200)
    a, b = store.prior()
    assert (a, b) != (3.0, 1.0) and a / (a + b) < 0.3
    expected_a, expected_b = fit_beta_prior([2] * 15 + [4] * 200, [0] * 15 + counts.tolist())
    assert (a, b) == (expected_a, expected_b)
    g, p = store.estimates(["p0", "q0"])
    assert p.tolist() == pytest.approx([a / (a + b + 2), (a + counts[0]) / (a + b + 4)])
    # the fit reads each prompt's latest observation, and is redone after every update
    store.update(more, [4] * 200, [4] * 200, [1.0] * 200)
    a2, b2 = store.prior()
    assert a2 / (a2 + b2) > 0.5
    assert store.accept_rate("q0") == pytest.approx((a2 + counts[0] + 4) / (a2 + b2 + 8))
    # a restored store refits from the restored counts
    state = store.state_dict()
    assert state["settings"]["prior"] == "fitted"
    fresh = PromptStatsStore("posterior", prior="fitted")
    fresh.load_state_dict(state)
    assert fresh.prior() == (a2, b2)
    with pytest.raises(ValueError, match="prior must be one of"):
        PromptStatsStore("posterior", prior="empirical")
    # one pre-sample per prompt: the mean is fitted, the configured strength kept
    single = PromptStatsStore("posterior", prior_a=3.0, prior_b=1.0, prior="fitted")
    single.update([f"s{i}" for i in range(40)], [1] * 40, [int(i % 4 == 0) for i in range(40)],
                  [1.0] * 40)
    a, b = single.prior()
    assert a + b == pytest.approx(4.0) and a / (a + b) == pytest.approx(0.25)


def test_from_config():
    cfg = load_config(None, ["gvm.estimator=posterior", "gvm.prior_a=2", "gvm.prior_b=3",
                             "gvm.grad_norm_ema=0.9", "gvm.grad_norm_fallback=similar-p",
                             "gvm.grad_norm_shrink=1.5", "gvm.prior=fitted"])
    store = PromptStatsStore.from_config(cfg.gvm)
    assert (store.estimator, store.prior_a, store.prior_b, store.grad_norm_ema,
            store.grad_norm_fallback, store.grad_norm_shrink) == (
        "posterior", 2.0, 3.0, 0.9, "similar-p", 1.5)
    assert store.state_dict()["settings"]["grad_norm_fallback"] == "similar-p"
    assert store.prior_kind == "fitted"
    with pytest.raises(ConfigError, match="gvm.prior"):
        load_config(None, ["gvm.prior=empirical"])


# --- the statistics file --------------------------------------------------------------

def test_reads_a_valid_file(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [
        {"prompt_id": "p1", "num_samples": 8, "num_accepted": 3, "grad_norm": 1.5,
         "problem": "extra keys are ignored"},
        "",
        {"prompt_id": 7, "num_samples": 8, "num_accepted": 0, "grad_norm": None},
    ])
    t = read_stats_jsonl(path)
    assert t.prompt_ids == ["p1", "7"] and len(t) == 2
    assert t.num_samples.tolist() == [8, 8] and t.num_accepted.tolist() == [3, 0]
    assert t.grad_norms[0] == 1.5 and np.isnan(t.grad_norms[1])


GOOD = {"prompt_id": "ok", "num_samples": 8, "num_accepted": 1, "grad_norm": 1.0}


@pytest.mark.parametrize("bad, problem", [
    ('{"prompt_id": "x", "num_samples": 8,', "broken JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ({"prompt_id": "x", "num_samples": 8, "num_accepted": 1}, "missing field 'grad_norm'"),
    ({**GOOD, "prompt_id": None}, "prompt_id must be a string or an integer"),
    ({**GOOD, "prompt_id": "ok"}, "duplicate prompt_id 'ok' .first seen on line 1"),
    ({**GOOD, "prompt_id": "x", "num_samples": -8}, "num_samples must be non-negative"),
    ({**GOOD, "prompt_id": "x", "num_samples": 0}, "num_samples must be at least 1"),
    ({**GOOD, "prompt_id": "x", "num_accepted": -1}, "num_accepted must be non-negative"),
    ({**GOOD, "prompt_id": "x", "num_samples": 7.5}, "num_samples must be an integer, got 7.5"),
    ({**GOOD, "prompt_id": "x", "num_accepted": "3"}, "num_accepted must be an integer"),
    ({**GOOD, "prompt_id": "x", "num_accepted": True}, "num_accepted must be an integer"),
    ({**GOOD, "prompt_id": "x", "num_accepted": 9}, r"num_accepted \(9\) exceeds num_samples"),
    ('{"prompt_id": "x", "num_samples": 8, "num_accepted": 1, "grad_norm": NaN}',
     "grad_norm must be finite, got nan"),
    ('{"prompt_id": "x", "num_samples": 8, "num_accepted": 1, "grad_norm": Infinity}',
     "grad_norm must be finite, got inf"),
    ({**GOOD, "prompt_id": "x", "grad_norm": -0.5}, "grad_norm must be non-negative"),
    ({**GOOD, "prompt_id": "x", "grad_norm": "1.0"}, "grad_norm must be a number"),
    ({**GOOD, "prompt_id": "x", "grad_norm": None}, "grad_norm is null but num_accepted > 0"),
])
def test_bad_rows_name_the_line_and_the_problem(tmp_path, bad, problem):
    path = write_jsonl(tmp_path / "s.jsonl", [GOOD, "", bad])
    with pytest.raises(StatsFileError, match=rf"s\.jsonl:3: {problem}"):
        read_stats_jsonl(path)


def test_unreadable_or_empty_files(tmp_path):
    with pytest.raises(StatsFileError, match="cannot read"):
        read_stats_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(StatsFileError, match="no statistics rows"):
        read_stats_jsonl(write_jsonl(tmp_path / "empty.jsonl", ["", "  "]))
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(StatsFileError, match="not UTF-8"):
        read_stats_jsonl(tmp_path / "bin.jsonl")
