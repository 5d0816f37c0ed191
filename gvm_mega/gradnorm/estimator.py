"""Per-response gradient norms of ``sum_t log pi(y_t | x, y_<t)`` for a whole batch at once.

One forward pass with hooks that keep each selected layer's inputs and outputs, then one
``torch.autograd.grad`` from the logits to those outputs, seeded with the analytic gradient
of the summed response log-probs. Sequences do not interact in a decoder, so the per-token
output gradients of the batched pass are exactly those of one-sequence-at-a-time passes, and
the kernels turn them into per-sequence squared norms without per-sequence gradients.
Parameter gradients (``.grad``) are neither computed nor touched.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

import kernels
from kernels._dist import all_reduce_
from gvm_mega.gradnorm.batch import SequenceBatch, micro_batches
from gvm_mega.gradnorm.layers import PARAM_SETS, LayerInfo, ModelLayers, find_layers, unwrap

ForwardFn = Callable[[nn.Module, SequenceBatch], torch.Tensor]


def default_forward(model: nn.Module, batch: SequenceBatch) -> torch.Tensor:
    """Logits ``(B, T, V_local)``: megatron ``GPTModel(ids, positions, None)`` or ``model(ids)``."""
    if find_layers(model).megatron:
        out = model(batch.input_ids, batch.position_ids, None)
    else:
        out = model(batch.input_ids)
    if hasattr(out, "logits"):
        out = out.logits
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out


def _megatron_groups() -> tuple[Optional[Any], int]:
    """(tensor-parallel group, pipeline size) from megatron's parallel state, if initialised."""
    try:
        from megatron.core import parallel_state as ps
    except Exception:
        return None, 1
    if not ps.model_parallel_is_initialized():
        return None, 1
    return ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_world_size()


class _Capture:
    """Forward hooks that keep ``(first input, first output)`` of each watched module.

    With ``cut`` (the word embedding) that module's output is replaced by a detached leaf
    that requires grad, so the pass needs no parameter to require grad: the backward stops
    at the embedding output, and megatron's linear layers, which otherwise always compute
    their weight gradients, take their frozen-weight path (input gradients only).
    """

    def __init__(self, infos: list[LayerInfo], cut: Optional[LayerInfo] = None):
        self.seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        names = {info.name for info in infos}
        self._handles = [info.module.register_forward_hook(self._hook(info.name, True))
                         for info in infos]
        if cut is not None and cut.name not in names:
            self._handles.append(cut.module.register_forward_hook(self._hook(cut.name, False)))
        self._cut = cut.name if cut is not None else None

    def _hook(self, name: str, keep: bool):
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            out = output[0] if isinstance(output, (tuple, list)) else output
            replaced = None
            if name == self._cut and isinstance(output, torch.Tensor):
                out = replaced = output.detach().requires_grad_()
            if keep:
                self.seen[name] = (args[0], out)
            return replaced
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class _NoParamGrads:
    """Temporarily sets ``requires_grad=False`` on every parameter (restored on exit)."""

    def __init__(self, model: nn.Module, active: bool):
        self._params = [p for p in model.parameters() if p.requires_grad] if active else []

    def __enter__(self) -> None:
        for p in self._params:
            p.requires_grad_(False)

    def __exit__(self, *exc: Any) -> None:
        for p in self._params:
            p.requires_grad_(True)


def _batch_first(t: torch.Tensor, info: LayerInfo) -> torch.Tensor:
    return t.transpose(0, 1) if info.seq_first else t


