"""The policy model: megatron-core GPTModel from config, and HF weights in and out.

Entry points: :func:`build_gpt_model`, :func:`model_config_from_hf`, :func:`load_hf_into_mcore`,
:func:`export_mcore_to_hf` / :func:`mcore_to_hf_state_dict`, and the megatron
dist-checkpoint pair :func:`save_mcore_checkpoint` / :func:`load_mcore_checkpoint`.
"""
from gvm_mega.models.arch import (
    check_model_parallel_fit,
    head_dim,
    hf_config_from_model_config,
    model_config_from_hf,
    qkv_bias,
)
from gvm_mega.models.gpt import build_gpt_model, layer_spec, transformer_config
from gvm_mega.models.hf_weights import (
    HFCheckpointReader,
    export_mcore_to_hf,
    hf_param_names,
    load_hf_into_mcore,
    mcore_to_hf_state_dict,
    save_hf_state_dict,
)
from gvm_mega.models.mcore_checkpoint import (
    load_mcore_checkpoint,
    read_mcore_metadata,
    save_mcore_checkpoint,
)

__all__ = ["HFCheckpointReader", "build_gpt_model", "check_model_parallel_fit",
           "export_mcore_to_hf", "head_dim", "hf_config_from_model_config", "hf_param_names",
           "layer_spec", "load_hf_into_mcore", "load_mcore_checkpoint", "mcore_to_hf_state_dict",
           "model_config_from_hf", "qkv_bias", "read_mcore_metadata", "save_hf_state_dict",
           "save_mcore_checkpoint", "transformer_config"]
