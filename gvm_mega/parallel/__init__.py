"""Parallel runtime: torchrun/SLURM start-up, megatron TP x PP x DP state, CPU support.

``init_distributed(cfg.parallel)`` is the entry point; it returns a :class:`ParallelLayout`.
``launch_local`` starts a small local world of worker processes (torchrun's environment).
:mod:`gvm_mega.parallel.cpu_compat` holds everything megatron-core needs to run without CUDA.
"""
from gvm_mega.parallel import cpu_compat
from gvm_mega.parallel.launch import RankResult, launch_local
from gvm_mega.parallel.launch_env import (
    LaunchEnv,
    detect_launch_env,
    expand_slurm_nodelist,
    find_free_port,
)
from gvm_mega.parallel.runtime import (
    ParallelLayout,
    current_layout,
    init_distributed,
    resolve_parallel_sizes,
    seed_everything,
    shutdown,
)

__all__ = ["LaunchEnv", "ParallelLayout", "RankResult", "cpu_compat", "current_layout",
           "detect_launch_env", "expand_slurm_nodelist", "find_free_port", "init_distributed",
           "launch_local", "resolve_parallel_sizes", "seed_everything", "shutdown"]
