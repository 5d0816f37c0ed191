"""Weight sync: the policy's megatron weights (TP/PP shards) into the rollout engine.

After each policy step every rank calls :func:`sync_weights`. The weights are gathered into HF
layout on the driver (global rank 0) one bucket at a time:

- an :class:`EmbeddedEngine` takes each bucket in memory as it arrives
  (``update_weights(bucket, strict=False)``), so the driver holds one bucket beyond the
  engine's own copy; the new weight version is set once the last bucket is in;
- an :class:`SGLangEngine` with ``weight_sync="distributed"`` broadcasts each bucket to the
  servers as it arrives (``send_weights_bucket``, through a process group the servers join,
  opened at the first sync and kept); the last bucket carries the new version;
- any other engine (an :class:`SGLangEngine` syncing from disk) gets the gathered state dict in
  one ``update_weights(state_dict, version)``: safetensors written, then every server told to
  load them with ``/update_weights_from_disk`` (the driver holds the whole model once, as the
  writer needs it).

An engine failure on the driver in the middle of the stream does not strand the other ranks:
the driver keeps taking part in the gather and the error is raised on every rank at the end.

Call it between rollouts: while buckets stream in, the engine holds a mix of old and new tensors.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

from gvm_mega.models.hf_weights import (DEFAULT_BUCKET_BYTES, HFBucketPlan,
                                        iter_mcore_to_hf_buckets, plan_hf_buckets)
from gvm_mega.rollout.embedded import EmbeddedEngine

__all__ = ["DEFAULT_BUCKET_BYTES", "SyncReport", "sync_weights"]


@dataclass
class SyncReport:
    """What one weight sync cost. Sizes are the whole model's (the same on every rank); times
    are this rank's (the driver's include handing the weights to the engine)."""

    version: str
    mode: str            # "memory" (embedded engine), "distributed" (broadcast) or "disk"
    gather_s: float      # waiting for buckets: TP/PP collectives, merges, copies to CPU
    load_s: float        # handing weights to the engine (disk: write + servers' reload;
                         # distributed: joining the group the first time + broadcasts)
    total_s: float
    bytes: int
    buckets: int
    tensors: int
    max_bucket_bytes: int
    engine_detail: dict[str, float] = field(default_factory=dict)

    def as_metrics(self, prefix: str = "weight_sync/") -> dict[str, float]:
        """Flat numeric metrics for the run log."""
        out = {k: v for k, v in asdict(self).items() if isinstance(v, (int, float))}
        out.update({f"engine_{k}": v for k, v in self.engine_detail.items()})
        return {prefix + k: float(v) for k, v in out.items()}


def _mode_of(engine: Any, plan: HFBucketPlan) -> str:
    """How the driver hands weights to ``engine``, or an ``error:`` line (checked before any
    weight moves, so a mismatch fails on every rank instead of stranding them mid-stream)."""
    if engine is None:
        return "error: sync_weights needs the rollout engine on the driver (global rank 0)"
    if isinstance(engine, EmbeddedEngine):
        current = engine.decoder.w
        for bucket in plan.buckets:
            for unit in bucket:
                for name, shape in unit.tensors:
                    if name not in current:
                        return (f"error: sync_weights: the embedded engine has no tensor {name!r}; "
                                "build it from the policy's full HF state dict")
                    if tuple(current[name].shape) != tuple(shape):
                        return (f"error: sync_weights: {name} is {tuple(shape)} in the policy "
                                f"but {tuple(current[name].shape)} in the embedded engine")
        return "memory"
    if getattr(engine, "weight_sync", None) == "distributed" and \
            callable(getattr(engine, "send_weights_bucket", None)):
        try:
            engine.begin_weight_sync()  # a server that cannot join fails before any gather
        except Exception as exc:
            return f"error: sync_weights: the weight update group did not open: {exc}"
        return "distributed"
    if callable(getattr(engine, "update_weights", None)):
        return "disk"
    return (f"error: sync_weights: {type(engine).__name__} has no "
            "update_weights(state_dict, version)")


def sync_weights(model: torch.nn.Module, engine: Any, version: str | int, *,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> SyncReport:
    """Gather the policy's weights into HF layout on the driver and load them into ``engine``.

    Collective: every rank of the world calls it with its own ``model`` (the megatron module,
    DDP-wrapped or not); ``engine`` is used on global rank 0 only (pass None elsewhere).
    A bad engine on the driver raises the same ValueError on every rank.
    """
    if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be a positive integer, got {bucket_bytes!r}")
    version = str(version)
    driver = dist.get_rank() == 0
    start = time.perf_counter()
    plan = plan_hf_buckets(model, bucket_bytes)
    holder = [_mode_of(engine, plan) if driver else None]
    dist.broadcast_object_list(holder, src=0)
    mode = holder[0]
    if mode.startswith("error: "):
        raise ValueError(mode[len("error: "):])

    gather_s = load_s = 0.0
    state: Optional[dict[str, torch.Tensor]] = {} if mode == "disk" else None
    failure: Optional[str] = None
    last = len(plan.buckets) - 1
    mark = time.perf_counter()
    gather_s += mark - start
    for index, bucket in enumerate(iter_mcore_to_hf_buckets(model, plan=plan)):
        got = time.perf_counter()
        gather_s += got - mark
        if driver and failure is None:
            try:
                if mode == "distributed":
                    engine.send_weights_bucket(bucket, version if index == last else None)
                elif state is None:
                    engine.update_weights(bucket, None, strict=False)
                else:
                    state.update(bucket)
            except Exception as exc:  # keep gathering: the other ranks are in the collectives
                failure = f"sync_weights: bucket {index}: {type(exc).__name__}: {exc}"
        del bucket
        mark = time.perf_counter()
        load_s += mark - got
    detail: dict[str, float] = {}
    if driver and failure is None:
        try:
            if mode == "memory":
                engine.update_weights({}, version, strict=False)  # every bucket is in: new version
            elif mode == "disk":
                engine.update_weights(state, version)
            if mode != "memory":
                costs = getattr(engine, "last_sync", None) or {}
                detail = {k: float(v) for k, v in costs.items()}
        except Exception as exc:
            failure = f"sync_weights: {type(exc).__name__}: {exc}"
        state = None
        load_s += time.perf_counter() - mark
    holder = [failure]
    dist.broadcast_object_list(holder, src=0)
    if holder[0] is not None:
        raise RuntimeError(holder[0])
    return SyncReport(version=version, mode=mode, gather_s=gather_s, load_s=load_s,
                      total_s=time.perf_counter() - start, bytes=plan.total_bytes,
                      buckets=len(plan.buckets), tensors=plan.num_tensors,
                      max_bucket_bytes=max((plan.bucket_bytes_of(i)
                                            for i in range(len(plan.buckets))), default=0),
                      engine_detail=detail)
