"""Tiny end-to-end ``gvm-mega train`` runs: a config small enough for a test, and ways to run
it in this process, in a subprocess, or as a local 4-rank world."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent

# Two-layer model (PP2 splits it) on the two easiest arithmetic levels: a few hundred
# warm-start steps give it a non-zero sampled accuracy, so stage 1 accepts something and the
# policy step has data. Standalone (no ``base:``) so the demo's tuning does not change it.
TINY_CONFIG = """\
run: {seed: 7, name: tiny}
train: {iterations: 2, prompts_per_iteration: 4, warmup_steps: 0, eval_every: 0, eval_samples: 1}
model: {arch: tiny, num_layers: 2, hidden_size: 64, ffn_hidden_size: 128, num_attention_heads: 4,
        num_query_groups: 2, tokenizer: builtin}
data: {train_path: "builtin:arithmetic", eval_paths: ["builtin:arithmetic-test"], template: plain,
       arithmetic_train_size: 200, arithmetic_test_size: 12, arithmetic_min_level: 0,
       arithmetic_max_level: 1}
gvm: {presample_n: 4, budget_per_prompt: 4, reuse_stage1: true}
algorithm: {name: gvm-raft++, uniform_n: 4, ppo_epochs: 1, mini_batches: 1}
rollout: {engine: embedded, max_new_tokens: 40, temperature: 1.0}
optim: {lr: 1.0e-3}
logging: {progress_bars: false}
checkpoint: {save_every: 1}
"""

# Keys whose values are wall-clock measurements (differ between otherwise equal runs).
TIMING_PREFIX = "time_"

ENV = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
       "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def write_config(directory: Path) -> Path:
    path = directory / "tiny.yaml"
    path.write_text(TINY_CONFIG)
    return path


def train_argv(config: Path, run_dir: Path, overrides: Sequence[str] = ()) -> list[str]:
    return ["train", str(config), "--run-dir", str(run_dir), *overrides]


def run_in_process(config: Path, run_dir: Path, overrides: Sequence[str] = ()) -> int:
    """``gvm-mega train`` through the CLI entry point in this process (distributed state
    is torn down afterwards so the next run starts clean)."""
    from gvm_mega.cli import main
    from gvm_mega.parallel import shutdown

    try:
        return main(train_argv(config, run_dir, overrides))
    finally:
        shutdown()


def run_subprocess(config: Path, run_dir: Path, overrides: Sequence[str] = (),
                   timeout_s: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gvm_mega", *train_argv(config, run_dir, overrides)],
                          env={**os.environ, **ENV}, capture_output=True, text=True,
                          timeout=timeout_s, cwd=str(ROOT))


def popen(config: Path, run_dir: Path, overrides: Sequence[str] = ()) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gvm_mega", *train_argv(config, run_dir, overrides)],
                            env={**os.environ, **ENV}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=str(ROOT))


def run_world(config: Path, run_dir: Path, overrides: Sequence[str], world_size: int = 4,
              timeout_s: float = 240.0) -> None:
    """The same command as ``world_size`` local ranks (torchrun's environment); fails with
    every rank's log when one fails."""
    from gvm_mega.parallel import launch_local

    argv = [sys.executable, "-m", "gvm_mega", *train_argv(config, run_dir, overrides)]
    results = launch_local(argv, world_size, env=ENV, timeout_s=timeout_s)
    if any(r.returncode != 0 for r in results):
        logs = "\n".join(f"--- rank {r.rank} exit {r.returncode} ---\n{r.output[-3000:]}"
                         for r in results)
        raise AssertionError(f"a rank failed\n{logs}")


def run_torchrun(config: Path, run_dir: Path, overrides: Sequence[str], nproc: int = 4,
                 timeout_s: float = 300.0) -> None:
    """The same command under the real ``torchrun --standalone`` (its agent store and
    environment included); fails with its output when it fails."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", "-m", "gvm_mega", *train_argv(config, run_dir, overrides)]
    done = subprocess.run(argv, env={**os.environ, **ENV}, capture_output=True, text=True,
                          timeout=timeout_s, cwd=str(ROOT))
    if done.returncode != 0:
        raise AssertionError(f"torchrun exited with {done.returncode}\n"
                             f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]


def allocations(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "allocations.jsonl").read_text().splitlines()
            if line.strip()]


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith(TIMING_PREFIX)} for row in rows]


def warm_start_checkpoint(directory: Path, config: Path, steps: int = 300) -> Path:
    """A supervised warm start (no RL iterations) whose weights later runs load."""
    run_dir = directory / "warm"
    code = run_in_process(config, run_dir, [f"train.warmup_steps={steps}", "train.warmup_lr=5e-3",
                                            "train.warmup_batch_size=16", "train.iterations=0"])
    assert code == 0
    return run_dir / "checkpoints" / "iter_0000000"


def latest_checkpoint(run_dir: Path) -> Optional[int]:
    latest = run_dir / "checkpoints" / "latest"
    if not latest.exists():
        return None
    text = latest.read_text().strip() if latest.is_file() else latest.resolve().name
    digits = "".join(ch for ch in Path(text).name if ch.isdigit())
    return int(digits) if digits else None
