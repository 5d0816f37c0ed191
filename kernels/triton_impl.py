"""Triton ghost-norm kernels (GPU; CPU tensors only under ``TRITON_INTERPRET=1``).

Each kernel runs one program per (sequence, row tile, column tile) of the ``T x T`` token
grid, visits only the upper triangle (the contraction is symmetric; off-diagonal tiles count
twice), builds its two Gram tiles in registers and writes one partial sum. Partials are
summed in torch, so results do not depend on scheduling (no atomics). Tails of ``T``, the
feature width and the vocabulary are masked, so no length needs to be a multiple of a block.

Importing this module imports triton: the dispatcher imports it only when asked for the
Triton backend, so that ``TRITON_INTERPRET`` can be set before triton is first imported.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import triton
import triton.language as tl

from kernels._dist import all_reduce_
from kernels.reference import vocab_parallel_logsumexp

BLOCK_T = 32
BLOCK_K = 32
BLOCK_V = 64


@triton.jit
def _gram_tile(x_ptr, sxb, sxt, b, rows_i, rows_j, mi, mj, K,
               BT: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr):
    """``X_i X_j^T`` for two row tiles of sequence ``b``, accumulated over ``K`` features."""
    acc = tl.zeros((BT, BT), dtype=ACC)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        mk = rk < K
        xi = tl.load(x_ptr + b * sxb + rows_i[:, None] * sxt + rk[None, :],
                     mask=mi[:, None] & mk[None, :], other=0.0).to(ACC)
        xj = tl.load(x_ptr + b * sxb + rows_j[:, None] * sxt + rk[None, :],
                     mask=mj[:, None] & mk[None, :], other=0.0).to(ACC)
        acc += tl.dot(xi, tl.trans(xj), input_precision="ieee", out_dtype=ACC)
    return acc


@triton.jit
def _linear_ghost_kernel(a_ptr, g_ptr, out_ptr, T, DIN, DOUT, NT,
                         sab, sat, sgb, sgt,
                         BT: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr):
    b = tl.program_id(0)
    i = tl.program_id(1)
    j = tl.program_id(2)
    if j >= i:
        rows_i = i * BT + tl.arange(0, BT)
        rows_j = j * BT + tl.arange(0, BT)
        mi = rows_i < T
        mj = rows_j < T
        ga = _gram_tile(a_ptr, sab, sat, b, rows_i, rows_j, mi, mj, DIN, BT, BK, ACC)
        gg = _gram_tile(g_ptr, sgb, sgt, b, rows_i, rows_j, mi, mj, DOUT, BT, BK, ACC)
        part = tl.sum(tl.sum(ga * gg, axis=1), axis=0)
        part = part * tl.where(j > i, 2.0, 1.0)
        tl.store(out_ptr + (b * NT + i) * NT + j, part)


@triton.jit
def _embedding_ghost_kernel(ids_ptr, g_ptr, out_ptr, T, D, NT, sib, sgb, sgt,
                            BT: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr):
    b = tl.program_id(0)
    i = tl.program_id(1)
    j = tl.program_id(2)
    if j >= i:
        rows_i = i * BT + tl.arange(0, BT)
        rows_j = j * BT + tl.arange(0, BT)
        mi = rows_i < T
        mj = rows_j < T
        id_i = tl.load(ids_ptr + b * sib + rows_i, mask=mi, other=-1)
        id_j = tl.load(ids_ptr + b * sib + rows_j, mask=mj, other=-1)
        same = (id_i[:, None] == id_j[None, :]) & (id_i[:, None] >= 0)
        gg = _gram_tile(g_ptr, sgb, sgt, b, rows_i, rows_j, mi, mj, D, BT, BK, ACC)
        part = tl.sum(tl.sum(tl.where(same, gg, 0.0), axis=1), axis=0)
        part = part * tl.where(j > i, 2.0, 1.0)
        tl.store(out_ptr + (b * NT + i) * NT + j, part)


@triton.jit
def _grad_logits_tile(l_ptr, slb, slt, b, rows, mrows, lse, tgt, w, rv, mv, ACC: tl.constexpr):
    """``w (onehot(y) - softmax)`` for one row tile and one vocab chunk, from logits and lse."""
    lg = tl.load(l_ptr + b * slb + rows[:, None] * slt + rv[None, :],
                 mask=mrows[:, None] & mv[None, :], other=float("-inf")).to(ACC)
    p = tl.exp(lg - lse[:, None])
    hit = ((rv[None, :] == tgt[:, None]) & mv[None, :]).to(p.dtype)
    return (hit - p) * w[:, None]


@triton.jit
def _lm_head_ghost_kernel(h_ptr, l_ptr, lse_ptr, tgt_ptr, w_ptr, out_ptr, T, D, V, NT,
                          shb, sht, slb, slt, ssb,
                          BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                          ACC: tl.constexpr):
    b = tl.program_id(0)
    i = tl.program_id(1)
    j = tl.program_id(2)
    if j >= i:
        rows_i = i * BT + tl.arange(0, BT)
        rows_j = j * BT + tl.arange(0, BT)
        mi = rows_i < T
        mj = rows_j < T
        gh = _gram_tile(h_ptr, shb, sht, b, rows_i, rows_j, mi, mj, D, BT, BK, ACC)
        lse_i = tl.load(lse_ptr + b * ssb + rows_i, mask=mi, other=0.0)
        lse_j = tl.load(lse_ptr + b * ssb + rows_j, mask=mj, other=0.0)
        y_i = tl.load(tgt_ptr + b * ssb + rows_i, mask=mi, other=-1)
        y_j = tl.load(tgt_ptr + b * ssb + rows_j, mask=mj, other=-1)
        w_i = tl.load(w_ptr + b * ssb + rows_i, mask=mi, other=0.0)
        w_j = tl.load(w_ptr + b * ssb + rows_j, mask=mj, other=0.0)
        gd = tl.zeros((BT, BT), dtype=ACC)
        for v0 in range(0, V, BV):
            rv = v0 + tl.arange(0, BV)
            mv = rv < V
            d_i = _grad_logits_tile(l_ptr, slb, slt, b, rows_i, mi, lse_i, y_i, w_i, rv, mv, ACC)
            d_j = _grad_logits_tile(l_ptr, slb, slt, b, rows_j, mj, lse_j, y_j, w_j, rv, mv, ACC)
            gd += tl.dot(d_i, tl.trans(d_j), input_precision="ieee", out_dtype=ACC)
        part = tl.sum(tl.sum(gh * gd, axis=1), axis=0)
        part = part * tl.where(j > i, 2.0, 1.0)
        tl.store(out_ptr + (b * NT + i) * NT + j, part)


def _acc_dtype(dtype: torch.dtype) -> tuple[torch.dtype, Any]:
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def linear_weight_ghost(inputs: torch.Tensor, grads: torch.Tensor,
                        block_t: int = BLOCK_T, block_k: int = BLOCK_K) -> torch.Tensor:
    """``sum_{t,s} (A A^T)_{ts} (G G^T)_{ts}`` per sequence; rows must already be masked."""
    B, T, din = inputs.shape
    dout = grads.shape[-1]
    tdtype, acc = _acc_dtype(torch.promote_types(inputs.dtype, grads.dtype))
    a = inputs.contiguous()   # native dtype: tiles are widened to the accumulator in-kernel
    g = grads.contiguous()
    nt = triton.cdiv(T, block_t)
    parts = torch.zeros(B, nt, nt, dtype=tdtype, device=a.device)
    _linear_ghost_kernel[(B, nt, nt)](a, g, parts, T, din, dout, nt,
                                      a.stride(0), a.stride(1), g.stride(0), g.stride(1),
                                      BT=block_t, BK=block_k, ACC=acc)
    return parts.sum((1, 2))


def embedding_ghost(token_ids: torch.Tensor, grads: torch.Tensor, mask: Optional[torch.Tensor],
                    vocab_start: int, vocab_end: Optional[int], group: Optional[Any],
                    block_t: int = BLOCK_T, block_k: int = BLOCK_K) -> torch.Tensor:
    """Triton version of :func:`kernels.reference.embedding_sq_norms`."""
    B, T, d = grads.shape
    tdtype, acc = _acc_dtype(grads.dtype)
    local = token_ids.long() - vocab_start
    keep = local >= 0
    if vocab_end is not None:
        keep &= local < (vocab_end - vocab_start)
    g = grads
    if mask is not None:
        keep &= mask != 0
        g = g * mask.to(g.dtype)[..., None]
    ids = torch.where(keep, local, torch.full_like(local, -1)).to(torch.int64).contiguous()
    g = g.contiguous()
    nt = triton.cdiv(T, block_t)
    parts = torch.zeros(B, nt, nt, dtype=tdtype, device=g.device)
    _embedding_ghost_kernel[(B, nt, nt)](ids, g, parts, T, d, nt, ids.stride(0),
                                         g.stride(0), g.stride(1),
                                         BT=block_t, BK=block_k, ACC=acc)
    return all_reduce_(parts.sum((1, 2)), group, "sum")


def lm_head_ghost(hidden: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                  logits: torch.Tensor, lse: Optional[torch.Tensor], vocab_start: int,
                  group: Optional[Any], block_t: int = BLOCK_T, block_k: int = BLOCK_K,
                  block_v: int = BLOCK_V) -> torch.Tensor:
    """Triton version of :func:`kernels.reference.lm_head_sq_norms` (from logits)."""
    B, T, d = hidden.shape
    V = logits.shape[-1]
    tdtype, acc = _acc_dtype(torch.promote_types(hidden.dtype, logits.dtype))
    if lse is None:
        lse = vocab_parallel_logsumexp(logits, group=group)
    h = hidden.contiguous()   # native dtype: no widened copy of the logits
    lg = logits.contiguous()
    lse = lse.to(tdtype).contiguous()
    tgt = (targets.long() - vocab_start).contiguous()
    w = mask.to(tdtype).contiguous()
    nt = triton.cdiv(T, block_t)
    parts = torch.zeros(B, nt, nt, dtype=tdtype, device=h.device)
    _lm_head_ghost_kernel[(B, nt, nt)](h, lg, lse, tgt, w, parts, T, d, V, nt,
                                       h.stride(0), h.stride(1), lg.stride(0), lg.stride(1),
                                       lse.stride(0),
                                       BT=block_t, BK=block_k, BV=block_v, ACC=acc)
    return all_reduce_(parts.sum((1, 2)), group, "sum")
