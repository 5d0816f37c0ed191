"""Training checkpoints: save, stop and resume equals a continuous run, at the same layout and
at another one (TP2xPP2 -> TP1), optimizer state included; atomic writes and keep-last."""
from __future__ import annotations

import json

import pytest

from _train_worker import run_world

TOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    first = run_world("checkpoint", 4, {"out": str(out)})
    resumed_dir = tmp_path_factory.mktemp("resume")
    second = run_world("resume", 1, {"out": str(resumed_dir), "root": str(out / "ckpt")})
    return first, second, out / "ckpt"


def _losses(steps):
    return [s["loss"] for s in steps]


def test_files_and_pointer(runs):
    first, _, root = runs
    assert first["files"] == ["iter_0000004", "latest"]  # keep_last=1, stale temp dir cleared
    assert (root / "latest").read_text().strip() == "iter_0000004"
    meta = json.loads((root / "iter_0000004" / "gvm_mega_checkpoint.json").read_text())
    assert meta["iteration"] == 4 and meta["layout"]["tp"] == 2 and meta["layout"]["pp"] == 2
    assert meta["counters"]["updates"] == 4 and meta["scheduler"]["num_steps"] == 4
    assert (root / "iter_0000004" / "optimizer" / "metadata.json").is_file()
    assert len(list((root / "iter_0000004" / "rng").glob("rank*.pt"))) == 4


def test_resume_same_layout_is_exact(runs):
    first, _, _ = runs
    cont = [first["continuous"][k] for k in ("4", "5")]
    for key in ("loss", "grad_norm", "lr"):
        assert [s[key] for s in first["same_layout"]] == [s[key] for s in cont], key


def test_resume_at_tp1_in_same_world(runs):
    first, _, _ = runs
    cont = [first["continuous"][k] for k in ("4", "5")]
    for key in ("loss", "grad_norm", "lr", "kl"):
        got, want = [s[key] for s in first["tp1"]], [s[key] for s in cont]
        assert max(abs(a - b) for a, b in zip(got, want)) <= TOL, (key, got, want)


def test_optimizer_state_matters(runs):
    """Without the Adam moments the second resumed step differs: the check above has teeth."""
    first, _, _ = runs
    with_state = first["tp1"][1]["grad_norm"]
    without = first["tp1_without_optimizer_state"][1]["grad_norm"]
    assert abs(with_state - without) > 1e-2


def test_stop_and_resume_in_new_process_at_tp1(runs):
    first, second, _ = runs
    assert second["iteration"] == 4
    cont = [first["continuous"][k] for k in ("4", "5")]
    for key in ("loss", "grad_norm", "lr", "entropy"):
        got, want = [s[key] for s in second["steps"]], [s[key] for s in cont]
        assert max(abs(a - b) for a, b in zip(got, want)) <= TOL, (key, got, want)


def test_pointer_and_listing_without_a_world(tmp_path):
    from gvm_mega.config import ConfigError
    from gvm_mega.training import CheckpointManager, checkpoint_name

    mgr = CheckpointManager(tmp_path / "none", keep_last=3)
    assert mgr.latest() is None and mgr.checkpoints() == []
    root = tmp_path / "ckpt"
    for it in (3, 12):
        (root / checkpoint_name(it)).mkdir(parents=True)
        (root / checkpoint_name(it) / "gvm_mega_checkpoint.json").write_text("{}")
    (root / checkpoint_name(20)).mkdir()  # incomplete: no metadata, not a checkpoint
    (root / ".tmp-iter_0000030").mkdir()
    mgr = CheckpointManager(root, keep_last=2)
    assert [it for it, _ in mgr.checkpoints()] == [3, 12]
    assert mgr.latest() is None  # no pointer yet
    (root / "latest").write_text("iter_0000020\n")
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        mgr.latest()
    (root / "latest").write_text("iter_0000012\n")
    assert mgr.latest() == root / "iter_0000012"
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(root, keep_last=0)
