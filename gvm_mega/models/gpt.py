"""Build the policy: a megatron-core GPTModel from the ``model`` config section.

The model is split according to the megatron parallel state already set up by
:func:`gvm_mega.parallel.init_distributed`. On CPU it uses megatron's local (pure torch) layer
spec; on GPU the transformer-engine spec when transformer-engine imports, else the local one.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from gvm_mega.config.schema import ModelConfig
from gvm_mega.models.arch import check_model_parallel_fit, head_dim, qkv_bias

__all__ = ["build_gpt_model", "transformer_config", "layer_spec", "transformer_engine_available"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def transformer_engine_available() -> bool:
    """True when transformer-engine's torch extension imports (it raises non-ImportErrors too)."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # an empty meta package raises RuntimeError
        return False
    return True


def transformer_config(cfg: ModelConfig, *, tp: Optional[int] = None, pp: Optional[int] = None,
                       perform_initialization: bool = True, **overrides: Any):
    """megatron ``TransformerConfig`` for ``cfg`` at the current (or given) TP/PP sizes."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_config import TransformerConfig

    tp = ps.get_tensor_model_parallel_world_size() if tp is None else tp
    pp = ps.get_pipeline_model_parallel_world_size() if pp is None else pp
    check_model_parallel_fit(cfg, tp, pp)
    dtype = _DTYPES[cfg.params_dtype]
    kwargs: dict[str, Any] = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=head_dim(cfg),
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=qkv_bias(cfg),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype is torch.bfloat16,
        fp16=dtype is torch.float16,
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=perform_initialization,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def layer_spec(use_transformer_engine: Optional[bool] = None):
    """The decoder layer spec: transformer-engine on GPU when importable, else local modules."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_transformer_engine is None:
        use_transformer_engine = torch.cuda.is_available() and transformer_engine_available()
    if use_transformer_engine:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    return gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")


def build_gpt_model(cfg: ModelConfig, *, pre_process: Optional[bool] = None,
                    post_process: Optional[bool] = None, parallel_output: bool = True,
                    perform_initialization: bool = True,
                    use_transformer_engine: Optional[bool] = None, **config_overrides: Any):
    """This rank's part of the GPTModel for ``cfg`` (call after ``init_distributed``).

    ``pre_process``/``post_process`` default to whether this rank is the first/last pipeline
    stage. ``parallel_output=True`` keeps logits split over the vocabulary across TP ranks (what
    vocab-parallel log-probs want). Skip ``perform_initialization`` when weights are loaded next.
    The model config is kept as ``model.gvm_model_config`` for export.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    config = transformer_config(cfg, perform_initialization=perform_initialization,
                                **config_overrides)
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage()
    if post_process is None:
        post_process = ps.is_pipeline_last_stage()
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(use_transformer_engine),
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=cfg.rope_theta,
    )
    if not perform_initialization:
        _mark_tensor_parallel_weights(model)
    if torch.cuda.is_available():
        model = model.cuda(torch.cuda.current_device())
    model.gvm_model_config = cfg
    return model


def _mark_tensor_parallel_weights(model: torch.nn.Module) -> None:
    """Tag split weights as tensor-parallel, as megatron's init functions would have.

    megatron sets ``tensor_model_parallel``/``partition_dim`` on local-spec weights only inside
    its weight initialisers; skipped initialisation leaves them untagged, and grad-norm and
    clipping would then count them as TP duplicates (only on TP rank 0).
    """
    from megatron.core import tensor_parallel as mtp

    split_dim = ((mtp.ColumnParallelLinear, 0), (mtp.RowParallelLinear, 1),
                 (mtp.VocabParallelEmbedding, 0))
    for module in model.modules():
        for cls, dim in split_dim:
            weight = getattr(module, "weight", None)
            if isinstance(module, cls) and isinstance(weight, torch.nn.Parameter) \
                    and not getattr(weight, "tensor_model_parallel", False):
                mtp.set_tensor_model_parallel_attributes(weight, True, dim, 1)
