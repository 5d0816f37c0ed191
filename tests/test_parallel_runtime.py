"""Parallel runtime: launcher environments, TP x PP x DP layout, megatron state on CPU/gloo."""
from __future__ import annotations

import json
import sys
import time

import pytest

from gvm_mega.config import ConfigError
from gvm_mega.config.schema import ParallelConfig
from gvm_mega.parallel import (ParallelLayout, detect_launch_env, expand_slurm_nodelist,
                               resolve_parallel_sizes)
from gvm_mega.parallel.launch import launch_local

from _mcore_helpers import run_worker


def test_torchrun_environment_wins_over_slurm():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.5",
           "MASTER_PORT": "1234", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    got = detect_launch_env(env)
    assert (got.source, got.rank, got.world_size, got.local_rank) == ("torchrun", 3, 8, 1)
    assert got.init_method == "tcp://10.0.0.5:1234"


def test_slurm_environment_picks_first_node_and_job_port():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_NODELIST": "gpu[07-08,10],cpu1", "SLURM_JOB_ID": "123456"}
    got = detect_launch_env(env)
    assert (got.source, got.rank, got.world_size, got.local_rank) == ("slurm", 5, 8, 1)
    assert got.master_addr == "gpu07"
    assert got.master_port == 20000 + 123456 % 10000
    env["MASTER_ADDR"], env["MASTER_PORT"] = "head", "4000"
    assert detect_launch_env(env).init_method == "tcp://head:4000"


def test_single_process_uses_a_free_loopback_port():
    got = detect_launch_env({})
    assert (got.source, got.rank, got.world_size, got.master_addr) == ("single", 0, 1, "127.0.0.1")
    assert 0 < got.master_port < 65536


@pytest.mark.parametrize("env, needle", [
    ({"RANK": "4", "WORLD_SIZE": "4"}, "rank 4 is outside a world of size 4"),
    ({"RANK": "x", "WORLD_SIZE": "4"}, "RANK='x' is not an integer"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, "SLURM_NODELIST"),
])
def test_bad_launch_environment_is_named(env, needle):
    with pytest.raises(ValueError, match=needle):
        detect_launch_env(env)


def test_expand_slurm_nodelist():
    assert expand_slurm_nodelist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07",
                                                            "login1"]
    assert expand_slurm_nodelist("r[1-2]n[8-9]") == ["r1n8", "r1n9", "r2n8", "r2n9"]
    assert expand_slurm_nodelist("node9") == ["node9"]
    with pytest.raises(ValueError, match="bad range '5-2'"):
        expand_slurm_nodelist("n[5-2]")


def test_resolve_parallel_sizes():
    assert resolve_parallel_sizes(8, ParallelConfig(tp=2, pp=2)) == (2, 2, 2)
    assert resolve_parallel_sizes(8, ParallelConfig(tp=2, pp=1, dp=4)) == (2, 1, 4)
    with pytest.raises(ConfigError, match=r"world size 6 does not factor into parallel.tp=4 "
                                          r"x parallel.pp=1"):
        resolve_parallel_sizes(6, ParallelConfig(tp=4))
    with pytest.raises(ConfigError, match=r"'parallel.dp' is 3 but world size 8 .* gives dp=2"):
        resolve_parallel_sizes(8, ParallelConfig(tp=2, pp=2, dp=3))


def test_nccl_without_cuda_is_refused():
    import torch

    from gvm_mega.parallel.runtime import _pick_backend

    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert _pick_backend("auto") == "gloo"
    with pytest.raises(ConfigError, match="'parallel.backend' is 'nccl' but CUDA"):
        _pick_backend("nccl")


def test_layout_roles():
    base = dict(world_size=4, local_rank=0, tp=2, pp=2, dp=1, tp_rank=0, dp_rank=0,
                backend="gloo", device="cpu")
    first = ParallelLayout(rank=0, pp_rank=0, **base)
    last = ParallelLayout(rank=2, pp_rank=1, **base)
    assert first.is_driver and first.is_first_stage and not first.is_last_stage
    assert not last.is_driver and last.is_last_stage and not last.is_first_stage


def test_launcher_stops_the_other_ranks_when_one_fails():
    code = ("import os, sys, time\n"
            "r = int(os.environ['RANK'])\n"
            "print('rank', r, os.environ['WORLD_SIZE'], os.environ['MASTER_ADDR'])\n"
            "sys.exit(3) if r == 0 else time.sleep(60)\n")
    start = time.monotonic()
    results = launch_local([sys.executable, "-c", code], 2, timeout_s=30)
    assert time.monotonic() - start < 20
    assert results[0].returncode == 3 and "rank 0 2 127.0.0.1" in results[0].output
    assert results[1].returncode != 0  # terminated, not left waiting


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_ranks_under_slurm_env(tmp_path):
    """One world of 2 (SLURM variables): factoring errors, groups, seeding, and the same training
    step under TP2, PP2 and DP2 (same weights and data: same loss and global grad norm)."""
    run_worker("runtime", 2, {"out": str(tmp_path)}, slurm=True)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rep in reports:
        assert "world size 2 does not factor into parallel.tp=3" in rep["errors"][0]
        assert "'parallel.dp' is 2 but world size 2" in rep["errors"][1]
        assert rep["tp2"]["tp_group"] == [0, 1]
    assert [r["tp2"]["tp_rank"] for r in reports] == [0, 1]
    for key in ("train_tp2", "train_pp2", "train_dp2"):
        norms = {round(r[key]["grad_norm"], 6) for r in reports}
        assert len(norms) == 1 and norms.pop() > 0  # one global grad norm on every rank
    tp_losses = [r["train_tp2"]["loss"] for r in reports]
    assert abs(tp_losses[0] - tp_losses[1]) < 1e-6  # both TP ranks see the full loss
    assert [r["train_pp2"]["loss"] is None for r in reports] == [True, False]  # last stage only
    # same weights and data: the TP2 and PP2 runs compute the same loss and gradient norm
    assert abs(tp_losses[0] - reports[1]["train_pp2"]["loss"]) < 1e-5
    # ... and so does plain data parallelism over two copies of the same batch
    for key in ("train_pp2", "train_dp2"):
        assert abs(reports[0]["train_tp2"]["grad_norm"] - reports[0][key]["grad_norm"]) < 1e-4, key
    assert abs(tp_losses[0] - reports[0]["train_dp2"]["loss"]) < 1e-5
