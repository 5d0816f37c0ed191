"""Supervised warm start: SFT on the task's worked solutions before RL.

A tiny model starting from random weights never produces a verifiable answer, so RL has no
signal; a short SFT phase on (problem, worked solution) pairs gives it a starting accuracy
that RL then improves on.

The warm start always runs as one process (TP = PP = DP = 1, a fixed thread count) in a child
of the driver, and every rank loads its result, a megatron checkpoint in ``RUN_DIR/warm_start``.
Float sums depend on the layout and on the number of threads, and hundreds of SFT steps
amplify those last-bit differences into different samples; this way a run under any
parallel layout starts RL from bit-identical weights. The checkpoint also lets a run killed
before its first RL checkpoint resume without repeating the warm start.
"""
from __future__ import annotations

import dataclasses
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from gvm_mega.data import Prompt
from gvm_mega.training import LossSpec, Policy, SampleBatch

WARM_START_DIR = "warm_start"
_DONE = "COMPLETE"


SFTExample = tuple[list[int], list[list[int]]]


def sft_pairs(prompts: Sequence[Prompt], template: Any, tokenizer: Any) -> list[SFTExample]:
    """(prompt ids, [ids + EOS of each worked solution]) for every prompt that has one."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pairs = []
    for p in prompts:
        if p.solution:
            solutions = (p.solution,) + tuple(s for s in p.other_solutions if s)
            pairs.append((tokenizer.encode_prompt(template.render(p.problem)),
                          [tokenizer.encode(s) + eos for s in solutions]))
    return pairs


def warm_start(cfg: Any, pairs: Sequence[SFTExample], *, dp_rank: int, dp_size: int, seed: int,
               on_step: Callable[[int, float], None] | None = None) -> Policy:
    """A policy trained with SFT for ``train.warmup_steps`` steps at ``train.warmup_lr``.

    Each visit of a problem with several worked solutions trains on one drawn at random (from
    a stream of its own, so problems with one solution see the same batches either way)."""
    if not pairs:
        raise ValueError("the warm start needs prompts with worked solutions "
                         "(set train.warmup_steps=0 for data without them)")
    optim = dataclasses.replace(cfg.optim, lr=cfg.train.warmup_lr, min_lr=0.0, warmup_steps=0,
                                schedule="cosine")
    policy = Policy(cfg.model, optim=optim, loss=LossSpec(kind="sft", uses_group_advantages=False),
                    micro_batch_tokens=cfg.parallel.micro_batch_tokens,
                    total_steps=cfg.train.warmup_steps)
    rng = random.Random(seed)
    pick = random.Random(f"{seed}:solutions")
    order: list[int] = []
    size = cfg.train.warmup_batch_size
    for step in range(cfg.train.warmup_steps):
        while len(order) < size:
            epoch = list(range(len(pairs)))
            rng.shuffle(epoch)
            order.extend(epoch)
        batch, order = order[:size], order[size:]
        drawn = [(pairs[i][0], _one_solution(pairs[i][1], pick)) for i in batch]
        mine = drawn[dp_rank::dp_size]
        report = policy.train_step(SampleBatch(
            sequences=[p + r for p, r in mine], prompt_lengths=[len(p) for p, _ in mine],
            advantages=[1.0] * len(mine)))
        if on_step is not None:
            on_step(step, report.loss)
    return policy


def _one_solution(solutions: Sequence[list[int]], pick: random.Random) -> list[int]:
    return solutions[0] if len(solutions) == 1 else pick.choice(solutions)


# ----------------------------------------------------------------- one process, any layout
def warm_start_dir(run_dir: str | Path) -> Path:
    """Where a run keeps its warm-start weights."""
    return Path(run_dir) / WARM_START_DIR


def warm_start_ready(run_dir: str | Path) -> bool:
    return (warm_start_dir(run_dir) / _DONE).is_file()


def warm_start_threads() -> int:
    """The warm start's thread count: every CPU this process may use, whatever the layout."""
    from gvm_mega.parallel.launch_env import usable_cpus

    return usable_cpus()


def run_warm_start_process(config_path: str | Path, run_dir: str | Path, *,
                           on_step: Optional[Callable[[int, float], None]] = None) -> Path:
    """Train the warm start in a single-process child and return its checkpoint directory.

    ``config_path`` is the run's resolved config. Raises RuntimeError with the child's last
    output when it fails.
    """
    from gvm_mega.parallel import find_free_port

    out = warm_start_dir(run_dir)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    threads = str(warm_start_threads())
    # a world of its own: none of the launcher's rank variables, and not torchrun's agent
    # store (TORCHELASTIC_USE_AGENT_STORE would make the child wait for a store that the
    # launcher, not the child, is meant to host)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TORCHELASTIC_", "ROLE_", "GROUP_", "SLURM_"))
           and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(find_free_port()), RANK="0",
               WORLD_SIZE="1", LOCAL_RANK="0", OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    proc = subprocess.Popen([sys.executable, "-m", "gvm_mega.trainer.warm_start",
                             str(config_path), str(partial)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        parts = line.split()
        if len(parts) == 3 and parts[0] == "step" and on_step is not None:
            on_step(int(parts[1]), float(parts[2]))
        else:
            tail = (tail + [line.rstrip()])[-40:]
    if proc.wait() != 0 or not (partial / _DONE).is_file():
        raise RuntimeError("the supervised warm start failed (exit code "
                           f"{proc.returncode}):\n" + "\n".join(tail))
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out


def _main(argv: Sequence[str]) -> int:
    """``python -m gvm_mega.trainer.warm_start CONFIG OUT_DIR`` (what the driver runs)."""
    import warnings

    import torch

    warnings.filterwarnings("ignore", module="megatron")
    from gvm_mega.config import load_config
    from gvm_mega.data import build_template, load_prompts
    from gvm_mega.models import save_mcore_checkpoint
    from gvm_mega.parallel import init_distributed, shutdown
    from gvm_mega.tokenizer import load_tokenizer

    config_path, out_dir = argv
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or warm_start_threads()))
    cfg = load_config(config_path, ["parallel.tp=1", "parallel.pp=1", "parallel.dp=1"])
    init_distributed(cfg.parallel, seed=cfg.run.seed)
    try:
        tokenizer = load_tokenizer(cfg.model.tokenizer)
        template = build_template(cfg.data.template, tokenizer_dir=None if cfg.model.tokenizer
                                  == "builtin" else cfg.model.tokenizer)
        pairs = sft_pairs(load_prompts(cfg.data.train_path, cfg.data).prompts, template, tokenizer)
        policy = warm_start(cfg, pairs, dp_rank=0, dp_size=1, seed=cfg.run.seed,
                            on_step=lambda step, loss: print(f"step {step} {loss:.6f}", flush=True))
        save_mcore_checkpoint(policy.module, out_dir, cfg.model, tokenizer=tokenizer)
        (Path(out_dir) / _DONE).write_text("ok\n")
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
