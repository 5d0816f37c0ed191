"""Build the configured rollout engine from the ``rollout`` config section."""
from __future__ import annotations

import os
from typing import Any, Optional

import torch

from gvm_mega.rollout.client import SGLangClient
from gvm_mega.rollout.embedded import EmbeddedEngine
from gvm_mega.rollout.remote import SGLangEngine
from gvm_mega.rollout.types import RolloutEngine, SamplingParams


def sampling_from_config(cfg: Any, *, sampling_seed: Optional[int] = None,
                         stop_token_ids: tuple[int, ...] = ()) -> SamplingParams:
    """SamplingParams from a ``RolloutConfig`` (seeded per prompt by the caller)."""
    return SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                          top_p=cfg.top_p, top_k=cfg.top_k, stop=tuple(cfg.stop),
                          stop_token_ids=stop_token_ids, sampling_seed=sampling_seed)


def client_from_config(cfg: Any) -> SGLangClient:
    """An SGLangClient for ``rollout.urls`` (``rollout.worker_urls`` for weight updates)."""
    if not cfg.urls:
        raise ValueError("rollout.urls: the sglang engine needs at least one server or router URL")
    return SGLangClient(cfg.urls, worker_urls=cfg.worker_urls or None,
                        concurrency=cfg.concurrency, request_timeout_s=cfg.request_timeout_s,
                        max_retries=cfg.max_retries, backoff_s=cfg.retry_backoff_s,
                        max_abort_resubmits=cfg.max_abort_resubmits,
                        max_n_per_request=cfg.max_n_per_request,
                        check_weight_version=cfg.check_weight_version)


def build_engine(cfg: Any, hf_config: dict, state_dict: Optional[dict[str, torch.Tensor]] = None,
                 *, tokenizer: Any = None, run_dir: str = ".", seed: int = 0) -> RolloutEngine:
    """``rollout.engine``: the in-process engine (needs ``state_dict``) or SGLang servers.

    Both answer ``generate(requests)`` and ``update_weights(state_dict, version)``.
    """
    if cfg.engine == "embedded":
        if state_dict is None:
            raise ValueError("rollout.engine=embedded needs the initial HF state dict")
        return EmbeddedEngine(hf_config, state_dict, tokenizer=tokenizer, seed=seed,
                              max_batch_size=cfg.max_batch_size)
    if cfg.engine == "sglang":
        weights_dir = cfg.weights_dir or os.path.join(run_dir, "weights")
        return SGLangEngine(client_from_config(cfg), hf_config, weights_dir,
                            weight_sync=cfg.weight_sync, sync_backend=cfg.weight_sync_backend,
                            sync_master_address=cfg.weight_sync_master_address,
                            sync_timeout_s=cfg.weight_sync_timeout_s)
    raise ValueError(f"rollout.engine: unknown engine {cfg.engine!r}")
