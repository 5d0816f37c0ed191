"""Find the layers whose per-sequence gradient norms the estimator needs, and their layout.

Works on megatron-core models (``VocabParallelEmbedding``, ``ColumnParallelLinear``,
``RowParallelLinear``; activations sequence-first ``[s, b, h]``, vocab and weights sharded
over tensor parallelism) and on plain torch models (``nn.Embedding`` / ``nn.Linear``,
batch-first, nothing sharded). Wrappers with a ``.module`` attribute (DDP, Float16Module)
are looked through.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

PARAM_SETS = ("embedding", "lm_head", "linear")


def _megatron_layers() -> tuple[type, type, type] | None:
    try:
        from megatron.core.tensor_parallel.layers import (
            ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)
    except Exception:  # megatron-core absent or unimportable: plain torch models only
        return None
    return VocabParallelEmbedding, ColumnParallelLinear, RowParallelLinear


@dataclass
class LayerInfo:
    """One layer: its module, activation layout and how its gradient is split over TP ranks."""

    name: str
    module: nn.Module = field(repr=False)
    seq_first: bool = False        # activations are (T, B, ...)
    weight_sharded: bool = False   # partial norms are summed over the tensor-parallel group
    bias_sharded: bool = False
    vocab_start: int = 0           # embedding / output layer: first id of the local shard
    vocab_end: Optional[int] = None


@dataclass
class ModelLayers:
    embedding: Optional[LayerInfo]
    output: Optional[LayerInfo]
    linears: list[LayerInfo] = field(default_factory=list)
    tied: bool = False             # output layer reuses the embedding table
    megatron: bool = False


def unwrap(model: nn.Module) -> nn.Module:
    """The innermost module under DDP / Float16Module style wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def _tp_rank(module: nn.Module) -> int:
    group = getattr(module, "tp_group", None)
    if group is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(group)
    return 0


def find_layers(model: nn.Module) -> ModelLayers:
    """Locate the word embedding, the output layer and the linear layers of ``model``."""
    inner = unwrap(model)
    mega = _megatron_layers()
    vpe, col, row = mega if mega else (None, None, None)
    is_mega = mega is not None and any(isinstance(m, (vpe, col, row)) for m in inner.modules())

    embedding = output = None
    linears: list[LayerInfo] = []
    out_mod = None
    for attr in ("output_layer", "lm_head"):
        if isinstance(getattr(inner, attr, None), nn.Module):
            out_mod = getattr(inner, attr)
            break
    vocab_parallel = [(n, m) for n, m in inner.named_modules() if mega and isinstance(m, vpe)]
    plain = [(n, m) for n, m in inner.named_modules() if isinstance(m, nn.Embedding)]
    if vocab_parallel:  # megatron: the word embedding (position embeddings are nn.Embedding)
        name, mod = max(vocab_parallel, key=lambda nm: "word" in nm[0])
        embedding = LayerInfo(name, mod, weight_sharded=True, vocab_start=mod.vocab_start_index,
                              vocab_end=mod.vocab_end_index)
    elif plain:         # the largest table is the token embedding
        name, mod = max(plain, key=lambda nm: nm[1].num_embeddings)
        embedding = LayerInfo(name, mod, vocab_end=mod.num_embeddings)
    if out_mod is None:
        for name, mod in inner.named_modules():
            if name.split(".")[-1] in ("output_layer", "lm_head"):
                out_mod = mod
    for name, mod in inner.named_modules():
        if mod is out_mod:
            if mega and isinstance(mod, col):
                V_local = mod.output_size_per_partition
                start = _tp_rank(mod) * V_local
                output = LayerInfo(name, mod, seq_first=True, weight_sharded=True,
                                   vocab_start=start, vocab_end=start + V_local)
            elif isinstance(mod, nn.Linear):
                output = LayerInfo(name, mod, vocab_end=mod.out_features)
            else:
                raise TypeError(f"output layer {name!r} is a {type(mod).__name__}, expected "
                                "nn.Linear or megatron ColumnParallelLinear")
        elif mega and isinstance(mod, col):
            linears.append(LayerInfo(name, mod, seq_first=True, weight_sharded=True, bias_sharded=True))
        elif mega and isinstance(mod, row):
            linears.append(LayerInfo(name, mod, seq_first=True, weight_sharded=True))
        elif isinstance(mod, nn.Linear):
            linears.append(LayerInfo(name, mod))

    tied = False
    if output is not None and embedding is not None:
        if is_mega:
            tied = bool(getattr(inner, "share_embeddings_and_output_weights", False))
        else:
            tied = output.module.weight is embedding.module.weight
    return ModelLayers(embedding, output, linears, tied, is_mega)


def output_weight(model: nn.Module, layers: ModelLayers) -> Optional[torch.Tensor]:
    """The output layer's weight (the embedding table when tied)."""
    inner = unwrap(model)
    if layers.tied:
        return layers.embedding.module.weight
    if layers.output is None:
        return None
    w = getattr(layers.output.module, "weight", None)
    if w is None and hasattr(inner, "shared_embedding_or_output_weight"):
        w = inner.shared_embedding_or_output_weight()
    return w


def select_parameters(model: nn.Module, params: str) -> list[nn.Parameter]:
    """The parameters whose joint gradient norm ``params`` names (see :data:`PARAM_SETS`).

    ``embedding``: the word-embedding table; ``lm_head``: the output weight (the same table
    when tied); ``linear``: weights and biases of every linear layer except the output layer.
    """
    if params not in PARAM_SETS:
        raise ValueError(f"gvm.grad_norm_params must be one of {', '.join(PARAM_SETS)}, got {params!r}")
    layers = find_layers(model)
    if params == "embedding":
        if layers.embedding is None:
            raise ValueError("model has no word embedding (nn.Embedding or VocabParallelEmbedding)")
        return [layers.embedding.module.weight]
    if params == "lm_head":
        w = output_weight(model, layers)
        if w is None:
            raise ValueError("model has no output layer named output_layer or lm_head")
        return [w]
    out = []
    for info in layers.linears:
        for p in (info.module.weight, getattr(info.module, "bias", None)):
            if isinstance(p, torch.Tensor):
                out.append(p)
    if not out:
        raise ValueError("model has no linear layers besides the output layer")
    return out
