"""Per-response gradient norms of ``sum_t log pi(y_t | x, y_<t)`` for a whole batch at once.

One forward pass with hooks that keep each selected layer's inputs and outputs, then one
``torch.autograd.grad`` from the logits to those outputs, seeded with the analytic gradient
of the summed response log-probs. Sequences do not interact in a decoder, so the per-token
output gradients of the batched pass are exactly those of one-sequence-at-a-time passes, and
the kernels turn them into per-sequence squared norms without per-sequence gradients.
Parameter gradients (``.grad``) are neither computed nor touched.

Under tensor parallelism the vocabulary and weight shards give partial sums reduced over the
TP group; under pipeline parallelism each stage runs its slice of the pass (hidden states
and their gradients travel point to point, see :mod:`gvm_mega.gradnorm.pipeline`) and the
stages' partial norms are summed over the pipeline group.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

import kernels
from kernels._dist import all_reduce_
from gvm_mega.gradnorm.batch import SequenceBatch, micro_batches
from gvm_mega.gradnorm.layers import PARAM_SETS, LayerInfo, ModelLayers, find_layers, unwrap
from gvm_mega.gradnorm.pipeline import StageLinks

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


def _tensor_parallel_group() -> Optional[Any]:
    """Megatron's tensor-parallel group, if its parallel state is initialised."""
    try:
        from megatron.core import parallel_state as ps
    except Exception:
        return None
    return ps.get_tensor_model_parallel_group() if ps.model_parallel_is_initialized() else None


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
        self.stage = StageLinks.from_megatron() if self.layers.megatron else StageLinks()
        self.tp_group = tp_group if tp_group is not None else (
            _tensor_parallel_group() if self.layers.megatron else None)
        # the table is shared even where a pipeline stage holds only one of its two uses
        self.tied = self.layers.tied or bool(
            self.layers.megatron and getattr(unwrap(model), "share_embeddings_and_output_weights",
                                             False))
        self._check_layers()

    def _check_layers(self) -> None:
        L, st = self.layers, self.stage
        if self.params == "embedding" and st.first and L.embedding is None:
            raise ValueError("gvm.grad_norm_params=embedding but the model has no word embedding")
        if (self.params == "lm_head" or self.tied) and st.last and L.output is None:
            raise ValueError("the model has no output layer named output_layer or lm_head")
        if self.params == "linear" and st.single and not L.linears:
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
        """Squared per-response norms, ``(B,)`` float64 on the CPU, in batch order.

        Under pipeline parallelism every stage of the pipeline must call this with the same
        batch; micro-batches go through the stages a window of ``pp`` at a time (all forward,
        then all backward), and every stage returns the full result.
        """
        out = torch.zeros(batch.size, dtype=torch.float64)
        inner = unwrap(self.model)
        was_training = inner.training
        inner.eval()
        device = next(inner.parameters()).device
        groups = micro_batches(batch.lengths, self.max_tokens)
        try:
            for start in range(0, len(groups), self.stage.size):
                window = groups[start:start + self.stage.size]
                parts = self._window([batch.select(rows).to(device) for rows in window])
                for rows, part in zip(window, parts):
                    out[torch.as_tensor(rows)] = part.detach().double().cpu()
        finally:
            if not self.stage.first:
                inner.set_input_tensor(None)
            inner.train(was_training)
        return self.stage.sum_over_stages(out, device)

    def norms(self, batch: SequenceBatch) -> torch.Tensor:
        """Per-response gradient norms ``||d log pi(y|x) / d theta||``, ``(B,)`` float64."""
        return self.sq_norms(batch).clamp_min(0).sqrt()

    # ----------------------------------------------------------------- internals
    @property
    def _forward_only(self) -> bool:
        """The untied output layer's gradient is analytic in the logits: no backward pass."""
        return self.params == "lm_head" and not self.tied

    @property
    def _uses_embedding(self) -> bool:
        return self.params == "embedding" or (self.params == "lm_head" and self.tied)

    @property
    def _uses_output(self) -> bool:
        return self.params == "lm_head" or (self.params == "embedding" and self.tied)

    def _watched(self) -> list[LayerInfo]:
        """This stage's layers whose activations (and output gradients) the norms need."""
        L = self.layers
        if self.params == "linear":
            return list(L.linears)
        watched = [L.embedding] if self._uses_embedding and L.embedding is not None else []
        if self._uses_output and L.output is not None:
            watched.append(L.output)
        return watched

    def _window(self, mbs: list[SequenceBatch]) -> list[torch.Tensor]:
        """This stage's partial squared norms of each micro-batch."""
        passes = [self._forward(mb) for mb in mbs]
        totals = [p.head_norms() if self.stage.last else p.zeros() for p in passes]
        if self._forward_only:
            return totals
        for p, total in zip(passes, totals):
            total += self._backward(p)
        if self.tied and self._uses_embedding:
            self._tied_cross_terms(passes, totals)
        return totals

    def _forward(self, mb: SequenceBatch) -> "_StagePass":
        L, st = self.layers, self.stage
        backward = not self._forward_only
        inner = unwrap(self.model)
        inp = None
        if not st.first:
            B, T = mb.input_ids.shape
            param = next(inner.parameters())
            inp = st.recv_forward((T, B, inner.config.hidden_size), param.dtype, param.device)
            inp.requires_grad_(backward)
            inner.set_input_tensor(inp)
        # the backward stops at the embedding output (first stage) or at the received hidden
        # states (later stages), so no parameter needs to require grad
        cut = L.embedding if (backward and st.first) else None
        cap = _Capture(self._watched(), cut)
        try:
            with torch.set_grad_enabled(backward), \
                    _NoParamGrads(self.model, backward and (cut is not None or inp is not None)):
                out = self.forward_fn(self.model, mb)
        finally:
            cap.remove()
        if not st.last:
            st.send_forward(out)
        return _StagePass(self, mb, out, inp, cap.seen)

    def _backward(self, p: "_StagePass") -> torch.Tensor:
        """Gradients from this stage's output back to its input; this stage's layer norms."""
        L, st = self.layers, self.stage
        grad_out = p.seed if st.last else st.recv_backward(p.out)
        watched = [L.embedding] if (self._uses_embedding and st.first) else \
            (list(L.linears) if self.params == "linear" else [])
        outputs = [p.seen[info.name][1] for info in watched]
        for info, o in zip(watched, outputs):
            if not o.requires_grad:
                raise RuntimeError(f"output of {info.name!r} does not require grad: the model "
                                   "needs a word embedding or parameters that require grad")
        wrt = outputs + ([p.inp] if p.inp is not None else [])
        total = p.zeros()
        if not wrt:
            return total
        grads = torch.autograd.grad(p.out, wrt, grad_outputs=grad_out)
        if p.inp is not None:
            st.send_backward(grads[-1])
        if self._uses_embedding and st.first:
            info = L.embedding
            p.emb_grad = grads[0].detach()
            total += kernels.embedding_sq_norms(
                p.seen[info.name][0], p.emb_grad, p.mb.token_mask, vocab_start=info.vocab_start,
                vocab_end=info.vocab_end, group=self.tp_group if info.weight_sharded else None,
                backend=self.backend)
            return total
        sharded = torch.zeros_like(total)
        for info, g in zip(watched, grads):
            a = _batch_first(p.seen[info.name][0], info).detach()
            g = _batch_first(g, info).detach()
            w_sq, b_sq = kernels.linear_sq_norms(a, g, p.mb.token_mask, method=self.linear_method,
                                                 backend=self.backend)
            (sharded if info.weight_sharded else total).add_(w_sq.to(total.dtype))
            if getattr(info.module, "bias", None) is not None:
                (sharded if info.bias_sharded else total).add_(b_sq.to(total.dtype))
        all_reduce_(sharded, self.tp_group, "sum")
        return total + sharded

    def _tied_cross_terms(self, passes: list["_StagePass"], totals: list[torch.Tensor]) -> None:
        """``2 <E_b, O_b>`` on the last stage, from the first stage's embedding gradients."""
        st = self.stage
        if st.first and not st.last:
            for p in passes:
                st.send_to_last(p.emb_grad)
            return
        if not st.last:
            return
        L = self.layers
        for p, total in zip(passes, totals):
            if st.first:
                g = p.emb_grad
            else:
                B, T = p.mb.input_ids.shape
                g = st.recv_from_first((B, T, p.hidden.shape[-1]), p.hidden.dtype, p.hidden.device)
            total += kernels.tied_cross_term(
                p.hidden, p.mb.targets, p.mb.loss_mask, p.mb.input_ids, g, logits=p.logits,
                lse=p.lse, token_mask=p.mb.token_mask, vocab_start=p.vocab_start,
                group=p.out_group, chunk_size=self.vocab_chunk, backend=self.backend).to(total.dtype)


