"""Start a small local world of worker processes (what torchrun does, minus elasticity).

Used by tools such as ``gvm-mega convert`` to run a TP x PP job on one machine when they were
not started under torchrun or srun. Each worker is a fresh ``python`` process with the torchrun
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR=127.0.0.1``, a free
``MASTER_PORT``); if one fails, the others are stopped so nobody waits in a collective forever.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

from gvm_mega.parallel.launch_env import find_free_port

__all__ = ["RankResult", "launch_local", "torchrun_env"]


@dataclass
class RankResult:
    rank: int
    returncode: int
    output: str


def torchrun_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    return {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port)}


def launch_local(argv: Sequence[str], world_size: int, *,
                 env: Optional[Mapping[str, str]] = None,
                 env_for_rank: Optional[Callable[[int, int, int], Mapping[str, str]]] = None,
                 timeout_s: Optional[float] = None, echo: bool = False) -> list[RankResult]:
    """Run ``argv`` as ``world_size`` ranks; return each rank's exit code and output.

    ``env_for_rank(rank, world_size, port)`` replaces the torchrun variables (e.g. to mimic
    SLURM). Output is captured (and echoed to stderr with ``echo``). On a failure or timeout
    the remaining ranks are terminated; their results carry the signal's return code.
    """
    port = find_free_port()
    make_env = env_for_rank or torchrun_env
    procs, logs = [], []
    for rank in range(world_size):
        child_env = {k: v for k, v in os.environ.items()
                     if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID")}
        child_env.update(env or {})
        child_env.update(make_env(rank, world_size, port))
        log = tempfile.TemporaryFile(mode="w+", encoding="utf-8")
        procs.append(subprocess.Popen(list(argv), env=child_env, stdout=log,
                                      stderr=subprocess.STDOUT))
        logs.append(log)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    failed = False
    while any(p.poll() is None for p in procs):
        if any(p.returncode not in (None, 0) for p in procs) or (
                deadline is not None and time.monotonic() > deadline):
            failed = True
            break
        time.sleep(0.05)
    if failed:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    results = []
    for rank, (p, log) in enumerate(zip(procs, logs)):
        log.seek(0)
        text = log.read()
        log.close()
        if echo and text:
            sys.stderr.write(f"--- rank {rank} (exit {p.returncode}) ---\n{text}")
        results.append(RankResult(rank, p.returncode, text))
    return results
