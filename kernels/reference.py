"""Pure-torch per-sequence squared gradient norms: the CPU default and the test oracle.

Shapes are batch-first: ``(B, T, ...)`` with ``B`` sequences of (padded) length ``T``.
Every function returns a ``(B,)`` tensor of squared norms, in float64 when any input is
float64 and in float32 otherwise.

Notation. ``L_b = sum_t w_bt log p(y_bt | x_b<=t)`` is the quantity whose gradient we take
per sequence; ``w`` is the response mask (0 on prompt and padding). For the output layer,
``dL_b/dlogits_bt = w_bt (onehot(y_bt) - softmax(logits_bt))`` — we call it ``D``. For a
linear layer with inputs ``A_b`` and output gradients ``G_b`` the weight gradient is
``G_b^T A_b`` and ``||G_b^T A_b||^2 = sum_{t,s} (A_b A_b^T)_{ts} (G_b G_b^T)_{ts}`` (the
"ghost norm"), which never forms the per-sequence gradient.

Tensor parallelism. With a vocab-sharded output layer or embedding each rank holds columns
``[vocab_start, vocab_start + V_local)``. The partial ``D D^T`` of a shard contracted with the
replicated ``H H^T`` is linear in ``D D^T``, so summing the contracted per-sequence scalars
over the group equals contracting the summed ``D D^T``; we all-reduce the ``(B,)`` partials
(cheaper than ``(B, T, T)`` matrices). The log-softmax normaliser is reduced over the group
first (max, then sum of exponentials).
"""
from __future__ import annotations

from typing import Any, Iterator, Optional

import torch

from kernels._dist import all_reduce_, group_active

DEFAULT_VOCAB_CHUNK = 4096


def compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float64 if any floating input is float64, else float32 (half types accumulate in fp32)."""
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def _check_3d(name: str, t: torch.Tensor) -> None:
    if t.dim() != 3:
        raise ValueError(f"{name} must have shape (batch, tokens, features), got {tuple(t.shape)}")


def _check_bt(name: str, t: torch.Tensor, B: int, T: int) -> None:
    if tuple(t.shape) != (B, T):
        raise ValueError(f"{name} must have shape ({B}, {T}), got {tuple(t.shape)}")


def _logit_chunks(
    logits: Optional[torch.Tensor],
    hidden: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    chunk_size: int,
    dtype: torch.dtype,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(offset, logits[..., offset:offset+chunk])`` from logits or from ``hidden @ weight^T``."""
    if (logits is None) == (weight is None):
        raise ValueError("pass exactly one of logits= (B, T, V_local) or weight= (V_local, d)")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    V = logits.shape[-1] if logits is not None else weight.shape[0]
    for c0 in range(0, V, chunk_size):
        c1 = min(V, c0 + chunk_size)
        if logits is not None:
            yield c0, logits[..., c0:c1].to(dtype)
        else:
            yield c0, hidden.to(dtype) @ weight[c0:c1].to(dtype).t()


def vocab_parallel_logsumexp(
    logits: Optional[torch.Tensor] = None,
    *,
    hidden: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    group: Optional[Any] = None,
    chunk_size: int = DEFAULT_VOCAB_CHUNK,
) -> torch.Tensor:
    """``log sum_v exp(logits_v)`` over the whole (possibly vocab-sharded) vocabulary, ``(B, T)``.

    Reads the vocabulary in chunks; under tensor parallelism reduces the max and the sum of
    exponentials over ``group``.
    """
    dtype = compute_dtype(logits, hidden, weight)
    if not group_active(group):  # one fused pass per chunk
        out = None
        for _, lc in _logit_chunks(logits, hidden, weight, chunk_size, dtype):
            cl = torch.logsumexp(lc, -1)
            out = cl if out is None else torch.logaddexp(out, cl)
        return out
    m = None
    for _, lc in _logit_chunks(logits, hidden, weight, chunk_size, dtype):
        cm = lc.amax(-1)
        m = cm if m is None else torch.maximum(m, cm)
    all_reduce_(m, group, "max")
    s = torch.zeros_like(m)
    for _, lc in _logit_chunks(logits, hidden, weight, chunk_size, dtype):
        s += torch.exp(lc - m[..., None]).sum(-1)
    all_reduce_(s, group, "sum")
    return m + torch.log(s)


def _grad_logits_chunk(
    lc: torch.Tensor, c0: int, lse: torch.Tensor, local_targets: torch.Tensor, w: torch.Tensor
) -> torch.Tensor:
    """``D`` restricted to columns ``[c0, c0 + C)`` of the local shard (three passes over it)."""
    C = lc.shape[-1]
    d = torch.sub(lc, lse[..., None])
    d.exp_().mul_(-w[..., None])
    idx = local_targets - c0
    hit = ((idx >= 0) & (idx < C)).to(d.dtype) * w
    d.scatter_add_(-1, idx.clamp(0, C - 1)[..., None], hit[..., None])
    return d


