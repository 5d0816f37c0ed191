"""One entry point per norm, choosing the torch or the Triton implementation.

``backend``: ``"torch"`` (reference), ``"triton"``, or ``"auto"`` — Triton for CUDA tensors
when triton imports, torch otherwise (the CPU default). Cases a Triton kernel does not
cover (output layer given as a weight rather than logits, materialised linear gradients)
use the torch path under either backend.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import torch

from kernels import reference

BACKENDS = ("auto", "torch", "triton")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when ``kernels.triton_impl`` (and so triton) imports."""
    try:
        import kernels.triton_impl  # noqa: F401
    except Exception:  # ImportError, or triton failing to find a backend
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend actually used for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton" and not triton_available():
        raise RuntimeError("backend='triton' requested but triton is not importable")
    return backend


def _triton():
    import kernels.triton_impl as impl
    return impl


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
    chunk_size: int = reference.DEFAULT_VOCAB_CHUNK,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-sequence squared norm of the output-layer weight gradient of ``sum_t w_t log p(y_t)``.

    See :func:`kernels.reference.lm_head_sq_norms`; ``group`` is the tensor-parallel group
    over which the vocabulary is sharded.
    """
    if resolve_backend(backend, hidden.device) == "triton" and logits is not None:
        reference._check_3d("hidden", hidden)
        B, T, _ = hidden.shape
        reference._check_bt("targets", targets, B, T)
        reference._check_bt("mask", mask, B, T)
        return _triton().lm_head_ghost(hidden, targets, mask, logits, lse, vocab_start, group)
    return reference.lm_head_sq_norms(hidden, targets, mask, logits=logits, weight=weight,
                                      lse=lse, vocab_start=vocab_start, group=group,
                                      chunk_size=chunk_size)


def embedding_sq_norms(
    token_ids: torch.Tensor,
    grads: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    vocab_start: int = 0,
    vocab_end: Optional[int] = None,
    group: Optional[Any] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-sequence squared norm of the embedding-table gradient (equal ids interact).

    See :func:`kernels.reference.embedding_sq_norms`.
    """
    if resolve_backend(backend, grads.device) == "triton":
        reference._check_3d("grads", grads)
        B, T, _ = grads.shape
        reference._check_bt("token_ids", token_ids, B, T)
        if mask is not None:
            reference._check_bt("mask", mask, B, T)
        return _triton().embedding_ghost(token_ids, grads, mask, vocab_start, vocab_end, group)
    return reference.embedding_sq_norms(token_ids, grads, mask, vocab_start=vocab_start,
                                        vocab_end=vocab_end, group=group)


def linear_sq_norms(
    inputs: torch.Tensor,
    grads: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    method: str = "auto",
    backend: str = "auto",
    max_materialised: int = 1 << 24,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence ``(weight, bias)`` squared gradient norms of one linear layer.

    ``method="auto"`` picks ghost or materialised by :func:`kernels.choose_linear_method`;
    materialised gradients are formed for at most ``max_materialised`` numbers at a time.
    """
    if method == "auto":
        reference._check_3d("inputs", inputs)
        method = reference.choose_linear_method(inputs.shape[1], inputs.shape[-1], grads.shape[-1])
    if method == "ghost" and resolve_backend(backend, inputs.device) == "triton":
        reference._check_3d("inputs", inputs)
        reference._check_3d("grads", grads)
        B, T, _ = inputs.shape
        if grads.shape[:2] != (B, T):
            raise ValueError(f"grads must have shape ({B}, {T}, d_out), got {tuple(grads.shape)}")
        dtype = reference.compute_dtype(inputs, grads)
        a, g = inputs, grads  # native dtype; the kernel accumulates in fp32 (fp64 for fp64)
        if mask is not None:
            reference._check_bt("mask", mask, B, T)
            a, g = a * mask.to(a.dtype)[..., None], g * mask.to(g.dtype)[..., None]
        return _triton().linear_weight_ghost(a, g), g.sum(1, dtype=dtype).pow(2).sum(-1)
    return reference.linear_sq_norms(inputs, grads, mask, method=method,
                                     max_materialised=max_materialised)


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
    chunk_size: int = reference.DEFAULT_VOCAB_CHUNK,
    backend: str = "auto",
) -> torch.Tensor:
    """Cross term ``2 <E_b, O_b>`` of a table shared by embedding and output layer.

    Torch under every backend (it is a small part of the tied-weight norm); see
    :func:`kernels.reference.tied_cross_term`.
    """
    resolve_backend(backend, hidden.device)
    return reference.tied_cross_term(hidden, targets, mask, token_ids, emb_grads, logits=logits,
                                     weight=weight, lse=lse, token_mask=token_mask,
                                     vocab_start=vocab_start, group=group, chunk_size=chunk_size)