class _StagePass:
    """One micro-batch's forward through this stage: what the norms and the backward need."""

    def __init__(self, est: GradNormEstimator, mb: SequenceBatch, out: torch.Tensor,
                 inp: Optional[torch.Tensor], seen: dict):
        self.est, self.mb, self.out, self.inp, self.seen = est, mb, out, inp, seen
        self.seed: Optional[torch.Tensor] = None
        self.emb_grad: Optional[torch.Tensor] = None
        self.hidden: Optional[torch.Tensor] = None
        self.logits: Optional[torch.Tensor] = None
        self.lse: Optional[torch.Tensor] = None
        self.vocab_start, self.out_group = 0, None

    def zeros(self) -> torch.Tensor:
        return torch.zeros(self.mb.input_ids.shape[0], device=self.out.device,
                           dtype=kernels.reference.compute_dtype(self.out))

    def head_norms(self) -> torch.Tensor:
        """Last stage: the output layer's norms from the logits, and the backward seed."""
        est, mb = self.est, self.mb
        L = est.layers
        B, T = mb.input_ids.shape
        logits = self.out
        if logits.dim() != 3 or tuple(logits.shape[:2]) != (B, T):
            raise ValueError(f"forward_fn must return logits of shape ({B}, {T}, vocab), "
                             f"got {tuple(logits.shape)}")
        self.vocab_start = L.output.vocab_start if L.output is not None else 0
        self.out_group = est.tp_group if (L.output is not None and L.output.weight_sharded) else None
        if L.output is not None and L.output.vocab_end is not None and \
                logits.shape[-1] != L.output.vocab_end - L.output.vocab_start:
            self.vocab_start, self.out_group = 0, None  # logits gathered over the vocabulary
        self.logits = logits.detach()
        self.lse = kernels.vocab_parallel_logsumexp(self.logits, group=self.out_group,
                                                    chunk_size=est.vocab_chunk)
        total = self.zeros()
        if est._uses_output:
            self.hidden = _batch_first(self.seen[L.output.name][0], L.output).detach()
            total += kernels.lm_head_sq_norms(
                self.hidden, mb.targets, mb.loss_mask, logits=self.logits, lse=self.lse,
                vocab_start=self.vocab_start, group=self.out_group, chunk_size=est.vocab_chunk,
                backend=est.backend).to(total.dtype)
        if not est._forward_only:
            self.seed = kernels.logprob_grad_of_logits(self.logits, mb.targets, mb.loss_mask,
                                                       lse=self.lse, vocab_start=self.vocab_start,
                                                       group=self.out_group)
        return total