def logprob_grad_of_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    *,
    lse: Optional[torch.Tensor] = None,
    vocab_start: int = 0,
    group: Optional[Any] = None,
) -> torch.Tensor:
    """``d(sum_t w_t log p(y_t))/d logits`` for the local vocab shard, in ``logits.dtype``.

    This is the seed of the one backward pass of the estimator.
    """
    _check_3d("logits", logits)
    if lse is None:
        lse = vocab_parallel_logsumexp(logits, group=group)
    dtype = compute_dtype(logits)
    d = _grad_logits_chunk(logits.to(dtype), 0, lse.to(dtype), targets - vocab_start, mask.to(dtype))
    return d.to(logits.dtype)


def lm_head_sq_norms(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    *,
    logits: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None,
    vocab_start: int = 0,
    group: Optional[Any] = None,
    chunk_size: int = DEFAULT_VOCAB_CHUNK,
) -> torch.Tensor:
    """Per-sequence ``||dL_b/dW_out||^2`` fused with the log-softmax, vocab read in chunks.

    ``hidden`` (B, T, d) are the output layer's inputs, ``targets`` (B, T) global token ids,
    ``mask`` (B, T) the response mask; give ``logits`` (B, T, V_local) or the local weight
    shard ``weight`` (V_local, d). Only ``(B, T, chunk)`` of ``D`` exists at a time.
    """
    _check_3d("hidden", hidden)
    B, T, _ = hidden.shape
    _check_bt("targets", targets, B, T)
    _check_bt("mask", mask, B, T)
    dtype = compute_dtype(hidden, logits, weight)
    if lse is None:
        lse = vocab_parallel_logsumexp(logits, hidden=hidden, weight=weight, group=group,
                                       chunk_size=chunk_size)
    lse = lse.to(dtype)
    w = mask.to(dtype)
    local_targets = targets - vocab_start
    gram_d = torch.zeros(B, T, T, dtype=dtype, device=hidden.device)
    for c0, lc in _logit_chunks(logits, hidden, weight, chunk_size, dtype):
        dc = _grad_logits_chunk(lc, c0, lse, local_targets, w)
        gram_d.baddbmm_(dc, dc.transpose(1, 2))
    h = hidden.to(dtype)
    gram_h = torch.bmm(h, h.transpose(1, 2))
    out = (gram_h * gram_d).sum((1, 2))
    return all_reduce_(out, group, "sum")


def tied_cross_term(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    token_ids: torch.Tensor,
    emb_grads: torch.Tensor,
    *,
    logits: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None,
    token_mask: Optional[torch.Tensor] = None,
    vocab_start: int = 0,
    group: Optional[Any] = None,
    chunk_size: int = DEFAULT_VOCAB_CHUNK,
) -> torch.Tensor:
    """``2 <E_b, O_b>`` for a weight shared by the input embedding and the output layer.

    With tied weights the per-sequence gradient is ``E_b + O_b`` (embedding part plus output
    part), so its squared norm is ``||E_b||^2 + ||O_b||^2 + 2 <E_b, O_b>`` and
    ``<E_b, O_b> = sum_{t,s} D_{s, x_t} <g_t, h_s>``: the output-gradient column of each
    input token, read chunk by chunk. ``emb_grads`` (B, T, d) are the embedding output
    gradients, ``token_ids`` (B, T) the inputs.
    """
    _check_3d("hidden", hidden)
    _check_3d("emb_grads", emb_grads)
    B, T, _ = hidden.shape
    for name, t in (("targets", targets), ("mask", mask), ("token_ids", token_ids)):
        _check_bt(name, t, B, T)
    dtype = compute_dtype(hidden, logits, weight, emb_grads)
    if lse is None:
        lse = vocab_parallel_logsumexp(logits, hidden=hidden, weight=weight, group=group,
                                       chunk_size=chunk_size)
    lse = lse.to(dtype)
    w = mask.to(dtype)
    g = emb_grads.to(dtype)
    if token_mask is not None:
        _check_bt("token_mask", token_mask, B, T)
        g = g * token_mask.to(dtype)[..., None]
    local_targets = targets - vocab_start
    local_ids = token_ids - vocab_start
    cols = torch.zeros(B, T, T, dtype=dtype, device=hidden.device)  # cols[b, s, t] = D_{s, x_t}
    for c0, lc in _logit_chunks(logits, hidden, weight, chunk_size, dtype):
        C = lc.shape[-1]
        dc = _grad_logits_chunk(lc, c0, lse, local_targets, w)
        idx = local_ids - c0
        hit = ((idx >= 0) & (idx < C)).to(dtype)
        picked = torch.gather(dc, -1, idx.clamp(0, C - 1)[:, None, :].expand(B, T, T))
        cols += picked * hit[:, None, :]
    inner = torch.bmm(hidden.to(dtype), g.transpose(1, 2))  # inner[b, s, t] = <h_s, g_t>
    out = 2.0 * (inner * cols).sum((1, 2))
    return all_reduce_(out, group, "sum")


