"""The engine interface over SGLang servers: blocking ``generate`` and weight updates.

Weights reach the servers in one of two ways (``weight_sync``):

- ``disk``: the trainer writes an HF checkpoint (safetensors + config.json) into
  ``weights_dir``, which the servers must be able to read, and tells them to load it with
  ``/update_weights_from_disk``;
- ``distributed``: the trainer broadcasts the tensors through a process group the servers join
  (:class:`WeightUpdateGroup`), one bucket at a time, so the whole model is never held at once
  (:meth:`SGLangEngine.send_weights_bucket`). The group is opened at the first update and kept.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import time
from typing import Mapping, Optional, Sequence

import torch

from gvm_mega.rollout.client import SGLangClient
from gvm_mega.rollout.hf_io import save_hf_checkpoint
from gvm_mega.rollout.types import DEFAULT_WEIGHT_VERSION, RolloutRequest, Sample
from gvm_mega.rollout.weight_update_group import WeightUpdateGroup, resolve_backend

WEIGHT_SYNC_MODES = ("disk", "distributed")


class SGLangEngine:
    """``generate(requests)`` / ``update_weights(state_dict, version)`` over an SGLangClient."""

    def __init__(self, client: SGLangClient, hf_config: dict, weights_dir: str, *,
                 extra_files: Optional[dict[str, str]] = None, weight_sync: str = "disk",
                 sync_backend: str = "auto", sync_master_address: Optional[str] = None,
                 sync_timeout_s: float = 300.0, bucket_bytes: int = 256 * 1024 ** 2) -> None:
        if weight_sync not in WEIGHT_SYNC_MODES:
            raise ValueError(f"weight_sync must be one of {WEIGHT_SYNC_MODES}, got {weight_sync!r}")
        self.client = client
        self.hf_config = dict(hf_config)
        self.weights_dir = weights_dir
        self.extra_files = extra_files or {}
        self.weight_sync = weight_sync
        self.bucket_bytes = bucket_bytes
        self.weight_version = DEFAULT_WEIGHT_VERSION
        self.last_sync: dict[str, float] = {}
        self._current_dir: Optional[str] = None
        if weight_sync == "distributed":
            resolve_backend(sync_backend)  # fail at setup, not at the first sync
        self._group_args = dict(backend=sync_backend, master_address=sync_master_address,
                                timeout_s=sync_timeout_s)
        self.update_group: Optional[WeightUpdateGroup] = None

    def generate(self, requests: Sequence[RolloutRequest]) -> list[list[Sample]]:
        return asyncio.run(self.client.generate(requests))

    # ---- weights -------------------------------------------------------------------------
    def update_weights(self, state_dict: dict[str, torch.Tensor], version: str) -> dict[str, float]:
        """Give every server the weights as ``version``; returns the time of each part."""
        if self.weight_sync == "distributed":
            return self._update_distributed(state_dict, str(version))
        start = time.perf_counter()
        path = os.path.join(self.weights_dir, f"weights-{version}")
        save_hf_checkpoint(state_dict, self.hf_config, path, extra_files=self.extra_files)
        written = time.perf_counter()
        asyncio.run(self.client.update_weights_from_disk(os.path.abspath(path), str(version)))
        loaded = time.perf_counter()
        if self._current_dir and self._current_dir != path:
            shutil.rmtree(self._current_dir, ignore_errors=True)
        self._current_dir = path
        self.weight_version = str(version)
        self.last_sync = {"write_s": written - start, "load_s": loaded - written,
                          "total_s": loaded - start}
        return self.last_sync

    def _update_distributed(self, state_dict: dict[str, torch.Tensor],
                            version: str) -> dict[str, float]:
        buckets: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, tensor in state_dict.items():
            nbytes = tensor.numel() * tensor.element_size()
            if buckets[-1] and size + nbytes > self.bucket_bytes:
                buckets.append({})
                size = 0
            buckets[-1][name] = tensor
            size += nbytes
        self.begin_weight_sync()
        for k, bucket in enumerate(buckets):
            self.send_weights_bucket(bucket, version if k == len(buckets) - 1 else None)
        return self.last_sync

    def begin_weight_sync(self) -> None:
        """Open the update group if needed (distributed mode) and reset the sync timings.

        Called before any tensor moves, so a server that cannot join fails the sync up front.
        """
        if self.weight_sync != "distributed":
            raise RuntimeError("begin_weight_sync: this engine syncs weights from disk")
        if self.update_group is None:
            self.update_group = WeightUpdateGroup(self.client, **self._group_args)
        init_s = self.update_group.open()
        self.last_sync = {"init_s": init_s, "send_s": 0.0, "buckets": 0.0, "total_s": init_s}

    def send_weights_bucket(self, bucket: Mapping[str, torch.Tensor],
                            version: Optional[str] = None) -> dict[str, float]:
        """Broadcast one bucket of HF tensors to every server (distributed mode); with
        ``version`` (the last bucket) the servers switch to it."""
        if self.weight_sync != "distributed":
            raise RuntimeError("send_weights_bucket: this engine syncs weights from disk")
        if self.update_group is None or not self.update_group.is_open or not self.last_sync:
            self.begin_weight_sync()
        cost = self.update_group.send(bucket, version)
        for key in ("init_s", "send_s"):
            self.last_sync[key] += cost[key]
            self.last_sync["total_s"] += cost[key]
        self.last_sync["buckets"] += 1
        if version is not None:
            self.weight_version = str(version)
        return cost

    def close(self) -> None:
        """Tear down the update group, if any (servers drop it too)."""
        if self.update_group is not None:
            self.update_group.close()
