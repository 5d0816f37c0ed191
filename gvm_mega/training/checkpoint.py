"""Training checkpoints: model, optimizer, lr schedule, RNG and the caller's state.

Layout under the checkpoint root (a file system every rank sees)::

    ROOT/latest                      name of the newest complete checkpoint, written last
    ROOT/iter_0000042/
        gvm_mega_model.json          model config + layout (also a plain model checkpoint:
        model/                       ``gvm_mega.models.load_mcore_checkpoint`` reads it)
        optimizer/                   megatron dist-checkpoint of the Adam moments
        gvm_mega_checkpoint.json     iteration, layout, update counters, scheduler state
        rng/rank00000.pt ...         each rank's RNG states
        extra.pt                     the caller's state dict (data cursor, prompt statistics)

A checkpoint is written into ``ROOT/.tmp-iter_...`` and renamed into place only once every
rank has finished, then ``latest`` is replaced atomically and checkpoints beyond the newest
``keep_last`` are deleted. A run stopped mid-save leaves a temporary directory that the next
save clears, and ``latest`` still names the previous complete checkpoint.

Model and optimizer state are megatron ``dist_checkpointing`` sharded tensors keyed by the
parameters' global shapes, so both load into any TP/PP/DP layout (the non-distributed
optimizer's moments are resharded like the weights). RNG states are per rank and only restored
at the layout that wrote them; elsewhere the generators keep their current seeding (the policy
uses no dropout, so the training result does not depend on them).

``dist_checkpointing`` starts worker processes while saving: guard script entry points with
``if __name__ == "__main__":``.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
import torch.distributed as dist

from gvm_mega.config import ConfigError
from gvm_mega.training.schedule import restore_scheduler

if TYPE_CHECKING:
    from gvm_mega.tokenizer import Tokenizer
    from gvm_mega.training.step import Policy

__all__ = ["CheckpointManager", "LoadedCheckpoint", "checkpoint_name"]

FORMAT_VERSION = 1
META_FILE = "gvm_mega_checkpoint.json"
LATEST = "latest"
OPTIMIZER_DIR = "optimizer"
RNG_DIR = "rng"
EXTRA_FILE = "extra.pt"
_NOT_ARCHITECTURE = ("hf_path", "tokenizer")  # where a model came from, not what it is
_NAME = re.compile(r"^iter_(\d{7,})$")


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


@dataclass
class LoadedCheckpoint:
    """What :meth:`CheckpointManager.load` restored."""

    path: Path
    iteration: int
    extra_state: Any
    optimizer_restored: bool
    rng_restored: bool
    saved_layout: dict


def _layout() -> dict:
    from megatron.core import parallel_state as ps

    return {"tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size(), "world": dist.get_world_size()}


def _rng_state() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "tracker": get_cuda_rng_tracker().get_states()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CheckpointManager:
    """Save and restore a :class:`~gvm_mega.training.step.Policy` under ``root``.

    Every method is collective over the whole world (all ranks call it together).
    """

    def __init__(self, root: Union[str, Path], *, keep_last: int = 2,
                 hf_side_dir: Optional[Union[str, Path]] = None,
                 tokenizer: Optional["Tokenizer"] = None) -> None:
        """``hf_side_dir`` and ``tokenizer`` are saved with every checkpoint's weights (see
        :func:`~gvm_mega.models.save_mcore_checkpoint`) so each one converts to a complete HF
        directory."""
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.hf_side_dir = hf_side_dir
        self.tokenizer = tokenizer

    # ------------------------------------------------------------------ discovery
    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints under the root, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _NAME.match(p.name)
            if m and p.is_dir() and (p / META_FILE).is_file():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def latest(self) -> Optional[Path]:
        """The checkpoint ``latest`` names, or None when nothing was saved yet."""
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        name = pointer.read_text(encoding="utf-8").strip()
        path = self.root / name
        if not _NAME.match(name) or not (path / META_FILE).is_file():
            raise ConfigError(f"{pointer}: names {name!r}, which is not a complete checkpoint "
                              f"under {self.root}")
        return path

    # ------------------------------------------------------------------ save
    def save(self, policy: "Policy", iteration: int, extra_state: Any = None) -> Path:
        """Write checkpoint ``iteration``; ``extra_state`` is taken from global rank 0."""
        from megatron.core import dist_checkpointing

        from gvm_mega.models import save_mcore_checkpoint

        if iteration < 0:
            raise ValueError(f"iteration must be >= 0, got {iteration}")
        rank = dist.get_rank()
        name = checkpoint_name(iteration)
        tmp = self.root / f".tmp-{name}"
        final = self.root / name
        has_optimizer = policy.optimizer is not None and policy.updates > 0
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-iter_*"):
                shutil.rmtree(stale, ignore_errors=True)
            (tmp / RNG_DIR).mkdir(parents=True)
            if has_optimizer:
                (tmp / OPTIMIZER_DIR).mkdir()
        dist.barrier()
        save_mcore_checkpoint(policy.module, tmp, hf_side_dir=self.hf_side_dir,
                              tokenizer=self.tokenizer)
        if has_optimizer:
            model_sd = policy.module.sharded_state_dict()
            dist_checkpointing.save(policy.optimizer.sharded_state_dict(model_sd),
                                    str(tmp / OPTIMIZER_DIR))
        torch.save(_rng_state(), tmp / RNG_DIR / f"rank{rank:05d}.pt")
        if rank == 0:
            meta = {"format": FORMAT_VERSION, "iteration": iteration, "layout": _layout(),
                    "counters": policy.counters(), "optimizer": has_optimizer,
                    "scheduler": policy.scheduler.state_dict() if policy.scheduler else None}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            torch.save(extra_state, tmp / EXTRA_FILE)
        dist.barrier()
        if rank == 0:
            if final.exists():
                old = self.root / f".tmp-old-{name}"
                os.rename(final, old)
                os.rename(tmp, final)
                shutil.rmtree(old)
            else:
                os.rename(tmp, final)
            _write_atomic(self.root / LATEST, name + "\n")
            self._prune(keep=final)
        dist.barrier()
        return final

    def _prune(self, keep: Path) -> None:
        done = self.checkpoints()
        for _, path in done[:max(0, len(done) - self.keep_last)]:
            if path != keep:
                shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------------ load
    def load(self, policy: "Policy", path: Optional[Union[str, Path]] = None, *,
             load_optimizer: bool = True) -> Optional[LoadedCheckpoint]:
        """Restore ``path`` (default: ``latest``) into ``policy``; None if there is none.

        ``path`` may also be a plain model checkpoint (``save_mcore_checkpoint``, ``gvm-mega
        convert``): then only the weights load, as iteration 0. The model config recorded in
        the checkpoint must equal the policy's. With
        ``load_optimizer=False`` (or a checkpoint saved before any update) the optimizer keeps
        its fresh state.
        """
        from megatron.core import dist_checkpointing

        from gvm_mega.models import load_mcore_checkpoint, read_mcore_metadata

        path = self.latest() if path is None else Path(path)
        if path is None:
            return None
        saved_cfg, model_meta = read_mcore_metadata(path)
        diff = [k for k, v in vars(saved_cfg).items()
                if k not in _NOT_ARCHITECTURE and getattr(policy.model_cfg, k) != v]
        if diff:
            raise ConfigError(f"{path}: checkpoint model config differs from the run's in "
                              f"model.{', model.'.join(diff)}")
        meta_path = path / META_FILE
        if not meta_path.is_file():  # a plain model checkpoint: weights only, iteration 0
            load_mcore_checkpoint(policy.module, path)
            dist.barrier()
            return LoadedCheckpoint(path=path, iteration=0, extra_state=None,
                                    optimizer_restored=False, rng_restored=False,
                                    saved_layout=dict(model_meta.get("saved_layout", {})))
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{meta_path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
        if meta.get("format") != FORMAT_VERSION:
            raise ConfigError(f"{meta_path}: unsupported format {meta.get('format')!r} "
                              f"(expected {FORMAT_VERSION})")
        load_mcore_checkpoint(policy.module, path)
        restored_optimizer = False
        if policy.optimizer is not None and load_optimizer and meta["optimizer"]:
            model_sd = policy.module.sharded_state_dict()
            opt_sd = policy.optimizer.sharded_state_dict(model_sd, is_loading=True)
            state = dist_checkpointing.load(opt_sd, str(path / OPTIMIZER_DIR))
            policy.optimizer.load_state_dict(state)
            restored_optimizer = True
        if load_optimizer:  # else a fresh start from these weights: schedule from step 0
            if policy.scheduler is not None and meta.get("scheduler"):
                restore_scheduler(policy.scheduler, meta["scheduler"])
            policy.load_counters(meta.get("counters", {}))
        rng_file = path / RNG_DIR / f"rank{dist.get_rank():05d}.pt"
        same_layout = meta["layout"] == _layout()
        if same_layout and rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=False))
        extra = torch.load(path / EXTRA_FILE, weights_only=False) \
            if (path / EXTRA_FILE).is_file() else None
        dist.barrier()
        return LoadedCheckpoint(path=path, iteration=int(meta["iteration"]), extra_state=extra,
                                optimizer_restored=restored_optimizer,
                                rng_restored=same_layout and rng_file.is_file(),
                                saved_layout=meta["layout"])