def embedding_sq_norms(
    token_ids: torch.Tensor,
    grads: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    vocab_start: int = 0,
    vocab_end: Optional[int] = None,
    group: Optional[Any] = None,
) -> torch.Tensor:
    """Per-sequence ``||dL_b/dE||^2`` for an embedding table from its output gradients.

    Rows hit by equal ids add up: ``sum_{t,s: x_t = x_s} <g_t, g_s>``. Computed exactly by
    summing gradients per (sequence, id) segment, which costs ``O(T d)`` per sequence. Only
    ids in the local shard ``[vocab_start, vocab_end)`` count; partials are summed over
    ``group``. ``mask`` (B, T) drops padding positions.
    """
    _check_3d("grads", grads)
    B, T, d = grads.shape
    _check_bt("token_ids", token_ids, B, T)
    dtype = compute_dtype(grads)
    g = grads.to(dtype)
    local = token_ids.long() - vocab_start
    keep = local >= 0
    if vocab_end is not None:
        keep &= local < (vocab_end - vocab_start)
    if mask is not None:
        _check_bt("mask", mask, B, T)
        keep &= mask != 0
        g = g * mask.to(dtype)[..., None]
    out = torch.zeros(B, dtype=dtype, device=grads.device)
    if not bool(keep.any()):
        return all_reduce_(out, group, "sum")
    span = int(local[keep].max()) + 1
    seq = torch.arange(B, device=grads.device)[:, None].expand(B, T)
    keys = (seq * span + local)[keep]
    uniq, inverse = torch.unique(keys, return_inverse=True)
    sums = torch.zeros(uniq.numel(), d, dtype=dtype, device=grads.device)
    sums.index_add_(0, inverse, g[keep])
    out.index_add_(0, uniq // span, sums.pow(2).sum(-1))
    return all_reduce_(out, group, "sum")


def choose_linear_method(tokens: int, d_in: int, d_out: int) -> str:
    """``"ghost"`` or ``"materialise"`` for one linear layer at sequence length ``tokens``.

    The ghost norm costs ``T^2 (d_in + d_out)`` per sequence and holds ``2 T^2`` numbers;
    materialising costs ``T d_in d_out`` and holds ``d_in d_out``. Ghost wins on compute
    when ``T (d_in + d_out) < d_in d_out``, which also implies the memory condition
    ``2 T^2 < d_in d_out``; otherwise the per-sequence gradient is cheaper.
    """
    return "ghost" if tokens * (d_in + d_out) < d_in * d_out else "materialise"


def linear_sq_norms(
    inputs: torch.Tensor,
    grads: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    method: str = "auto",
    max_materialised: int = 1 << 24,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence ``(||dL_b/dW||^2, ||dL_b/db||^2)`` of a linear layer ``y = x W^T + b``.

    ``inputs`` (B, T, d_in) and ``grads`` = dL/dy (B, T, d_out); ``mask`` (B, T) zeroes
    padding rows. ``method`` is ``"ghost"``, ``"materialise"`` or ``"auto"``
    (:func:`choose_linear_method`). Materialised gradients are formed for a few sequences at
    a time, at most ``max_materialised`` numbers.
    """
    _check_3d("inputs", inputs)
    _check_3d("grads", grads)
    B, T, d_in = inputs.shape
    if grads.shape[:2] != (B, T):
        raise ValueError(f"grads must have shape ({B}, {T}, d_out), got {tuple(grads.shape)}")
    d_out = grads.shape[-1]
    dtype = compute_dtype(inputs, grads)
    a = inputs.to(dtype)
    g = grads.to(dtype)
    if mask is not None:
        _check_bt("mask", mask, B, T)
        m = mask.to(dtype)[..., None]
        a, g = a * m, g * m
    if method == "auto":
        method = choose_linear_method(T, d_in, d_out)
    if method == "ghost":
        w_sq = (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))
    elif method == "materialise":
        step = max(1, max_materialised // max(1, d_in * d_out))
        w_sq = torch.cat([torch.bmm(g[i:i + step].transpose(1, 2), a[i:i + step]).pow(2).sum((1, 2))
                          for i in range(0, B, step)])
    else:
        raise ValueError(f"method must be 'auto', 'ghost' or 'materialise', got {method!r}")
    b_sq = g.sum(1).pow(2).sum(-1)
    return w_sq, b_sq
