"""Rollouts: one engine interface, ``generate(requests) -> samples per request``.

- :class:`EmbeddedEngine`: in-process Llama/Qwen2 decoder with a KV cache (CPU default).
- :class:`SGLangClient` / :class:`SGLangEngine`: SGLang servers or an sglang-router over HTTP.
- :class:`WeightUpdateGroup`: weights broadcast to SGLang servers through a process group
  they join (``/init_weights_update_group`` + ``/update_weights_from_distributed``).
- :class:`RolloutServer`: SGLang's HTTP API over the embedded engine (``gvm-mega serve``).
- :func:`save_hf_checkpoint`: write HF weights for servers to load after a policy step.
- :func:`sync_weights`: after a policy step, stream the megatron weights (TP/PP shards) in HF
  layout into the engine, bucket by bucket, and report the time it took (:class:`SyncReport`).

Weights enter through ``update_weights(state_dict, version)`` with HF tensor names.
"""
from gvm_mega.rollout.client import RolloutError, SGLangClient
from gvm_mega.rollout.decoder import DecoderConfig
from gvm_mega.rollout.embedded import EmbeddedEngine, sample_seed
from gvm_mega.rollout.factory import build_engine, client_from_config, sampling_from_config
from gvm_mega.rollout.hf_io import load_hf_state_dict, save_hf_checkpoint
from gvm_mega.rollout.protocol import BadRequest, parse_generate_body, sample_to_json
from gvm_mega.rollout.remote import SGLangEngine
from gvm_mega.rollout.server import RolloutServer
from gvm_mega.rollout.text import load_text_codec
from gvm_mega.rollout.types import (DEFAULT_WEIGHT_VERSION, RolloutEngine, RolloutRequest,
                                    Sample, SamplingParams)
from gvm_mega.rollout.weight_sync import SyncReport, sync_weights
from gvm_mega.rollout.weight_update_group import WeightUpdateGroup, join_update_group

__all__ = [
    "BadRequest", "DEFAULT_WEIGHT_VERSION", "DecoderConfig", "EmbeddedEngine", "RolloutEngine",
    "RolloutError", "RolloutRequest", "RolloutServer", "SGLangClient", "SGLangEngine", "Sample",
    "SamplingParams", "load_hf_state_dict", "load_text_codec", "parse_generate_body",
    "build_engine", "client_from_config", "sample_seed", "sample_to_json", "sampling_from_config",
    "save_hf_checkpoint", "SyncReport", "sync_weights", "WeightUpdateGroup", "join_update_group",
]