class GradNormEstimator:
    """Per-response gradient norms over one parameter set (see :data:`PARAM_SETS`).

    ``params``: ``embedding`` (word-embedding table), ``lm_head`` (output weight), or
    ``linear`` (every linear layer but the output layer, weights and biases). With tied
    embeddings ``embedding`` and ``lm_head`` name the same table and both include its
    input and output gradient parts. ``tp_group`` defaults to megatron's tensor-parallel
    group; ``max_tokens`` bounds the padded tokens of one micro-batch.
    """

    def __init__(
        self,
        model: nn.Module,
        params: str = "embedding",
        *,
        tp_group: Optional[Any] = None,
        forward_fn: Optional[ForwardFn] = None,
        backend: str = "auto",
        max_tokens: int = 4096,
        vocab_chunk: int = kernels.DEFAULT_VOCAB_CHUNK,
        linear_method: str = "auto",
    ):
        if params not in PARAM_SETS:
            raise ValueError(f"gvm.grad_norm_params must be one of {', '.join(PARAM_SETS)}, "
                             f"got {params!r}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.model = model
        self.params = params
        self.layers: ModelLayers = find_layers(model)
        self.forward_fn = forward_fn or default_forward
        self.backend = backend
        self.max_tokens = max_tokens
        self.vocab_chunk = vocab_chunk
        self.linear_method = linear_method
        mega_tp, pp = _megatron_groups() if self.layers.megatron else (None, 1)
        if pp > 1:
            raise NotImplementedError("the gradient-norm estimator runs on the whole model: "
                                      "pipeline parallel size must be 1 for this pass")
        self.tp_group = tp_group if tp_group is not None else mega_tp
        self._check_layers()

    def _check_layers(self) -> None:
        L = self.layers
        needs_output = self.params == "lm_head" or L.tied
        if self.params == "embedding" and L.embedding is None:
            raise ValueError("gvm.grad_norm_params=embedding but the model has no word embedding")
        if needs_output and L.output is None:
            raise ValueError("the model has no output layer named output_layer or lm_head")
        if self.params == "linear" and not L.linears:
            raise ValueError("gvm.grad_norm_params=linear but the model has no linear layers")
        if L.tied and (L.embedding.vocab_start != L.output.vocab_start):
            raise ValueError("tied embedding and output layer shard the vocabulary differently")

    @classmethod
    def from_config(cls, model: nn.Module, config: Any, **kwargs: Any) -> "GradNormEstimator":
        """Parameter set from ``gvm.grad_norm_params``, micro-batch size from
        ``parallel.micro_batch_tokens``."""
        kwargs.setdefault("max_tokens", config.parallel.micro_batch_tokens)
        return cls(model, config.gvm.grad_norm_params, **kwargs)

    # ----------------------------------------------------------------- public
    def sq_norms(self, batch: SequenceBatch) -> torch.Tensor:
        """Squared per-response norms, ``(B,)`` float64 on the CPU, in batch order."""
        out = torch.zeros(batch.size, dtype=torch.float64)
        inner = unwrap(self.model)
        was_training = inner.training
        inner.eval()
        try:
            device = next(inner.parameters()).device
            for rows in micro_batches(batch.lengths, self.max_tokens):
                mb = batch.select(rows).to(device)
                out[torch.as_tensor(rows)] = self._micro_batch(mb).detach().double().cpu()
        finally:
            inner.train(was_training)
        return out

    def norms(self, batch: SequenceBatch) -> torch.Tensor:
        """Per-response gradient norms ``||d log pi(y|x) / d theta||``, ``(B,)`` float64."""
        return self.sq_norms(batch).clamp_min(0).sqrt()

    # ----------------------------------------------------------------- internals
    def _watched(self) -> list[LayerInfo]:
        L = self.layers
        if self.params == "linear":
            return list(L.linears)
        watched = [L.embedding] if (self.params == "embedding" or L.tied) else []
        if self.params == "lm_head" or L.tied:
            watched.append(L.output)
        return watched

    def _micro_batch(self, mb: SequenceBatch) -> torch.Tensor:
        L = self.layers
        group = self.tp_group
        forward_only = self.params == "lm_head" and not L.tied  # D is analytic: no backward
        cut = None if forward_only else L.embedding  # the backward stops at the embedding output
        cap = _Capture(self._watched(), cut)
        try:
            with torch.set_grad_enabled(not forward_only), _NoParamGrads(self.model, cut is not None):
                logits = self.forward_fn(self.model, mb)
        finally:
            cap.remove()
        B, T = mb.input_ids.shape
        if logits.dim() != 3 or tuple(logits.shape[:2]) != (B, T):
            raise ValueError(f"forward_fn must return logits of shape ({B}, {T}, vocab), "
                             f"got {tuple(logits.shape)}")
        vocab_start = L.output.vocab_start if L.output is not None else 0
        out_group = group if (L.output is not None and L.output.weight_sharded) else None
        if L.output is not None and L.output.vocab_end is not None and \
                logits.shape[-1] != L.output.vocab_end - L.output.vocab_start:
            vocab_start, out_group = 0, None  # logits gathered over the vocabulary already
        detached = logits.detach()
        lse = kernels.vocab_parallel_logsumexp(detached, group=out_group, chunk_size=self.vocab_chunk)
        total = torch.zeros(B, dtype=kernels.reference.compute_dtype(detached), device=detached.device)

        table = self.params != "linear"  # embedding / lm_head; both when tied
        use_embedding = table and (self.params == "embedding" or L.tied)
        use_output = table and (self.params == "lm_head" or L.tied)
        hidden = None
        if use_output:
            hidden = _batch_first(cap.seen[L.output.name][0], L.output).detach()
            total += kernels.lm_head_sq_norms(hidden, mb.targets, mb.loss_mask, logits=detached,
                                              lse=lse, vocab_start=vocab_start, group=out_group,
                                              chunk_size=self.vocab_chunk, backend=self.backend)
        if self.params == "lm_head" and not L.tied:
            return total

        watched = [L.embedding] if use_embedding else list(L.linears)
        outputs = [cap.seen[info.name][1] for info in watched]
        for info, o in zip(watched, outputs):
            if not o.requires_grad:
                raise RuntimeError(f"output of {info.name!r} does not require grad: the model "
                                   "needs a word embedding or parameters that require grad")
        seed = kernels.logprob_grad_of_logits(detached, mb.targets, mb.loss_mask, lse=lse,
                                              vocab_start=vocab_start, group=out_group)
        grads = torch.autograd.grad(logits, outputs, grad_outputs=seed)

        if use_embedding:
            info = L.embedding
            ids = cap.seen[info.name][0]
            g = grads[0].detach()
            emb_group = group if info.weight_sharded else None
            total += kernels.embedding_sq_norms(ids, g, mb.token_mask, vocab_start=info.vocab_start,
                                                vocab_end=info.vocab_end, group=emb_group,
                                                backend=self.backend)
            if L.tied:
                total += kernels.tied_cross_term(hidden, mb.targets, mb.loss_mask, ids, g,
                                                 logits=detached, lse=lse, token_mask=mb.token_mask,
                                                 vocab_start=vocab_start, group=out_group,
                                                 chunk_size=self.vocab_chunk, backend=self.backend)
            return total

        sharded = torch.zeros_like(total)
        for info, g in zip(watched, grads):
            a = _batch_first(cap.seen[info.name][0], info).detach()
            g = _batch_first(g, info).detach()
            w_sq, b_sq = kernels.linear_sq_norms(a, g, mb.token_mask, method=self.linear_method,
                                                 backend=self.backend)
            (sharded if info.weight_sharded else total).add_(w_sq.to(total.dtype))
            if getattr(info.module, "bias", None) is not None:
                (sharded if info.bias_sharded else total).add_(b_sq.to(total.dtype))
        all_reduce_(sharded, group, "sum")
        return total + sharded
