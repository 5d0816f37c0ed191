"""Distributed start-up: process group, megatron parallel state (TP x PP x DP), seeding.

One call, :func:`init_distributed`, turns the launcher's environment (torchrun, SLURM or none,
see :mod:`gvm_mega.parallel.launch_env`) and the ``parallel`` config section into an
initialised ``torch.distributed`` world plus megatron's tensor/pipeline/data-parallel groups,
and describes the result as a :class:`ParallelLayout`. gloo is used without CUDA (with
:mod:`gvm_mega.parallel.cpu_compat` enabled), NCCL with it.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from gvm_mega.config import ConfigError
from gvm_mega.config.schema import ParallelConfig
from gvm_mega.parallel import cpu_compat
from gvm_mega.parallel.launch_env import LaunchEnv, detect_launch_env

DEFAULT_TRACKER_SEED = 1234

__all__ = ["ParallelLayout", "init_distributed", "resolve_parallel_sizes", "seed_everything",
           "current_layout", "shutdown"]


@dataclass(frozen=True)
class ParallelLayout:
    """This rank's place in the TP x PP x DP grid."""

    rank: int
    world_size: int
    local_rank: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    backend: str
    device: str

    @property
    def is_driver(self) -> bool:
        """Global rank 0 owns prompts, rollouts, rewards and allocation."""
        return self.rank == 0

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def resolve_parallel_sizes(world_size: int, cfg: ParallelConfig) -> tuple[int, int, int]:
    """(tp, pp, dp) for ``world_size`` ranks, or a ConfigError naming the numbers."""
    tp, pp = cfg.tp, cfg.pp
    if tp < 1 or pp < 1:
        raise ConfigError(f"'parallel.tp' ({tp}) and 'parallel.pp' ({pp}) must be >= 1")
    if world_size % (tp * pp):
        raise ConfigError(
            f"world size {world_size} does not factor into parallel.tp={tp} x parallel.pp={pp} "
            f"x data-parallel: {world_size} is not divisible by tp*pp={tp * pp}")
    dp = world_size // (tp * pp)
    if cfg.dp is not None and cfg.dp != dp:
        raise ConfigError(
            f"'parallel.dp' is {cfg.dp} but world size {world_size} with parallel.tp={tp} and "
            f"parallel.pp={pp} gives dp={dp} (tp*pp*dp must equal the world size)")
    return tp, pp, dp


def _pick_backend(requested: str) -> str:
    has_cuda = torch.cuda.is_available()
    if requested == "auto":
        return "nccl" if has_cuda else "gloo"
    if requested == "nccl" and not has_cuda:
        raise ConfigError("'parallel.backend' is 'nccl' but CUDA is not available; "
                          "use 'gloo' or 'auto'")
    return requested


def current_layout(backend: Optional[str] = None,
                   local_rank: Optional[int] = None) -> ParallelLayout:
    """Describe the already initialised megatron parallel state."""
    from megatron.core import parallel_state as ps

    rank = dist.get_rank()
    local = rank if local_rank is None else local_rank
    return ParallelLayout(
        rank=rank, world_size=dist.get_world_size(), local_rank=local,
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        backend=backend or dist.get_backend(),
        device=f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu",
    )


def init_distributed(cfg: ParallelConfig, *, seed: Optional[int] = None,
                     timeout_s: float = 1800.0,
                     environ: Optional[dict] = None) -> ParallelLayout:
    """Initialise torch.distributed and megatron parallel state for ``cfg``; return the layout.

    The layout is checked against the world size before any rendezvous, so a world that does not
    factor into ``tp * pp * dp`` fails at once on every rank. Calling again in the same process
    keeps the process group and rebuilds megatron's groups when the sizes differ. With ``seed``,
    :func:`seed_everything` runs afterwards; without, only megatron's tensor-parallel RNG streams
    are (re)seeded, with ``DEFAULT_TRACKER_SEED``, since megatron layers cannot run without them.
    """
    launch: LaunchEnv = detect_launch_env(environ)
    world = dist.get_world_size() if dist.is_initialized() else launch.world_size
    tp, pp, dp = resolve_parallel_sizes(world, cfg)
    backend = _pick_backend(cfg.backend)
    cpu_compat.enable()
    if torch.cuda.is_available():
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method=launch.init_method,
                                rank=launch.rank, world_size=launch.world_size,
                                timeout=timedelta(seconds=timeout_s))
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        same = (ps.get_tensor_model_parallel_world_size() == tp
                and ps.get_pipeline_model_parallel_world_size() == pp)
        if not same:
            ps.destroy_model_parallel()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tp,
                                     pipeline_model_parallel_size=pp)
    layout = current_layout(backend=dist.get_backend(), local_rank=launch.local_rank)
    if seed is not None:
        seed_everything(seed)
    else:  # megatron's layers need the TP RNG streams; they depend on the (new) TP rank
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(DEFAULT_TRACKER_SEED)
    return layout


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch identically on every rank, plus megatron's TP RNG streams.

    Equal seeds on all ranks keep CPU-initialised weights independent of the TP size; megatron's
    tracker gives each TP rank its own stream for dropout inside tensor-parallel regions.
    """
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2 ** 32))
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    torch.manual_seed(seed)
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    if ps.model_parallel_is_initialized():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def shutdown() -> None:
    """Tear down megatron parallel state and the process group (safe to call twice)."""
    try:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
    except ImportError:  # pragma: no cover
        pass
    if dist.is_initialized():
        dist.destroy_process_group()
