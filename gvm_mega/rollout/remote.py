"""The engine interface over SGLang servers: blocking ``generate`` and ``update_weights``.

Weights reach the servers through the file system: the trainer writes an HF checkpoint
(safetensors + config.json) into ``weights_dir``, which the servers must be able to read, and
tells them to load it with ``/update_weights_from_disk``.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import time
from typing import Optional, Sequence

import torch

from gvm_mega.rollout.client import SGLangClient
from gvm_mega.rollout.hf_io import save_hf_checkpoint
from gvm_mega.rollout.types import DEFAULT_WEIGHT_VERSION, RolloutRequest, Sample


class SGLangEngine:
    """``generate(requests)`` / ``update_weights(state_dict, version)`` over an SGLangClient."""

    def __init__(self, client: SGLangClient, hf_config: dict, weights_dir: str, *,
                 extra_files: Optional[dict[str, str]] = None) -> None:
        self.client = client
        self.hf_config = dict(hf_config)
        self.weights_dir = weights_dir
        self.extra_files = extra_files or {}
        self.weight_version = DEFAULT_WEIGHT_VERSION
        self.last_sync: dict[str, float] = {}
        self._current_dir: Optional[str] = None

    def generate(self, requests: Sequence[RolloutRequest]) -> list[list[Sample]]:
        return asyncio.run(self.client.generate(requests))

    def update_weights(self, state_dict: dict[str, torch.Tensor], version: str) -> dict[str, float]:
        """Write the weights, make every server load them, and return the time of each part."""
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
